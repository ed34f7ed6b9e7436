"""The Python client (``tickpipe``) and the examples against a real server, feed and recorder."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import polars as pl
import pytest
import redis

from examples.backtest_replay import SETTLE_S
from tests.harness import ROOT, Stack, eventually, recorded_for, write_history
from tests.test_replay import END, ROWS, SYMS, T0
from tickpipe import Client, Loss, SyncClient


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Feed, recorder and web, plus the hand-written history of test_replay on its own day."""
    s = Stack(tmp_path_factory.mktemp("client"), recorder=True, recorder_flush_s=0.2)
    write_history(s.data_dir / "history", ROWS, "1-0", "1-9")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _key(stack: Stack) -> str:
    return stack.key(f"c{time.monotonic_ns()}", ["realtime", "historical", "replay"])


def assert_gap_free(ticks: list[dict]) -> None:
    """Per symbol, every tick is the one after the previous: nothing lost, nothing repeated."""
    last: dict[str, int] = {}
    for t in ticks:
        if t["sym"] in last:
            assert t["seq"] == last[t["sym"]] + 1, f"gap or duplicate at {t}"
        last[t["sym"]] = t["seq"]


def _restart_web(stack: Stack) -> None:
    stack.web.stop(signal.SIGKILL)
    stack.start_web()


async def test_subscribe_is_gap_free_across_a_killed_web_process(full: Stack) -> None:
    seen: list[dict] = []
    async with Client(full.base, _key(full)) as c:
        async for tick in c.subscribe(["AAPL", "MSFT"]):
            seen.append(tick)
            if len(seen) == 40:
                await asyncio.to_thread(_restart_web, full)
            if len(seen) >= 200:
                break
    assert_gap_free(seen)


def _drop_pubsub(stack: Stack) -> int:
    """Make Redis drop every pub/sub connection (as it does to one over its output buffer
    limit): the web process misses what is published until its hub reconnects."""
    r = redis.Redis.from_url(stack.redis.url)
    try:
        return r.client_kill_filter(_type="pubsub")
    finally:
        r.close()


async def test_subscribe_recovers_the_ticks_redis_pubsub_dropped(full: Stack) -> None:
    seen: list[dict] = []
    async with Client(full.base, _key(full)) as c:
        async for tick in c.subscribe(["AAPL", "MSFT"]):
            seen.append(tick)
            if len(seen) == 40:
                assert await asyncio.to_thread(_drop_pubsub, full) >= 1
            if len(seen) >= 200:
                break
    assert "pub/sub connection unavailable" in full.web.output()  # the drop did happen
    assert_gap_free(seen)


def _restart_redis_empty(stack: Stack) -> None:
    """SIGKILL Redis and start it again with nothing in it (no persistence): every symbol's
    sequence restarts at seq 1 in a new epoch."""
    stack.redis.kill()
    time.sleep(1.0)
    stack.redis.start()


async def test_subscribe_goes_on_in_the_new_epoch_after_redis_restarts_empty(
    tmp_path: Path,
) -> None:
    """The iterator does not raise: it reports the loss (``on_loss`` and ``losses``, before
    the next tick of that symbol) and continues with the new epoch from its first seq."""
    s = Stack(tmp_path).start()
    syms = ["AAPL", "MSFT"]
    reported: list[Loss] = []
    old: dict[str, list[int]] = {x: [] for x in syms}
    new: dict[str, list[int]] = {x: [] for x in syms}
    restarted = False
    try:
        async with Client(s.base, s.key("agent", ["realtime"])) as c:
            sub = c.subscribe(syms, on_loss=reported.append)
            async for tick in sub:
                lost = any(loss.sym == tick["sym"] for loss in reported)
                (new if lost else old)[tick["sym"]].append(tick["seq"])
                # some of each symbol first: a busy feed can send 40 of one before the other
                if not restarted and min(len(v) for v in old.values()) >= 20:
                    restarted = True
                    before = dict(sub.epochs)
                    await asyncio.to_thread(_restart_redis_empty, s)
                if min(len(v) for v in new.values()) >= 30:
                    break
        assert s.web.proc.poll() is None and s.feed.proc.poll() is None
    finally:
        s.stop()
    assert sub.losses == reported
    assert sorted(loss.sym for loss in reported) == syms  # one loss per symbol
    for loss in reported:
        assert loss.reason == "epoch_changed" and loss.epoch == before[loss.sym]
        assert loss.next_epoch == sub.epochs[loss.sym] != loss.epoch
        assert loss.from_seq == old[loss.sym][-1] + 1 and loss.to_seq is None
    for x in syms:
        assert old[x] == list(range(old[x][0], old[x][0] + len(old[x])))
        assert new[x] == list(range(1, len(new[x]) + 1))  # the whole new epoch, in order


