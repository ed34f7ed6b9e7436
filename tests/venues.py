"""A local WebSocket server that speaks a venue's protocol closely enough for its adapter and
streams real captured messages (``tests/data/venues``, provenance in ``tests/data/SOURCES.md``).

Per venue it answers the way the venue does: Binance takes its streams from the URL and sends a
combined stream's messages only for the streams named there; Coinbase answers ``subscribe``
with ``subscriptions`` (or the captured ``error`` for an unknown product) and sends only the
channels subscribed; Kraken v2 acknowledges each channel and symbol (or refuses a pair), sends
``status`` on connect and a ``heartbeat`` every half second; Alpaca says ``connected``, checks the
key and secret (``auth failed`` otherwise) and lists the subscription. A test decides what the
"market" sends and when (``emit``), and can drop every connection (TCP reset or close frame),
or mute the venue (no messages, no heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve

DATA = Path(__file__).parent / "data" / "venues"
COINBASE_CHANNEL = {"match": "matches", "last_match": "matches", "ticker": "ticker",
                    "l2update": "level2", "snapshot": "level2"}  # fmt: skip


def lines(rel: str) -> list[str]:
    """The messages of a captured ``.jsonl`` file, exactly as the venue sent them."""
    return [x for x in (DATA / rel).read_text().splitlines() if x.strip()]


def received(rel: str) -> list[str]:
    """The frames the client received in a documented ``wscat`` session (its ``< `` lines),
    exactly as the venue sent them."""
    return [x[2:] for x in (DATA / rel).read_text().splitlines() if x.startswith("< ")]


@dataclass
class Conn:
    ws: ServerConnection
    wants: set[str] = field(default_factory=set)  # streams / channel:symbol pairs subscribed
    ready: bool = False


class FakeVenue:
    def __init__(
        self,
        kind: str,
        refuse: frozenset[str] = frozenset(),
        key: tuple[str, str] = ("", ""),
    ) -> None:
        self.kind = kind.split("-")[0]  # binance-futures speaks binance
        self.refuse = refuse
        self.key = key
        self.conns: list[Conn] = []
        self.subscriptions = 0  # connections that subscribed, ever
        self.received: list[str] = []  # every client message
        self.muted = False
        # Binance: how long after the handshake a new connection's stream starts (the venue
        # attaches it to the market a little later; what trades meanwhile goes elsewhere).
        self.attach_s = 0.0
        self.server: Server | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> FakeVenue:
        self.server = await serve(self._handle, "127.0.0.1", 0, ping_interval=None)
        self.port = self.server.sockets[0].getsockname()[1]
        if self.kind == "kraken":
            self._beat = asyncio.create_task(self._heartbeats())
        return self

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    @property
    def url(self) -> str:
        path = {"binance": "/stream", "coinbase": "/", "kraken": "/v2", "alpaca": "/v2/iex"}
        return f"ws://127.0.0.1:{self.port}{path[self.kind]}"

    # -- what the test does --

    async def emit(self, messages: list[str], every_s: float = 0.0) -> None:
        """Send each message to every subscribed connection that asked for it."""
        for text in messages:
            for conn in list(self.conns):
                if conn.ready and self._wanted(conn, text):
                    with contextlib.suppress(Exception):
                        await conn.ws.send(text)
            if every_s:
                await asyncio.sleep(every_s)

    async def send_raw(self, text: str) -> None:
        """Send ``text`` as it is to every subscribed connection (malformed or error messages)."""
        for conn in list(self.conns):
            if conn.ready:
                await conn.ws.send(text)

    def drop(self, close_frame: bool = False) -> None:
        """End every connection: a TCP reset, or a close frame (1001 going away)."""
        for conn in list(self.conns):
            if close_frame:
                asyncio.get_running_loop().create_task(conn.ws.close(1001, "going away"))
            else:
                conn.ws.transport.abort()
            conn.ready = False

    async def subscribed(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` connections have subscribed since the start."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.subscriptions < n:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{self.subscriptions} subscriptions, waited for {n}"
            )
            await asyncio.sleep(0.02)

    # -- the venue's side --

    def _wanted(self, conn: Conn, text: str) -> bool:
        msg = orjson.loads(text)
        if self.kind == "binance":
            return "stream" not in msg or msg["stream"] in conn.wants
        if self.kind == "coinbase":
            channel = COINBASE_CHANNEL.get(msg.get("type"), "")
            return f"{channel}:{msg.get('product_id')}" in conn.wants
        return True

    async def _handle(self, ws: ServerConnection) -> None:
        conn = Conn(ws)
        self.conns.append(conn)
        try:
            if self.kind == "binance":
                query = parse_qs(urlparse(ws.request.path if ws.request else "").query)
                conn.wants = set(query.get("streams", [""])[0].split("/"))
                if self.attach_s:
                    await asyncio.sleep(self.attach_s)
                conn.ready = True
                self.subscriptions += 1
            elif self.kind == "kraken":
                await ws.send(lines("kraken/v2_status.jsonl")[0])
            elif self.kind == "alpaca":
                await ws.send(lines("alpaca/stocks_v2_session_docs.jsonl")[0])
            async for raw in ws:
                self.received.append(str(raw))
                await getattr(self, f"_{self.kind}")(conn, orjson.loads(raw))
        except Exception:  # a dropped connection, or the test ended
            pass
        finally:
            conn.ready = False
            self.conns.remove(conn)

    async def _binance(self, conn: Conn, msg: dict[str, Any]) -> None:
        await conn.ws.send(orjson.dumps({"result": None, "id": msg.get("id")}).decode())

    async def _coinbase(self, conn: Conn, msg: dict[str, Any]) -> None:
        products = msg["product_ids"]
        bad = [p for p in products if p in self.refuse]
        if bad:  # the captured refusal (for GIBBERISH-USD), for the product refused
            error = lines("coinbase/exchange_error.jsonl")[0]
            await conn.ws.send(error.replace("GIBBERISH-USD", bad[0]))
            return
        conn.wants = {f"{ch}:{p}" for ch in msg["channels"] for p in products}
        channels = [{"name": ch, "product_ids": products} for ch in msg["channels"]]
        await conn.ws.send(orjson.dumps({"type": "subscriptions", "channels": channels}).decode())
        conn.ready = True
        self.subscriptions += 1

    async def _kraken(self, conn: Conn, msg: dict[str, Any]) -> None:
        ack = orjson.loads(lines("kraken/v2_subscribe_ack.jsonl")[0])
        params = msg["params"]
        for sym in params["symbol"]:
            if sym in self.refuse:  # the documented error ack: success false, error, symbol
                reply = {"method": "subscribe", "error": f"Currency pair not supported {sym}",
                         "success": False, "symbol": sym, "time_in": ack["time_in"],
                         "time_out": ack["time_out"], "req_id": msg.get("req_id")}  # fmt: skip
            else:
                reply = {**ack, "req_id": msg.get("req_id")}
                reply["result"] = {**ack["result"], "channel": params["channel"], "symbol": sym}
            await conn.ws.send(orjson.dumps(reply).decode())
        conn.wants.add(params["channel"])
        if {"trade", "ticker"} <= conn.wants:
            conn.ready = True
            self.subscriptions += 1
            for text in self.on_subscribe:
                await conn.ws.send(text)

    # What a new subscription gets first (Kraken's snapshots), sent again on every resubscribe.
    on_subscribe: list[str] = []

    async def _heartbeats(self) -> None:
        beat = lines("kraken/v2_heartbeat.jsonl")[0]
        while True:
            await asyncio.sleep(0.5)
            if not self.muted:
                for conn in list(self.conns):
                    if conn.ready:
                        with contextlib.suppress(Exception):
                            await conn.ws.send(beat)

    async def _alpaca(self, conn: Conn, msg: dict[str, Any]) -> None:
        session = lines("alpaca/stocks_v2_session_docs.jsonl")
        if msg.get("action") == "auth":
            if (msg.get("key"), msg.get("secret")) == self.key:
                await conn.ws.send(session[1])
            else:
                errors = lines("alpaca/stocks_v2_errors_docs.jsonl")
                await conn.ws.send(next(e for e in errors if '"code":402' in e))
                await conn.ws.close(1008, "auth failed")
        elif msg.get("action") == "subscribe":
            reply = {"T": "subscription"}
            for kind in ("trades", "quotes", "bars"):
                reply[kind] = [s for s in msg.get(kind, []) if s not in self.refuse]
            await conn.ws.send(orjson.dumps([reply]).decode())
            conn.ready = True
            self.subscriptions += 1
