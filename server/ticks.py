"""The Tick: what a trade or a quote is, the checks every tick passes before it is published, and
the tick table every part of history shares (``TICK_SCHEMA``, ``STORED_SCHEMA``)."""

from __future__ import annotations

import math
import re

import msgspec
import polars as pl

SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9._/-]{0,31}\Z")  # \Z: "AAPL\n" is no symbol
SIDES = frozenset({"buy", "sell"})

# Sanity bounds: timestamps between 2000-01-01 and 2100-01-01, in integer ns UTC.
MIN_TS_NS = 946_684_800 * 10**9
MAX_TS_NS = 4_102_444_800 * 10**9

# Ticks as a table: one row per trade or quote, what vendor files become (``server.history.
# importers``). A field a tick does not have is null (a trade's bid, a quote's price).
TICK_SCHEMA: dict[str, pl.DataType] = {
    "sym": pl.Utf8(),
    "type": pl.Utf8(),
    "ts": pl.Datetime("ns", "UTC"),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "side": pl.Utf8(),
    "bid": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask": pl.Float64(),
    "ask_size": pl.Float64(),
    "venue": pl.Utf8(),
    "crossed": pl.Boolean(),
    # Vendor flags kept with the tick (``suspicious``, ``corrected``, ...), comma-separated;
    # null when the vendor flagged nothing. Live ticks carry none.
    "flags": pl.Utf8(),
}
# Stored rows, in this column order: the tick table plus where each tick stands in its symbol's
# sequence (``epoch``, ``seq``). The recorder, the importer, history queries, replays and
# catch-up rows all use it.
STORED_SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in TICK_SCHEMA.items() if k in ("sym", "type", "ts")},
    "epoch": pl.Int64(),
    "seq": pl.Int64(),
    **{k: v for k, v in TICK_SCHEMA.items() if k not in ("sym", "type", "ts")},
}


_VALID_SEEN: set[str] = set()  # symbols already found valid (a feed publishes a few, often)


def is_valid_symbol(sym: object) -> bool:
    """A symbol is 1-32 chars of A-Z, 0-9 and ``. _ / -``, starting with a letter or digit."""
    if not isinstance(sym, str):
        return False
    if sym in _VALID_SEEN:
        return True
    if SYMBOL_RE.match(sym) is not None:
        if len(_VALID_SEEN) > 100_000:
            _VALID_SEEN.clear()
        _VALID_SEEN.add(sym)
        return True
    return False


# A tick is a msgspec Struct, not a dataclass: its constructor is C (a feed builds one per trade
# or quote: 110 ns where the dataclass' generated __init__ took 230), and it is left out of the
# garbage collector (``gc=False``: it holds only strings, numbers and None, so it can be in no
# reference cycle), so the ticks in flight in a busy feed add nothing to its collections.
class Trade(msgspec.Struct, gc=False):
    sym: str
    ts: int
    price: float
    size: float
    side: str | None = None
    venue: str | None = None
    # A live venue's own trade id, and when tickpipe received the message (ns): published, not
    # stored (history keeps ``ts``, the venue's event time).
    trade_id: int | None = None
    recv_ts: int | None = None


class Quote(msgspec.Struct, gc=False):
    """A best bid and ask. One side may be absent (None, and its size too): a venue's book with
    no bid or no ask (Alpaca and Binance send a price of 0 for it) is kept, one-sided."""

    sym: str
    ts: int
    bid: float | None
    bid_size: float | None
    ask: float | None
    ask_size: float | None
    venue: str | None = None
    recv_ts: int | None = None

    @property
    def crossed(self) -> bool:
        bid, ask = self.bid, self.ask
        return bid is not None and ask is not None and bid > ask


Tick = Trade | Quote


_INF = math.inf


def _positive(x: object) -> bool:
    if type(x) is float:  # the usual case first: NaN and infinity fail the comparison
        return 0.0 < x < _INF
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _valid_ts(ts: object) -> bool:
    return type(ts) is int and MIN_TS_NS <= ts < MAX_TS_NS


def reject_reason(tick: Tick) -> str | None:
    """Why this tick must not be published, or None if it is good.

    A crossed quote (bid > ask) is not a reason: it happens in real FX data, so it is kept and
    flagged on the wire instead.
    """
    # The usual tick first, in one expression (a feed screens every tick): a symbol and venue
    # seen valid before, int times and finite positive float prices and sizes. Whatever this
    # does not pass outright is judged in full below, which names the reason.
    try:
        ts, recv, venue = tick.ts, tick.recv_ts, tick.venue
        if (
            tick.sym in _VALID_SEEN
            and type(ts) is int
            and MIN_TS_NS <= ts < MAX_TS_NS
            and (recv is None or (type(recv) is int and MIN_TS_NS <= recv < MAX_TS_NS))
            and (venue is None or venue in _VALID_SEEN)
        ):
            if type(tick) is Quote:
                bid, ask, bid_size, ask_size = tick.bid, tick.ask, tick.bid_size, tick.ask_size
                if (
                    type(bid) is float
                    and 0.0 < bid < _INF
                    and type(ask) is float
                    and 0.0 < ask < _INF
                    and (bid_size is None or (type(bid_size) is float and 0.0 < bid_size < _INF))
                    and (ask_size is None or (type(ask_size) is float and 0.0 < ask_size < _INF))
                ):
                    return None
            elif type(tick) is Trade:
                price, size, side = tick.price, tick.size, tick.side
                if (
                    type(price) is float
                    and 0.0 < price < _INF
                    and type(size) is float
                    and 0.0 < size < _INF
                    and (side is None or side == "buy" or side == "sell")
                ):
                    return None
    except TypeError:  # an unhashable symbol or venue: judged below
        pass
    return _judged(tick)


def _judged(tick: Tick) -> str | None:
    if not is_valid_symbol(tick.sym):
        return "bad_symbol"
    if not _valid_ts(tick.ts):
        return "bad_timestamp"
    if isinstance(tick, Trade):
        if not _positive(tick.price):
            return "bad_price"
        if not _positive(tick.size):
            return "bad_size"
        if tick.side is not None and tick.side not in SIDES:
            return "bad_side"
    else:
        bid, ask = tick.bid, tick.ask
        # One side may be absent (a one-sided book), not both; a side given must be positive.
        if (bid is None and ask is None) or not all(x is None or _positive(x) for x in (bid, ask)):
            return "bad_price"
        # Sizes may be unknown (FX tick files often carry none); if given they must be positive,
        # and an absent side has none.
        if not all(x is None or _positive(x) for x in (tick.bid_size, tick.ask_size)) or (
            (bid is None and tick.bid_size is not None)
            or (ask is None and tick.ask_size is not None)
        ):
            return "bad_size"
    if tick.venue is not None and not is_valid_symbol(tick.venue):
        return "bad_venue"
    if tick.recv_ts is not None and not _valid_ts(tick.recv_ts):
        return "bad_timestamp"
    return None
