"""The fan-out hub: one Redis pub/sub connection per web process, many WebSocket subscribers.

* Channels are reference-counted by local subscribers; a channel is SUBSCRIBEd once, and every
  subscriber that asks for it while that is in flight waits on the same confirmation (no race
  where concurrent subscribes overwrite each other).
* Each message is decoded once; the same string is queued for every subscriber. Nothing here
  awaits a client: ``Subscriber.push`` only appends to a bounded buffer, and each connection's
  own writer task drains it, packing whatever has queued up into one frame.
* Slow consumers: past ``conflate_bytes`` quotes conflate to the latest per symbol; trades are
  never dropped, and past ``max_buffer_bytes`` the connection is closed as a slow consumer.
* If Redis goes away the hub reconnects with backoff, resubscribes, and tells each subscriber
  which of its symbols may have a gap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from server import protocol
from server.bus import CHANNEL_PREFIX, KEYS_CHANNEL, Bus, Latest, SeqState, channel
from server.config import Settings

log = logging.getLogger("tickpipe.hub")

TRADE, QUOTE = 1, 2
MASKS = {"trade": TRADE, "quote": QUOTE}
PING_AFTER_S = 5.0


class RedisUnavailable(Exception):
    """Redis did not answer in time; the request can be retried."""


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
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set by the writer after each frame (replay backpressure)
        # Set by the hub: ticks mark the subscriber dirty and one timer wakes all dirty writers,
        # so a busy connection gets one frame per flush interval, not one per Redis message.
        self.defer_wake: Callable[[Subscriber], None] | None = None
        self.closed = asyncio.Event()
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
        self._sampling = asyncio.Event()

    # -- called by the hub (never awaits) --

    def push(self, sym: str, fragment: str, mask: int) -> None:
        if self.close_code is not None:
            return
        held = self._held.get(sym)
        if held is not None:
            held.append(fragment)
            return
        if mask != TRADE | QUOTE:
            kept = [e for e in protocol.split_events(fragment) if _wanted(e, mask)]
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
        for ev in protocol.split_events(fragment):
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
        for ev in protocol.split_events(fragment):
            kind = protocol.event_type(ev)
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
        if self.sample_s:
            self._sampling.set()
        else:
            self._sampling.clear()
            self._flush_samples()

    def _flush_samples(self) -> None:
        if not self._samples:
            return
        parts = [ev for slots in self._samples.values() for ev in slots.values()]
        self._samples.clear()
        self._enqueue(",".join(parts))

    async def run_sampler(self) -> None:
        """While ``throttle_ms`` is set: queue the latest samples once per period."""
        while self.close_code is None:
            await self._sampling.wait()
            await asyncio.sleep(self.sample_s or 0)
            self._flush_samples()

    def _enqueue(self, text: str, now: bool = True) -> None:
        self._queue.append(text)
        self._queued += len(text) + 1
        if self._queued > self._max_buffer:
            self.close(
                protocol.CloseCode.SLOW_CONSUMER,
                protocol.error(
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
                protocol.event_json(
                    protocol.status(
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
            self._enqueue(protocol.event_json(ev))

    def send_raw(self, event: str) -> None:
        """Queue one event that is already JSON text."""
        self._enqueue(event)

    def close(self, code: int, event: dict[str, Any] | None = None) -> None:
        """Stop delivering; the endpoint sends ``event`` and closes the socket with ``code``."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_event = event
        if code == protocol.CloseCode.SLOW_CONSUMER:
            self.counters.slow_closes += 1
        self._samples.clear()
        self._sampling.set()  # let the sampler see the close and end
        self._queue.clear()
        self._latest_quote.clear()
        self._held.clear()
        self._queued = 0
        self.closed.set()
        self._wake.set()
        self._drained.set()

    async def wait_room(self, limit: int) -> None:
        """Wait until at most ``limit`` characters are queued (or the connection closed): a
        producer that can wait (a replay) keeps the buffer small instead of filling it."""
        while self._queued > limit and self.close_code is None:
            self._drained.clear()
            await self._drained.wait()

    # -- subscription set-up: hold live fragments until the snapshot is queued --

    def hold(self, syms: list[str]) -> None:
        for sym in syms:
            self._held.setdefault(sym, [])

    def release(self, sym: str, after_seq: int, mask: int) -> None:
        """Queue the held fragments of ``sym``, dropping events the snapshot already covers."""
        held = self._held.pop(sym, None)
        if not held or self.close_code is not None:
            return
        for fragment in held:
            kept = [
                e
                for e in protocol.split_events(fragment)
                if (protocol.event_seq(e) or after_seq + 1) > after_seq and _wanted(e, mask)
            ]
            if kept:
                self.push(sym, ",".join(kept), TRADE | QUOTE)

    def unhold(self, syms: list[str]) -> None:
        for sym in syms:
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
                self._drained.set()
            if self.conflating and self.close_code is None and not self._queue:
                self.conflating = False
                self.send(protocol.status("conflation_ended", "caught up; quotes flow unconflated"))


