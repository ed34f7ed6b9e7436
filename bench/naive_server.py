"""The naive fan-out the benchmark compares tickpipe against (not used by tickpipe itself).

The design most first attempts have: one redis-py pub/sub connection; for each message, for each
client subscribed to its symbol, for each tick in it, ``await websocket.send_text("[tick]")``.
One frame per tick per client, sent inside the loop over clients. It speaks just enough of
tickpipe's protocol for the same benchmark clients: any ``Authorization`` is accepted, a
``subscribe`` is answered with ``subscribed``, and ticks arrive as one-event arrays.

Run: ``uvicorn --factory bench.naive_server:create_app`` with ``NAIVE_REDIS_URL`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from server.live.bus import Layout, channel_symbol
from server.wire import split_events


class NaiveHub:
    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.clients: dict[str, set[WebSocket]] = {}
        self._lock = asyncio.Lock()
        self._first = asyncio.Event()

    async def subscribe(self, ws: WebSocket, syms: list[str]) -> None:
        # Check-then-add under a lock: unlike broadcaster, no subscription is lost to a race.
        async with self._lock:
            for sym in syms:
                if sym not in self.clients:
                    self.clients[sym] = set()
                    await self.pubsub.subscribe(Layout().channel(sym))
                self.clients[sym].add(ws)
            self._first.set()

    def drop(self, ws: WebSocket) -> None:
        for subs in self.clients.values():
            subs.discard(ws)

    async def run(self) -> None:
        await self._first.wait()  # listen() needs a subscription first
        async for msg in self.pubsub.listen():
            if msg["type"] != "message":
                continue
            sym = channel_symbol(msg["channel"])
            events = split_events(msg["data"].decode())
            for ws in list(self.clients.get(sym, ())):
                try:
                    for ev in events:
                        await ws.send_text("[" + ev + "]")
                except Exception:
                    self.drop(ws)


async def ws_endpoint(ws: WebSocket) -> None:
    hub: NaiveHub = ws.app.state.hub
    await ws.accept()
    try:
        while True:
            msg = orjson.loads(await ws.receive_text())
            if msg.get("op") == "subscribe":
                syms = [s.upper() for s in msg["symbols"]]
                await hub.subscribe(ws, syms)
                reply = {"type": "subscribed", "id": msg.get("id"), "symbols": syms}
                await ws.send_text(orjson.dumps([reply]).decode())
    except WebSocketDisconnect:
        pass
    finally:
        hub.drop(ws)


def create_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = app.state.hub = NaiveHub(os.environ["NAIVE_REDIS_URL"])
        task = asyncio.create_task(hub.run())
        yield
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await hub.pubsub.aclose()
        await hub.redis.aclose()

    return Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)], lifespan=lifespan)
