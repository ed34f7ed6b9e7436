"""Binance public data dumps (data.binance.vision): trades, aggTrades and bookTicker CSVs.

Layouts from ``binance/binance-public-data`` README.md (see tests/data/vendors/binance_vision/
LAYOUT.md): spot files have no header, futures files have one; spot trades carry 7 columns and
futures 6 (no best-match column), spot aggTrades 8 and futures 7. Times are milliseconds since
the epoch (13 digits), or microseconds in newer spot files (16 digits); both are read.
``is_buyer_maker`` true means the seller was the aggressor. The symbol comes from the file name
(``BTCUSDT-trades-2024-01-02.csv``, also inside ``BTCUSDT-trades-2024-01.zip``) or ``--symbol``;
the venue is BINANCE (spot: the column count) or BINANCE-FUTURES.
"""

from __future__ import annotations

import re

import polars as pl

from server.history.importers import common, table

NAME_RE = re.compile(
    r"^(?P<sym>[A-Za-z0-9]+)-(?P<kind>trades|aggTrades|bookTicker)-\d{4}-\d{2}(-\d{2})?\.csv$"
)
# Milliseconds below this, microseconds from it (2000-2100 in ms is 9.5e11 .. 4.1e12).
MICROSECONDS_FROM = 10**14

TRADES_GUIDE = (
    "Binance public data trades (spot: no header, 7 columns; futures: header, 6 columns):\n"
    "  id,price,qty,quote_qty,time,is_buyer_maker[,is_best_match]\n"
    "  51175358,17.80180000,5.69000000,101.29224200,1583709433583,True,True\n"
    "time: ms (or us in newer spot files) since the epoch. Symbol from the file name\n"
    "SYMBOL-trades-YYYY-MM[-DD].csv (or .zip), or --symbol."
)
AGG_TRADES_GUIDE = (
    "Binance public data aggTrades (spot: no header, 8 columns; futures: header, 7):\n"
    "  aggregate trade id,price,quantity,first trade id,last trade id,time,\n"
    "  was the buyer the maker[,was the trade the best price match]\n"
    "  26129,0.01633102,4.70443515,27781,27781,1498793709153,true\n"
    "Symbol from the file name SYMBOL-aggTrades-YYYY-MM[-DD].csv (or .zip), or --symbol."
)
BOOK_TICKER_GUIDE = (
    "Binance public data bookTicker (futures), header:\n"
    "  update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,\n"
    "  event_time\n"
    "  1,42000.1,2.5,42000.2,1.25,1704153600123,1704153600125\n"
    "Best bid and ask as quotes at transaction_time (ms). Symbol from the file name\n"
    "SYMBOL-bookTicker-YYYY-MM-DD.csv (or .zip), or --symbol."
)

TRADE_COLUMNS: dict[str, pl.DataType] = {
    "id": pl.Utf8(),
    "price": pl.Float64(),
    "qty": pl.Float64(),
    "quote_qty": pl.Float64(),
    "time": pl.Int64(),
    "is_buyer_maker": pl.Utf8(),
    "is_best_match": pl.Utf8(),
}
AGG_TRADE_COLUMNS: dict[str, pl.DataType] = {
    "agg_trade_id": pl.Utf8(),
    "price": pl.Float64(),
    "qty": pl.Float64(),
    "first_trade_id": pl.Utf8(),
    "last_trade_id": pl.Utf8(),
    "time": pl.Int64(),
    "is_buyer_maker": pl.Utf8(),
    "is_best_match": pl.Utf8(),
}
BOOK_TICKER_COLUMNS: dict[str, pl.DataType] = {
    "update_id": pl.Utf8(),
    "bid": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask": pl.Float64(),
    "ask_size": pl.Float64(),
    "transaction_time": pl.Int64(),
    "event_time": pl.Int64(),
}
KINDS = {"binance-trades": "trades", "binance-aggtrades": "aggTrades",
         "binance-bookticker": "bookTicker"}  # fmt: skip


def has_header(data: bytes) -> bool:
    """A header row starts with a word; a data row with a number."""
    first = table.first_line(data).split(",", 1)[0].strip().strip('"')
    return bool(first) and not first.lstrip("-").replace(".", "", 1).isdigit()


def symbol_of(name: str, fmt: str, symbol: str | None) -> str:
    named = NAME_RE.match(name)
    if symbol is not None:
        return symbol
    if named is not None and named["kind"] == KINDS[fmt]:
        return named["sym"]
    raise ValueError(
        f"{name!r} does not name its symbol the Binance way (SYMBOL-{KINDS[fmt]}-YYYY-MM-DD.csv); "
        "keep the published file name or pass --symbol BTCUSDT"
    )


def epoch_ms_or_us(col: str) -> pl.Expr:
    t = pl.col(col)
    return common.epoch_ts(
        pl.when(t >= MICROSECONDS_FROM)
        .then(common.times(t, 1_000))
        .otherwise(common.times(t, 10**6))
    )


def aggressor(col: str) -> pl.Expr:
    """``is_buyer_maker``: true, the buyer rested and the seller hit it (a sell)."""
    maker = pl.col(col).str.strip_chars().str.to_lowercase()
    return (
        pl.when(maker == "true")
        .then(pl.lit("sell"))
        .when(maker == "false")
        .then(pl.lit("buy"))
        .otherwise(pl.lit("?"))
    )


def parse(data: bytes, name: str, fmt: str, symbol: str | None) -> pl.DataFrame:
    """Ticks (before the checks) of one Binance dump file of kind ``fmt``."""
    sym = symbol_of(name, fmt, symbol)
    header = has_header(data)
    if fmt == "binance-bookticker":
        rows = table.read_rows(data, BOOK_TICKER_COLUMNS, header=header)
        at = (
            pl.when(pl.col("transaction_time") > 0).then("transaction_time").otherwise("event_time")
        )
        return rows.with_columns(
            *common.quote_columns(),
            sym=pl.lit(sym),
            venue=pl.lit("BINANCE-FUTURES"),
            ts=common.epoch_ts(common.times(at, 10**6)),
        )
    columns = TRADE_COLUMNS if fmt == "binance-trades" else AGG_TRADE_COLUMNS
    rows = table.read_rows(data, columns, header=header)
    # Spot files have the best-match column, futures files do not.
    spot = rows.height > 0 and rows["is_best_match"].null_count() < rows.height
    return rows.with_columns(
        *common.trade_columns(),
        sym=pl.lit(sym),
        venue=pl.lit("BINANCE" if spot else "BINANCE-FUTURES"),
        ts=epoch_ms_or_us("time"),
        price=pl.col("price"),
        size=pl.col("qty"),
        side=aggressor("is_buyer_maker"),
    )
