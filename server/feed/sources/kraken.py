"""Kraken WebSocket v2: the ``trade`` and ``ticker`` channels (the ticker on every best bid/ask
change, ``event_trigger: bbo``).

Each subscription is acknowledged per symbol and channel (``success``); a refused one says why,
naming the symbol (``Currency pair not supported XBT/USD``). ``side`` of a trade is the taker's.
The venue sends ``{"channel":"heartbeat"}`` every second while subscribed, so silence means the
connection is gone. The trade subscription asks for a snapshot (the latest trades): after a
reconnect it fills a short hole, and what was already published is dropped as a duplicate.
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from server.feed.sources.adapter import Adapter, named_in, ns_from_iso, venue_int
from server.ticks import Quote, Trade

_CHANNELS = ("trade", "ticker")


class Kraken(Adapter):
    kind: ClassVar[str] = "kraken"
    venue: ClassVar[str] = "KRAKEN"
    default_url: ClassVar[str] = "wss://ws.kraken.com/v2"
    silence_s: ClassVar[float | None] = 10.0

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
        sink, names, venue = self.sink, self.names, self.venue
        try:
            msg = orjson.loads(raw)
            channel = msg.get("channel")
            snapshot = msg.get("type") == "snapshot"  # what was there before subscribing
            # Trades and quotes, nearly every message, are read here in the loop (a symbol
            # this source did not subscribe is counted by ``symbol``).
            if channel == "trade":
                trade = sink.trade
                for t in msg["data"]:
                    venue_sym = t["symbol"]
                    sym = names.get(venue_sym) if type(venue_sym) is str else None
                    if sym is None:
                        self.symbol(venue_sym, "trade")
                        continue
                    side = t["side"]
                    trade(
                        Trade(sym, ns_from_iso(t["timestamp"]), float(t["price"]),
                              float(t["qty"]), side if side == "buy" or side == "sell" else None,
                              venue, venue_int(t["trade_id"]), recv_ns),
                        snapshot=snapshot,
                    )  # fmt: skip
            elif channel == "ticker":
                quote = sink.quote
                for q in msg["data"]:
                    venue_sym = q["symbol"]
                    sym = names.get(venue_sym) if type(venue_sym) is str else None
                    if sym is None:
                        self.symbol(venue_sym, "ticker")
                        continue
                    ts = q.get("timestamp")
                    quote(
                        Quote(sym, ns_from_iso(ts) if ts else recv_ns, float(q["bid"]),
                              float(q["bid_qty"]), float(q["ask"]), float(q["ask_qty"]),
                              venue, recv_ns),
                        snapshot=snapshot,
                    )  # fmt: skip
            elif channel in ("heartbeat", "status"):
                pass
            elif msg.get("method") == "subscribe":
                self._ack(msg)
            elif msg.get("method") == "pong":
                pass
            else:
                sink.unexpected(f"channel {str(channel)[:32]!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            sink.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")

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
