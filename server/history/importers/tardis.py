"""Tardis.dev CSV downloads: trades, quotes (best bid and ask), and book data (incremental_book_L2,
book_snapshot_N) reduced to the top of the book, each with its exact header.

Layouts: tests/data/vendors/tardis/LAYOUT.md. ``timestamp`` (the exchange's time) is microseconds
since the epoch and is the tick's time; ``exchange`` is the venue.
"""

from __future__ import annotations

import heapq
import re

import polars as pl

from server.history.importers import common, table

# The header lines of Tardis.dev CSV downloads, exactly. Quotes list the ask before the bid.
TARDIS_TRADES_HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
TARDIS_QUOTES_HEADER = (
    "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount"
)
L2_HEADER = "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"
SNAPSHOT_RE = re.compile(r"^exchange,symbol,timestamp,local_timestamp,asks\[0\]\.price,")
TRADES_GUIDE = (
    "Tardis.dev trades CSV. Header exactly:\n"
    "  exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
    "  binance,BTCUSDT,1700000000000001,1700000000000100,1,buy,37000.5,0.01\n"
    "timestamp: microseconds since the epoch, UTC."
)
QUOTES_GUIDE = (
    "Tardis.dev quotes CSV (best bid and ask). Header exactly:\n"
    "  exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount\n"
    "  binance,BTCUSDT,1700000000000001,1700000000000100,0.5,37000.6,37000.4,1.2"
)
BOOK_GUIDE = (
    "Tardis.dev book data reduced to the top of the book: a quote each time the best bid or\n"
    "ask or their amounts change. incremental_book_L2, header exactly:\n"
    "  exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n"
    "  deribit,BTC-PERPETUAL,1585699200245000,1585699200355684,true,ask,6421.5,18640\n"
    "or book_snapshot_N (5, 25, ...), header exchange,symbol,timestamp,local_timestamp,\n"
    "asks[0].price,asks[0].amount,bids[0].price,bids[0].amount,asks[1].price,..."
)
_ID = {"exchange": pl.Utf8(), "symbol": pl.Utf8(), "timestamp": pl.Int64(),
       "local_timestamp": pl.Int64()}  # fmt: skip
TRADE_COLUMNS: dict[str, pl.DataType] = {
    **_ID, "id": pl.Utf8(), "side": pl.Utf8(), "price": pl.Float64(), "amount": pl.Float64(),
}  # fmt: skip
QUOTE_COLUMNS: dict[str, pl.DataType] = {
    **_ID, "ask_amount": pl.Float64(), "ask_price": pl.Float64(), "bid_price": pl.Float64(),
    "bid_amount": pl.Float64(),
}  # fmt: skip
L2_COLUMNS: dict[str, pl.DataType] = {
    **_ID, "is_snapshot": pl.Utf8(), "side": pl.Utf8(), "price": pl.Float64(),
    "amount": pl.Float64(),
}  # fmt: skip
TOP = ("bid", "bid_size", "ask", "ask_size")


def _check_header(data: bytes, expected: str, fmt: str) -> None:
    header = table.first_line(data)
    if not header:
        raise ValueError(f"the file is empty; a {fmt} file starts with a header line")
    if header != expected:
        raise ValueError(
            f"the header {header[:80]!r} is not the Tardis.dev {fmt} header {expected!r}; "
            "check the format name"
        )


def _identity() -> dict[str, pl.Expr]:
    return {
        "sym": pl.col("symbol"),
        "venue": pl.col("exchange"),
        "ts": common.epoch_ts(common.times(pl.col("timestamp"), 1000)),
    }


def parse_trades(data: bytes) -> pl.DataFrame:
    _check_header(data, TARDIS_TRADES_HEADER, "tardis-trades")
    rows = table.read_rows(data, TRADE_COLUMNS, header=True, unused=("local_timestamp", "id"))
    return rows.with_columns(
        *common.trade_columns(),
        **_identity(),
        size=pl.col("amount"),
        side=common.side("side"),
    )


def parse_quotes(data: bytes) -> pl.DataFrame:
    _check_header(data, TARDIS_QUOTES_HEADER, "tardis-quotes")
    rows = table.read_rows(data, QUOTE_COLUMNS, header=True, unused=("local_timestamp",))
    return rows.with_columns(
        *common.quote_columns(),
        **_identity(),
        bid=pl.col("bid_price"),
        bid_size=pl.col("bid_amount"),
        ask=pl.col("ask_price"),
        ask_size=pl.col("ask_amount"),
    )


# --- book data reduced to the top of the book ---------------------------------------------------


