"""A process of benchmark WebSocket clients: connect, subscribe, count ticks, check seq, time them.

Run by ``bench/fanout.py``, which talks to it over stdin/stdout, one JSON object per line:

1. stdin:  the plan (URL, key, each client's symbols, the seq of every symbol before publishing)
2. stdout: ``{"ready": n_subscribed, "failed": [...]}`` once every client is subscribed
3. stdin:  the measurement window ``{"w0": ns, "w1": ns}`` (wall clock, same host)
4. stdin:  ``{"final": {sym: seq}}`` once the publisher has stopped; clients drain until they
           have seen every final seq or ``drain_s`` passes
5. stdout: the figures (counts, seq gaps, missing events, a latency histogram), then exit

Latency is ``time_ns()`` when a frame is handed to us minus the tick's ``ts`` (set by the
publisher just before ``Bus.publish``), for ticks published inside the window.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import orjson
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from bench.lines import emit, read_line

TICK_TYPES = frozenset({"trade", "quote"})
FINE_NS = 10_000  # histogram buckets: 10 us below COARSE_FROM, 1 ms above
COARSE_FROM = 200_000_000


def bucket(lat_ns: int) -> int:
    """Histogram key for one latency; ``bucket_ns`` maps it back to nanoseconds."""
    if lat_ns < COARSE_FROM:
        return max(lat_ns, 0) // FINE_NS
    return COARSE_FROM // FINE_NS + (lat_ns - COARSE_FROM) // 1_000_000


def bucket_ns(key: int) -> int:
    edge = COARSE_FROM // FINE_NS
    if key < edge:
        return key * FINE_NS + FINE_NS // 2
    return COARSE_FROM + (key - edge) * 1_000_000 + 500_000


class Figures:
    """What every client of this process saw (shared: one event loop, no locks needed)."""

    def __init__(self) -> None:
        self.w0 = 1 << 62
        self.w1 = 1 << 62
        self.hist: dict[int, int] = {}
        self.in_window = 0  # ticks published in the window that arrived (any time)
        self.recv_in_window = 0  # ticks that arrived during the window
        self.received = 0
        self.frames = 0
        self.frames_in_window = 0
        self.gaps = 0  # seq jumps forward
        self.gap_events = 0  # events skipped by those jumps
        self.dups = 0  # seq at or below one already seen
        self.max_lat = 0
        self.status: dict[str, int] = {}
        self.closed: dict[str, int] = {}


class TickClient(asyncio.Protocol):
    """One WebSocket client: websockets' sans-I/O protocol driven by an asyncio transport.

    Frames are handled inside ``data_received``, with no task switch per frame: the benchmark's
    clients share two cores with the server they measure, so they must cost little. ``last``
    (sym -> last seq seen) is this client's own; ``figs`` is shared by the process.
    """

    def __init__(
        self,
        idx: int,
        plan: dict[str, Any],
        figs: Figures,
        last: dict[str, int],
        ready: asyncio.Queue[tuple[int, str | None]],
    ) -> None:
        self.idx = idx
        self.figs = figs
        self.last = last
        self.ready = ready
        self.subscribed = False
        self.done = asyncio.get_running_loop().create_future()
        # Offer compression only when asked: browsers do, but it is per connection CPU work.
        ext = enable_client_permessage_deflate(None) if plan.get("deflate") else None
        self.proto = ClientProtocol(
            parse_uri(plan["url"]), extensions=ext, max_size=16 * 1024 * 1024
        )
        self.request = self.proto.connect()
        self.request.headers["Authorization"] = f"Bearer {plan['key']}"
        self.subscribe = orjson.dumps({"op": "subscribe", "id": 1, "symbols": list(last)})
        self.transport: asyncio.Transport | None = None
        self.partial: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.proto.send_request(self.request)
        self.flush()

    def flush(self) -> None:
        assert self.transport is not None
        for data in self.proto.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if self.proto.handshake_exc is not None:
                    self.fail(f"handshake: {self.proto.handshake_exc!r}"[:200])
                else:
                    self.proto.send_text(self.subscribe)
            elif event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT:
                if not event.fin:
                    self.partial.append(event.data)
                elif self.partial:
                    self.on_message(b"".join([*self.partial, event.data]))
                    self.partial.clear()
                else:
                    self.on_message(event.data)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        figs = self.figs
        code = str(self.proto.close_code or "none")
        if not self.done.done():  # closed by the server, not by us at the end
            figs.closed[code] = figs.closed.get(code, 0) + 1
            self.fail(f"closed before subscribed: {code}")
            self.done.set_result(None)

    def fail(self, why: str) -> None:
        if not self.subscribed:
            self.subscribed = True
            self.ready.put_nowait((self.idx, why))

    def close(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def on_message(self, data: bytes | bytearray | memoryview) -> None:
        now = time.time_ns()
        figs = self.figs
        last = self.last
        figs.frames += 1
        w0, w1 = figs.w0, figs.w1
        inside_now = w0 <= now < w1
        figs.frames_in_window += inside_now
        for ev in orjson.loads(data):
            kind = ev["type"]
            if kind in TICK_TYPES:
                sym = ev["sym"]
                seq = ev["seq"]
                prev = last[sym]
                if seq == prev + 1:
                    last[sym] = seq
                elif seq > prev:
                    figs.gaps += 1
                    figs.gap_events += seq - prev - 1
                    last[sym] = seq
                else:
                    figs.dups += 1
                    continue
                figs.received += 1
                if inside_now:
                    figs.recv_in_window += 1
                ts = ev["ts"]
                if w0 <= ts < w1:
                    figs.in_window += 1
                    lat = now - ts
                    k = lat // FINE_NS if 0 <= lat < COARSE_FROM else bucket(lat)
                    figs.hist[k] = figs.hist.get(k, 0) + 1
                    if lat > figs.max_lat:
                        figs.max_lat = lat
            elif kind == "subscribed":
                if not self.subscribed:
                    self.subscribed = True
                    bad = ev.get("rejected")
                    self.ready.put_nowait((self.idx, f"rejected: {bad}" if bad else None))
            elif kind in ("error", "status"):
                code = kind + ":" + str(ev.get("code", "?"))
                figs.status[code] = figs.status.get(code, 0) + 1


async def main() -> None:
    plan = await read_line()
    figs = Figures()
    ready: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    base: dict[str, int] = plan["base"]
    lasts = [{s: base[s] for s in syms} for syms in plan["clients"]]
    loop = asyncio.get_running_loop()
    uri = parse_uri(plan["url"])
    clients: list[TickClient] = []
    failed = []
    for i, last in enumerate(lasts):
        client = TickClient(i, plan, figs, last, ready)
        try:
            await loop.create_connection(lambda c=client: c, uri.host, uri.port)
        except OSError as exc:
            client.fail(f"connect: {exc!r}")
        clients.append(client)
        if i % 20 == 19:  # do not stampede the accept queue
            await asyncio.sleep(0.02)
    deadline = time.monotonic() + plan.get("connect_timeout_s", 60)
    for _ in lasts:
        try:
            idx, err = await asyncio.wait_for(ready.get(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            failed.append("timed out waiting for subscribed")
            break
        if err:
            failed.append(f"client {idx}: {err}")
    emit({"ready": len(lasts) - len(failed), "failed": failed[:5]})

    window = await read_line()
    figs.w0, figs.w1 = window["w0"], window["w1"]
    final: dict[str, int] = (await read_line())["final"]
    deadline = time.monotonic() + plan.get("drain_s", 5.0)
    while time.monotonic() < deadline:
        if all(last[s] >= final[s] for last in lasts for s in last):
            break
        await asyncio.sleep(0.05)
    missing = sum(max(0, final[s] - last[s]) for last in lasts for s in last)
    for client in clients:
        client.close()
    emit(
        {
            "clients": len(lasts),
            "expected": sum(final[s] - base[s] for last in lasts for s in last),
            "received": figs.received,
            "in_window": figs.in_window,
            "recv_in_window": figs.recv_in_window,
            "frames": figs.frames,
            "frames_in_window": figs.frames_in_window,
            "gaps": figs.gaps,
            "gap_events": figs.gap_events,
            "tail_missing": missing,
            "dups": figs.dups,
            "max_lat_ns": figs.max_lat,
            "status": figs.status,
            "closed": figs.closed,
            "hist": list(figs.hist.items()),
        }
    )


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
