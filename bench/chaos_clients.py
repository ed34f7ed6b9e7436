"""The chaos benchmark's clients: resuming subscribers, a latency probe and a slow consumer.

Run by ``bench/chaos.py``, which talks to it over stdin/stdout, one JSON object per line. The
first line in is the plan (URL, key, each subscriber's symbols, the probe's symbols); the first
line out is ``{"ready": ...}`` once every subscriber has delivered a tick. Then each command in
gets one answer out:

* ``{"cmd": "watch", "after_ns": t}``: from now on each subscriber (and the probe) notes when it
  first receives a tick published after ``t``; ``{"cmd": "recovered"}`` says when, per client.
* ``{"cmd": "latency", "t0": ns, "t1": ns}``: the probe's and the subscribers' p50/p99 (tick
  ``ts`` to receive) over ticks received in ``[t0, t1)``, and the probe's reconnects.
* ``{"cmd": "slow", "symbols": [...], "stall_s": s}``: start a slow consumer (the Python client,
  resume on) that takes one tick and then reads nothing for ``stall_s``; ``{"cmd": "slow_state"}``
  gives its last seq per symbol; ``{"cmd": "slow_stop"}`` ends it.
* ``{"cmd": "finish"}``: every client's deliveries as runs of seq per (symbol, epoch index), the
  duplicates it saw and the errors its ``subscribe`` raised (the in-band reports); then exit.

Subscribers use ``tickpipe.Client.subscribe`` unchanged. When it raises (an epoch change, a gap
that cannot be filled, giving up) the error is recorded with its time and the subscriber
subscribes again. A tick whose seq is not above the last one delivered for its symbol starts a
new epoch index for that symbol if the subscription was restarted since (a Redis that lost its
data restarts every sequence at 1), and counts as a duplicate otherwise.

The probe is a plain WebSocket client on every symbol: it measures what other clients see while
a fault hits, and the highest seq of each (symbol, epoch) it saw (what was published, even where
Redis lost it). It reconnects without resuming and counts its reconnects.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import websockets

from bench.clients import bucket, bucket_ns
from bench.lines import emit, read_line
from tickpipe.client import Client, Loss, TickpipeError

TICK_TYPES = frozenset({"trade", "quote"})
RESTART_PAUSE_S = 0.2


class LatencyLog:
    """Latency histograms per second of receipt, so any window of whole seconds can be read."""

    def __init__(self) -> None:
        self.by_second: dict[int, dict[int, int]] = {}

    def add(self, now_ns: int, ts_ns: int) -> None:
        hist = self.by_second.setdefault(now_ns // 1_000_000_000, {})
        k = bucket(now_ns - ts_ns)
        hist[k] = hist.get(k, 0) + 1

    def percentiles(self, t0_ns: int, t1_ns: int) -> dict[str, float | int]:
        merged: dict[int, int] = {}
        for sec in range(t0_ns // 1_000_000_000, t1_ns // 1_000_000_000 + 1):
            for k, n in self.by_second.get(sec, {}).items():
                merged[k] = merged.get(k, 0) + n
        total = sum(merged.values())
        out: dict[str, float | int] = {"ticks": total}
        for name, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            seen, value = 0, float("nan")
            for k in sorted(merged):
                seen += merged[k]
                if seen >= p * total:
                    value = bucket_ns(k) / 1e6
                    break
            out[name] = value
        return out


class Runs:
    """The seqs delivered for one (symbol, epoch) as sorted, disjoint [lo, hi] runs."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it was already there (a duplicate)."""
        runs = self.runs
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
            return True
        if not runs or seq > runs[-1][1]:
            runs.append([seq, seq])
            return True
        i = bisect.bisect_right(runs, [seq, 1 << 62]) - 1  # the run starting at or before seq
        if i >= 0 and runs[i][0] <= seq <= runs[i][1]:
            return False
        joins_left = i >= 0 and runs[i][1] == seq - 1
        joins_right = runs[i + 1][0] == seq + 1  # there is a run after: seq < runs[-1][1]
        if joins_left and joins_right:
            runs[i][1] = runs.pop(i + 1)[1]
        elif joins_left:
            runs[i][1] = seq
        elif joins_right:
            runs[i + 1][0] = seq
        else:
            runs.insert(i + 1, [seq, seq])
        return True


