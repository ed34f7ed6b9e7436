"""HistData.com tick quotes: no header, times in EST all year, no sizes."""

from __future__ import annotations

import polars as pl

from server.history.importers import common, table

# HistData quotes are in EST all year (no DST). POSIX zone names invert the sign: GMT+5 is UTC-5.
HISTDATA_TZ = "Etc/GMT+5"
COLUMNS: dict[str, pl.DataType] = {
    "time": pl.Utf8(),
    "bid": pl.Float64(),
    "ask": pl.Float64(),
    "volume": pl.Utf8(),
}
GUIDE = (
    "HistData.com tick quotes, no header: time (EST, UTC-5 all year),bid,ask,volume.\n"
    "  20120201 000000173,1.306600,1.306770,0\n"
    "Needs --symbol (e.g. EURUSD)."
)


def parse(data: bytes, symbol: str) -> pl.DataFrame:
    # Volume is 0 on every HistData tick row, and is not a per-side size: sizes stay null.
    naive = pl.col("time").str.strptime(pl.Datetime("ns"), "%Y%m%d %H%M%S%3f", strict=False)
    return table.read_rows(data, COLUMNS, header=False).with_columns(
        *common.quote_columns(),
        sym=pl.lit(symbol),
        venue=pl.lit(None, pl.Utf8),
        ts=common.local_ts(naive, HISTDATA_TZ),
        bid_size=pl.lit(None, pl.Float64),
        ask_size=pl.lit(None, pl.Float64),
    )
