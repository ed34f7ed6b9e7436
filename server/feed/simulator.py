"""A seeded market simulator: random-walk mids, realistic spreads, trades at or inside the quote."""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

from server.ticks import Quote, Tick, Trade

# Plausible reference prices for the default universe; other symbols get a stable made-up price.
REFERENCE_PRICES = {
    "AAPL": 228.0, "MSFT": 415.0, "NVDA": 135.0, "AMZN": 198.0, "GOOGL": 172.0,
    "META": 560.0, "TSLA": 250.0, "AVGO": 170.0, "JPM": 222.0, "V": 290.0,
    "UNH": 560.0, "XOM": 118.0, "JNJ": 155.0, "WMT": 80.0, "MA": 505.0,
    "PG": 168.0, "HD": 400.0, "COST": 890.0, "NFLX": 700.0, "AMD": 150.0,
}  # fmt: skip
TICK_SIZE = 0.01
TRADE_SHARE = 0.25  # one tick in four is a trade, the rest are quote updates


@dataclass(slots=True)
class _Book:
    mid: float
    spread_bps: float
    bid: float = 0.0
    ask: float = 0.0
    last_ts: int = 0


def _cents(x: float) -> float:
    return round(round(x / TICK_SIZE) * TICK_SIZE, 2)


class Simulator:
    """Generates interleaved trades and quotes for a set of symbols; same seed, same ticks."""

    def __init__(self, symbols: list[str], seed: int = 7, rate: float = 2000.0) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self._owed = 0.0
        self.symbols = list(symbols)
        self.books: dict[str, _Book] = {}
        for sym in self.symbols:
            price = REFERENCE_PRICES.get(sym) or 10.0 + zlib.crc32(sym.encode()) % 490
            # Cheaper stocks trade at wider spreads in basis points.
            bps = max(0.5, min(8.0, 150.0 / price))
            self.books[sym] = _Book(price, bps)
            self._requote(self.books[sym])
        # More liquid names (earlier in the list) tick more often.
        self.weights = [1.0 / math.sqrt(rank + 1) for rank in range(len(self.symbols))]

    def _requote(self, book: _Book) -> None:
        spread = max(TICK_SIZE, _cents(book.mid * book.spread_bps / 1e4))
        book.bid = _cents(book.mid - spread / 2)
        book.ask = _cents(book.bid + spread)

    def describe(self) -> str:
        return f"simulated ticks for {len(self.symbols)} symbols at {self.rate:.0f} ticks/s"

    def due(self, start_ns: int, end_ns: int) -> list[Tick]:
        """The ticks of ``[start_ns, end_ns)`` at ``rate`` (at most one second's worth)."""
        self._owed += self.rate * min(end_ns - start_ns, 10**9) / 1e9
        n = int(self._owed)
        self._owed -= n
        return self.batch(n, start_ns, end_ns) if n else []

    def batch(self, n: int, start_ns: int, end_ns: int) -> list[Tick]:
        """``n`` ticks with event times spread over ``[start_ns, end_ns)``."""
        rng = self.rng
        syms = rng.choices(self.symbols, weights=self.weights, k=n)
        step = max(1, (end_ns - start_ns) // max(n, 1))
        out: list[Tick] = []
        for k, sym in enumerate(syms):
            book = self.books[sym]
            ts = max(start_ns + k * step, book.last_ts + 1)
            book.last_ts = ts
            if rng.random() < TRADE_SHARE:
                r = rng.random()
                if r < 0.45:
                    price, side = book.ask, "buy"
                elif r < 0.9:
                    price, side = book.bid, "sell"
                else:  # midpoint or hidden-liquidity print inside the spread
                    price, side = _cents((book.bid + book.ask) / 2), None
                size = float(rng.choice((1, 5, 10, 25, 50, 100, 100, 100, 200, 300, 500)))
                out.append(Trade(sym, ts, price, size, side))
            else:
                book.mid *= math.exp(rng.gauss(0.0, 0.00015))
                self._requote(book)
                out.append(
                    Quote(
                        sym,
                        ts,
                        book.bid,
                        float(100 * rng.randint(1, 20)),
                        book.ask,
                        float(100 * rng.randint(1, 20)),
                    )
                )
        return out