def _wanted(event: str, mask: int) -> bool:
    kind = MASKS.get(protocol.event_type(event))
    return kind is None or bool(kind & mask)


class _Channel:
    __slots__ = ("confirmed", "subscribers")

    def __init__(self) -> None:
        self.subscribers: dict[Subscriber, int] = {}
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Hub:
    """Owns the web process's Redis pub/sub connection and routes messages to subscribers."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        # RESP2: pub/sub messages come back from read_response (RESP3 routes them to push handlers).
        self._pool = ConnectionPool.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=None,  # idle is normal here; the watchdog below finds a dead Redis
            retry=None,
            protocol=2,
        )
        self._conn: Connection | None = None
        self._channels: dict[bytes, _Channel] = {}
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.on_control: Callable[[bytes, bytes], None] | None = None
        self.redis_up = False
        self.reconnects = 0
        self.messages_in = 0
        self._down_since: float | None = None
        self._ever_up = False
        self._received = 0  # replies read on the pub/sub connection, for the watchdog
        self._dirty: set[Subscriber] = set()
        self.on_lost: list[Callable[[], None]] = []  # called when the pub/sub connection drops
        self.counters = FanoutCounters()
        self._flush_s = settings.flush_ms / 1000

    # -- lifecycle --

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-reader")
        if self._flush_s > 0:
            self._flusher = asyncio.create_task(self._flush(), name="hub-flusher")

    async def _flush(self) -> None:
        """Every ``flush_ms``, wake the writers that have ticks waiting."""
        dirty = self._dirty
        while True:
            await asyncio.sleep(self._flush_s)
            if dirty:
                for sub in dirty:
                    sub._wake.set()
                dirty.clear()

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.disconnect()
        await self._pool.disconnect()

    def attach(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        sub.counters = self.counters
        if self._flush_s > 0:
            sub.defer_wake = self._dirty.add

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self._dirty.discard(sub)
        for sym in list(sub.symbols):
            self._leave(sub, sym)
        sub.symbols.clear()

    # -- subscriptions --

    async def subscribe(
        self, sub: Subscriber, syms: list[str], types: list[str], timeout: float = 5.0
    ) -> dict[str, Latest]:
        """Subscribe ``sub`` to ``syms``; returns each one's sequence state and latest trade and
        quote, read after live delivery started. Live events of new symbols are held back until
        the caller ``release``s each symbol, so the caller can queue a snapshot first."""
        mask = 0
        for t in types:
            mask |= MASKS[t]
        new = [s for s in syms if s not in sub.symbols]
        sub.hold(new)
        waits = []
        to_send = []
        for sym in syms:
            sub.symbols[sym] = mask
            name = channel(sym).encode()
            ch = self._channels.get(name)
            if ch is None:
                ch = self._channels[name] = _Channel()
                to_send.append(name)
            ch.subscribers[sub] = mask
            waits.append(ch.confirmed)
        try:
            if to_send and self._conn is not None and self.redis_up:
                await self._conn.send_command("SUBSCRIBE", *to_send)
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*waits)), timeout)
            states = await asyncio.wait_for(self.bus.latest(syms), timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            for sym in new:
                self._leave(sub, sym)
                sub.symbols.pop(sym, None)
            sub.unhold(new)
            raise RedisUnavailable(str(exc) or "timed out waiting for Redis") from None
        return states

    def unsubscribe(self, sub: Subscriber, syms: list[str]) -> None:
        for sym in syms:
            if sub.symbols.pop(sym, None) is not None:
                self._leave(sub, sym)
        sub.unhold(syms)

    def _leave(self, sub: Subscriber, sym: str) -> None:
        ch = self._channels.get(channel(sym).encode())
        if ch is not None:
            ch.subscribers.pop(sub, None)
        # Empty channels stay subscribed until the sweeper drops them: an UNSUBSCRIBE racing a
        # new SUBSCRIBE could otherwise confirm the wrong one.

    async def sweep(self) -> None:
        """Unsubscribe channels nobody has listened to since the last sweep."""
        idle = [n for n, ch in self._channels.items() if not ch.subscribers and ch.confirmed.done()]
        if not idle or self._conn is None or not self.redis_up:
            return
        for name in idle:
            del self._channels[name]
        with contextlib.suppress(RedisError, OSError):
            await self._conn.send_command("UNSUBSCRIBE", *idle)

    # -- the reader --

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connect()
                delay = 0.1
                await self._read()
            except asyncio.CancelledError:
                raise
            except (OSError, RedisError) as exc:
                conn, self._conn = self._conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()
                self._lost(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _connect(self) -> None:
        conn = self._pool.make_connection()
        await conn.connect()
        # The control channel goes last: its confirmation means every channel is back.
        names = [*self._channels, KEYS_CHANNEL.encode()]
        for _name, ch in self._channels.items():
            if ch.confirmed.done():
                ch.confirmed = asyncio.get_running_loop().create_future()
        await conn.send_command("SUBSCRIBE", *names)
        self._conn = conn
        self._ever_up = True
        self.redis_up = True
        if self._down_since is not None:
            log.info("redis pub/sub reconnected; resubscribed %d channels", len(self._channels))

    def _lost(self, exc: BaseException) -> None:
        if not self._ever_up:
            log.warning("redis not reachable yet (%s); retrying", exc)
        elif self._down_since is None:
            log.warning("redis pub/sub connection unavailable (%s); reconnecting", exc)
            self._down_since = time.time()
            self.redis_up = False
            for forget in self.on_lost:
                forget()
            for sub in self.subscribers:
                if sub.symbols:
                    sub.send(
                        protocol.status(
                            "redis_unavailable",
                            "live data is interrupted (Redis connection lost); reconnecting",
                            symbols=sorted(sub.symbols),
                        )
                    )

    async def _announce_gap(self) -> None:
        """After a reconnect: tell each subscriber where its symbols stand now."""
        since = self._down_since
        self._down_since = None
        self.reconnects += 1
        syms = sorted({s for sub in self.subscribers for s in sub.symbols})
        try:
            states = await self.bus.seq_states(syms) if syms else {}
        except (RedisError, OSError):
            states = {}
        for sub in self.subscribers:
            if not sub.symbols:
                continue
            mine = sorted(sub.symbols)
            sub.send(
                protocol.status(
                    "gap",
                    "live data resumed after a Redis outage; events for these symbols may be "
                    "missing between your last seq and the seq given here",
                    symbols=mine,
                    since_ns=int((since or time.time()) * 1e9),
                    seq={s: _seq_json(states.get(s)) for s in mine},
                )
            )

    async def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        channels = self._channels
        prefix = CHANNEL_PREFIX.encode()
        plen = len(prefix)
        watchdog = asyncio.get_running_loop().create_task(self._watch(conn))
        try:
            await self._dispatch_loop(conn, channels, prefix, plen)
        finally:
            watchdog.cancel()

    async def _watch(self, conn: Connection) -> None:
        """PING when the connection has been quiet; drop it if even the PING gets no answer."""
        seen = -1
        while True:
            await asyncio.sleep(PING_AFTER_S)
            if self._received != seen:
                seen = self._received
                continue
            await conn.send_command("PING")
            await asyncio.sleep(PING_AFTER_S)
            if self._received == seen:
                log.warning(
                    "redis pub/sub silent for %.0fs, even to PING; reconnecting", 2 * PING_AFTER_S
                )
                await conn.disconnect()
                return

    async def _dispatch_loop(
        self, conn: Connection, channels: dict[bytes, _Channel], prefix: bytes, plen: int
    ) -> None:
        while True:
            msg = await conn.read_response(disable_decoding=True)
            self._received += 1
            if not isinstance(msg, list) or len(msg) < 3:
                continue
            kind = msg[0]
            if kind == b"message":
                name = msg[1]
                ch = channels.get(name)
                if ch is not None and ch.subscribers:
                    self.messages_in += 1
                    sym = name[plen:].decode()
                    fragment = msg[2].decode()
                    for sub, mask in ch.subscribers.items():
                        sub.push(sym, fragment, mask)
                elif not name.startswith(prefix) and self.on_control is not None:
                    self.on_control(name, msg[2])
            elif kind == b"subscribe":
                ch = channels.get(msg[1])
                if ch is not None and not ch.confirmed.done():
                    ch.confirmed.set_result(None)
                if msg[1] == KEYS_CHANNEL.encode() and self._down_since is not None:
                    asyncio.get_running_loop().create_task(self._announce_gap())

    # -- figures --

    def figures(self) -> dict[str, Any]:
        return {
            "redis_up": self.redis_up,
            "connections": len(self.subscribers),
            "channels": sum(1 for ch in self._channels.values() if ch.subscribers),
            "subscriptions": sum(len(s.symbols) for s in self.subscribers),
            "messages_in": self.messages_in,
            "reconnects": self.reconnects,
        }


def _seq_json(state: SeqState | None) -> dict[str, Any]:
    if state is None:
        return {"epoch": None, "seq": None}
    return {"epoch": state.epoch, "seq": state.seq}
