"""What every format shares: a file's bytes out of its archive (step 1), the field expressions
the parsers are built from, and the checks every tick passes with the split into ticks and
rejects (step 3)."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from server.history.importers import table
from server.ticks import MAX_TS_NS, MIN_TS_NS, SYMBOL_RE, TICK_SCHEMA

# A compressed file that cannot be read to its end: truncated, damaged, or not what its first
# bytes claim (gzip.BadGzipFile is an OSError; an encrypted zip member is a RuntimeError).
ARCHIVE_ERRORS = (
    zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError, NotImplementedError, RuntimeError
)  # fmt: skip
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip

REJECT_SCHEMA: dict[str, pl.DataType] = {"line": pl.Int64(), "reason": pl.Utf8(), "raw": pl.Utf8()}

NEW_YORK = "America/New_York"
PRICE_SCALE_1E4 = 10_000.0

# Sides as vendors spell them; anything else (except empty/unknown, which mean "not given") rejects.
SIDE_WORDS = {"buy": "buy", "b": "buy", "sell": "sell", "s": "sell"}
NO_SIDE_WORDS = ("", "unknown", "none", "null")
# Every spelling (lower, upper and title case) mapped at once: no per-row lower-casing.
SIDE_SPELLINGS: dict[str | None, str | None] = {
    **{s: w for word, w in SIDE_WORDS.items() for s in (word, word.upper(), word.title())},
    **{s: None for word in NO_SIDE_WORDS for s in (word, word.upper(), word.title())},
    None: None,
}

TimeUnit = Literal["s", "ms", "us", "ns"]
# Digits after the decimal point that still fit in integer ns, per unit.
UNIT_DIGITS: dict[str, int] = {"s": 9, "ms": 6, "us": 3, "ns": 0}


@dataclass(frozen=True, slots=True)
class ImportResult:
    """The ticks of one file and the rows that could not become ticks.

    ``read`` counts data rows (header and blank lines excluded); ``skipped`` counts rows that are
    valid but are not ticks (LOBSTER order-book events), so ``read == len(ticks) + len(rejects) +
    skipped``.
    """

    ticks: pl.DataFrame
    rejects: pl.DataFrame
    read: int
    skipped: int = 0


# Bytes and lines


def load(path: Path, raw: bytes | None = None) -> tuple[bytes, str]:
    """The file's decompressed bytes and the name of the CSV they came from (a zip member's).
    ``raw``: the file's bytes, already read.

    A zip or gzip file that cannot be read to its end is a ``ValueError`` naming the file."""
    if raw is None:
        raw = path.read_bytes()
    magic = raw[:4]
    kind = "zip" if magic in ZIP_MAGICS else "gzip" if magic[:2] == b"\x1f\x8b" else None
    if kind is None:
        return raw, path.name
    try:
        if kind == "gzip":
            return gzip.decompress(raw), path.name.removesuffix(".gz")
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            csvs = [i for i in members if i.filename.lower().endswith(".csv")] or members
            if not csvs:
                raise ValueError(f"{path.name}: the zip archive is empty")
            member = csvs[0]
            return z.read(member), Path(member.filename).name
    except ARCHIVE_ERRORS as exc:
        raise ValueError(
            f"{path.name}: not a readable {kind} file ({exc}); it may be truncated or damaged: "
            "fetch it again"
        ) from None


# Field parsing (expressions)


def num(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Float64, strict=False)


def unscale(value: pl.Expr, scale: float) -> pl.Expr:
    """``value / scale``, rounded back to the decimals a power-of-ten scale implies.

    Polars divides by a constant as a multiplication by its reciprocal (5859100 / 10000 gives
    585.9100000000001); rounding restores the correctly rounded price.
    """
    if scale == 1.0:
        return value
    digits = math.log10(scale)
    if digits != int(digits):
        return value / scale
    return (value / scale).round(int(digits) + 4)


def decimal_ns(col: str | pl.Expr, unit: str) -> pl.Expr:
    """A decimal count of ``unit`` (``"34200.004241176"`` seconds) as exact integer ns.

    Parsed as text, not float, so nanosecond digits survive.
    """
    text = pl.col(col) if isinstance(col, str) else col
    digits = UNIT_DIGITS[unit]
    parts = text.cast(pl.Utf8).str.split_exact(".", 1)
    whole = parts.struct.field("field_0").cast(pl.Int64, strict=False)
    frac = parts.struct.field("field_1")
    ns = times(whole, 10**digits)
    if digits:
        frac_ns = frac.fill_null("").str.pad_end(digits, "0").str.slice(0, digits)
        ns = ns + frac_ns.cast(pl.Int64, strict=False)
    # Too many sub-ns digits are truncated; non-digits after the dot make the whole value null.
    valid_frac = frac.is_null() | frac.str.contains(r"^[0-9]*$")
    return pl.when(valid_frac).then(ns)


def times(value: pl.Expr, factor: int) -> pl.Expr:
    """``value * factor`` in Int64, null where it would overflow (instead of wrapping round)."""
    if factor == 1:
        return value
    return pl.when(value.abs() <= (2**63 - 1) // factor).then(value * factor)


def epoch_ts(ns: pl.Expr) -> pl.Expr:
    """Integer ns since the epoch as a UTC timestamp; null outside tickpipe's 2000-2100 window."""
    in_range = ns.is_between(MIN_TS_NS, MAX_TS_NS, closed="left")
    return pl.from_epoch(pl.when(in_range).then(ns), time_unit="ns").dt.replace_time_zone("UTC")


