"""Binance spot and USDⓈ-M futures market streams: ``<sym>@trade`` (or ``@aggTrade``) and
``<sym>@bookTicker`` on one combined-stream connection (``/stream?streams=...``).

Binance answers pings itself (the WebSocket library pongs), closes a connection after 24 hours
(a planned reconnect comes first), and sends ``{"code": n, "msg": ...}`` for a bad request. Its
market streams do not refuse an unknown symbol (they stay silent), so symbols are checked for
the venue's form here. ``m`` is "the buyer is the maker": the aggressor is then the seller.
"""

from __future__ import annotations

import re
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

import orjson

from server.feed.sources.adapter import MS, Adapter, Sink, VenueRefused, book_side, venue_int
from server.ticks import Quote, Trade

_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
MAX_STREAMS = 1024  # a connection's streams at most (the venue's limit)


class BinanceSpot(Adapter):
    kind: ClassVar[str] = "binance"
    venue: ClassVar[str] = "BINANCE"
    default_url: ClassVar[str] = "wss://stream.binance.com:9443/stream"
    lifetime_s: ClassVar[float | None] = 23.5 * 3600  # Binance closes connections at 24 h
    agg_trades = False  # subscribe <sym>@aggTrade (one trade per taker order) instead of @trade
    time_unit = MS  # ns per unit of the venue's times (ms unless the URL asks for µs)

    def __init__(self, symbols: dict[str, str], sink: Sink, secrets: dict[str, str]) -> None:
        super().__init__(symbols, sink, secrets)
        if len(symbols) > MAX_STREAMS // 2:
            raise VenueRefused(
                f"{len(symbols)} symbols are {2 * len(symbols)} streams; {self.venue} serves at "
                f"most {MAX_STREAMS} on one connection (2 a symbol): give a feed at most "
                f"{MAX_STREAMS // 2} symbols and run several feeds, each with its own --name"
            )
        for sym in symbols:
            if not _SYMBOL.match(sym):
                raise VenueRefused(
                    f"{sym!r} is not a {self.venue} symbol: write it as the venue does, e.g. "
                    "BTCUSDT (letters and digits, no separator)"
                )

    def streams(self) -> list[str]:
        trades = "aggTrade" if self.agg_trades else "trade"
        return [f"{s.lower()}@{kind}" for s in self.names for kind in (trades, "bookTicker")]

    def url(self, base: str) -> str:
        """The combined-stream URL: ``base`` (``--url``, its query kept: ``timeUnit=MICROSECOND``
        makes the venue send its times in µs, read as such) and the streams."""
        query = urlsplit(base).query
        unit = dict(parse_qsl(query)).get("timeUnit", "")
        self.time_unit = 1_000 if unit.upper() == "MICROSECOND" else MS
        sep = "&" if query else "" if base.endswith("?") else "?"
        return f"{base}{sep}streams={'/'.join(self.streams())}"

    def hello(self) -> list[str]:
        return []  # the streams are in the URL

    def on_connected(self) -> None:
        self.ready = True  # nothing to confirm: the URL names the streams

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        sink = self.sink
        try:
            msg = orjson.loads(raw)
            data = msg.get("data", msg) if isinstance(msg, dict) else None
            if not isinstance(data, dict):
                sink.malformed("not a JSON object")
                return
            event = data.get("e")
            if event is None and "u" in data and "b" in data:
                event = "bookTicker"  # spot's bookTicker has no event type
            if event in ("trade", "aggTrade", "bookTicker"):
                sym = self.symbol(data["s"], event)
                if sym is None:
                    return
                unit = self.time_unit
                if event == "bookTicker":
                    venue_ts = data.get("T")  # futures only
                    bid, bid_size = book_side(float(data["b"]), float(data["B"]))
                    ask, ask_size = book_side(float(data["a"]), float(data["A"]))
                    sink.quote(
                        Quote(sym, recv_ns if venue_ts is None else venue_int(venue_ts) * unit,
                              bid, bid_size, ask, ask_size, self.venue, recv_ns),
                        venue_int(data["u"]),
                    )  # fmt: skip
                else:
                    sink.trade(
                        Trade(sym, venue_int(data["T"]) * unit, float(data["p"]),
                              float(data["q"]), "sell" if data["m"] else "buy", self.venue,
                              venue_int(data["t" if event == "trade" else "a"]), recv_ns)
                    )  # fmt: skip
            elif "result" in data and "id" in data:
                sink.subscribed("*")
            elif "code" in data and "msg" in data:
                sink.venue_error(f"code {data['code']}: {str(data['msg'])[:200]}")
            else:
                sink.unexpected(f"event {str(event)[:32]!r}" if event else "unknown message")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")


class BinanceFutures(BinanceSpot):
    """USDⓈ-M futures: the same streams, ``T`` on bookTicker is the venue's update time."""

    kind: ClassVar[str] = "binance-futures"
    venue: ClassVar[str] = "BINANCE-FUTURES"
    default_url: ClassVar[str] = "wss://fstream.binance.com/stream"