async def test_subscribe_waits_for_symbols_the_feed_has_not_published_since_redis_restarted_empty(
    tmp_path: Path,
) -> None:
    """Redis restarts empty and the feed comes back publishing AAPL only: the server answers
    the resume of MSFT with ``unknown_symbol`` (nothing publishes it now). For a symbol the
    stream had, that passes: AAPL streams on in its new epoch while MSFT is asked for again,
    and when MSFT is published again its loss is reported and it goes on, nothing raised."""
    s = Stack(tmp_path).start()
    both = s.feed.env
    reported: list[Loss] = []
    seen: list[dict] = []
    at: dict[str, int] = {}  # how many ticks had been seen when each symbol's loss came
    counts = {"AAPL": 0, "MSFT": 0}
    restarted = False

    def lost(loss: Loss) -> None:
        reported.append(loss)
        at[loss.sym] = len(seen)

    def redis_back_empty_with_aapl_only() -> None:
        s.feed.stop()
        _restart_redis_empty(s)
        s.feed.env = {**both, "TICKPIPE_SYMBOLS": "AAPL"}
        s.feed.start()

    def msft_back() -> None:
        s.feed.stop()
        s.feed.env = both
        s.feed.start()

    try:
        async with Client(s.base, s.key("agent", ["realtime"])) as c:
            sub = c.subscribe(["AAPL", "MSFT"], on_loss=lost)
            async for tick in sub:
                seen.append(tick)
                counts[tick["sym"]] += 1
                if not restarted and min(counts.values()) >= 20:  # both symbols streamed
                    restarted = True
                    await asyncio.to_thread(redis_back_empty_with_aapl_only)
                if "AAPL" in at and len(seen) == at["AAPL"] + 30:
                    aapl_only = {t["sym"] for t in seen[at["AAPL"] :]}
                    await asyncio.to_thread(msft_back)
                if "MSFT" in at and sum(t["sym"] == "MSFT" for t in seen[at["MSFT"] :]) >= 10:
                    break  # MSFT's new epoch may arrive after many AAPL ticks on a busy machine
    finally:
        s.stop()
    assert aapl_only == {"AAPL"}  # AAPL streamed in its new epoch while MSFT was unknown
    assert [loss.sym for loss in reported] == ["AAPL", "MSFT"]
    assert all(loss.reason == "epoch_changed" for loss in reported)
    for sym in ("AAPL", "MSFT"):
        after = [t["seq"] for t in seen[at[sym] :] if t["sym"] == sym]
        assert after and after == list(range(1, len(after) + 1))  # the new epoch from seq 1


def _forgot_after(stack: Stack, sym: str, seq: int) -> Callable[[], bool]:
    """A probe: True once Redis keeps neither in ``sym``'s recent events nor in the tickerplant
    log the event after ``seq`` (the log must have dropped every batch it had when a later
    event of ``sym`` had been published)."""
    r = redis.Redis.from_url(stack.redis.url)
    mark: list[tuple[int, int]] = []  # the log's last batch once a later event is published

    def ident(raw: bytes) -> tuple[int, int]:
        ms, n = raw.split(b"-")
        return int(ms), int(n)

    def probe() -> bool:
        if not mark:
            if int(r.hget(f"tp:sym:{sym}", "seq") or 0) <= seq + 1:
                return False
            mark.append(ident(r.xrevrange("tp:log", count=1)[0][0]))
        log = r.xrange("tp:log", count=1)
        hist = r.xrange(f"tp:hist:{sym}", count=1)
        if not log or not hist or ident(log[0][0]) <= mark[0]:
            return False
        first = orjson.loads(b"[" + hist[0][1][b"d"] + b"]")[0]["seq"]
        if first > seq + 1:
            r.close()
            return True
        return False

    return probe


@pytest.mark.slow
@pytest.mark.timeout(300)  # the feed must publish 1,000 batches meanwhile: slower on a busy machine
async def test_subscribe_reports_events_no_longer_kept_and_goes_on(tmp_path: Path) -> None:
    """No recorder, about 100 recent events per symbol in Redis and 1,000 batches (10 s) in the
    tickerplant log: after the web process was down until they are gone from Redis (about 10 s). The
    stream reports exactly which and goes on from the first event still kept."""
    s = Stack(tmp_path, history_per_symbol=100, log_max_batches=1000, feed_batch_ms=10).start()
    reported: list[tuple[int, Loss]] = []  # (ticks seen when it was reported, the loss)
    seen: list[int] = []
    try:
        async with Client(s.base, s.key("away", ["realtime"])) as c:
            on_loss = lambda loss: reported.append((len(seen), loss))  # noqa: E731
            async for tick in c.subscribe(["AAPL"], on_loss=on_loss):
                seen.append(tick["seq"])
                if len(seen) == 20:
                    s.web.stop(signal.SIGKILL)
                    # down until Redis no longer keeps what came next: about 10 s at full pace,
                    # longer when a busy machine slows the feed (a fixed 14 s could fall short)
                    await eventually(
                        _forgot_after(s, "AAPL", seen[-1]), timeout=120, every=0.5,
                        what="the events after the last one seen gone from Redis",
                    )  # fmt: skip
                    await asyncio.to_thread(s.start_web)
                if reported and len(seen) > reported[0][0] + 40:
                    break
    finally:
        s.stop()
    ((at, loss),) = reported
    assert loss.reason == "too_old" and loss.sym == "AAPL" and loss.epoch == loss.next_epoch
    assert loss.from_seq == seen[at - 1] + 1 and loss.missing > 0
    assert seen[at] == loss.to_seq + 1  # the first event still kept comes next
    before, after = seen[:at], seen[at:]
    assert before == list(range(before[0], before[0] + len(before)))
    assert after == list(range(after[0], after[0] + len(after)))


