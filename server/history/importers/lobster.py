"""LOBSTER message files: executions become trades, order-book events are skipped."""

from __future__ import annotations

import datetime as dt
import re

import polars as pl

from server.history.importers import common, table

COLUMNS: dict[str, pl.DataType] = {
    "time": pl.Utf8(),
    "type": pl.Int64(),
    "order_id": pl.Utf8(),
    "size": pl.Float64(),
    "price": pl.Float64(),
    "direction": pl.Utf8(),
    # Newer LOBSTER output has a 7th column (the market participant id); it is not used.
    "mpid": pl.Utf8(),
}
NAME_RE = re.compile(
    r"^(?:lobster_)?(?P<sym>[A-Za-z0-9.]+)_(?P<date>\d{4}-\d{2}-\d{2})_\d+_\d+_message_\d+\.csv$",
    re.IGNORECASE,
)
EXECUTIONS = (4, 5)
BOOK_EVENTS = (1, 2, 3, 6, 7)
GUIDE = (
    "LOBSTER message file, no header: time (s after midnight, New York),type,order_id,\n"
    "size,price (x 10000),direction[,mpid]. Executions (types 4, 5) become trades; book\n"
    "events are skipped.\n"
    "  34200.025552880,4,16120456,100,5859100,-1\n"
    "Symbol and date from the name [lobster_]TICKER_YYYY-MM-DD_34200000_57600000_message_N.csv,\n"
    "or --symbol and --date."
)


def parse(data: bytes, name: str, symbol: str | None, date: dt.date | None
          ) -> tuple[pl.DataFrame, int, int]:  # fmt: skip
    """Trades (before the checks) of one message file, the rows read and the book events
    skipped."""
    named = NAME_RE.match(name)
    if named is not None:
        symbol = symbol or named["sym"]
        date = date or dt.date.fromisoformat(named["date"])
    if symbol is None or date is None:
        raise ValueError(
            f"{name}: a LOBSTER message file does not carry its symbol and date; pass --symbol "
            "and --date (tickpipe import --symbol AAPL --date 2012-06-21), or keep the LOBSTER "
            "name TICKER_YYYY-MM-DD_34200000_57600000_message_N.csv"
        )
    rows = table.read_rows(data, COLUMNS, header=False)
    # Order-book events (submissions, cancels, deletes, cross trades, halts) are not ticks.
    event = pl.col("type")
    ticks = rows.filter(
        pl.col("reason").is_not_null() | event.is_null() | ~event.is_in(BOOK_EVENTS)
    )
    # direction is the side of the resting limit order that was hit; the aggressor is the other.
    side = (
        pl.when(pl.col("direction") == "1")
        .then(pl.lit("sell"))
        .when(pl.col("direction") == "-1")
        .then(pl.lit("buy"))
        .otherwise(pl.lit("?"))
    )
    frame = ticks.with_columns(
        *common.trade_columns(),
        reason=pl.coalesce(
            "reason",
            pl.when(event.is_null() | ~event.is_in(EXECUTIONS)).then(
                pl.format(
                    "bad_row: unknown LOBSTER event type {}", event.cast(pl.Utf8).fill_null("?")
                )
            ),
        ),
        sym=pl.lit(symbol),
        venue=pl.lit(None, pl.Utf8),
        ts=common.since_midnight_ts("time", "s", date, common.NEW_YORK),
        price=common.unscale(pl.col("price"), common.PRICE_SCALE_1E4),
        side=side,
    )
    return frame, rows.height, rows.height - ticks.height
