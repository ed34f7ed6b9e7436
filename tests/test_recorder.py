"""The recorder stores every published tick exactly once, even when killed at any moment."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import duckdb
import httpx
import pytest
import redis

from server.history.store import scan
from tests.harness import TLS, WAIT_S, Stack, eventually, eventually_sync


def published(stack: Stack) -> dict[str, tuple[int, int]]:
    """(epoch, last seq) per symbol, as Redis assigned them."""
    r = redis.Redis.from_url(stack.redis.url)
    try:
        out = {}
        for key in r.scan_iter("tp:sym:*"):
            epoch, seq = r.hmget(key, "epoch", "seq")
            out[key.decode().split(":", 2)[2]] = (int(epoch), int(seq))
        return out
    finally:
        r.close()


def wait_recorded(stack: Stack, expected: int, timeout: float = WAIT_S) -> int:
    n: int = eventually_sync(lambda: count_stored(stack), lambda n: n >= expected, timeout, 0.3,
                             f"{expected} ticks stored")  # fmt: skip
    return n


def stored_files(stack: Stack) -> list[str]:
    """The files a reader reads (files merged into a compacted one are not among them)."""
    return [str(f.path) for f in scan(stack.data_dir / "history").files]


def count_stored(stack: Stack) -> int:
    files = stored_files(stack)
    if not files:
        return 0
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT count(*) FROM read_parquet({files})").fetchone()[0]
    finally:
        con.close()


def check_exactly_once(stack: Stack) -> None:
    pub = published(stack)
    total = sum(seq for _e, seq in pub.values())
    assert wait_recorded(stack, total) == total
    con = duckdb.connect()
    rows = con.execute(
        f"""
        SELECT sym, epoch, count(*) AS n, count(DISTINCT seq) AS distinct_seq,
               min(seq) AS lo, max(seq) AS hi
        FROM read_parquet({stored_files(stack)})
        GROUP BY sym, epoch
        """
    ).fetchall()
    con.close()
    assert {r[0] for r in rows} == set(pub)
    for sym, epoch, n, distinct_seq, lo, hi in rows:
        assert (epoch, hi) == pub[sym], sym
        assert n == distinct_seq, f"{sym}: {n - distinct_seq} duplicates"
        assert (lo, hi - lo + 1) == (1, n), f"{sym}: gaps in 1..{hi}"


def test_every_published_tick_is_stored_once_with_its_fields(own_stack) -> None:
    s: Stack = own_stack(recorder=True, feed_rate=1000, recorder_flush_s=0.2)
    time.sleep(2)
    s.feed.stop()
    check_exactly_once(s)
    con = duckdb.connect()
    glob = str(s.data_dir / "history" / "date=*" / "*.parquet")
    rows = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()
    types = {r[0]: r[1] for r in rows}
    assert types["ts"] == "TIMESTAMPTZ_NS", "timestamps keep ns precision and UTC"
    trade = con.execute(
        f"SELECT price, size, bid FROM read_parquet('{glob}') WHERE type = 'trade' LIMIT 1"
    ).fetchone()
    con.close()
    assert trade[0] > 0 and trade[1] > 0 and trade[2] is None


@pytest.mark.slow
def test_recorder_killed_repeatedly_under_load_loses_and_doubles_nothing(own_stack) -> None:
    # Compaction runs twice a second too, so some kills land in the middle of a merge.
    s: Stack = own_stack(
        recorder=True, feed_rate=3000, recorder_flush_s=0.1, recorder_batch=50,
        compact_every_s=0.5, compact_min_files=3, compact_grace_s=5,
    )  # fmt: skip
    rng = random.Random(5)
    for _ in range(8):
        time.sleep(rng.uniform(0.2, 1.0))
        s.recorder.stop(signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 0.5))
        s.recorder.start()
    time.sleep(1)
    s.feed.stop()
    check_exactly_once(s)


async def test_entries_stored_but_not_yet_acknowledged_are_not_stored_again(tmp_path) -> None:
    """The crash window between renaming a file into place and XACK, made to happen."""
    from redis.asyncio import Redis

    from server.config import Settings
    from server.history.recorder import Recorder
    from server.history.store import write_file
    from server.history.tail import entries_to_frame
    from server.live.bus import Bus
    from server.ticks import Trade
    from tests.harness import RedisProcess

    proc = RedisProcess(tmp_path)
    proc.start()
    settings = Settings(redis_url=proc.url, data_dir=tmp_path / "data")
    r = Redis.from_url(proc.url)
    bus = Bus(r)
    t0 = 1_790_000_000_000_000_000
    first = Recorder(settings)
    await first._ensure_group()
    for i in range(20):
        await bus.publish([Trade("AAPL", t0 + i, 100.0, 1.0), Trade("MSFT", t0 + i, 50.0, 2.0)])
    entries = await first._read(pending=False)
    assert len(entries) == 20
    # The first recorder stores the batch and dies before acknowledging it.
    write_file(
        first.root, entries_to_frame(entries), entries[0][0].decode(), entries[-1][0].decode()
    )
    await first.redis.aclose()
    # A new recorder gets the same entries again as pending (in smaller reads, so its files
    # would not line up with the stored one), and must not store them twice.
    second = Recorder(settings.model_copy(update={"recorder_batch": 7}))
    seen = []
    while again := await second._read(pending=True):
        seen.extend(e[0] for e in again)
        await second.flush(again)
    assert seen == [e[0] for e in entries]
    assert await second.redis.xpending(settings_log_key(), "recorder") == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip
    await second.redis.aclose()
    glob = str(tmp_path / "data" / "history" / "date=*" / "*.parquet")
    con = duckdb.connect()
    n, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT (sym, seq)) FROM read_parquet('{glob}')"
    ).fetchone()
    con.close()
    assert (n, distinct) == (40, 40)
    await r.aclose()
    proc.kill()


async def test_a_batch_retried_on_a_promoted_replica_that_never_got_it_is_stored_once(
    tmp_path,
) -> None:
    """A master applies a batch and dies before replying; its replica, cut off just before,
    never got it. The recorder stored the batch from the master's log; the feed retries it on
    the promoted replica under the same seqs (its floor), which puts it in that log again under
    a new entry id. A recorder started afresh on the new master stores it once, and what comes
    after it as usual."""
    from redis.asyncio import Redis

    from server.config import Settings
    from server.history.recorder import Recorder
    from server.live.bus import Bus
    from server.ticks import Trade
    from tests.harness import RedisProcess

    t0 = 1_790_000_000_000_000_000
    master, replica = RedisProcess(tmp_path), RedisProcess(tmp_path)
    master.start()
    replica.start()
    m = Redis.from_url(master.url, socket_timeout=60)
    r = Redis.from_url(replica.url, socket_timeout=60)
    data = tmp_path / "data"

    def trades(lo: int, hi: int) -> list[Trade]:
        return [Trade("AAPL", t0 + i, 100.0 + i, 1.0) for i in range(lo, hi)]

    try:
        await r.replicaof("127.0.0.1", master.port)
        await eventually(
            lambda: r.info("replication"), lambda i: i.get("master_link_status") == "up",
            timeout=60, what="the replica in sync with its master",
        )  # fmt: skip
        first = Recorder(Settings(redis_url=master.url, data_dir=data))
        await first._ensure_group()
        feed = Bus(m, publisher="sim")
        await feed.publish_group(trades(0, 3), batch="b1")
        assert await m.wait(1, 30_000) == 1, "the replica has the first batch"
        await r.replicaof("NO", "ONE")  # cut off, then promoted: it never gets the second
        await feed.publish_group(trades(3, 6), batch="b2")  # applied; its reply "lost"
        await first.flush(await first._read(pending=False))
        await first.redis.aclose()

        retry = Bus(r, publisher="sim")
        retry._assigned = {"AAPL": (await Bus(r).seq_states(["AAPL"]))["AAPL"]}  # the floor
        states = await retry.publish_group(trades(3, 6), batch="b2")
        assert states["AAPL"].seq == 6, "the same seqs again"
        await retry.publish_group(trades(6, 8), batch="b3")

        second = Recorder(Settings(redis_url=replica.url, data_dir=data))
        while entries := await second._read(pending=False):
            await second.flush(entries)
        await second.redis.aclose()
        assert second.repeats_dropped == 3
        glob = str(data / "history" / "date=*" / "*.parquet")
        con = duckdb.connect()
        seqs = [x for (x,) in con.execute(f"SELECT seq FROM '{glob}' ORDER BY seq").fetchall()]
        con.close()
        assert seqs == list(range(1, 9))
    finally:
        await m.aclose()
        await r.aclose()
        master.kill()
        replica.kill()


async def test_a_failover_in_the_middle_of_a_flush_stores_each_tick_once(tmp_path) -> None:
    """The recorder's unwritten batch holds entries read from the old master when the promoted
    replica's consumer group (behind) hands them out again, and the feed's retry of the last one
    under the same seqs and a new entry id: one flush gets all of them and stores each tick
    once."""
    from redis.asyncio import Redis

    from server.config import Settings
    from server.history.recorder import Recorder
    from server.live.bus import LOG_KEY, Bus
    from server.ticks import Trade
    from tests.harness import RedisProcess

    t0 = 1_790_000_000_000_000_000
    proc = RedisProcess(tmp_path)
    proc.start()
    r = Redis.from_url(proc.url)
    try:
        recorder = Recorder(Settings(redis_url=proc.url, data_dir=tmp_path / "data"))
        await recorder._ensure_group()
        bus = Bus(r)
        for lo in (0, 3):
            await bus.publish([Trade("AAPL", t0 + i, 100.0 + i, 1.0) for i in range(lo, lo + 3)])
        first, second = await recorder._read(pending=False)
        retry_id = await r.xadd(LOG_KEY, second[1])  # the retry, as the new master logs it
        retried = (retry_id, second[1])
        await recorder.flush([first, second, first, second, retried])
        await recorder.redis.aclose()
        assert recorder.repeats_dropped == 3
        glob = str(tmp_path / "data" / "history" / "date=*" / "*.parquet")
        con = duckdb.connect()
        seqs = [x for (x,) in con.execute(f"SELECT seq FROM '{glob}' ORDER BY seq").fetchall()]
        con.close()
        assert seqs == [1, 2, 3, 4, 5, 6]
    finally:
        await r.aclose()
        proc.kill()


def test_a_corrupt_stored_file_does_not_keep_the_recorder_from_starting(tmp_path) -> None:
    """On start the recorder reads the seqs of the latest files; one it cannot read is passed
    over (history queries report it as corrupt), and the others still count."""
    from server.config import Settings
    from server.history.recorder import Recorder
    from tests.harness import corrupt_history_file, write_history
    from tests.test_gaps import HAND_ROWS

    data = tmp_path / "data"
    write_history(data / "history", HAND_ROWS, "5-0", "5-9")
    corrupt_history_file(data / "history")
    recorder = Recorder(Settings(redis_url="redis://127.0.0.1:1/0", data_dir=data))
    assert recorder.stored_seqs == {"AAPL": (1, 20), "MSFT": (2, 5)}  # OLD: imported, epoch < 0


def settings_log_key() -> str:
    from server.live.bus import LOG_KEY

    return LOG_KEY


def _recorder_state(stack: Stack) -> dict[str, str]:
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        return r.hgetall("tp:recorder")
    finally:
        r.close()


def _wait_state(stack: Stack, state: str, timeout: float = WAIT_S) -> dict[str, str]:
    got: dict[str, str] = eventually_sync(
        lambda: _recorder_state(stack), lambda got: got.get("state") == state, timeout, 0.2,
        f"the recorder reporting {state}",
    )  # fmt: skip
    return got


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_stops_acknowledging_and_loses_nothing(tmp_path) -> None:
    """History on a 192 KiB tmpfs: a real ENOSPC while flushing. The recorder keeps running,
    acknowledges nothing it could not write, history up to now still answers from the log, and
    once space is freed the backlog is stored exactly once."""
    s = Stack(tmp_path, recorder=True, feed_rate=2000, recorder_flush_s=0.2)
    history = s.data_dir / "history"
    history.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(history)], check=True)
    try:
        s.start()
        failed = _wait_state(s, "write_failed")
        assert failed["error"].startswith("disk full: "), failed
        assert s.recorder.proc.poll() is None, "the recorder must not exit on a full disk"
        time.sleep(1.5)
        r = redis.Redis.from_url(s.redis.url)
        pending = r.xpending("tp:log", "recorder")["pending"]
        r.close()
        assert pending > 0 or int(_recorder_state(s)["lag_batches"]) > 0
        assert not list(history.glob("date=*/.*.tmp")), "a failed write left a partial file"
        admin = s.key("ops", ("admin",))

        def recorder_part() -> dict:
            status = httpx.get(
                f"{s.base}/status",
                headers={"Authorization": f"Bearer {admin}"},
                timeout=WAIT_S,
                verify=TLS,
            )
            return next(p for p in status.json()["services"] if p["id"] == "recorder")

        # the board's next round (every second; later on a busy machine) sees the heartbeat
        rec = eventually_sync(recorder_part, lambda rec: rec["state"] == "down", what="down")
        assert rec["state"] == "down" and "disk full" in rec["reason"], rec
        # "Free disk space": grow the filesystem under the running recorder.
        subprocess.run(["mount", "-o", "remount,size=64m", str(history)], check=True)
        _wait_state(s, "ok")
        s.feed.stop()
        check_exactly_once(s)
        assert "cannot write history" in s.recorder.output()
    finally:
        s.stop()
        subprocess.run(["umount", "-l", str(history)], check=False)


def test_log_entries_parse_whatever_the_spacing_and_string_contents() -> None:
    from server.history.tail import entries_to_frame

    trade = b'{"type":"trade","sym":"A","seq":1,"ts":10,"price":1.0,"size":2.0}'
    # A venue that looks like the publish script's join between two events.
    quote = (
        b'{"type":"quote","sym":"B","seq":1,"ts":11,"bid":1.0,"ask":2.0,'
        b'"venue":"x},{\\"type\\":\\""}'
    )
    status = b'{"type":"status","code":"epoch_changed","sym":"A","epoch":5,"message":"m"}'
    entries = [
        (b"1-0", {b"e": b"A=5,B=6", b"d": trade + b"," + quote}),
        (b"2-0", {}),  # trimmed before it was stored: left out
        (b"3-0", {b"e": b"A=7,B=6", b"d": status + b", " + trade.replace(b"1,", b"2,", 1)}),
    ]
    frame = entries_to_frame(entries)
    assert frame.select("sym", "type", "epoch", "seq", "venue").rows() == [
        ("A", "trade", 5, 1, None),
        ("B", "quote", 6, 1, 'x},{"type":"'),
        ("A", "trade", 7, 2, None),
    ]
