"""Live venue sources: one adapter per venue protocol (``binance``, ``coinbase``, ...), driven by
a session that keeps the connection (``session.VenueFeed``), publishing through the same
tickerplant as the simulator.

    venue WebSocket -> adapter (parse, normalise) -> session (continuity, reconnects, figures)
                    -> tickerplant (screen, publish atomically) -> Redis
"""

from __future__ import annotations

from server.feed.sources.adapter import Adapter, VenueRefused
from server.feed.sources.alpaca import AlpacaCrypto, AlpacaStocks
from server.feed.sources.binance import BinanceFutures, BinanceSpot
from server.feed.sources.coinbase import Coinbase
from server.feed.sources.kraken import Kraken
from server.feed.sources.session import SessionOptions, VenueFeed
from server.ticks import is_valid_symbol

ADAPTERS: dict[str, type[Adapter]] = {
    a.kind: a for a in (BinanceSpot, BinanceFutures, Coinbase, Kraken, AlpacaStocks, AlpacaCrypto)
}
KEYED = {"alpaca", "alpaca-crypto"}  # sources that need TICKPIPE_ALPACA_KEY_ID / _SECRET_KEY

__all__ = ["ADAPTERS", "KEYED", "SessionOptions", "VenueFeed", "VenueRefused", "symbol_map"]


def symbol_map(symbols: list[str], renames: list[str]) -> dict[str, str]:
    """Venue symbol -> tickpipe symbol: each as given (upper case) unless ``VENUE_SYM=SYM``
    renames it. Raises ``ValueError`` saying what to fix."""
    names = {s.strip().upper(): s.strip().upper() for s in symbols if s.strip()}
    if not names:
        raise ValueError("--symbols needs at least one symbol, e.g. BTCUSDT,ETHUSDT")
    for item in renames:
        venue_sym, sep, sym = item.partition("=")
        venue_sym, sym = venue_sym.strip().upper(), sym.strip().upper()
        if not sep or not venue_sym or not sym:
            raise ValueError(f"--map {item!r}: write VENUE_SYMBOL=SYMBOL, e.g. BTCUSDT=BTC-USDT")
        if venue_sym not in names:
            raise ValueError(f"--map {item!r}: {venue_sym} is not among --symbols")
        names[venue_sym] = sym
    seen: dict[str, str] = {}
    for venue_sym, sym in names.items():
        if sym in seen:
            raise ValueError(
                f"{seen[sym]} and {venue_sym} would both be published as {sym}: each tickpipe "
                "symbol comes from one venue symbol (fix --map)"
            )
        seen[sym] = venue_sym
    for sym in names.values():
        if not is_valid_symbol(sym):
            raise ValueError(
                f"{sym!r} cannot be a tickpipe symbol (1-32 of A-Z 0-9 . _ / -); rename it with "
                "--map VENUE_SYMBOL=SYMBOL"
            )
    return names
