"""Kraken WebSocket v2: the ``trade`` and ``ticker`` channels (the ticker on every best bid/ask
change, ``event_trigger: bbo``).

Each subscription is acknowledged per symbol and channel (``success``); a refused one says why,
naming the symbol (``Currency pair not supported XBT/USD``). ``side`` of a trade is the taker's.
The venue sends ``{"channel":"heartbeat"}`` every second while subscribed, so silence means the
connection is gone. The trade subscription asks for a snapshot (the latest trades): after a
reconnect it fills a short hole, and what was already published is dropped as a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import msgspec
import orjson

from server.feed.sources.adapter import (
    Adapter,
    Positive,
    VenueId,
    named_in,
    ns_from_iso,
    one_sided_quote,
    venue_int,
)
from server.ticks import MAX_TS_NS, MIN_TS_NS, Quote, Trade

_CHANNELS = ("trade", "ticker")


class _Trade(msgspec.Struct):
    """A trade of a ``trade`` message: the fields read, of the documented types (a JSON integer
    price or size becomes a float, as ``float()`` makes it; the rest is skipped)."""

    symbol: str
    side: str
    price: float
    qty: float
    trade_id: VenueId
    timestamp: str


class _Ticker(msgspec.Struct):
    """A ``ticker`` entry: its best bid/ask (the day's figures are skipped)."""

    symbol: str
    bid: float
    bid_qty: float
    ask: float
    ask_qty: float
    timestamp: str | None = None


class _CheckedTrade(_Trade):
    """A trade whose price and size the tick checks admit (``Positive``)."""

    price: Positive
    qty: Positive


class _CheckedTicker(_Ticker):
    """A ticker entry whose prices and sizes the tick checks admit."""

    bid: Positive
    bid_qty: Positive
    ask: Positive
    ask_qty: Positive


class _Trades(msgspec.Struct, tag_field="channel", tag="trade"):
    type: str
    data: Sequence[_Trade]


class _Tickers(msgspec.Struct, tag_field="channel", tag="ticker"):
    type: str
    data: Sequence[_Ticker]


class _CheckedTrades(_Trades, tag="trade"):
    data: Sequence[_CheckedTrade]


class _CheckedTickers(_Tickers, tag="ticker"):
    data: Sequence[_CheckedTicker]


class _Heartbeat(msgspec.Struct, tag_field="channel", tag="heartbeat"):
    pass


# A trade, ticker or heartbeat message, typed: first held to the tick checks (nearly every
# message); one that fails them (a bid of 0) read as its documented types, its ticks handed over
# unscreened; anything else fails both (``_message`` reads it).
_CHECKED = msgspec.json.Decoder(_CheckedTrades | _CheckedTickers | _Heartbeat)
_DATA = msgspec.json.Decoder(_Trades | _Tickers | _Heartbeat)


def _trade_of(t: dict[str, Any]) -> _Trade:
    """A trade the typed decoding refused, read field by field."""
    return _Trade(t["symbol"], t["side"], float(t["price"]), float(t["qty"]),
                  venue_int(t["trade_id"]), t["timestamp"])  # fmt: skip


def _ticker_of(q: dict[str, Any]) -> _Ticker:
    """A ticker entry the typed decoding refused, read field by field."""
    return _Ticker(q["symbol"], float(q["bid"]), float(q["bid_qty"]), float(q["ask"]),
                   float(q["ask_qty"]), q.get("timestamp"))  # fmt: skip


class Kraken(Adapter):
    kind: ClassVar[str] = "kraken"
    venue: ClassVar[str] = "KRAKEN"
    default_url: ClassVar[str] = "wss://ws.kraken.com/v2"
    silence_s: ClassVar[float | None] = 10.0
    screens: ClassVar[bool] = True  # the checked decoding's; the rest calls ``unscreened``

    def on_connected(self) -> None:
        super().on_connected()
        self._acks: set[tuple[str, str]] = set()

    def hello(self) -> list[str]:
        syms = list(self.names)
        return [
            orjson.dumps(
                {"method": "subscribe",
                 "params": {"channel": "trade", "symbol": syms, "snapshot": True}, "req_id": 1}
            ).decode(),
            orjson.dumps(
                {"method": "subscribe",
                 "params": {"channel": "ticker", "symbol": syms, "event_trigger": "bbo"},
                 "req_id": 2}
            ).decode(),
        ]  # fmt: skip

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        # A trade, ticker or heartbeat message, nearly every one, is decoded straight into the
        # fields read (msgspec, typed: a ticker's day figures are skipped, not built); any other
        # message (an acknowledgement, an error, a field not of the documented type) is read by
        # ``_message``, which counts what it cannot publish.
        msg = self.decode_checked(raw, recv_ns, _CHECKED, _DATA)
        if msg is None:
            self._message(raw, recv_ns)
            return
        try:
            if isinstance(msg, _Trades):
                self._trades(msg.data, msg.type == "snapshot", recv_ns)
            elif isinstance(msg, _Tickers):
                self._tickers(msg.data, msg.type == "snapshot", recv_ns)
        except ValueError as exc:  # a time that is not one: the rest of the message is not read
            self.sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

    def _trades(self, trades: Iterable[_Trade], snapshot: bool, recv_ns: int) -> None:
        """The trades of a message (``snapshot``: what traded before subscribing); a symbol this
        source did not subscribe is counted by ``symbol``."""
        sink = self.sink
        names, venue, trade = self.names, self.venue, sink.trade
        lo, hi = MIN_TS_NS, MAX_TS_NS  # the times the tick checks admit
        for t in trades:
            sym = names.get(t.symbol)
            if sym is None:
                self.symbol(t.symbol, "trade")
                continue
            side, ts = t.side, ns_from_iso(t.timestamp)
            if not lo <= ts < hi:
                sink.unscreened()  # the tickerplant rejects it, counted
            trade(Trade(sym, ts, t.price, t.qty, side if side == "buy" or side == "sell" else None,
                        venue, t.trade_id, recv_ns), snapshot=snapshot)  # fmt: skip

    def _tickers(self, tickers: Iterable[_Ticker], snapshot: bool, recv_ns: int) -> None:
        """The best bids/asks of a ticker message, as ``_trades``; without the venue's time,
        the receive time stands in."""
        sink = self.sink
        names, venue, quote = self.names, self.venue, sink.quote
        lo, hi = MIN_TS_NS, MAX_TS_NS  # the times the tick checks admit
        for q in tickers:
            sym = names.get(q.symbol)
            if sym is None:
                self.symbol(q.symbol, "ticker")
                continue
            ts = ns_from_iso(q.timestamp) if q.timestamp else recv_ns
            if not lo <= ts < hi:
                sink.unscreened()
            if q.bid and q.ask:
                tick = Quote(sym, ts, q.bid, q.bid_qty, q.ask, q.ask_qty, venue, recv_ns)
            else:  # a price of 0: that side of the book is empty
                tick = one_sided_quote(sym, ts, q.bid, q.bid_qty, q.ask, q.ask_qty, venue, recv_ns)
            quote(tick, snapshot=snapshot)

    def _message(self, raw: str | bytes, recv_ns: int) -> None:
        """Read a message the typed decoding did not take: trades and tickers as ``on_message``
        does (what the typing refused, e.g. a price sent as a string, judged as ``float()``
        judges it, entry by entry), acknowledgements, the rest counted."""
        self.sink.unscreened()  # what the typed decoding refused: the tickerplant screens it
        try:
            msg = orjson.loads(raw)
            channel = msg.get("channel")
            snapshot = msg.get("type") == "snapshot"  # what was there before subscribing
            if channel == "trade":
                self._trades((_trade_of(t) for t in msg["data"]), snapshot, recv_ns)
            elif channel == "ticker":
                self._tickers((_ticker_of(q) for q in msg["data"]), snapshot, recv_ns)
            elif channel in ("heartbeat", "status"):
                pass
            elif msg.get("method") == "subscribe":
                self._ack(msg)
            elif msg.get("method") == "pong":
                pass
            elif msg.get("success") is False or "error" in msg:  # a reply to another request
                method = str(msg.get("method") or "a request")[:32]
                self.sink.venue_error(f"{method}: {str(msg.get('error'))[:200]}")
            else:
                self.sink.unexpected(f"channel {str(channel)[:32]!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

    def _ack(self, msg: dict[str, object]) -> None:
        if msg.get("success") is True:
            result = msg.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("symbol"), str):
                self.sink.malformed("a subscribe acknowledgement without its channel and symbol")
                return
            self._acks.add((str(result.get("channel")), result["symbol"]))
            if len(self._acks) >= len(_CHANNELS) * len(self.names):
                self.sink.subscribed("*")
            return
        error = str(msg.get("error") or "subscription refused")[:200]
        symbol = msg.get("symbol")  # the refused symbol, when the venue says which
        named = [str(symbol)] if symbol in self.names else named_in(self.names, error)
        if named:
            self.sink.refused(named[0], error)
        else:
            self.sink.venue_error(error)
