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

from typing import ClassVar

import orjson

from server.feed.sources.adapter import Adapter, ns_from_iso, venue_int
from server.ticks import Quote, Trade

_TAKER = {"B": "buy", "S": "sell"}
# Errors after which reconnecting cannot help: the key or the plan must change.
_FINAL = {402: "auth failed", 409: "insufficient subscription"}


class AlpacaStocks(Adapter):
    kind: ClassVar[str] = "alpaca"
    venue: ClassVar[str] = "ALPACA"
    default_url: ClassVar[str] = "wss://stream.data.alpaca.markets/v2/iex"
    consecutive_trade_ids: ClassVar[bool] = False
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
        sink = self.sink
        try:
            points = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            sink.malformed(f"JSONDecodeError: {str(exc)[:120]}")
            return
        if not isinstance(points, list):
            sink.malformed("not a JSON array of data points")
            return
        # Trades and quotes, nearly every point, are read here in the loop (no call per point
        # but the sink's); the rest in _point.
        names, venue, by_exchange = self.names, self.venue, self.ids_per_exchange
        trade, quote = sink.trade, sink.quote
        for p in points:
            try:
                kind = p["T"]
                if kind == "t" or kind == "q":
                    venue_sym = p["S"]
                    sym = names.get(venue_sym) if type(venue_sym) is str else None
                    if sym is None:
                        self.symbol(venue_sym, "trade" if kind == "t" else "quote")
                    elif kind == "t":
                        taker = p.get("tks")  # crypto only
                        tick = Trade(sym, ns_from_iso(p["t"]), float(p["p"]), float(p["s"]),
                                     None if taker is None else _TAKER.get(str(taker)), venue,
                                     venue_int(p["i"]), recv_ns)  # fmt: skip
                        trade(tick, (p.get("x"), tick.trade_id) if by_exchange else None)
                    else:
                        quote(Quote(sym, ns_from_iso(p["t"]), float(p["bp"]), float(p["bs"]),
                                    float(p["ap"]), float(p["as"]), venue, recv_ns))  # fmt: skip
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
                advice = "check TICKPIPE_ALPACA_KEY_ID, TICKPIPE_ALPACA_SECRET_KEY and its plan"
                sink.refused("", f"{code} {text}: {advice}")
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
