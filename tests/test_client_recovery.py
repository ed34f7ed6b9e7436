"""The Python client against a scripted tickpipe peer: closes a reconnect gets past are retried
with a resume by seq, never raised to the caller.

A real WebSocket server on a free port plays the server's side of the protocol, message by
message as ``contracts/asyncapi.yaml`` gives it, so that the order of the last ``error`` event and
the close frame (which a real server under load does not fix) is the same on every run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve

from tests.harness import WAIT_S, free_port
from tickpipe import Client

EPOCH = 1_790_000_000_000


def _trade(seq: int) -> dict[str, Any]:
    return {"type": "trade", "sym": "AAPL", "seq": seq, "ts": 1_790_000_000_000_000_000 + seq,
            "price": 100.0 + seq, "size": 1.0}  # fmt: skip


def _welcome() -> list[dict[str, Any]]:
    return [{"type": "welcome", "protocol": 1, "conn_id": "c", "server_time": 0,
             "heartbeat_s": 10, "limits": {}, "key": {"name": "k"}}]  # fmt: skip


def _subscribed(seq: int) -> dict[str, Any]:
    return {"type": "subscribed", "id": "sub", "symbols": ["AAPL"], "channels": [],
            "types": ["trade", "quote"], "throttle_ms": 0,
            "seq": {"AAPL": {"epoch": EPOCH, "seq": seq}}, "rejected": []}  # fmt: skip


async def _send(ws: ServerConnection, *events: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(list(events)).decode())


class ScriptedServer:
    """Connection 1: five trades, then a slow-consumer close (error event first). Connection 2:
    refused at the door (connection_limit, as after a crash of another web process).
    Connection 3: the resume it asks for, then five more trades."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        n = self.connections
        if n == 2:
            await _send(ws, {"type": "error", "code": "connection_limit", "fatal": True, "id": None,
                             "message": "key 'k' already has 100 open connections"})  # fmt: skip
            await ws.close(4030, "connection_limit")
            return
        await _send(ws, *_welcome())
        self.requests.append(orjson.loads(await ws.recv()))
        if n == 1:
            await _send(ws, _subscribed(0), *(_trade(s) for s in range(1, 6)))
            await _send(ws, {"type": "error", "code": "slow_consumer", "fatal": True, "id": None,
                             "message": "more than 4194304 bytes were waiting"})  # fmt: skip
            await ws.close(4008, "slow_consumer")
            return
        await _send(ws, _subscribed(7), _trade(6), _trade(7),
                    {"type": "resumed", "id": "sub", "sym": "AAPL", "epoch": EPOCH, "from_seq": 5,
                     "to_seq": 7, "count": 2, "source": "redis"})  # fmt: skip
        await _send(ws, *(_trade(s) for s in range(8, 11)))
        await ws.wait_closed()


async def test_a_slow_consumer_close_and_a_full_connection_quota_are_resumed_not_raised() -> None:
    script = ScriptedServer()
    port = free_port()
    async with serve(script.handler, "127.0.0.1", port):
        seqs: list[int] = []
        async with Client(f"http://127.0.0.1:{port}", "tp_test") as client:
            sub = client.subscribe(["AAPL"])
            async for tick in sub:
                seqs.append(tick["seq"])
                if len(seqs) == 10:
                    break
    assert seqs == list(range(1, 11))
    assert script.connections == 3
    # The resume asked for exactly what came after the last tick the caller was given.
    assert script.requests[-1]["from_seq"] == {"AAPL": 5}
    assert script.requests[-1]["epoch"] == {"AAPL": EPOCH}
    assert not sub.losses


async def test_an_unauthorized_close_is_raised_at_once() -> None:
    async def refuse(ws: ServerConnection) -> None:
        await _send(ws, {"type": "error", "code": "unauthorized", "fatal": True, "id": None,
                         "message": "missing, unknown or revoked key"})  # fmt: skip
        await ws.close(4001, "unauthorized")

    port = free_port()
    async with serve(refuse, "127.0.0.1", port), Client(f"http://127.0.0.1:{port}", "x") as client:
        try:
            async for _ in client.subscribe(["AAPL"]):
                raise AssertionError("no tick can come")
        except Exception as exc:
            assert getattr(exc, "code", None) == "unauthorized", exc
        else:
            raise AssertionError("an unauthorized key must raise")
    await asyncio.sleep(0)