class Delivery:
    """What one client delivered: runs per (sym, epoch index), duplicates, in-band reports."""

    def __init__(self, name: str, latency: LatencyLog) -> None:
        self.name = name
        self.latency = latency
        self.runs: dict[tuple[str, int], Runs] = {}
        self.epoch: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.restarted: set[str] = set()  # symbols not seen since the subscription restarted
        self.dups: dict[tuple[str, int], list[int]] = {}
        self.reports: list[dict[str, Any]] = []
        self.watch_after: int | None = None
        self.recovered_ns: int | None = None
        self.delivered = 0

    def tick(self, ev: dict[str, Any]) -> None:
        now = time.time_ns()
        sym, seq = ev["sym"], ev["seq"]
        prev = self.last.get(sym)
        if prev is not None and seq <= prev and sym in self.restarted:
            self.epoch[sym] = self.epoch.get(sym, 0) + 1
        self.restarted.discard(sym)
        key = (sym, self.epoch.get(sym, 0))
        runs = self.runs.get(key) or self.runs.setdefault(key, Runs())
        if not runs.add(seq):
            self.dups.setdefault(key, []).append(seq)
            return
        self.last[sym] = seq
        self.delivered += 1
        ts = ev["ts"]
        self.latency.add(now, ts)
        if self.watch_after is not None and self.recovered_ns is None and ts > self.watch_after:
            self.recovered_ns = now

    def report(self, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, TickpipeError) else type(exc).__name__
        self.reports.append({"t_ns": time.time_ns(), "code": code, "message": str(exc)[:300]})
        self.restarted.update(self.last)

    def loss(self, loss: Loss) -> None:
        """A loss the stream reported in-band (``on_loss``) and went on after."""
        self.reports.append(
            {"t_ns": time.time_ns(), "code": f"loss {loss.reason}", "message": loss.message[:300]}
        )
        if loss.reason == "epoch_changed":
            self.restarted.add(loss.sym)  # its seqs start again at 1

    def figures(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "delivered": self.delivered,
            "runs": [[s, e, r.runs] for (s, e), r in self.runs.items()],
            "dups": [[s, e, seqs[:10_000]] for (s, e), seqs in self.dups.items()],
            "reports": self.reports,
            "last": self.last,
        }


async def subscriber(client: Client, symbols: list[str], d: Delivery, stop: asyncio.Event) -> None:
    """Subscribe (resume on) until stopped; an error ends one subscription, then another starts."""
    while not stop.is_set():
        stream: AsyncIterator[dict[str, Any]] = client.subscribe(symbols, on_loss=d.loss)
        try:
            async for ev in stream:
                d.tick(ev)
                if stop.is_set():
                    break
        except (TickpipeError, OSError, websockets.WebSocketException) as exc:
            d.report(exc)
            await asyncio.sleep(RESTART_PAUSE_S)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


class Probe:
    """A plain WebSocket client on every symbol: latency and the highest seq per (sym, epoch)."""

    def __init__(self, url: str, key: str, symbols: list[str]) -> None:
        self.url, self.key, self.symbols = url, key, symbols
        self.latency = LatencyLog()
        self.epoch: dict[str, int] = {}
        self.top: dict[tuple[str, int], int] = {}
        self.connects = 0
        self.closes: dict[str, int] = {}
        self.watch_after: int | None = None
        self.recovered_ns: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with websockets.connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.key}"},
                    open_timeout=10,
                    max_size=None,
                ) as ws:
                    self.connects += 1
                    msg = {"op": "subscribe", "id": "probe", "symbols": self.symbols}
                    await ws.send(orjson.dumps(msg).decode())
                    async for raw in ws:
                        self.frame(raw)
                    code = ws.close_code
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None) or type(exc).__name__
            self.closes[str(code)] = self.closes.get(str(code), 0) + 1
            await asyncio.sleep(0.1)

    def frame(self, raw: str | bytes) -> None:
        now = time.time_ns()
        for ev in orjson.loads(raw):
            kind = ev["type"]
            if kind in TICK_TYPES:
                sym = ev["sym"]
                key = (sym, self.epoch.get(sym, 0))
                if ev["seq"] > self.top.get(key, 0):
                    self.top[key] = ev["seq"]
                self.latency.add(now, ev["ts"])
                if (
                    self.watch_after is not None
                    and self.recovered_ns is None
                    and ev["ts"] > self.watch_after
                ):
                    self.recovered_ns = now
            elif kind == "subscribed":
                for sym, st in ev["seq"].items():
                    if st.get("epoch") is not None:
                        self.epoch[sym] = st["epoch"]
            elif kind == "status" and ev.get("code") == "epoch_changed" and "epoch" in ev:
                self.epoch[ev["sym"]] = ev["epoch"]