async def test_replay_resumes_after_a_killed_web_process_to_an_identical_fingerprint(
    full: Stack,
) -> None:
    async with Client(full.base, _key(full)) as c:
        replay = c.replay(SYMS, T0, END, speed=5)  # 20 s of market time: about 4 s
        n = 0
        async for _tick in replay:
            n += 1
            if n == 200:
                await asyncio.to_thread(_restart_web, full)
        rest = await c.fingerprint(SYMS, T0, END)
    assert replay.reconnects >= 1
    assert replay.count == n == len(ROWS) == rest["count"]
    assert replay.fingerprint == rest["fingerprint"]
    assert [(g["sym"], g["from_seq"]) for g in replay.gaps] == [("CCC", 50)]


async def test_replay_pause_and_resume_from_the_client(full: Stack) -> None:
    async with Client(full.base, _key(full)) as c:
        replay = c.replay(["AAA"], T0, END, speed=20)
        stamps = []
        async for tick in replay:
            stamps.append((time.monotonic(), tick["ts"]))
            if len(stamps) == 20:
                await replay.pause()
                await asyncio.sleep(1.0)
                await replay.resume()
    waits = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    assert max(waits) >= 0.8  # the pause held the stream
    assert len(stamps) == sum(r[0] == "AAA" for r in ROWS)


async def test_history_returns_a_polars_frame_and_latest_the_last_ticks(full: Stack) -> None:
    async with Client(full.base, _key(full)) as c:
        frame = await c.history(SYMS, T0, END)
        latest = await c.latest(["AAPL"])
    assert isinstance(frame, pl.DataFrame) and frame.height == len(ROWS)
    assert frame["sym"].unique().sort().to_list() == SYMS
    assert latest["AAPL"]["seq"] > 0 and latest["AAPL"]["trade"]["sym"] == "AAPL"


def test_sync_client_for_notebooks(full: Stack) -> None:
    with SyncClient(full.base, _key(full)) as c:
        frame = c.history(["AAA"], T0, END, types=["trade"])
        replay, ticks = c.replay(["AAA"], T0, END, types=["trade"])
        got = list(ticks)
        assert c.fingerprint(["AAA"], T0, END, types=["trade"])["fingerprint"] == replay.fingerprint
    assert len(got) == frame.height > 0


def _example(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args, "--url", stack.base, "--key", _key(stack)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,  # an example imports Polars: slow to start on a loaded machine
    )


def _run_example(stack: Stack, *args: str) -> str:
    out = _example(stack, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
async def test_backtest_replays_a_recorded_range_by_default_and_matches(full: Stack) -> None:
    await recorded_for(full, SETTLE_S + 3)
    out = await asyncio.to_thread(_example, full, "examples/backtest_replay.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "MATCH"
    replayed = int(out.stdout.split("replayed ")[1].split()[0])
    assert replayed > 0


@pytest.mark.slow
async def test_backtest_exits_non_zero_on_mismatch_and_says_why(full: Stack) -> None:
    assert full.recorder is not None
    full.recorder.stop()  # ticks keep coming; the store stops growing
    try:
        await asyncio.sleep(SETTLE_S + 3)  # the default range now ends after the recorder stopped
        out = await asyncio.to_thread(_example, full, "examples/backtest_replay.py")
    finally:
        full.recorder.start()
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stdout.splitlines()[-1]
    assert last.startswith("MISMATCH: the server counts") and "not recorded yet" in last, last


@pytest.mark.slow
def test_examples_run_against_a_real_server(full: Stack) -> None:
    agent = _run_example(
        full, "examples/ma_cross_agent.py", "--symbol", "AAPL", "--trades", "40", "--fast", "3",
        "--slow", "8",
    )  # fmt: skip
    *signals, last = agent.splitlines()
    assert last == "done: 40 trades of AAPL"
    assert all(line.split()[:2] in (["BUY", "AAPL"], ["SELL", "AAPL"]) for line in signals)
    day = "2026-03-02"
    backtest = _run_example(
        full, "examples/backtest_replay.py", "--symbols", ",".join(SYMS), "--day", day
    )
    assert f"replayed {len(ROWS)} ticks" in backtest and "MATCH" in backtest.splitlines()[-1]
