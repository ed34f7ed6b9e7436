"""One WebSocket's outbound side: a bounded buffer the hub pushes fragments into without ever
awaiting, and one writer task that packs whatever has queued into frames.

Past ``conflate_bytes`` quotes conflate to the latest per symbol (trades are never dropped); past
``max_buffer_bytes`` the connection is closed as a slow consumer. ``throttle_ms`` samples the
latest trade and quote per symbol instead; ``hold``/``release`` keep a symbol's live fragments
back while its snapshot or catch-up backlog is queued.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server import wire
from server.config import Settings

TRADE, QUOTE = 1, 2
MASKS = {"trade": TRADE, "quote": QUOTE}


class FanoutCounters:
    """Running totals of this web process's fan-out, kept across connections (for status and
    metrics)."""

    __slots__ = ("conflated", "conflations", "events_out", "frames_out", "slow_closes", "ticks_out")

    def __init__(self) -> None:
        self.frames_out = 0
        self.events_out = 0
        self.ticks_out = 0
        self.conflations = 0  # times a connection started conflating
        self.conflated = 0  # quotes replaced by a newer one before they were sent
        self.slow_closes = 0  # connections closed as slow consumers (4008)


class Subscriber:
    """The outbound side of one WebSocket: a bounded buffer in characters and one writer task."""

    def __init__(
        self,
        conn_id: str,
        send_text: Callable[[str], Awaitable[None]],
        settings: Settings,
        key_id: str = "",
    ) -> None:
        self.conn_id = conn_id
        self.key_id = key_id
        self._send_text = send_text
        self._conflate_at = settings.conflate_bytes
        self._max_buffer = settings.max_buffer_bytes
        self._max_frame = settings.max_frame_bytes
        self.symbols: dict[str, int] = {}  # sym -> TRADE|QUOTE mask
        self._queue: collections.deque[str] = collections.deque()
        self._queued = 0
        self._latest_quote: dict[str, str] = {}  # conflation slots, only while conflating
        self.conflating = False
        self._held: dict[str, list[str]] = {}  # symbols being set up: fragments held back
        # Released symbols -> the seq their snapshot or backlog reached, until a live event
        # passes it: a message published before the snapshot was read can still be unread on
        # the hub's pub/sub socket when the snapshot's reply (another connection) arrives.
        self._floor: dict[str, int] = {}
        self._wake = asyncio.Event()
        # Set by the writer after each frame, for a producer waiting for room (a replay); made
        # by the first ``wait_room``: an idle connection holds only what it uses.
        self._drained: asyncio.Event | None = None
        # Set by the hub: ticks mark the subscriber dirty and one timer wakes all dirty writers,
        # so a busy connection gets one frame per flush interval, not one per Redis message.
        self.defer_wake: Callable[[Subscriber], None] | None = None
        # Done when the connection is closed (the endpoint waits on it with its tasks).
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_event: dict[str, Any] | None = None
        self.last_send = time.monotonic()
        self.frames_out = 0
        self.events_out = 0
        self.conflated = 0
        self.counters = FanoutCounters()  # the hub's shared totals once attached
        self.channels: set[str] = set()  # non-tick channels, e.g. "status"
        # Sampling (``throttle_ms``): the latest trade and quote per symbol, sent once a period.
        self.sample_s = 0.0
        self._samples: dict[str, dict[str, str]] = {}
        self._sampler: asyncio.Task[None] | None = None  # runs only while sampling

    # -- called by the hub (never awaits) --

    def push(self, sym: str, fragment: str, mask: int) -> None:
        if self.close_code is not None:
            return
        held = self._held.get(sym)
        if held is not None:
            held.append(fragment)
            return
        if self._floor and sym in self._floor:
            fragment = self._above_floor(sym, fragment)
            if not fragment:
                return
        if mask != TRADE | QUOTE:
            kept = [e for e in wire.split_events(fragment) if _wanted(e, mask)]
            if not kept:
                return
            fragment = ",".join(kept)
        if self.sample_s:
            self._sample(sym, fragment)
        elif self.conflating:
            self._push_conflating(sym, fragment)
        else:
            self._enqueue(fragment, now=False)

    def _push_conflating(self, sym: str, fragment: str) -> None:
        for ev in wire.split_events(fragment):
            if ev.startswith('{"type":"quote"'):
                if sym in self._latest_quote:
                    self.conflated += 1
                    self.counters.conflated += 1
                self._latest_quote[sym] = ev
                if self.defer_wake is not None:
                    self.defer_wake(self)
                else:
                    self._wake.set()
            else:
                # A trade (or status) flushes the pending quote first: per-symbol order holds.
                pending = self._latest_quote.pop(sym, None)
                if pending is not None:
                    self._enqueue(pending, now=False)
                self._enqueue(ev, now=False)

    def _sample(self, sym: str, fragment: str) -> None:
        slots = self._samples.get(sym)
        if slots is None:
            slots = self._samples[sym] = {}
        for ev in wire.split_events(fragment):
            kind = wire.event_type(ev)
            if kind in MASKS:
                slots.pop(kind, None)  # the newer event goes last: seq order holds in a sample
                slots[kind] = ev
            else:  # status events (epoch_changed) are never sampled away; older samples first
                if slots:
                    self._enqueue(",".join(slots.values()))
                    slots.clear()
                self._enqueue(ev)

    def set_throttle(self, ms: int) -> None:
        """Sample this connection's ticks every ``ms`` (0: every tick, as published)."""
        self.sample_s = ms / 1000
        if not self.sample_s:
            self._flush_samples()
        elif self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self.run_sampler())

    def _flush_samples(self) -> None:
        if not self._samples:
            return
        parts = [ev for slots in self._samples.values() for ev in slots.values()]
        self._samples.clear()
        self._enqueue(",".join(parts))

    def stop_sampler(self) -> None:
        """End the sampler task, if one runs (the connection is going away)."""
        if self._sampler is not None:
            self._sampler.cancel()

    async def run_sampler(self) -> None:
        """While ``throttle_ms`` is set: queue the latest samples once per period."""
        while self.close_code is None and self.sample_s:
            await asyncio.sleep(self.sample_s)
            self._flush_samples()

    def _enqueue(self, text: str, now: bool = True) -> None:
        self._queue.append(text)
        self._queued += len(text) + 1
        if self._queued > self._max_buffer:
            self.close(
                wire.CloseCode.SLOW_CONSUMER,
                wire.error(
                    "slow_consumer",
                    f"more than {self._max_buffer} bytes of trades were waiting for this "
                    "connection; read faster, subscribe to fewer symbols, or resume by seq",
                    fatal=True,
                ),
            )
            return
        if not self.conflating and self._queued > self._conflate_at:
            self.conflating = True
            self.counters.conflations += 1
            self._queue.append(
                wire.event_json(
                    wire.status(
                        "conflating",
                        "this connection is behind: quotes are conflated to the latest per "
                        "symbol (seq gaps are dropped quotes); trades are all delivered",
                    )
                )
            )
        if now or self.defer_wake is None:
            self._wake.set()
        else:
            self.defer_wake(self)

    def send(self, *events: dict[str, Any]) -> None:
        """Queue control events (they keep their place relative to ticks)."""
        for ev in events:
            self._enqueue(wire.event_json(ev))

    def send_raw(self, event: str) -> None:
        """Queue one event that is already JSON text."""
        self._enqueue(event)

    def close(self, code: int, event: dict[str, Any] | None = None) -> None:
        """Stop delivering; the endpoint sends ``event`` and closes the socket with ``code``."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_event = event
        if code == wire.CloseCode.SLOW_CONSUMER:
            self.counters.slow_closes += 1
        self._samples.clear()
        self.stop_sampler()
        self._queue.clear()
        self._latest_quote.clear()
        self._held.clear()
        self._floor.clear()
        self._queued = 0
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake.set()
        if self._drained is not None:
            self._drained.set()

    async def wait_room(self, limit: int) -> None:
        """Wait until at most ``limit`` characters are queued (or the connection closed): a
        producer that can wait (a replay) keeps the buffer small instead of filling it."""
        while self._queued > limit and self.close_code is None:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()

    # -- subscription set-up: hold live fragments until the snapshot is queued --

    def hold(self, syms: list[str]) -> None:
        for sym in syms:
            self._held.setdefault(sym, [])

    def release(self, sym: str, after_seq: int, mask: int) -> None:
        """Queue the held fragments of ``sym``, dropping events the snapshot already covers
        (and any that still come late, until one past it does)."""
        held = self._held.pop(sym, None)
        self._floor[sym] = after_seq
        if not held or self.close_code is not None:
            return
        for fragment in held:
            kept = [
                e
                for e in wire.split_events(fragment)
                if _place(e, after_seq) > after_seq and _wanted(e, mask)
            ]
            if kept:
                self.push(sym, ",".join(kept), TRADE | QUOTE)

    def _above_floor(self, sym: str, fragment: str) -> str:
        """The events of ``fragment`` past ``sym``'s released seq; the floor goes once one
        passes it, or with a new epoch (its seq starts again at 1)."""
        floor = self._floor[sym]
        if fragment.startswith('{"type":"status","code":"epoch_changed"'):
            del self._floor[sym]
            return fragment
        events = wire.split_events(fragment)
        kept = [e for e in events if (wire.event_seq(e) or floor + 1) > floor]
        if any((wire.event_seq(e) or 0) > floor for e in kept):
            del self._floor[sym]
        return fragment if len(kept) == len(events) else ",".join(kept)

    def unhold(self, syms: list[str]) -> None:
        for sym in syms:
            self._floor.pop(sym, None)
            self._held.pop(sym, None)
            self._samples.pop(sym, None)

    # -- the writer task --

    def _take_frame(self) -> str:
        parts: list[str] = []
        size = 2
        queue = self._queue
        while queue and (not parts or size + len(queue[0]) <= self._max_frame):
            text = queue.popleft()
            parts.append(text)
            size += len(text) + 1
        self._queued = max(0, self._queued - size + 2)
        if not queue and self._latest_quote:  # conflated quotes never counted in _queued
            parts.extend(self._latest_quote.values())
            self._latest_quote.clear()
        self.events_out += len(parts)
        text = "[" + ",".join(parts) + "]"
        c = self.counters
        c.events_out += len(parts)
        c.ticks_out += text.count('"seq":')  # one per tick event; a C scan of what is sent
        return text

    async def run_writer(self) -> None:
        """Drain the buffer into frames until the connection closes."""
        while self.close_code is None:
            await self._wake.wait()
            self._wake.clear()
            while self.close_code is None and (self._queue or self._latest_quote):
                text = self._take_frame()
                await self._send_text(text)
                self.frames_out += 1
                self.counters.frames_out += 1
                self.last_send = time.monotonic()
                if self._drained is not None:
                    self._drained.set()
            if self.conflating and self.close_code is None and not self._queue:
                self.conflating = False
                self.send(wire.status("conflation_ended", "caught up; quotes flow unconflated"))


def _place(event: str, after_seq: int) -> int:
    """Where an event stands in its symbol's sequence: a tick's seq, an upstream gap's tick
    after (both already sent when at or below ``after_seq``); other status events always go."""
    seq = wire.event_seq(event)
    if seq is None:
        seq = wire.upstream_gap_place(event)
    return after_seq + 1 if seq is None else seq


def _wanted(event: str, mask: int) -> bool:
    kind = MASKS.get(wire.event_type(event))
    return kind is None or bool(kind & mask)
