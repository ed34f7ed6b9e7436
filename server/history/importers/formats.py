"""The formats by name: ``read_file`` parses one file of any of them into ticks and rejects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from server.history.importers import (
    binance,
    common,
    databento,
    dukascopy,
    histdata,
    lean,
    lobster,
    mapped,
    polygon,
    tardis,
)
from server.history.importers.common import ImportResult
from server.history.importers.mapped import Mapping

# What a file of each format looks like, with an example line (``tickpipe import --help``), in
# the order the help lists them.
FORMAT_GUIDE = {
    "tardis-trades": tardis.TRADES_GUIDE,
    "tardis-quotes": tardis.QUOTES_GUIDE,
    "tardis-book": tardis.BOOK_GUIDE,
    "databento": databento.GUIDE,
    "binance-trades": binance.TRADES_GUIDE,
    "binance-aggtrades": binance.AGG_TRADES_GUIDE,
    "binance-bookticker": binance.BOOK_TICKER_GUIDE,
    "polygon-trades": polygon.GUIDE,
    "dukascopy": dukascopy.GUIDE,
    "histdata": histdata.GUIDE,
    "lobster": lobster.GUIDE,
    "lean": lean.GUIDE,
    "csv": mapped.GUIDE,
}
FORMATS = tuple(FORMAT_GUIDE)
# Fields per line of the formats whose every line has the same count (a rejected line with
# another count is reported as such).
FIELDS = {
    "tardis-trades": len(tardis.TRADE_COLUMNS),
    "tardis-quotes": len(tardis.QUOTE_COLUMNS),
    "histdata": len(histdata.COLUMNS),
    "polygon-trades": len(polygon.COLUMNS),
}


def read_file(
    path: Path,
    fmt: str,
    *,
    symbol: str | None = None,
    mapping: Mapping | None = None,
    date: dt.date | None = None,
    lean_market: str | None = None,
    raw: bytes | None = None,
) -> ImportResult:
    """Parse one vendor file (plain, ``.gz`` or ``.zip``) into ticks and rejects.

    ``symbol`` names the instrument for files that do not carry one (HistData, LOBSTER, Lean, a
    mapping without a symbol column); ``date`` gives the session date of LOBSTER files whose name
    does not carry it; ``lean_market`` (``forex/fxcm``) the market of a Lean file kept outside
    Lean's folders. ``mapping`` is required for ``fmt="csv"`` (which also reads Parquet).
    ``raw``: the file's bytes if already read.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    path = Path(path)
    data, name = common.load(path, raw)
    skipped = 0
    read: int | None = None
    if fmt == "csv":
        if mapping is None:
            raise ValueError("format 'csv' needs a mapping: which column is the time, price, ...")
        if data[:4] == b"PAR1":
            frame = mapped.parse_parquet(data, name, mapping, symbol)
            return common.split_ticks(frame, read=frame.height)
        frame = mapped.parse_csv(data, name, mapping, symbol)
        return common.split_ticks(frame, read=frame.height, data=data,
                                  separator=mapping.separator)  # fmt: skip
    if fmt == "databento":
        if not databento.is_dbn(data):
            raise ValueError(f"{name}: not a DBN file (it does not start with DBN); check --format")
        frame, read = databento.parse(data, symbol)
        return common.split_ticks(frame, read=read, skipped=read - frame["line"].n_unique())
    if fmt == "tardis-trades":
        frame = tardis.parse_trades(data)
    elif fmt == "tardis-quotes":
        frame = tardis.parse_quotes(data)
    elif fmt == "tardis-book":
        frame, read = tardis.parse_book(data)
        skipped = read - frame.height
    elif fmt == "histdata":
        frame = histdata.parse(data, common.need_symbol(symbol, fmt))
    elif fmt == "lobster":
        frame, read, skipped = lobster.parse(data, name, symbol, date)
    elif fmt == "lean":
        frame = lean.parse(data, path, name, symbol, lean_market)
    elif fmt in binance.KINDS:
        frame = binance.parse(data, name, fmt, symbol)
    elif fmt == "dukascopy":
        frame = dukascopy.parse(data, name, symbol)
    else:
        frame = polygon.parse(data)
    return common.split_ticks(
        frame,
        read=frame.height if read is None else read,
        skipped=skipped,
        data=data,
        fields=FIELDS.get(fmt),
    )
