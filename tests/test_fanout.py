"""Fan-out under stress: 1,000 simultaneous subscribers, slow consumers, bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time

import orjson
import psutil
import pytest
import redis
import websockets

from server.wire import CloseCode
from tests.harness import WAIT_S, Stack, next_event, recv_events, send


def redis_seq(stack: Stack, sym: str) -> int:
    r = redis.Redis.from_url(stack.redis.url)
    try:
        return int(r.hget(f"tp:sym:{sym}", "seq") or 0)
    finally:
        r.close()


@pytest.mark.slow
@pytest.mark.alone
async def test_1000_clients_subscribing_at_once_all_receive_every_tick(own_stack) -> None:
    s: Stack = own_stack(
        symbols="AAPL,MSFT", feed_rate=40, feed_batch_ms=100, max_conns_per_key=5000
    )
    key = s.key("crowd")

    async def subscriber() -> tuple[websockets.ClientConnection, int]:
        ws, _ = await s.client(key, timeout=60)
        await send(ws, op="subscribe", symbols=["AAPL"])
        sub = await next_event(ws, "subscribed", timeout=30)
        return ws, sub["seq"]["AAPL"]["seq"]

    t0 = time.monotonic()
    clients = await asyncio.gather(*(subscriber() for _ in range(1000)))
    print(f"1000 clients connected and subscribed in {time.monotonic() - t0:.1f}s")
    target = redis_seq(s, "AAPL") + 10  # every client must see everything up to here

    async def drain(ws, after: int) -> list[int]:
        seqs: list[int] = []
        while not seqs or seqs[-1] < target:
            for ev in await recv_events(ws, timeout=30):
                if ev["type"] == "trade" or ev["type"] == "quote":
                    seqs.append(ev["seq"])
        return seqs

    results = await asyncio.gather(*(drain(ws, after) for ws, after in clients))
    # All at once: closed one after the other, the sockets not yet closed go on receiving
    # ticks nobody reads, and each close handshake waits behind a longer backlog (a run took
    # 47 s to close them that way).
    await asyncio.gather(*(ws.close() for ws, _ in clients))
    for (_, after), seqs in zip(clients, results, strict=True):
        assert seqs == list(range(after + 1, seqs[-1] + 1)), "lost or duplicated ticks"
        assert seqs[-1] >= target


def tiny_socket(port: int) -> socket.socket:
    """A client socket with a 4 KB receive buffer, so not reading backs up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.slow
async def test_client_that_stops_reading_is_closed_as_slow_consumer_4008(own_stack) -> None:
    s: Stack = own_stack(
        feed_rate=5000, max_buffer_bytes=200_000, conflate_bytes=50_000, slow_close_timeout_s=30
    )
    key = s.key("sleepy")
    server = psutil.Process(s.web.proc.pid)
    rss_before = server.memory_info().rss
    ws = await websockets.connect(
        s.ws_url, sock=tiny_socket(s.port), max_queue=1,
        additional_headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    await send(ws, op="subscribe", symbols=["*"])
    # Meanwhile a well-behaved client keeps receiving.
    good, _ = await s.client(s.key("awake"))
    await send(good, op="subscribe", symbols=["AAPL"])
    await next_event(good, "subscribed")
    deadline = time.monotonic() + WAIT_S
    while "slow_consumer" not in s.web.output() and time.monotonic() < deadline:
        await next_event(good, "quote")  # the sleeper does not hold anybody up
    assert "slow_consumer" in s.web.output(), "the sleeper was never cut off"
    rss_growth = server.memory_info().rss - rss_before
    assert rss_growth < 30_000_000, f"server grew by {rss_growth} bytes"
    # The sleeper wakes up: it reads what was in flight, then the error and the close code.
    events: list[dict] = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            events.extend(await recv_events(ws))
    assert ws.close_code == CloseCode.SLOW_CONSUMER == 4008
    assert ws.close_reason.startswith("slow_consumer: more than 200000 bytes")
    err = events[-1]
    assert err["type"] == "error" and err["code"] == "slow_consumer" and err["fatal"] is True
    await next_event(good, "quote")
    await good.close()


@pytest.mark.slow
async def test_lagging_client_gets_quotes_conflated_but_every_trade(own_stack) -> None:
    s: Stack = own_stack(
        symbols="AAPL,MSFT,NVDA", feed_rate=10000, max_buffer_bytes=50_000_000,
        conflate_bytes=20_000, history_per_symbol=1_000_000,
    )  # fmt: skip
    key = s.key("laggard")
    ws = await websockets.connect(
        s.ws_url, sock=tiny_socket(s.port), max_queue=1,
        additional_headers={"Authorization": f"Bearer {key}"},
        close_timeout=1,  # the backlog still queued would hold the close handshake for 10 s
    )  # fmt: skip
    await next_event(ws, "welcome")
    await send(ws, op="subscribe", symbols=["AAPL", "MSFT", "NVDA"])
    sub = await next_event(ws, "subscribed")
    start = {k: v["seq"] for k, v in sub["seq"].items()}
    # Stop reading long enough for the kernel buffers to fill and the server's to grow past
    # conflate_bytes (at 10,000 ticks/s, about 1.5 MB/s: well under a second).
    await asyncio.sleep(5)
    got: dict[str, list[int]] = {k: [] for k in start}
    statuses: list[str] = []
    t_end = time.monotonic() + 8  # then read as fast as we can: the backlog drains
    while time.monotonic() < t_end:
        for ev in await recv_events(ws):
            if ev["type"] in ("trade", "quote"):
                got[ev["sym"]].append(ev["seq"])
            elif ev["type"] == "status":
                statuses.append(ev["code"])
    await ws.close()
    assert statuses and statuses[0] == "conflating"
    # Conflation switches on and off as the client falls behind and catches up.
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses
    r = redis.Redis.from_url(s.redis.url)
    dropped_quotes = 0
    try:
        for sym, seqs in got.items():
            assert seqs == sorted(set(seqs)), f"{sym}: out of order or duplicated"
            published = []
            for _id, fields in r.xrange(f"tp:hist:{sym}", "-", "+"):
                published.extend(orjson.loads(b"[" + fields[b"d"] + b"]"))
            window = [e for e in published if start[sym] < e["seq"] <= seqs[-1]]
            trades = {e["seq"] for e in window if e["type"] == "trade"}
            quotes = {e["seq"] for e in window if e["type"] == "quote"}
            received = set(seqs)
            assert trades <= received, f"{sym}: trades dropped: {sorted(trades - received)[:10]}"
            dropped_quotes += len(quotes - received)
    finally:
        r.close()
    assert dropped_quotes > 0, "no quote was conflated"
