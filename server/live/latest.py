"""The last-value cache: the latest trade and quote per symbol, held in the web process.

Like a kdb+ real-time subscriber, it listens to the hub's own pub/sub channels for the symbols
that ``GET /ticks/realtime`` is asked about, so repeat requests are answered from memory, with no
Redis round trip. A symbol's entry is primed from Redis once its channel is confirmed, updated by
every message after that, dropped when nobody asked for it for ``idle_s``, and thrown away
whenever the hub loses Redis (answers then come from Redis until it is primed again).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
from redis.exceptions import RedisError

from server import wire
from server.live.bus import Bus, Latest
from server.live.hub import Hub, RedisUnavailable


@dataclass(slots=True)
class Entry:
    epoch: int | None = None
    seq: int = 0
    trade: str | None = None
    quote: str | None = None
    primed: bool = False
    used: float = 0.0


def _last_event(fragment: str, kind: str) -> str | None:
    i = fragment.rfind('{"type":"' + kind + '"')
    return None if i < 0 else fragment[i : fragment.index("}", i) + 1]


class LatestCache:
    """Answers "latest trade and quote" for symbols, from memory once primed. It listens to
    the hub as a ``Listener``."""

    def __init__(self, hub: Hub, bus: Bus, idle_s: float = 60.0) -> None:
        self.hub = hub
        self.bus = bus
        self.idle_s = idle_s
        self.symbols: dict[str, int] = {}  # what the hub sees as this listener's subscriptions
        self.entries: dict[str, Entry] = {}
        self._priming: set[str] = set()
        hub.on_lost.append(self.forget)

    # -- the hub's Listener protocol (server.live.listener) --

    def hold(self, syms: list[str]) -> None:
        for sym in syms:
            self.entries.setdefault(sym, Entry())

    def unhold(self, syms: list[str]) -> None:
        for sym in syms:
            entry = self.entries.get(sym)
            if entry is not None and not entry.primed:
                del self.entries[sym]

    def release(self, sym: str, after_seq: int, mask: int) -> None:
        pass  # held fragments were applied as they came

    def push(self, sym: str, fragment: str, mask: int) -> None:
        entry = self.entries.get(sym)
        if entry is None:
            return
        if '"code":"epoch_changed"' in fragment:
            first = wire.split_events(fragment)[0]
            entry.epoch = orjson.loads(first)["epoch"]
            entry.seq, entry.trade, entry.quote = 0, None, None
        last = fragment[fragment.rfind('{"type":') :]
        seq = wire.event_seq(last)
        if seq is None or seq <= entry.seq:
            return
        entry.seq = seq
        trade = _last_event(fragment, "trade")
        if trade is not None:
            entry.trade = trade
        quote = _last_event(fragment, "quote")
        if quote is not None:
            entry.quote = quote

    # -- for the REST route --

    def get(self, syms: list[str]) -> dict[str, Entry]:
        """The primed entries among ``syms`` (others must be read from Redis)."""
        now = time.monotonic()
        out = {}
        for sym in syms:
            entry = self.entries.get(sym)
            if entry is not None and entry.primed:
                entry.used = now
                out[sym] = entry
        return out

    def track(self, syms: list[str]) -> None:
        """Start keeping these (published) symbols in memory, in the background."""
        new = [s for s in syms if s not in self.entries and s not in self._priming]
        if new and self.hub.redis_up:
            self._priming.update(new)
            asyncio.get_running_loop().create_task(self._prime(new))

    async def _prime(self, syms: list[str]) -> None:
        try:
            states = await self.hub.subscribe(self, syms, ["trade", "quote"])
        except (RedisUnavailable, RedisError, OSError):
            return
        finally:
            self._priming.difference_update(syms)
        now = time.monotonic()
        for sym in syms:
            entry = self.entries.get(sym)
            if entry is not None:
                _merge(entry, states[sym])
                entry.primed = True
                entry.used = now

    def forget(self) -> None:
        """Redis was lost: what is in memory may be behind; start over from Redis."""
        self.hub.unsubscribe(self, list(self.symbols))
        self.entries.clear()

    def evict_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        idle = [s for s, e in self.entries.items() if e.primed and e.used < cutoff]
        for sym in idle:
            del self.entries[sym]
        if idle:
            self.hub.unsubscribe(self, idle)


def _merge(entry: Entry, state: Latest) -> None:
    """Fold Redis' answer into an entry that may already have newer messages."""
    if entry.epoch is None:
        entry.epoch = state.epoch
    if state.seq > entry.seq:
        entry.seq = state.seq
    for kind in ("trade", "quote"):
        raw: bytes | None = getattr(state, kind)
        if raw is None:
            continue
        mine = getattr(entry, kind)
        if mine is None or (wire.event_seq(mine) or 0) < (wire.event_seq(raw.decode()) or 0):
            setattr(entry, kind, raw.decode())
