"""Databento Binary Encoding (DBN) files: ``trades``, ``tbbo`` and ``mbp-1`` schemas.

Read with Databento's own ``databento-dbn`` package: its transcoder turns the records into CSV
(integer prices in units of 1e-9, integer ns timestamps, the symbol mapped from the file's
metadata), which Polars then reads like any other file. DBN versions 1 to 3 and zstd-compressed
files (``.dbn.zst``) are read.

* ``trades``: every record is a trade at ``ts_event``; ``side`` is the aggressor (``B`` buy,
  ``A`` sell, ``N`` none).
* ``tbbo``: trades, each with the best bid and offer just before it: a trade and a quote at the
  same time.
* ``mbp-1``: book updates and trades; a quote whenever the top of the book changes, and a trade
  for each ``T`` record.

The venue is the dataset's venue code (``XNAS`` of ``XNAS.ITCH``). Databento's record flags
``F_BAD_TS_RECV`` and ``F_MAYBE_BAD_BOOK`` are kept as the flags ``bad_ts_recv`` and
``maybe_bad_book``.
"""

from __future__ import annotations

import io

import polars as pl

from server.history.importers import common, table

DBN_MAGIC = b"DBN"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UNDEF_PRICE = 2**63 - 1
PRICE_DIGITS = 9
F_MAYBE_BAD_BOOK = 1 << 2
F_BAD_TS_RECV = 1 << 3
SCHEMAS = ("trades", "tbbo", "mbp-1")
GUIDE = (
    "Databento DBN file (.dbn or .dbn.zst) of schema trades, tbbo or mbp-1, read with the\n"
    "databento-dbn package: trades at ts_event with the aggressor side; tbbo: each trade and\n"
    "the best bid/offer before it; mbp-1: trades and a quote whenever the top of book\n"
    "changes. Symbols from the file's metadata; venue: the dataset's (XNAS of XNAS.ITCH).\n"
    "Flags bad_ts_recv and maybe_bad_book kept. Example (trades, as CSV):\n"
    "  ts_event=1700000000000000000 price=189500000000 size=100 side=B symbol=AAPL"
)
COLUMNS: dict[str, pl.DataType] = {
    "ts_recv": pl.Int64(),
    "ts_event": pl.Int64(),
    "rtype": pl.Int64(),
    "publisher_id": pl.Int64(),
    "instrument_id": pl.Int64(),
    "action": pl.Utf8(),
    "side": pl.Utf8(),
    "depth": pl.Int64(),
    "price": pl.Int64(),
    "size": pl.Int64(),
    "flags": pl.Int64(),
    "ts_in_delta": pl.Int64(),
    "sequence": pl.Int64(),
}
LEVEL_COLUMNS: dict[str, pl.DataType] = {
    "bid_px_00": pl.Int64(),
    "ask_px_00": pl.Int64(),
    "bid_sz_00": pl.Int64(),
    "ask_sz_00": pl.Int64(),
    "bid_ct_00": pl.Int64(),
    "ask_ct_00": pl.Int64(),
}


def is_dbn(data: bytes) -> bool:
    return data[:3] == DBN_MAGIC or data[:4] == ZSTD_MAGIC


def to_csv(data: bytes) -> tuple[bytes, str, str]:
    """The records of a DBN stream as CSV, with the schema and dataset named in its metadata."""
    import databento_dbn as dbn

    try:
        if data[:4] == ZSTD_MAGIC:
            decoder = dbn.DBNDecoder(compression=dbn.Compression.from_str("zstd"))
            decoder.write(data)
            data = b"".join(bytes(r) for r in decoder.decode())
        metadata = dbn.Metadata.decode(data)
        # str() of the schema is its name as Databento writes it (trades, mbp-1, tbbo, ...).
        schema = "" if metadata.schema is None else str(metadata.schema)
        if schema not in SCHEMAS:
            raise ValueError(
                f"a DBN file of schema {schema or 'mixed'!r}: tickpipe imports the schemas "
                f"{', '.join(SCHEMAS)}"
            )
        out = io.BytesIO()
        transcoder = dbn.Transcoder(
            out, dbn.Encoding.from_str("csv"), dbn.Compression.from_str("none"), pretty_px=False,
            pretty_ts=False,
            map_symbols=True,
        )  # fmt: skip
        transcoder.write(data)
        transcoder.flush()
    except dbn.DBNError as exc:
        raise ValueError(
            f"not a readable DBN file ({str(exc).strip().splitlines()[0]}); "
            "it may be truncated or damaged: fetch it again"
        ) from None
    return out.getvalue(), schema, str(metadata.dataset)


def fixed_price(col: str) -> pl.Expr:
    """A 1e-9 fixed-point price as a float (undefined prices as null)."""
    px = pl.col(col)
    return pl.when(px != UNDEF_PRICE).then((px.cast(pl.Float64) / 1e9).round(PRICE_DIGITS))


def flag_words() -> pl.Expr:
    bits = pl.col("flags").fill_null(0)
    bad_ts = (bits & F_BAD_TS_RECV) != 0
    bad_book = (bits & F_MAYBE_BAD_BOOK) != 0
    return (
        pl.when(bad_ts & bad_book)
        .then(pl.lit("bad_ts_recv,maybe_bad_book"))
        .when(bad_ts)
        .then(pl.lit("bad_ts_recv"))
        .when(bad_book)
        .then(pl.lit("maybe_bad_book"))
    )


def parse(data: bytes, symbol: str | None) -> tuple[pl.DataFrame, int]:
    """Trades and quotes (before the checks) of one DBN file, and its number of records."""
    text, schema, dataset = to_csv(data)
    columns = dict(COLUMNS)
    if schema != "trades":
        columns |= LEVEL_COLUMNS
    columns["symbol"] = pl.Utf8()
    rows = table.read_rows(text, columns, header=True).with_columns(
        sym=pl.lit(symbol) if symbol is not None else pl.col("symbol"),
        venue=pl.lit(dataset.split(".")[0]),
        ts=common.epoch_ts(pl.col("ts_event")),
        flags=flag_words(),
    )
    trades = rows.filter(pl.col("action") == "T") if schema != "trades" else rows
    trades = trades.with_columns(
        *common.trade_columns(),
        price=fixed_price("price"),
        size=pl.col("size").cast(pl.Float64),
        side=pl.col("side").replace_strict({"B": "buy", "A": "sell"}, default=None),
    )
    if schema == "trades":
        return trades, rows.height
    top = ("bid", "bid_size", "ask", "ask_size")
    quotes = rows.with_columns(
        *common.quote_columns(),
        bid=fixed_price("bid_px_00"),
        ask=fixed_price("ask_px_00"),
        bid_size=pl.when(pl.col("bid_sz_00") > 0).then(pl.col("bid_sz_00").cast(pl.Float64)),
        ask_size=pl.when(pl.col("ask_sz_00") > 0).then(pl.col("ask_sz_00").cast(pl.Float64)),
    )
    if schema == "mbp-1":
        # One quote per change of the top of the book, per instrument.
        same = pl.all_horizontal(
            [pl.col(c).eq_missing(pl.col(c).shift(1).over("instrument_id")) for c in top]
        )
        quotes = quotes.filter(~same)
    # A quote sorts before the trade it preceded (same ts; the split keeps file order).
    frame = pl.concat([quotes, trades.select(quotes.columns)])
    return frame.sort("line", maintain_order=True), rows.height
