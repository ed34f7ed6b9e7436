"""The recorder stores every published tick exactly once, even when killed at any moment."""

from __future__ import annotations

import random
import signal
import time

import duckdb
import redis

from tests.harness import Stack


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


def wait_recorded(stack: Stack, expected: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = count_stored(stack)
        if n >= expected:
            return n
        time.sleep(0.3)
    return n


def count_stored(stack: Stack) -> int:
    files = list((stack.data_dir / "history").glob("date=*/*.parquet"))
    if not files:
        return 0
    con = duckdb.connect()
    try:
        return con.execute(
            f"SELECT count(*) FROM read_parquet({[str(f) for f in files]})"
        ).fetchone()[0]
    finally:
        con.close()


def check_exactly_once(stack: Stack) -> None:
    pub = published(stack)
    total = sum(seq for _e, seq in pub.values())
    assert wait_recorded(stack, total) == total
    con = duckdb.connect()
    glob = str(stack.data_dir / "history" / "date=*" / "*.parquet")
    rows = con.execute(
        f"""
        SELECT sym, epoch, count(*) AS n, count(DISTINCT seq) AS distinct_seq,
               min(seq) AS lo, max(seq) AS hi
        FROM read_parquet('{glob}', hive_partitioning = true)
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


def test_recorder_killed_repeatedly_under_load_loses_and_doubles_nothing(own_stack) -> None:
    s: Stack = own_stack(recorder=True, feed_rate=3000, recorder_flush_s=0.1, recorder_batch=50)
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

    from server.bus import Bus
    from server.config import Settings
    from server.recorder import Recorder, entries_to_frame, write_file
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


def settings_log_key() -> str:
    from server.bus import LOG_KEY

    return LOG_KEY


def test_log_entries_parse_whatever_the_spacing_and_string_contents() -> None:
    from server.recorder import entries_to_frame

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