async def test_a_replay_whose_server_closes_cleanly_continues_after_its_last_tick() -> None:
    """A server that restarts closes with 1001 (going away): the replay reconnects and asks for
    what comes after the last tick it yielded, instead of failing."""
    requests: list[dict[str, Any]] = []

    async def restarting(ws: ServerConnection) -> None:
        await _send(ws, *_welcome())
        requests.append(orjson.loads(await ws.recv()))
        if len(requests) == 1:
            await _send(ws, *(_trade(s) for s in range(1, 4)))
            await ws.close(1001, "shutdown: server is restarting")
            return
        await _send(ws, *(_trade(s) for s in range(4, 6)))
        await _send(ws, {"type": "replay_done", "id": "replay", "count": 5, "first_ts": None,
                         "last_ts": None, "fingerprint": "", "stopped": False})  # fmt: skip
        await ws.wait_closed()

    port = free_port()
    async with serve(restarting, "127.0.0.1", port), Client(f"http://127.0.0.1:{port}", "k") as c:
        replay = c.replay(["AAPL"], 0, 10**18)
        seqs = [tick["seq"] async for tick in replay]
    assert seqs == [1, 2, 3, 4, 5]
    assert replay.reconnects == 1 and replay.done is not None
    assert requests[1]["after"] == [_trade(3)["ts"], 3, "AAPL"]


class LiveServer:
    """A web process that welcomes, confirms the subscription and sends five trades."""

    def __init__(self) -> None:
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        await _send(ws, *_welcome())
        await ws.recv()
        await _send(ws, _subscribed(0), *(_trade(s) for s in range(1, 6)))
        await ws.wait_closed()


async def _first_trades(urls: list[str], n: int = 5, **kw: Any) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with Client(urls, "tp_k", **kw) as c:
        async for tick in c.subscribe(["AAPL"]):
            got.append(tick)
            if len(got) == n:
                return got
    raise AssertionError("the stream ended")


async def test_a_web_process_that_never_welcomes_is_left_for_the_next() -> None:
    """The handshake completes but no ``welcome`` comes (a hung process): after the connect
    timeout the next web process is tried, and the silent connection is closed."""
    closed = asyncio.Event()

    async def silent(ws: ServerConnection) -> None:
        await ws.wait_closed()
        closed.set()

    live = LiveServer()
    a, b = free_port(), free_port()
    async with serve(silent, "127.0.0.1", a), serve(live.handler, "127.0.0.1", b):
        urls = [f"http://127.0.0.1:{a}", f"http://127.0.0.1:{b}"]
        got = await asyncio.wait_for(_first_trades(urls, connect_timeout=0.5), WAIT_S)
        assert [t["seq"] for t in got] == [1, 2, 3, 4, 5] and live.connections == 1
        await asyncio.wait_for(closed.wait(), WAIT_S)


async def test_a_web_process_that_closes_before_welcome_is_left_for_the_next() -> None:
    async def closing(ws: ServerConnection) -> None:
        await ws.close(1011, "shutting down")

    live = LiveServer()
    a, b = free_port(), free_port()
    async with serve(closing, "127.0.0.1", a), serve(live.handler, "127.0.0.1", b):
        urls = [f"http://127.0.0.1:{a}", f"http://127.0.0.1:{b}"]
        got = await asyncio.wait_for(_first_trades(urls), WAIT_S)
        assert [t["seq"] for t in got] == [1, 2, 3, 4, 5] and live.connections == 1


class HttpPeer:
    """A web process's HTTP side: answers ``/ticks/realtime`` at once, or never (``hang``)."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        if self.hang:  # a heavy query still running
            await asyncio.sleep(30)
        body = orjson.dumps({"server_time": 0, "ticks": []})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        await writer.drain()
        writer.close()


async def test_a_rest_query_is_sent_again_only_when_it_never_reached_a_web_process() -> None:
    """A web process that cannot be reached: the next one answers. One that took the query and
    is slow to answer: the timeout is raised, the query is not sent to another one as well."""
    import httpx
    import pytest

    hung, good = HttpPeer(hang=True), HttpPeer(hang=False)
    h = await asyncio.start_server(hung.handle, "127.0.0.1", 0)
    g = await asyncio.start_server(good.handle, "127.0.0.1", 0)
    url = {s: f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in (h, g)}
    try:
        async with Client([f"http://127.0.0.1:{free_port()}", url[g]], "tp_k") as c:
            assert await c.latest(["AAPL"]) == {} and good.requests == 1
        async with Client([url[h], url[g]], "tp_k", timeout=1.0) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.latest(["AAPL"])
        assert hung.requests == 1 and good.requests == 1
    finally:
        h.close()
        g.close()
