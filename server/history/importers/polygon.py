"""Polygon.io flat files: ``us_stocks_sip/trades_v1`` day files (CSV, usually gzip).

Layout from Polygon's flat-files documentation (tests/data/vendors/polygon/LAYOUT.md): a header
row naming 13 columns, one row per trade of every ticker of the day; ``sip_timestamp`` (the time
the SIP received the trade) is nanoseconds since the epoch and is the tick's time; ``exchange``
is Polygon's numeric exchange id, kept as the venue; ``conditions`` may be one quoted cell of
several codes. A ``correction`` other than 0 marks a corrected trade: it is kept and flagged
``corrected``.
"""

from __future__ import annotations

import polars as pl

from server.history.importers import common, table

HEADER = (
    "ticker", "conditions", "correction", "exchange", "id", "participant_timestamp", "price",
    "sequence_number", "sip_timestamp", "size", "tape", "trf_id", "trf_timestamp",
)  # fmt: skip
GUIDE = (
    "Polygon.io flat file us_stocks_sip/trades_v1 (a day of every ticker), header:\n"
    "  ticker,conditions,correction,exchange,id,participant_timestamp,price,sequence_number,\n"
    "  sip_timestamp,size,tape,trf_id,trf_timestamp\n"
    '  A,"12,37",0,11,52983525035312,1712306654208705342,142.99,3807,1712306654208740096,5,1,0,0\n'
    "sip_timestamp: ns since the epoch; venue: Polygon's exchange id; correction != 0 is\n"
    "kept and flagged 'corrected'."
)
COLUMNS: dict[str, pl.DataType] = {
    "ticker": pl.Utf8(),
    "conditions": pl.Utf8(),
    "correction": pl.Int64(),
    "exchange": pl.Utf8(),
    "id": pl.Utf8(),
    "participant_timestamp": pl.Int64(),
    "price": pl.Float64(),
    "sequence_number": pl.Int64(),
    "sip_timestamp": pl.Int64(),
    "size": pl.Float64(),
    "tape": pl.Utf8(),
    "trf_id": pl.Utf8(),
    "trf_timestamp": pl.Int64(),
}


def parse(data: bytes) -> pl.DataFrame:
    """Trades (before the checks) of one Polygon trades flat file."""
    header = tuple(table.header_names(data))
    if header != HEADER:
        raise ValueError(
            f"the header {','.join(header)!r} is not the Polygon trades_v1 header "
            f"{','.join(HEADER)!r}; check the format name"
        )
    rows = table.read_rows(data, COLUMNS, header=True)
    return rows.with_columns(
        *common.trade_columns(),
        sym=pl.col("ticker"),
        venue=pl.col("exchange"),
        ts=common.epoch_ts(pl.col("sip_timestamp")),
        side=pl.lit(None, pl.Utf8),
        flags=pl.when(pl.col("correction").fill_null(0) != 0).then(pl.lit("corrected")),
    )