def local_ts(naive: pl.Expr, tz: str) -> pl.Expr:
    """A wall-clock time in ``tz`` as UTC; times that do not exist (DST gap) become null."""
    return naive.dt.replace_time_zone(
        tz, ambiguous="earliest", non_existent="null"
    ).dt.convert_time_zone("UTC")


def since_midnight_ts(col: str | pl.Expr, unit: str, day: dt.date, tz: str) -> pl.Expr:
    """``unit`` after local midnight of ``day`` in ``tz`` (LOBSTER, Lean) as a UTC timestamp."""
    day_ns = (
        (dt.datetime(day.year, day.month, day.day) - dt.datetime(1970, 1, 1))
        // dt.timedelta(microseconds=1)
        * 1000
    )
    since = decimal_ns(col, unit)
    naive = pl.from_epoch(pl.when(since >= 0).then(since + day_ns), time_unit="ns")
    return local_ts(naive, tz)


def side(col: str) -> pl.Expr:
    """Vendor side words as ``buy``/``sell``; "not given" as null; anything else as ``?``.

    Mapped on the column's categories (a few words over millions of rows)."""
    words = pl.col(col).cast(pl.Categorical)
    return words.replace_strict(SIDE_SPELLINGS, default="?", return_dtype=pl.Utf8)


def constant(values: pl.Series) -> bool:
    """Every value of ``values`` is the same one (nulls included): cheaper than counting the
    distinct values."""
    if values.len() == 0:
        return True
    first = values[0]
    if first is None:
        return values.null_count() == values.len()
    return bool((values == first).all()) and values.null_count() == 0


def trade_columns() -> list[pl.Expr]:
    return [
        pl.lit("trade").alias("type"),
        *[pl.lit(None, pl.Float64).alias(c) for c in ("bid", "bid_size", "ask", "ask_size")],
    ]


def quote_columns() -> list[pl.Expr]:
    return [
        pl.lit("quote").alias("type"),
        pl.lit(None, pl.Float64).alias("price"),
        pl.lit(None, pl.Float64).alias("size"),
        pl.lit(None, pl.Utf8).alias("side"),
    ]


def need_symbol(symbol: str | None, fmt: str) -> str:
    if symbol is None:
        raise ValueError(
            f"a {fmt} file does not name its instrument; pass symbol=, e.g. EURUSD "
            "(tickpipe import --symbol EURUSD)"
        )
    return symbol


# The checks every tick passes, and the split


def _positive(col: str) -> pl.Expr:
    value = pl.col(col)
    return value.is_not_null() & value.is_finite() & (value > 0)


def _bad_amount(col: str) -> pl.Expr:
    """Present but not a positive finite number (an absent size is allowed on quotes)."""
    return pl.col(col).is_not_null() & ~_positive(col)


