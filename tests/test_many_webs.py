"""Many web processes, one deployment: separate ``tickpipe web`` processes on other ports (as on
other hosts behind a load balancer) and ``TICKPIPE_WEB_WORKERS`` processes on one port, all on
the same Redis and data directory. Real processes, real sockets; one gets SIGKILLed.

The per-key connection quota across web processes is in ``test_connection_quota.py``; the
dashboard's tile per web process in ``test_dashboard.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection

from server.wire import CloseCode
from tests.harness import WAIT_S, Stack, close_code, eventually, next_event, recv_events, send
from tickpipe import Client

SYMBOLS = ["AAPL", "MSFT", "NVDA"]


@contextlib.asynccontextmanager
async def subscribed(port: int, key: str, symbols: list[str]) -> AsyncIterator[ClientConnection]:
    """A raw WebSocket on the web process at ``port``, subscribed to ``symbols`` (both types)."""
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=WAIT_S,
        # A socket the test stopped reading has a backlog queued before the server's close
        # frame: closing it would take seconds each, and no test here is about the close.
        close_timeout=1,
    )
    try:
        await next_event(ws, "welcome")
        await send(ws, op="subscribe", id="s", symbols=symbols)
        await next_event(ws, "subscribed")
        yield ws
    finally:
        with contextlib.suppress(Exception):
            await ws.close()


async def ticks_for(ws: ClientConnection, seconds: float) -> dict[tuple[str, int], dict[str, Any]]:
    """Every tick the socket receives in ``seconds``, by (symbol, seq)."""
    got: dict[tuple[str, int], dict[str, Any]] = {}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(TimeoutError):
            for ev in await recv_events(ws, left):
                if ev["type"] in ("trade", "quote"):
                    assert (ev["sym"], ev["seq"]) not in got, f"seq delivered twice: {ev}"
                    got[(ev["sym"], ev["seq"])] = ev
    return got


def contiguous(ticks: dict[tuple[str, int], Any], sym: str) -> bool:
    seqs = sorted(seq for s, seq in ticks if s == sym)
    return bool(seqs) and seqs == list(range(seqs[0], seqs[-1] + 1))


async def web_parts(stack: Stack, port: int, admin: str) -> dict[str, dict[str, Any]]:
    """The web processes the status of the web process at ``port`` lists, by id."""
    async with stack.http() as h:
        r = await h.get(
            f"http://127.0.0.1:{port}/status", headers={"Authorization": f"Bearer {admin}"}
        )
    assert r.status_code == 200, r.text
    return {p["id"]: p for p in r.json()["services"] if p["kind"] == "web"}


def connections(parts: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        pid: p["figures"].get("connections", 0) for pid, p in parts.items() if p["state"] == "up"
    }


async def test_clients_on_two_web_processes_see_the_same_events_with_the_same_seq(
    own_stack: type[Stack],
) -> None:
    s = own_stack()
    other, port = s.other_web()
    key = s.key("twins")
    try:
        async with (
            subscribed(s.port, key, SYMBOLS) as a,
            subscribed(port, key, SYMBOLS) as b,
        ):
            got_a: dict[tuple[str, int], dict[str, Any]] = {}
            got_b: dict[tuple[str, int], dict[str, Any]] = {}

            def overlap(sym: str) -> int:
                return sum(1 for k in got_a.keys() & got_b.keys() if k[0] == sym)

            # until 20 events of each symbol came on both (3 s at full pace; a busy feed is slower)
            deadline = time.monotonic() + WAIT_S
            while min(map(overlap, SYMBOLS)) < 20 and time.monotonic() < deadline:
                more_a, more_b = await asyncio.gather(ticks_for(a, 1), ticks_for(b, 1))
                for got, more in ((got_a, more_a), (got_b, more_b)):
                    assert not got.keys() & more.keys(), "seq delivered twice"
                    got.update(more)
        both = got_a.keys() & got_b.keys()
        for sym in SYMBOLS:
            assert contiguous(got_a, sym) and contiguous(got_b, sym), f"{sym}: a seq gap"
            assert overlap(sym) >= 20, f"{sym}: too little overlap"
        differ = [k for k in both if got_a[k] != got_b[k]]
        assert not differ, f"same seq, different event: {got_a[differ[0]]} / {got_b[differ[0]]}"
    finally:
        other.stop()


async def test_revoking_a_key_closes_its_sockets_on_every_web_process(
    own_stack: type[Stack],
) -> None:
    s = own_stack(feed=False)
    other, port = s.other_web()
    key = s.key("revoked-everywhere")
    try:
        async with subscribed(s.port, key, ["AAPL"]) as a, subscribed(port, key, ["AAPL"]) as b:
            assert s.cli("keys", "revoke", "revoked-everywhere").returncode == 0
            (code_a, _), (code_b, _) = await asyncio.gather(close_code(a), close_code(b))
        assert code_a == code_b == CloseCode.KEY_REVOKED
    finally:
        other.stop()


async def test_status_on_each_web_process_lists_every_web_process_with_its_connections(
    own_stack: type[Stack],
) -> None:
    s = own_stack(feed=False)
    other, port = s.other_web()
    admin = s.key("ops", ("admin", "realtime"))
    key = s.key("agent")
    assert other.proc is not None
    try:
        async with contextlib.AsyncExitStack() as held:
            for p, n in ((s.port, 3), (port, 2)):
                for _ in range(n):
                    await held.enter_async_context(subscribed(p, key, ["AAPL"]))
            for asked in (s.port, port):
                conns = await eventually(
                    lambda asked=asked: web_parts(s, asked, admin),
                    lambda parts: sorted(connections(parts).values()) == [2, 3],
                    what=f"both web processes up with 3 and 2 connections (asked {asked})",
                )
                assert any(pid.endswith(f":{other.proc.pid}") for pid in conns)
    finally:
        other.stop()


async def test_web_workers_setting_runs_that_many_web_processes_on_one_port(
    own_stack: type[Stack],
) -> None:
    s = own_stack(feed=True, web_workers=2)
    admin = s.key("ops", ("admin", "realtime"))
    key = s.key("crowd")
    async with contextlib.AsyncExitStack() as held:
        socks = [
            await held.enter_async_context(subscribed(s.port, key, ["AAPL"])) for _ in range(12)
        ]
        # Every worker reports, and together they hold every connection, whichever took which.
        parts = await eventually(
            lambda: web_parts(s, s.port, admin),
            lambda parts: len(parts) == 2 and sum(connections(parts).values()) == 12,
            what="two web workers up holding the 12 connections together",
        )
        assert all(p["figures"]["port"] == s.port for p in parts.values())
        for ws in socks:  # and each one streams
            await next_event(ws, "trade", sym="AAPL")


async def test_killed_web_process_its_client_resumes_on_the_other_without_loss(
    own_stack: type[Stack],
) -> None:
    """SIGKILL the web process a ``Client`` given both URLs streams from: it reconnects to the
    other one and resumes by seq, nothing lost or doubled; checked against Redis' own copy."""
    s = own_stack(feed_rate=1000)
    other, port = s.other_web()
    key = s.key("survivor")
    admin = s.key("ops", ("admin", "realtime"))
    urls = [s.base, f"http://127.0.0.1:{port}"]
    got: list[tuple[float, int, dict[str, Any]]] = []  # monotonic, wall ns, tick
    try:
        async with Client(urls, key) as c:
            sub = c.subscribe(SYMBOLS)

            async def consume() -> None:
                async for tick in sub:
                    got.append((time.monotonic(), time.time_ns(), tick))

            task = asyncio.create_task(consume())
            try:
                await eventually(lambda: len(got), lambda n: n >= 500, what="ticks before")
                assert s.web.proc is not None
                killed_pid = s.web.proc.pid
                s.web.stop(signal.SIGKILL)
                killed_at, n_before = time.monotonic(), len(got)
                await eventually(
                    lambda: len(got), lambda n: n >= n_before + 1000, what="ticks after"
                )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert c.url == urls[1], "the client moved to the live web process"
        assert sub.losses == [], f"losses reported: {sub.losses}"
        assert sub.reconnects >= 1
        after = [(t, wall) for t, wall, _ in got if t > killed_at]
        stored = await redis_copy(s, set(SYMBOLS))
        for sym in SYMBOLS:
            seqs = [tick["seq"] for _, _, tick in got if tick["sym"] == sym]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{sym}: lost or doubled"
            for _, _, tick in got:
                if tick["sym"] == sym:  # a resumed event also names its epoch
                    tick = {k: v for k, v in tick.items() if k != "epoch"}
                    assert tick == stored[(sym, tick["seq"])], "not the event Redis holds"
        # The killed one is down on the survivor's status within its heartbeat's life.
        killed_id = f"web:{socket.gethostname()}:{killed_pid}"
        parts = await eventually(
            lambda: web_parts(s, port, admin),
            lambda parts: parts.get(killed_id, {}).get("state") == "down",
            what="the killed web process shown down",
        )
        gap_ms = 1000 * (after[0][0] - killed_at)
        # Ticks stamped before the first one after the kill arrived: published while the client
        # had no connection, delivered by the resume.
        backlog = sum(1 for t, _, tick in got if t > killed_at and tick["ts"] <= after[0][1])
        print(
            f"\nweb SIGKILL: client resumed on the other web process {gap_ms:.0f} ms after the "
            f"kill ({sub.reconnects} reconnect); {len(got)} ticks over {len(SYMBOLS)} symbols, "
            f"0 lost, 0 doubled; {backlog} published while it had no connection came with the "
            "resume; "
            f"status shows {len(parts)} web processes, the killed one down"
        )
    finally:
        other.stop()


async def redis_copy(s: Stack, symbols: set[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The recent events Redis keeps per symbol (``tp:hist:S``), by (symbol, seq)."""
    r = aioredis.Redis.from_url(s.redis.url)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for sym in symbols:
            for _, fields in await r.xrange(f"tp:hist:{sym}"):
                for ev in orjson.loads(b"[" + fields[b"d"] + b"]"):
                    out[(ev["sym"], ev["seq"])] = ev
    finally:
        await r.aclose()
    return out


def test_client_without_any_url_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one tickpipe web process"):
        Client([], "tp_key")