def parse_book(data: bytes) -> tuple[pl.DataFrame, int]:
    """Top-of-book quotes (before the checks) of an incremental_book_L2 or book_snapshot_N
    file, with its rejected rows; and the number of rows read."""
    header = table.first_line(data)
    if header == L2_HEADER:
        rows = table.read_rows(data, L2_COLUMNS, header=True)
        return _l2_top(rows), rows.height
    if SNAPSHOT_RE.match(header):
        names = header.split(",")
        columns: dict[str, pl.DataType] = {n: pl.Float64() for n in names}
        columns |= _ID
        rows = table.read_rows(data, columns, header=True)
        quotes = rows.with_columns(
            *common.quote_columns(),
            **_identity(),
            bid=pl.col("bids[0].price"),
            bid_size=pl.col("bids[0].amount"),
            ask=pl.col("asks[0].price"),
            ask_size=pl.col("asks[0].amount"),
        )
        same = pl.all_horizontal(
            [pl.col(c).eq_missing(pl.col(c).shift(1).over("sym")) for c in TOP]
        )
        return quotes.filter(pl.col("reason").is_not_null() | ~same), rows.height
    raise ValueError(
        f"the header {header[:80]!r} is neither the Tardis.dev incremental_book_L2 header "
        f"{L2_HEADER!r} nor a book_snapshot_N header (exchange,symbol,timestamp,"
        "local_timestamp,asks[0].price,...); check the format name"
    )


def _bad_level() -> pl.Expr:
    price, amount = pl.col("price"), pl.col("amount")
    return (
        pl.when(~pl.col("side").is_in(["bid", "ask"]))
        .then(pl.lit("bad_side: not bid or ask"))
        .when(price.is_null() | ~price.is_finite() | (price <= 0))
        .then(pl.lit("bad_price: missing, non-positive or not finite"))
        .when(amount.is_null() | ~amount.is_finite() | (amount < 0))
        .then(pl.lit("bad_size: missing, negative or not finite"))
        .when(pl.col("timestamp").is_null() | pl.col("symbol").is_null())
        .then(pl.lit("bad_row: no timestamp or symbol"))
    )


def _l2_top(rows: pl.DataFrame) -> pl.DataFrame:
    """Replay the level updates per symbol and emit the top of the book after each message (the
    rows sharing a symbol and both timestamps) when it changed. A snapshot (``is_snapshot``
    true after a row that was not) starts that symbol's book afresh; an amount of 0 removes the
    level."""
    rows = rows.with_columns(reason=pl.coalesce("reason", _bad_level()))
    good = rows.filter(pl.col("reason").is_null())
    names = ("line", "exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side",
             "price", "amount")  # fmt: skip
    cols = [good[c].to_list() for c in names]
    lines, venues, syms, stamps, locals_, snaps, sides, prices, amounts = cols
    books: dict[str, _Book] = {}
    out: list[tuple[object, ...]] = []
    n = good.height
    for i in range(n):
        sym = syms[i]
        book = books.get(sym)
        if book is None:
            book = books[sym] = _Book()
        snapshot = snaps[i] == "true"
        if snapshot and not book.in_snapshot:
            book.clear()
        book.in_snapshot = snapshot
        book.update(sides[i] == "bid", prices[i], amounts[i])
        key = (sym, stamps[i], locals_[i])
        if i + 1 == n or (syms[i + 1], stamps[i + 1], locals_[i + 1]) != key:
            top = book.top()
            if top != book.emitted:
                book.emitted = top
                out.append((lines[i], sym, venues[i], stamps[i], *top))
    schema = {"line": pl.Int64(), "symbol": pl.Utf8(), "exchange": pl.Utf8(),
              "timestamp": pl.Int64(), **{c: pl.Float64() for c in TOP}}  # fmt: skip
    quotes = pl.DataFrame(out, schema=schema, orient="row").with_columns(
        *common.quote_columns(), **_identity(), reason=pl.lit(None, pl.Utf8)
    )
    bad = rows.filter(pl.col("reason").is_not_null()).with_columns(
        *common.quote_columns(), **_identity(), **{c: pl.lit(None, pl.Float64) for c in TOP}
    )
    return pl.concat([quotes, bad.select(quotes.columns)]).sort("line")


class _Book:
    """One symbol's price levels and its best prices (heaps with lazy deletion)."""

    def __init__(self) -> None:
        self.levels: tuple[dict[float, float], dict[float, float]] = ({}, {})  # bids, asks
        self.heaps: tuple[list[float], list[float]] = ([], [])  # -bid prices, ask prices
        self.in_snapshot = False
        self.emitted: tuple[float | None, ...] = (None, None, None, None)

    def clear(self) -> None:
        for part in (*self.levels, *self.heaps):
            part.clear()

    def update(self, bid: bool, price: float, amount: float) -> None:
        side = 0 if bid else 1
        levels = self.levels[side]
        if amount == 0:
            levels.pop(price, None)
            return
        if price not in levels:
            heapq.heappush(self.heaps[side], -price if bid else price)
        levels[price] = amount

    def _best(self, side: int) -> float | None:
        heap, levels = self.heaps[side], self.levels[side]
        while heap:
            price = -heap[0] if side == 0 else heap[0]
            if price in levels:
                return price
            heapq.heappop(heap)
        return None

    def top(self) -> tuple[float | None, ...]:
        bid, ask = self._best(0), self._best(1)
        return (
            bid, None if bid is None else self.levels[0][bid],
            ask, None if ask is None else self.levels[1][ask],
        )  # fmt: skip
