"""QuantConnect Lean tick data: equity (AlgoSeek) trades and quotes, forex and CFD quotes, crypto
trades and quotes; one CSV without a header inside each day's zip.

Layouts as Lean's own reader parses them (``Common/Data/Market/Tick.cs``, QuantConnect/Lean,
Apache-2.0; see tests/data/vendors/quantconnect_lean/LAYOUT.md). Time is milliseconds after
midnight (decimals allowed) in the data time zone of the file's market; the file's place in
Lean's data folder says which market it is (``<type>/<market>/tick/<symbol>/YYYYMMDD_<kind>.zip``,
e.g. ``forex/fxcm/tick/eurusd/20140505_quote.zip``), or ``--lean-market forex/fxcm`` for a file
kept elsewhere. A row the vendor marks suspicious is kept and flagged ``suspicious``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import polars as pl

from server.history.importers import common, table

NAME_RE = re.compile(
    r"^(?P<date>\d{8})_(?P<sym>[a-z0-9._-]+?)_"
    r"(?:(?P<kind>trade|quote)_tick|tick_(?P<kind2>trade|quote))\.csv$",
    re.IGNORECASE,
)
# The data time zone of each market's tick files: Lean's market-hours database
# (Data/market-hours/market-hours-database.json, QuantConnect/Lean commit
# 24863901deffa9ec7985e21ef8fbdb0258efb9e4), "dataTimeZone" of the "<Type>-<market>-[*]" entries.
# Lean's "UTC-05" (a fixed offset, no daylight saving) is "Etc/GMT+5" (POSIX inverts the sign).
DATA_TIME_ZONES: dict[tuple[str, str], str] = {
    ("equity", "usa"): "America/New_York",
    ("forex", "fxcm"): "Etc/GMT+5",
    ("forex", "oanda"): "UTC",
    ("forex", "interactivebrokers"): "UTC",
    ("cfd", "fxcm"): "Etc/GMT+5",
    ("cfd", "oanda"): "UTC",
    ("cfd", "interactivebrokers"): "UTC",
    **{("crypto", m): "UTC" for m in ("binance", "binanceus", "bitfinex", "bybit", "coinbase",
                                      "ftx", "ftxus", "kraken")},
    **{("cryptofuture", m): "UTC" for m in ("binance", "bybit", "dydx")},
}  # fmt: skip
# Symbols whose own entry overrides their market's zone (same database): FXCM CFDs in UTC.
SYMBOL_TIME_ZONES: dict[tuple[str, str, str], str] = {
    ("cfd", "fxcm", s.lower()): "UTC"
    for s in ("AU200AUD", "BCOUSD", "CH20CHF", "DE10YBEUR", "DE30EUR", "DXYUSD", "ES35EUR",
              "EU50EUR", "FR40EUR", "HK33HKD", "IT40EUR", "JP225JPY", "NAS100USD", "NATGASUSD",
              "SPX500USD", "UK100GBP", "US30USD", "WTICOUSD", "XAGUSD", "XAUUSD", "XCUUSD",
              "XPDUSD", "XPTUSD")
}  # fmt: skip
TYPES = ("equity", "forex", "cfd", "crypto", "cryptofuture")
GUIDE = (
    "QuantConnect Lean tick CSV, no header, inside YYYYMMDD_trade.zip / YYYYMMDD_quote.zip,\n"
    "read where Lean keeps it: <type>/<market>/tick/<symbol>/ (or --lean-market TYPE/MARKET).\n"
    "Time: ms after midnight in the market's data time zone (Lean's market-hours database:\n"
    "equity/usa New York, forex/fxcm and cfd/fxcm UTC-5, oanda and crypto UTC).\n"
    "  equity trade (YYYYMMDD_aapl_Trade_Tick.csv, prices x 10000):\n"
    "    34200000,4868000,100,P,00000000,0   (time,price,size,exchange,condition,suspicious)\n"
    "  equity quote: 34200000,4867000,300,4869000,200,P,00000000,0   (time,bid,bid_size,ask,\n"
    "    ask_size,exchange,condition,suspicious)\n"
    "  forex/cfd quote (YYYYMMDD_eurusd_tick_quote.csv): 3074,1.38756,1.38758   (time,bid,ask)\n"
    "  crypto trade: 86400,232.40,93.1[,suspicious]   quote: 86400,232.40,20392.0,232.42,8059.5\n"
    "Suspicious rows are kept and flagged 'suspicious'."
)


def market_of(path: Path, given: str | None) -> tuple[str, str] | None:
    """(security type, market) from ``--lean-market`` or the file's place in Lean's folders."""
    if given is not None:
        kind, _, market = given.lower().partition("/")
        if (kind, market) not in DATA_TIME_ZONES:
            known = ", ".join(f"{t}/{m}" for t, m in DATA_TIME_ZONES)
            raise ValueError(f"--lean-market {given!r} is not one of {known}")
        return kind, market
    parts = [p.lower() for p in path.resolve().parts]
    if len(parts) >= 5 and parts[-3] == "tick" and parts[-5] in TYPES:
        return parts[-5], parts[-4]
    return None


def parse(data: bytes, path: Path, name: str, symbol: str | None, market: str | None
          ) -> pl.DataFrame:  # fmt: skip
    """Ticks (before the checks) of one Lean tick CSV; ``name`` is the CSV's own name."""
    named = NAME_RE.match(name)
    if named is None:
        raise ValueError(
            f"{name!r} is not a Lean tick file name; expected YYYYMMDD_symbol_Trade_Tick.csv, "
            "YYYYMMDD_symbol_Quote_Tick.csv (equity) or YYYYMMDD_symbol_tick_quote.csv / "
            "_tick_trade.csv (forex, cfd, crypto), inside YYYYMMDD_<trade|quote>.zip"
        )
    day = dt.datetime.strptime(named["date"], "%Y%m%d").date()
    quotes = (named["kind"] or named["kind2"]).lower() == "quote"
    place = market_of(path, market)
    if place is None:
        if named["kind"] is None:
            raise ValueError(
                f"{path.name}: cannot tell the market of this Lean file (its time zone depends "
                "on it); keep it in Lean's folders (<type>/<market>/tick/<symbol>/) or pass "
                "--lean-market, e.g. forex/fxcm"
            )
        place = ("equity", "usa")  # AlgoSeek's naming is only used for US equities
    kind, market_name = place
    sym_file = named["sym"].lower()
    tz = SYMBOL_TIME_ZONES.get((kind, market_name, sym_file), DATA_TIME_ZONES[place])
    sym = symbol or named["sym"]
    if kind == "equity":
        frame = _equity(data, quotes)
    elif kind in ("forex", "cfd"):
        if not quotes:
            raise ValueError(f"{name}: Lean has only quote ticks for {kind}")
        frame = _forex(data)
    else:
        frame = _crypto(data, quotes)
    return frame.with_columns(
        sym=pl.lit(sym),
        ts=common.since_midnight_ts("time", "ms", day, tz),
        flags=pl.when(pl.col("suspicious").str.strip_chars().is_in(["1", "true", "True"])).then(
            pl.lit("suspicious")
        ),
        venue=pl.col("exchange") if kind == "equity" else pl.lit(market_name.upper()),
    )


