"""The Python client (``tickpipe``) and the examples against a real server, feed and recorder."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import polars as pl
import pytest
import redis

from tests.harness import ROOT, Stack, write_history
from tests.test_replay import END, ROWS, SYMS, T0
from tickpipe import Client, SyncClient


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


def _run_example(stack: Stack, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args, "--url", stack.base, "--key", _key(stack)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


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
