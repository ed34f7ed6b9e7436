"""Continuity of a venue's stream per symbol: duplicates dropped, holes in trade ids found.

Venues replay after a reconnect (Kraken's snapshot, Coinbase's ``last_match``) and a planned
reconnect overlaps two connections, so the same trade or quote can arrive twice; it is published
once. Where a venue numbers its trades consecutively per symbol, a trade id more than one past
the last one is an upstream gap: the venue's trades in between never reached tickpipe.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass

from server.ticks import Quote

RECENT_IDS = 4096  # trade ids remembered per symbol where ids are not consecutive


@dataclass(frozen=True, slots=True)
class UpstreamGap:
    """The venue's trades ``first``..``last`` (its own trade ids) of ``sym`` never arrived."""

    sym: str
    first: int
    last: int
    detected_ns: int

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


_PUBLISH: tuple[bool, None] = (True, None)
_DROP: tuple[bool, None] = (False, None)


def _seed_key(ts: object, recv_ts: object, *book: object) -> tuple[object, ...]:
    """What tells a quote from an earlier run's last one: its time and book, the time left out
    where it is only the receive time (no venue time, e.g. Binance spot's bookTicker)."""
    return (None if ts == recv_ts else ts, *book)


class Continuity:
    """What has been published per symbol, to judge the next trade or quote."""

    def __init__(self, consecutive_trade_ids: bool) -> None:
        self.consecutive = consecutive_trade_ids
        self.last_trade: dict[str, int] = {}
        # Where ids are not consecutive, per symbol: the recent trades' keys as a set, and the
        # same in arrival order (the oldest is forgotten first).
        self.recent: dict[str, tuple[set[Hashable], collections.deque[Hashable]]] = {}
        self.last_update: dict[str, int] = {}
        self.last_quote: dict[str, tuple[object, ...]] = {}
        self.seeded_quote: dict[str, tuple[object, ...]] = {}  # an earlier run's last (``seed``)
        self.duplicates = 0

    def trade(
        self, sym: str, trade_id: int | None, now_ns: int, key: Hashable = None
    ) -> tuple[bool, UpstreamGap | None]:
        """Whether to publish this trade, and the gap before it, if any. ``key``: what tells
        trades apart where ids are not consecutive, when the id alone does not (Alpaca's SIP:
        exchange and id)."""
        if trade_id is None:
            return _PUBLISH
        if not self.consecutive:
            recent = self.recent.get(sym)
            if recent is None:
                recent = self.recent[sym] = (set(), collections.deque())
            seen, order = recent
            if key is None:
                key = trade_id
            if key in seen:
                self.duplicates += 1
                return _DROP
            seen.add(key)
            order.append(key)
            if len(order) > RECENT_IDS:
                seen.discard(order.popleft())
            return _PUBLISH
        last = self.last_trade.get(sym)
        if last is not None and trade_id <= last:
            self.duplicates += 1
            return _DROP
        self.last_trade[sym] = trade_id
        if last is not None and trade_id > last + 1:
            return True, UpstreamGap(sym, last + 1, trade_id - 1, now_ns)
        return _PUBLISH

    def seed(self, trade: dict[str, object] | None, quote: dict[str, object] | None) -> None:
        """Go on after what an earlier run published (its latest trade and quote events of one
        symbol), so what the venue sends again on subscribing is not published twice."""
        if trade is not None and self.consecutive and type(trade.get("trade_id")) is int:
            self.last_trade.setdefault(str(trade["sym"]), trade["trade_id"])  # type: ignore[arg-type]
        if quote is not None:
            book = (quote.get(f) for f in ("bid", "bid_size", "ask", "ask_size"))
            key = _seed_key(quote.get("ts"), quote.get("recv_ts"), *book)
            self.last_quote.setdefault(str(quote["sym"]), key)
            self.seeded_quote.setdefault(str(quote["sym"]), key)

    def _seeded(self, tick: Quote) -> bool:
        """Whether ``tick``, a venue's first numbered quote of its symbol here, is the quote an
        earlier run published last (``seed``: its update id is not in the event, so its values
        tell; a quote without a venue time has its receive time as ``ts``, left out): counted
        as a duplicate."""
        key = _seed_key(tick.ts, tick.recv_ts, tick.bid, tick.bid_size, tick.ask, tick.ask_size)
        if self.seeded_quote.pop(tick.sym, None) == key:
            self.duplicates += 1
            return True
        return False

    def quote(self, tick: Quote, update_id: int | None) -> bool:
        """Whether to publish this quote: not one already published (by the venue's update id
        when it sends one, else by being the same as the last one)."""
        if update_id is not None:
            last = self.last_update.get(tick.sym)
            if last is None:  # the first numbered one: not the quote an earlier run published
                self.last_update[tick.sym] = update_id
                return not self._seeded(tick)
            if update_id <= last:
                self.duplicates += 1
                return False
            self.last_update[tick.sym] = update_id
            return True
        key = (tick.ts, tick.bid, tick.bid_size, tick.ask, tick.ask_size)
        if self.last_quote.get(tick.sym) == key:
            self.duplicates += 1
            return False
        self.last_quote[tick.sym] = key
        return True
