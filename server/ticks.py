"""The Tick: what a trade or a quote is, and the checks every tick passes before it is published."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SYMBOL_RE = re.compile(r"^[A-Z0-9][A-Z0-9._/-]{0,31}$")
SIDES = frozenset({"buy", "sell"})

# Sanity bounds: timestamps between 2000-01-01 and 2100-01-01, in integer ns UTC.
MIN_TS_NS = 946_684_800 * 10**9
MAX_TS_NS = 4_102_444_800 * 10**9


def is_valid_symbol(sym: object) -> bool:
    """A symbol is 1-32 chars of A-Z, 0-9 and ``. _ / -``, starting with a letter or digit."""
    return isinstance(sym, str) and SYMBOL_RE.match(sym) is not None


@dataclass(slots=True)
class Trade:
    sym: str
    ts: int
    price: float
    size: float
    side: str | None = None
    venue: str | None = None


@dataclass(slots=True)
class Quote:
    sym: str
    ts: int
    bid: float
    bid_size: float | None
    ask: float
    ask_size: float | None
    venue: str | None = None

    @property
    def crossed(self) -> bool:
        return self.bid > self.ask


Tick = Trade | Quote


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _valid_ts(ts: object) -> bool:
    return isinstance(ts, int) and not isinstance(ts, bool) and MIN_TS_NS <= ts < MAX_TS_NS


def reject_reason(tick: Tick) -> str | None:
    """Why this tick must not be published, or None if it is good.

    A crossed quote (bid > ask) is not a reason: it happens in real FX data, so it is kept and
    flagged on the wire instead.
    """
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
        if not (_positive(tick.bid) and _positive(tick.ask)):
            return "bad_price"
        # Sizes may be unknown (FX tick files often carry none); if given they must be positive.
        if not all(x is None or _positive(x) for x in (tick.bid_size, tick.ask_size)):
            return "bad_size"
    if tick.venue is not None and not is_valid_symbol(tick.venue):
        return "bad_venue"
    return None