def _clean_words(frame: pl.DataFrame, col: str) -> tuple[pl.DataFrame, pl.Expr]:
    """``col`` stripped and upper case, and which rows hold a value that is not a valid symbol;
    both worked out on its distinct values (a file has few symbols and venues, and millions of
    rows)."""
    if constant(frame[col]):
        values = [] if frame.height == 0 or frame[col][0] is None else [frame[col][0]]
    else:
        values = frame[col].unique().drop_nulls().to_list()
    clean = {v: v.strip().upper() for v in values}
    changed = {v: c for v, c in clean.items() if v != c}
    bad = [c for c in set(clean.values()) if not SYMBOL_RE.match(c)]
    if changed:
        frame = frame.with_columns(pl.col(col).replace(changed))
    return frame, (pl.col(col).is_in(bad) if bad else pl.lit(False))


def split_ticks(
    frame: pl.DataFrame,
    *,
    read: int,
    skipped: int = 0,
    data: bytes | None = None,
    fields: int | None = None,
    separator: str = ",",
) -> ImportResult:
    """Apply the tick rules: good rows become ticks (sorted by ts, stable), bad rows rejects.

    ``data``: the bytes the rows were read from, to give rejects their raw text (and, with
    ``fields``, the field count a rejected line should have had)."""
    frame = frame.with_columns(
        *[pl.lit(None, pl.Utf8).alias(c) for c in ("raw", "flags") if c not in frame.columns]
    )
    frame, bad_sym = _clean_words(frame, "sym")
    frame, bad_venue = _clean_words(frame, "venue")
    is_trade = pl.col("type") == "trade"
    no_bid, no_ask = pl.col("bid").is_null(), pl.col("ask").is_null()
    check = (
        pl.when(pl.col("reason").is_not_null())
        .then(pl.col("reason"))
        .when(pl.col("ts").is_null())
        .then(pl.lit("bad_timestamp: unparseable or outside 2000-2100"))
        .when(pl.col("sym").is_null() | bad_sym)
        .then(pl.lit("bad_symbol: not 1-32 of A-Z 0-9 . _ / -"))
        .when(bad_venue)
        .then(pl.lit("bad_venue: not 1-32 of A-Z 0-9 . _ / -"))
        .when(is_trade & ~_positive("price"))
        .then(pl.lit("bad_price: missing, non-positive or not finite"))
        .when(is_trade & ~_positive("size"))
        .then(pl.lit("bad_size: missing, non-positive or not finite"))
        .when(is_trade & (pl.col("side") == "?"))
        .then(pl.lit("bad_side: not buy or sell"))
        .when(~is_trade & no_bid & no_ask)
        .then(pl.lit("empty_quote: neither bid nor ask"))
        .when(~is_trade & ((~no_bid & ~_positive("bid")) | (~no_ask & ~_positive("ask"))))
        .then(pl.lit("bad_price: non-positive or not finite"))
        .when(~is_trade & (_bad_amount("bid_size") | _bad_amount("ask_size")))
        .then(pl.lit("bad_size: non-positive or not finite"))
    )
    frame = frame.with_columns(reason=check)
    rejects = (
        frame.filter(pl.col("reason").is_not_null())
        .select([pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items()])
        .sort("line")
    )
    if data is not None:
        rejects = table.with_raw(rejects, data, fields, separator)
    ticks = (
        frame.filter(pl.col("reason").is_null())
        .with_columns(
            # A one-sided quote cannot be crossed; trades have no crossed flag.
            crossed=pl.when(~is_trade).then((pl.col("bid") > pl.col("ask")).fill_null(False)),
            # The absent side of a one-sided quote carries no size.
            bid_size=pl.when(pl.col("bid").is_not_null()).then(pl.col("bid_size")),
            ask_size=pl.when(pl.col("ask").is_not_null()).then(pl.col("ask_size")),
        )
        .select([pl.col(c).cast(t) for c, t in TICK_SCHEMA.items()])
    )
    if not ticks["ts"].is_sorted():
        ticks = ticks.sort("ts", maintain_order=True)
    return ImportResult(ticks=ticks, rejects=rejects, read=read, skipped=skipped)
