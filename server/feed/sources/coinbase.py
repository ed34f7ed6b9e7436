"""Coinbase Exchange public feed: the ``matches`` channel (trades) and ``ticker`` (best bid/ask).

Its ``sequence`` runs per product across every channel, so a subscription to some channels sees
holes in it that are not losses; trade gaps are found in ``trade_id`` instead (consecutive per
product). ``side`` of a match is the maker's order side: the aggressor is the other side. On
subscribing, the venue sends each product's ``last_match`` (the latest trade, which after a
reconnect shows how many trades were missed) and a ``ticker``: both are snapshots (the state at
subscribing, not latency).
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from server.feed.sources.adapter import Adapter, Sink, book_side, named_in, ns_from_iso, venue_int
from server.ticks import Quote, Trade

_OTHER_SIDE = {"buy": "sell", "sell": "buy"}
_CHANNELS = ("matches", "ticker")


class Coinbase(Adapter):
    kind: ClassVar[str] = "coinbase"
    venue: ClassVar[str] = "COINBASE"
    default_url: ClassVar[str] = "wss://ws-feed.exchange.coinbase.com"

    def __init__(self, symbols: dict[str, str], sink: Sink, secrets: dict[str, str]) -> None:
        super().__init__(symbols, sink, secrets)
        self._first_ticker: set[object] = set()  # products whose ticker sent on subscribing is due

    def on_connected(self) -> None:
        super().on_connected()
        self._first_ticker = set(self.names)

    def hello(self) -> list[str]:
        return [
            orjson.dumps(
                {"type": "subscribe", "product_ids": list(self.names), "channels": list(_CHANNELS)}
            ).decode()
        ]

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        sink = self.sink
        try:
            msg = orjson.loads(raw)
            kind = msg["type"]
            if kind in ("match", "last_match"):
                sym = self.symbol(msg["product_id"], "match")
                if sym is None:
                    return
                sink.trade(
                    Trade(sym, ns_from_iso(msg["time"]), float(msg["price"]), float(msg["size"]),
                          _OTHER_SIDE[msg["side"]], self.venue, venue_int(msg["trade_id"]),
                          recv_ns),
                    snapshot=kind == "last_match",  # the latest trade, sent on subscribing
                )  # fmt: skip
            elif kind == "ticker":
                sym = self.symbol(msg["product_id"], "ticker")
                if sym is None:
                    return
                sizes = msg.get("best_bid_size"), msg.get("best_ask_size")
                bs, az = (float(x) if x else None for x in sizes)  # ("" for an empty side)
                # An empty side ("" or 0): no price, no size (a one-sided book).
                bid, bid_size = book_side(float(msg["best_bid"] or 0), bs)
                ask, ask_size = book_side(float(msg["best_ask"] or 0), az)
                first = self._first_ticker
                snapshot = bool(first) and msg["product_id"] in first  # the state at subscribing
                if snapshot:
                    first.discard(msg["product_id"])
                sink.quote(
                    Quote(sym, ns_from_iso(msg["time"]) if "time" in msg else recv_ns,
                          bid, bid_size, ask, ask_size, self.venue, recv_ns),
                    None if msg.get("sequence") is None else venue_int(msg["sequence"]),
                    snapshot,
                )  # fmt: skip
            elif kind == "subscriptions":
                self._confirm(msg["channels"])
            elif kind == "error":
                reason = str(msg.get("reason") or "")[:200]
                text = (
                    f"{str(msg.get('message'))[:100]}: {reason}" if reason else msg.get("message")
                )
                refused = named_in(self.names, reason)
                if refused:
                    sink.refused(refused[0], str(text))
                else:
                    sink.venue_error(str(text)[:300])
            elif kind == "heartbeat":
                pass
            else:
                sink.unexpected(f"type {str(kind)[:32]!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

    def _confirm(self, channels: object) -> None:
        """Ready once both channels list every product."""
        listed: dict[str, set[object]] = {}
        for c in channels if isinstance(channels, list) else [None]:
            products = c.get("product_ids") if isinstance(c, dict) else None
            if not isinstance(products, list):
                self.sink.malformed("a subscriptions reply whose channels are not as documented")
                return
            listed[str(c.get("name"))] = set(products)  # type: ignore[union-attr]
        if all(set(self.names) <= listed.get(ch, set()) for ch in _CHANNELS):
            self.sink.subscribed("*")
