"""The per-key connection quota across web processes, with real web processes that get killed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import websockets
from websockets.asyncio.client import ClientConnection

from server.wire import CloseCode
from tests.harness import WAIT_S, close_code, eventually, next_event, wait_port

LIMIT = 100
# A killed process's heartbeat hash lives 3 s; its slots must be free soon after, far sooner
# than the 60 s expiry that used to lock the key out: within 45 s of the kill, and at least
# 15 s after the restarted process listens (its start alone can take tens of seconds here).
FREED_BY_S = 45.0
FREED_WITHIN_S = 15.0


def freed_within(killed: float) -> float:
    """How long a slot of a process killed at ``killed`` (monotonic) may take to be free."""
    return max(FREED_WITHIN_S, FREED_BY_S - (time.monotonic() - killed))


async def connect(port: int, key: str) -> ClientConnection | int:
    """A connection past ``welcome``, or the close code it was refused with."""
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=WAIT_S,
    )
    try:
        welcome = await next_event(ws, "welcome")
    except (TimeoutError, websockets.ConnectionClosed):
        welcome = None
    if welcome is not None:
        return ws
    code, _ = await close_code(ws)
    return -1 if code is None else code


async def connect_eventually(port: int, key: str, within: float) -> ClientConnection:
    """Keep trying until the server accepts (it refuses with 4030 while the quota is full)."""

    async def attempt() -> ClientConnection | int:
        got = await connect(port, key)
        assert isinstance(got, ClientConnection) or got == CloseCode.CONNECTION_LIMIT, (
            f"refused with {got}, not 4030"
        )
        return got

    return await eventually(
        attempt, lambda got: not isinstance(got, int), within, 0.3, "a connection accepted"
    )


@contextlib.asynccontextmanager
async def held(conns: list[ClientConnection]) -> AsyncIterator[list[ClientConnection]]:
    try:
        yield conns
    finally:
        for ws in conns:
            with contextlib.suppress(Exception):
                await ws.close()


async def open_many(port: int, key: str, n: int) -> list[ClientConnection]:
    conns = []
    for _ in range(n):
        got = await connect(port, key)
        assert not isinstance(got, int), f"connection {len(conns) + 1} refused with {got}"
        conns.append(got)
    return conns


async def test_killed_web_process_frees_its_slots_within_its_heartbeat_ttl(own_stack) -> None:
    s = own_stack(feed=False, max_conns_per_key=LIMIT)
    key = s.key("crowd")
    async with held(await open_many(s.port, key, LIMIT)):
        assert await connect(s.port, key) == CloseCode.CONNECTION_LIMIT  # the quota is full
        s.web.stop(signal.SIGKILL)
        killed = time.monotonic()
    s.start_web()
    async with held([await connect_eventually(s.port, key, freed_within(killed))]) as conns:
        conns += await open_many(s.port, key, LIMIT - 1)  # every slot of the dead one is free
        assert await connect(s.port, key) == CloseCode.CONNECTION_LIMIT


async def test_live_process_keeps_its_slots_when_another_one_dies(own_stack) -> None:
    s = own_stack(feed=False, max_conns_per_key=LIMIT)
    key = s.key("shared")
    other, port = s.other_web()
    try:
        async with held(await open_many(s.port, key, 60)) as live:
            async with held(await open_many(port, key, 40)):
                assert await connect(port, key) == CloseCode.CONNECTION_LIMIT
                other.stop(signal.SIGKILL)
                killed = time.monotonic()
            other.start()
            wait_port(port)
            live.append(await connect_eventually(port, key, freed_within(killed)))
            live += await open_many(port, key, 39)
            # the 60 held through the live process still count: the key is full again
            assert await connect(port, key) == CloseCode.CONNECTION_LIMIT
            assert await connect(s.port, key) == CloseCode.CONNECTION_LIMIT
            for ws in live[:60]:
                await asyncio.wait_for(await ws.ping(), WAIT_S)  # and they were never closed
    finally:
        other.stop()
