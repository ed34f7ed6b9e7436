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
* On a Redis Cluster tick channels are sharded (``server.live.shards``: one connection per
  master that owns a needed slot) and the control channel has a connection of its own. When a
  master dies or a slot moves, only the channels concerned are interrupted; once each is
  subscribed again where it now lives, its subscribers get ``gap`` only if a seq was really
  missed: the hub knows the last seq it delivered per channel and compares it with the first
  one it receives again (or, if none comes, with the symbol's seq in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from server import wire
from server.config import Settings
from server.live.bus import CHANNEL_PREFIX, KEYS_CHANNEL, Bus, Latest, SeqState, channel_symbol
from server.live.connection import seed_nodes, watch_silence
from server.live.listener import Listener
from server.live.shards import Shards
from server.live.subscriber import MASKS, FanoutCounters, Subscriber

log = logging.getLogger("tickpipe.hub")

PING_AFTER_S = 5.0


class RedisUnavailable(Exception):
    """Redis did not answer in time; the request can be retried."""


class _Channel:
    __slots__ = ("confirmed", "first_again", "listeners", "lost_ns", "seen", "seen_at_loss")

    def __init__(self) -> None:
        self.listeners: dict[Listener, int] = {}
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Cluster only: the last seq delivered, the one when the subscription was interrupted,
        # and the first seq received after it was subscribed again (-1: an epoch change).
        self.seen = 0
        self.seen_at_loss: int | None = None
        self.first_again: int | None = None
        self.lost_ns = 0  # when the subscription was interrupted


class Hub:
    """Owns the web process's Redis pub/sub connection and routes messages to subscribers."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        # RESP2: pub/sub messages come back from read_response (RESP3 routes them to push handlers).
        self.sharded = bus.layout.sharded
        self._shards: Shards | None = None
        if self.sharded:
            self._shards = Shards(
                seed_nodes(settings), self._deliver, self._confirm, self._interrupted
            )
            self._control_at = 0  # which known node the control connection tries next
        self._pool = ConnectionPool.from_url(
            settings.redis_url.split(",")[0],
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
        if self._shards is not None:
            await self._shards.stop()
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
        self, sub: Listener, syms: list[str], types: Sequence[str], timeout: float = 5.0
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
            name = self.bus.layout.channel(sym).encode()
            ch = self._channels.get(name)
            if ch is None:
                ch = self._channels[name] = _Channel()
                to_send.append(name)
            ch.listeners[sub] = mask
            waits.append(ch.confirmed)
        try:
            if to_send and self._shards is not None:
                await self._shards.subscribe(to_send)
            elif to_send and self._conn is not None and self.redis_up:
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

    def unsubscribe(self, sub: Listener, syms: list[str]) -> None:
        for sym in syms:
            if sub.symbols.pop(sym, None) is not None:
                self._leave(sub, sym)
        sub.unhold(syms)

    def _leave(self, sub: Listener, sym: str) -> None:
        ch = self._channels.get(self.bus.layout.channel(sym).encode())
        if ch is not None:
            ch.listeners.pop(sub, None)
        # Empty channels stay subscribed until the sweeper drops them: an UNSUBSCRIBE racing a
        # new SUBSCRIBE could otherwise confirm the wrong one.

    async def sweep(self) -> None:
        """Unsubscribe channels nobody has listened to since the last sweep."""
        idle = [n for n, ch in self._channels.items() if not ch.listeners and ch.confirmed.done()]
        if idle and self._shards is not None:
            for name in idle:
                del self._channels[name]
            self._shards.unsubscribe(idle)
            return
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
        if self._shards is not None:
            return await self._connect_control()
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

    async def _connect_control(self) -> None:
        """Cluster: the control channel on any node (a cluster broadcasts plain pub/sub), the
        next known node after each failure; tick channels are the shards' business."""
        assert self._shards is not None
        known = self._shards.known
        addr = known[self._control_at % len(known)]
        self._control_at += 1
        conn = self._shards.connection(addr, None)
        await conn.connect()
        await conn.send_command("SUBSCRIBE", KEYS_CHANNEL)
        self._conn = conn
        self._ever_up = True
        self.redis_up = True
        self._down_since = None

    # -- cluster: interrupted sharded subscriptions --

    def _confirm(self, name: bytes) -> None:
        ch = self._channels.get(name)
        if ch is None:
            return
        if not ch.confirmed.done():
            ch.confirmed.set_result(None)
        if ch.seen_at_loss is not None:
            asyncio.get_running_loop().create_task(self._check_gap(name, ch))

    def _interrupted(self, names: set[bytes]) -> None:
        """These channels' subscription ended (a master died, a slot moved): hold new
        subscribers until they are back, and remember where each stood."""
        for forget in self.on_lost:
            forget()
        syms: dict[Subscriber, list[str]] = {}
        for name in names:
            ch = self._channels.get(name)
            if ch is None:
                continue
            if ch.confirmed.done():
                ch.confirmed = asyncio.get_running_loop().create_future()
            if ch.seen_at_loss is None:
                ch.seen_at_loss = ch.seen
                ch.first_again = None
                ch.lost_ns = time.time_ns()
            for sub in ch.listeners:
                if isinstance(sub, Subscriber):
                    syms.setdefault(sub, []).append(channel_symbol(name))
        for sub, mine in syms.items():
            sub.send(
                wire.status(
                    "redis_unavailable",
                    "live data of these symbols is interrupted (a Redis Cluster master is "
                    "failing over or their slot is moving); resubscribing",
                    symbols=sorted(mine),
                )
            )

    async def _check_gap(self, name: bytes, ch: _Channel) -> None:
        """After a channel is subscribed again: ``gap`` to its subscribers only if a seq was
        missed in between."""
        sym = channel_symbol(name)
        before = ch.seen_at_loss or 0
        missed: SeqState | None = None
        try:
            state = (await self.bus.seq_states([sym]))[sym]
        except (RedisError, OSError):
            state = None
        if state is not None and state.seq > before:
            # Wait a little for what was published since to arrive on the new subscription.
            for _ in range(20):
                if ch.first_again is not None:
                    break
                await asyncio.sleep(0.05)
            if ch.first_again is None or ch.first_again > before + 1:
                missed = state
        ch.seen_at_loss = None
        self.reconnects += 1
        if missed is None:
            return
        for sub in ch.listeners:
            if isinstance(sub, Subscriber):
                sub.send(
                    wire.status(
                        "gap",
                        "live data resumed after a Redis Cluster failover or slot move; events "
                        "for these symbols may be missing between your last seq and the seq "
                        "given here",
                        symbols=[sym],
                        since_ns=ch.lost_ns,
                        seq={sym: _seq_json(missed)},
                    )
                )

    def _deliver(self, name: bytes, data: bytes) -> None:
        """Cluster: one sharded message; the channel's last seq is kept for ``_check_gap``."""
        self._received += 1
        ch = self._channels.get(name)
        if ch is None or not ch.listeners:
            return
        self.messages_in += 1
        fragment = data.decode()
        last = fragment.rfind('"seq":')
        if last >= 0:
            ch.seen = _int_at(fragment, last + 6)
        if ch.seen_at_loss is not None and ch.first_again is None:
            if fragment.startswith('{"type":"status","code":"epoch_changed"'):
                ch.first_again = -1  # a new epoch: clients hear of it in-band
            elif last >= 0:
                ch.first_again = _int_at(fragment, fragment.find('"seq":') + 6)
        sym = channel_symbol(name)
        for sub, mask in ch.listeners.items():
            sub.push(sym, fragment, mask)

    def _lost(self, exc: BaseException) -> None:
        if self._shards is not None:  # the control channel only: ticks have their own links
            if self.redis_up:
                log.warning("control channel connection lost (%s); reconnecting", exc)
            self.redis_up = False
            return
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
                        wire.status(
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
                wire.status(
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
        watchdog = asyncio.get_running_loop().create_task(
            watch_silence(conn, lambda: self._received, PING_AFTER_S, "redis pub/sub")
        )
        try:
            await self._dispatch_loop(conn, channels, prefix, plen)
        finally:
            watchdog.cancel()

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
                if ch is not None and ch.listeners:
                    self.messages_in += 1
                    sym = name[plen:].decode()
                    fragment = msg[2].decode()
                    for sub, mask in ch.listeners.items():
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
            "channels": sum(1 for ch in self._channels.values() if ch.listeners),
            "subscriptions": sum(len(s.symbols) for s in self.subscribers),
            "messages_in": self.messages_in,
            "reconnects": self.reconnects,
        }


def _int_at(text: str, i: int) -> int:
    j = i
    while j < len(text) and text[j].isdigit():
        j += 1
    return int(text[i:j]) if j > i else 0


def _seq_json(state: SeqState | None) -> dict[str, Any]:
    if state is None:
        return {"epoch": None, "seq": None}
    return {"epoch": state.epoch, "seq": state.seq}
