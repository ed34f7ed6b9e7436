"""Alpaca market data: US stocks (IEX or SIP) and crypto, trades and quotes.

The session: the venue says ``connected``, the adapter sends its key and secret (from
``TICKPIPE_ALPACA_KEY_ID`` / ``TICKPIPE_ALPACA_SECRET_KEY``; never logged), the venue says
``authenticated``, the adapter subscribes, and the venue's ``subscription`` reply lists what it
serves: a symbol missing from it was refused. Messages are JSON arrays of data points
(``T``: ``t`` trade, ``q`` quote, ``error``, ``success``, ``subscription``). Stock trades carry no
aggressor side; crypto trades carry the taker's (``tks``: ``B`` / ``S``). Trade ids are unique
(stocks: per exchange ``x``, so a replay is told by both) but not consecutive, so no gap is
inferred from them.
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
    ns_from_iso,
    one_sided_quote,
    venue_int,
)
from server.ticks import MAX_TS_NS, MIN_TS_NS, Quote, Trade

_TAKER = {"B": "buy", "S": "sell"}


class _Trade(msgspec.Struct, tag_field="T", tag="t"):
    """A trade data point: the fields read, of the documented types (a JSON integer size or
    price becomes a float, as ``float()`` makes it; other fields of the point are skipped)."""

    S: str
    t: str
    p: float
    s: float
    i: VenueId
    x: str | None = None  # the exchange (stocks)
    tks: str | None = None  # the taker's side (crypto)


class _Quote(msgspec.Struct, tag_field="T", tag="q"):
    """A quote data point: the fields read."""

    S: str
    t: str
    bp: float
    bs: float
    ap: float
    as_: float = msgspec.field(name="as")


class _CheckedTrade(_Trade, tag="t"):
    """A trade point whose price and size the tick checks admit (``Positive``)."""

    p: Positive
    s: Positive


class _CheckedQuote(_Quote, tag="q"):
    """A quote point whose prices and sizes the tick checks admit."""

    bp: Positive
    bs: Positive
    ap: Positive
    as_: Positive = msgspec.field(name="as")


# A frame of trade and quote points, typed: first held to the tick checks (nearly every frame);
# a frame that fails them (a price of 0) read as its documented types, its ticks handed over
# unscreened; anything else fails both (``_frame`` reads it).
_CHECKED_POINTS = msgspec.json.Decoder(list[_CheckedTrade | _CheckedQuote])
_DATA_POINTS = msgspec.json.Decoder(list[_Trade | _Quote])


def _trade_of(p: dict[str, Any]) -> _Trade:
    """A trade point the typed decoding refused, read field by field."""
    taker = p.get("tks")
    return _Trade(p["S"], p["t"], float(p["p"]), float(p["s"]), venue_int(p["i"]), p.get("x"),
                  None if taker is None else str(taker))  # fmt: skip


def _quote_of(p: dict[str, Any]) -> _Quote:
    """A quote point the typed decoding refused, read field by field."""
    return _Quote(p["S"], p["t"], float(p["bp"]), float(p["bs"]), float(p["ap"]), float(p["as"]))


# Errors after which reconnecting cannot help (the venue's codes), and what must change.
_KEYS = "check TICKPIPE_ALPACA_KEY_ID, TICKPIPE_ALPACA_SECRET_KEY and its plan"
_FINAL = {
    402: _KEYS,  # auth failed
    405: "subscribe fewer symbols (--symbols) or get a plan that allows more",  # symbol limit
    409: _KEYS,  # insufficient subscription
    410: "this feed (--url, --source alpaca or alpaca-crypto) does not serve what was asked",
}


class AlpacaStocks(Adapter):
    kind: ClassVar[str] = "alpaca"
    venue: ClassVar[str] = "ALPACA"
    default_url: ClassVar[str] = "wss://stream.data.alpaca.markets/v2/iex"
    consecutive_trade_ids: ClassVar[bool] = False
    screens: ClassVar[bool] = True  # the checked decoding's; the rest calls ``unscreened``
    # What tells a trade from a replay: on SIP a stock trade's id is unique per exchange (``x``),
    # so the key is (exchange, id).
    ids_per_exchange: ClassVar[bool] = True

    def hello(self) -> list[str]:
        return []  # the venue speaks first ("connected")

    def _auth(self) -> str:
        return orjson.dumps(
            {"action": "auth", "key": self.secrets["key_id"], "secret": self.secrets["secret_key"]}
        ).decode()

    def _subscribe(self) -> str:
        syms = list(self.names)
        return orjson.dumps({"action": "subscribe", "trades": syms, "quotes": syms}).decode()

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        # A frame of trades and quotes only, nearly every frame, is decoded straight into the
        # fields read (msgspec, typed: the rest of each point is skipped, not built), held to
        # the tick checks or else (a price of 0) as read; any other frame (a control message,
        # another kind of point, a field not of the documented type) is read point by point by
        # ``_frame``, which counts what it cannot publish.
        points: Sequence[_Trade | _Quote] | None = self.decode_checked(
            raw, recv_ns, _CHECKED_POINTS, _DATA_POINTS
        )
        if points is None:
            self._frame(raw, recv_ns)
            return
        self._ticks(points, recv_ns)

    def _ticks(self, points: Iterable[_Trade | _Quote], recv_ns: int) -> None:
        """Trades and quotes as ticks; a point whose time is not one is counted, the rest go on.
        A time outside the tick checks' range is handed over unscreened (the tickerplant
        rejects it, counted)."""
        sink = self.sink
        names, venue, by_exchange = self.names, self.venue, self.ids_per_exchange
        trade, quote = sink.trade, sink.quote
        lo, hi = MIN_TS_NS, MAX_TS_NS  # the times the tick checks admit
        for p in points:
            try:
                sym = names.get(p.S)
                if sym is None:
                    self.symbol(p.S, "trade" if isinstance(p, _Trade) else "quote")
                    continue
                ts = ns_from_iso(p.t)
                if not lo <= ts < hi:
                    sink.unscreened()
                if isinstance(p, _Trade):
                    taker = p.tks
                    tick = Trade(sym, ts, p.p, p.s, None if taker is None else _TAKER.get(taker),
                                 venue, p.i, recv_ns)  # fmt: skip
                    trade(tick, (p.x, p.i) if by_exchange else None)
                elif p.bp and p.ap:
                    quote(Quote(sym, ts, p.bp, p.bs, p.ap, p.as_, venue, recv_ns))
                else:  # a price of 0: that side of the book is empty
                    quote(one_sided_quote(sym, ts, p.bp, p.bs, p.ap, p.as_, venue, recv_ns))
            except (TypeError, ValueError) as exc:
                sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

    def _frame(self, raw: str | bytes, recv_ns: int) -> None:
        """Read a frame point by point: trades and quotes as ``on_message`` does (what the
        typed decoding refused, e.g. a price sent as a string, judged as ``float()`` judges
        it), every other point by ``_point``; a point that cannot be read is counted."""
        sink = self.sink
        sink.unscreened()  # what the typed decoding refused: the tickerplant screens it
        try:
            points = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            sink.malformed(f"JSONDecodeError: {str(exc)[:120]}")
            return
        if not isinstance(points, list):
            sink.malformed("not a JSON array of data points")
            return
        for p in points:
            try:
                kind = p["T"]
                if kind == "t":
                    self._ticks((_trade_of(p),), recv_ns)
                elif kind == "q":
                    self._ticks((_quote_of(p),), recv_ns)
                else:
                    self._point(p, kind)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

    def _point(self, p: dict[str, object], kind: object) -> None:
        """A data point other than a trade or quote: the session's steps, errors, the rest."""
        sink = self.sink
        if kind == "success":
            if p.get("msg") == "connected":
                sink.reply(self._auth())
            elif p.get("msg") == "authenticated":
                sink.reply(self._subscribe())
        elif kind == "subscription":
            self._confirm(p)
        elif kind == "error":
            code, text = p.get("code"), str(p.get("msg"))[:200]
            if code in _FINAL:
                sink.refused("", f"{code} {text}: {_FINAL[code]}")
            else:
                sink.venue_error(f"{code} {text}")
        else:
            sink.unexpected(f"data point {str(kind)[:32]!r}")

    def _confirm(self, reply: dict[str, object]) -> None:
        for kind in ("trades", "quotes"):
            listed = reply.get(kind) or []
            if not isinstance(listed, list):
                self.sink.malformed(f"a subscription reply whose {kind} is not a list")
                return
            for sym in self.names:
                if sym not in listed and "*" not in listed:
                    self.sink.refused(sym, f"the venue's subscription reply does not list {sym} "
                                           f"among its {kind}")  # fmt: skip
                    return
        self.sink.subscribed("*")


class AlpacaCrypto(AlpacaStocks):
    """Crypto (``BTC/USD``): the same session and data points, taker side on trades."""

    kind: ClassVar[str] = "alpaca-crypto"
    venue: ClassVar[str] = "ALPACA-CRYPTO"
    default_url: ClassVar[str] = "wss://stream.data.alpaca.markets/v1beta3/crypto/us"

    ids_per_exchange: ClassVar[bool] = False  # one venue: the id alone tells a replay