def _present(price: str, size: str | None) -> pl.Expr:
    """A zero price (or size) on one side means that side is absent from the quote."""
    ok = pl.col(price) != 0
    return ok if size is None else ok & (pl.col(size) != 0)


def _equity(data: bytes, quotes: bool) -> pl.DataFrame:
    scale = common.PRICE_SCALE_1E4
    if not quotes:
        columns = {"time": pl.Utf8(), "price": pl.Float64(), "size": pl.Float64(),
                   "exchange": pl.Utf8(), "condition": pl.Utf8(),
                   "suspicious": pl.Utf8()}  # fmt: skip
        rows = table.read_rows(data, columns, header=False)
        return rows.with_columns(
            *common.trade_columns(),
            price=common.unscale(pl.col("price"), scale),
            side=pl.lit(None, pl.Utf8),
        )
    columns = {"time": pl.Utf8(), "bid": pl.Float64(), "bid_size": pl.Float64(),
               "ask": pl.Float64(), "ask_size": pl.Float64(), "exchange": pl.Utf8(),
               "condition": pl.Utf8(), "suspicious": pl.Utf8()}  # fmt: skip
    rows = table.read_rows(data, columns, header=False)
    bid_ok, ask_ok = _present("bid", "bid_size"), _present("ask", "ask_size")
    return rows.with_columns(
        *common.quote_columns(),
        bid=pl.when(bid_ok).then(common.unscale(pl.col("bid"), scale)),
        bid_size=pl.when(bid_ok).then(pl.col("bid_size")),
        ask=pl.when(ask_ok).then(common.unscale(pl.col("ask"), scale)),
        ask_size=pl.when(ask_ok).then(pl.col("ask_size")),
    )


def _forex(data: bytes) -> pl.DataFrame:
    rows = table.read_rows(data, {"time": pl.Utf8(), "bid": pl.Float64(), "ask": pl.Float64()},
                           header=False)  # fmt: skip
    return rows.with_columns(
        *common.quote_columns(),
        bid=pl.when(_present("bid", None)).then(pl.col("bid")),
        ask=pl.when(_present("ask", None)).then(pl.col("ask")),
        bid_size=pl.lit(None, pl.Float64),
        ask_size=pl.lit(None, pl.Float64),
        exchange=pl.lit(None, pl.Utf8),
        suspicious=pl.lit(None, pl.Utf8),
    )


def _crypto(data: bytes, quotes: bool) -> pl.DataFrame:
    if not quotes:
        columns = {"time": pl.Utf8(), "price": pl.Float64(), "size": pl.Float64(),
                   "suspicious": pl.Utf8()}  # fmt: skip
        rows = table.read_rows(data, columns, header=False)
        return rows.with_columns(
            *common.trade_columns(), side=pl.lit(None, pl.Utf8), exchange=pl.lit(None, pl.Utf8)
        )
    columns = {"time": pl.Utf8(), "bid": pl.Float64(), "bid_size": pl.Float64(),
               "ask": pl.Float64(), "ask_size": pl.Float64(), "suspicious": pl.Utf8()}  # fmt: skip
    rows = table.read_rows(data, columns, header=False)
    bid_ok, ask_ok = _present("bid", "bid_size"), _present("ask", "ask_size")
    return rows.with_columns(
        *common.quote_columns(),
        bid=pl.when(bid_ok).then(pl.col("bid")),
        bid_size=pl.when(bid_ok).then(pl.col("bid_size")),
        ask=pl.when(ask_ok).then(pl.col("ask")),
        ask_size=pl.when(ask_ok).then(pl.col("ask_size")),
        exchange=pl.lit(None, pl.Utf8),
    )
