"""Dukascopy tick exports as written by dukascopy-node (``-t tick -f csv``).

Layout from the dukascopy-node wiki and its ``formatOutput`` (tests/data/vendors/dukascopy/
LAYOUT.md): a header row, then ``timestamp,askPrice,bidPrice,askVolume,bidVolume`` (the volume
columns are left out when volumes are off); ``timestamp`` is milliseconds since the epoch, UTC.
The symbol comes from the file name (dukascopy-node names files ``eurusd-tick-...csv``) or
``--symbol``.
"""

from __future__ import annotations

import re

import polars as pl

from server.history.importers import common, table

HEADER = ("timestamp", "askPrice", "bidPrice", "askVolume", "bidVolume")
NAME_RE = re.compile(r"^(?P<sym>[A-Za-z0-9]+)-tick-", re.IGNORECASE)
GUIDE = (
    "Dukascopy tick CSV as exported by dukascopy-node (-t tick -f csv), header:\n"
    "  timestamp,askPrice,bidPrice,askVolume,bidVolume\n"
    "  1585526400104,1.11369,1.11361,0.75,0.75\n"
    "timestamp: ms since the epoch, UTC; the volume columns may be absent. Symbol from the\n"
    "file name (eurusd-tick-2020-03-30-2020-03-31.csv) or --symbol."
)
COLUMNS: dict[str, pl.DataType] = {
    "timestamp": pl.Int64(),
    "askPrice": pl.Float64(),
    "bidPrice": pl.Float64(),
    "askVolume": pl.Float64(),
    "bidVolume": pl.Float64(),
}


def volume(col: str) -> pl.Expr:
    return pl.when(pl.col(col) != 0).then(pl.col(col))


def parse(data: bytes, name: str, symbol: str | None) -> pl.DataFrame:
    """Quotes (before the checks) of one dukascopy-node tick export."""
    header = tuple(table.header_names(data))
    if header not in (HEADER, HEADER[:3]):
        raise ValueError(
            f"the header {','.join(header)!r} is not a Dukascopy tick header "
            f"({','.join(HEADER)}, volumes optional); check the format name"
        )
    named = NAME_RE.match(name)
    if symbol is None:
        if named is None:
            raise ValueError(
                f"{name!r} does not name its symbol (eurusd-tick-....csv); pass --symbol EURUSD"
            )
        symbol = named["sym"]
    columns = {c: COLUMNS[c] for c in header}
    rows = table.read_rows(data, columns, header=True)
    sizes = len(header) == len(HEADER)
    return rows.with_columns(
        *common.quote_columns(),
        sym=pl.lit(symbol),
        venue=pl.lit("DUKASCOPY"),
        ts=common.epoch_ts(common.times(pl.col("timestamp"), 10**6)),
        bid=pl.col("bidPrice"),
        ask=pl.col("askPrice"),
        # A volume of 0 means none was given for that side.
        bid_size=volume("bidVolume") if sizes else pl.lit(None, pl.Float64),
        ask_size=volume("askVolume") if sizes else pl.lit(None, pl.Float64),
    )