class SlowConsumer:
    """The Python client (resume on) that takes one tick, then reads nothing for ``stall_s``."""

    def __init__(self, client: Client, symbols: list[str], stall_s: float) -> None:
        self.client, self.symbols, self.stall_s = client, symbols, stall_s
        self.delivery = Delivery("slow", LatencyLog())
        self.stop = asyncio.Event()
        self.stalled_until_ns = 0
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        stalled = False
        while not self.stop.is_set():
            stream = self.client.subscribe(self.symbols, on_loss=self.delivery.loss)
            try:
                async for ev in stream:
                    self.delivery.tick(ev)
                    if not stalled:
                        stalled = True
                        self.stalled_until_ns = time.time_ns() + int(self.stall_s * 1e9)
                        await asyncio.sleep(self.stall_s)
                    if self.stop.is_set():
                        break
            except (TickpipeError, OSError, websockets.WebSocketException) as exc:
                self.delivery.report(exc)
                await asyncio.sleep(RESTART_PAUSE_S)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]


async def main() -> None:
    plan = await read_line()
    stop = asyncio.Event()
    latency = LatencyLog()
    client = Client(plan["url"], plan["key"], timeout=10, reconnect_tries=plan.get("tries", 60))
    deliveries = [Delivery(f"c{i}", latency) for i in range(len(plan["subscribers"]))]
    tasks = [
        asyncio.create_task(subscriber(client, syms, d, stop))
        for syms, d in zip(plan["subscribers"], deliveries, strict=True)
    ]
    probe = Probe(client.ws_url, plan["key"], plan["probe_symbols"])
    tasks.append(asyncio.create_task(probe.run(stop)))
    deadline = time.monotonic() + plan.get("ready_timeout_s", 30)
    while time.monotonic() < deadline and not all(d.delivered for d in deliveries):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    emit({"ready": sum(1 for d in deliveries if d.delivered), "of": len(deliveries)})
    slow: SlowConsumer | None = None
    while True:
        cmd = await read_line()
        what = cmd["cmd"]
        if what == "watch":
            for w in [*deliveries, probe]:
                w.watch_after, w.recovered_ns = cmd["after_ns"], None
            emit({"ok": True})
        elif what == "recovered":
            emit(
                {
                    "clients": {d.name: d.recovered_ns for d in deliveries},
                    "probe": probe.recovered_ns,
                }
            )
        elif what == "latency":
            emit(
                {
                    "probe": probe.latency.percentiles(cmd["t0"], cmd["t1"]),
                    "subscribers": latency.percentiles(cmd["t0"], cmd["t1"]),
                    "probe_connects": probe.connects,
                    "probe_closes": probe.closes,
                }
            )
        elif what == "lasts":
            emit({"clients": [d.last for d in deliveries]})
        elif what == "slow":
            slow = SlowConsumer(client, cmd["symbols"], cmd["stall_s"])
            emit({"ok": True})
        elif what == "slow_state":
            emit({"last": slow.delivery.last if slow else {}})
        elif what == "slow_stop":
            figures = None
            if slow is not None:
                slow.stop.set()
                slow.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(slow.task, 5)
                figures = slow.delivery.figures()
            emit({"slow": figures})
        elif what == "finish":
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            emit(
                {
                    "clients": [d.figures() for d in deliveries],
                    "probe": {
                        "top": [[s, e, n] for (s, e), n in probe.top.items()],
                        "connects": probe.connects,
                        "closes": probe.closes,
                    },
                }
            )
            return
        else:
            emit({"error": f"unknown command {what!r}"})


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
