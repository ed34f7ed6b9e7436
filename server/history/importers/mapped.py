"""Any CSV (or Parquet) file, read through a ``Mapping`` of its columns to tick fields."""

from __future__ import annotations

import datetime as dt
import io
import re

import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from server.history.importers import common, table
from server.history.importers.common import TimeUnit

FILE_PREFIX = "file:"
# strptime date codes and what they match in a file name.
DATE_CODES = {"%Y": r"\d{4}", "%m": r"\d{2}", "%d": r"\d{2}", "%y": r"\d{2}", "%j": r"\d{3}"}
GUIDE = (
    "Any CSV (or Parquet file) described by flags or a --mapping file (JSON, the same names\n"
    "with _ for -): --time COLUMN and how to read it (--time-unit s/ms/us/ns, or\n"
    "--time-format for strptime, else ISO-8601; --timezone for times without an offset),\n"
    "the symbol (--symbol-column, --symbol-pattern REGEX on the file name, or --symbol),\n"
    "--price and --size (trades), --bid --bid-size --ask --ask-size (quotes), --side,\n"
    "--venue, --flag-column, --price-scale, --separator. --no-header: columns are named\n"
    "1, 2, ... (or --columns a,b,c). --date-pattern %Y%m%d: the date is in the file name and\n"
    "the time column is the time of day.\n"
    "  when,ticker,px,qty\n"
    "  1700000000123,ES,4500.25,3\n"
    "  --time when --time-unit ms --symbol-column ticker --price px --size qty"
)


class Mapping(BaseModel):
    """How to read a CSV or Parquet file in a layout tickpipe has no named format for.

    Name the time column and either its epoch ``time_unit`` or a strptime ``time_format``; with
    neither, ISO-8601 text is expected (``2024-01-02T10:00:00.5Z``, ``2024-01-02 10:00:00``).
    Times without an offset are read in ``timezone``; times with one are converted to UTC.
    Prices (``price``, ``bid``, ``ask``) are divided by ``price_scale``. The symbol comes from
    ``symbol_column`` or the fixed ``symbol``. Rows with a ``price`` value are trades; rows
    without, when ``bid``/``ask`` are mapped, are quotes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: str
    time_unit: TimeUnit | None = None
    time_format: str | None = None
    timezone: str = "UTC"
    price_scale: float = 1.0
    symbol_column: str | None = None
    symbol: str | None = None
    price: str | None = None
    size: str | None = None
    side: str | None = None
    bid: str | None = None
    bid_size: str | None = None
    ask: str | None = None
    ask_size: str | None = None
    venue: str | None = None
    separator: str = ","
    # A column whose value 1/true marks the row as flagged by the vendor (the flag is named
    # after the column, e.g. "suspicious").
    flag_column: str | None = None
    # A file without a header row: its columns are ``column_names``, or "1", "2", ... by position.
    header: bool = True
    column_names: list[str] | None = None
    # A regular expression searched in the file name: its first group (or the match) is the symbol.
    symbol_pattern: str | None = None
    # The session date is in the file name in this strptime format (%Y, %m, %d); then ``time``
    # is the time of day (``time_unit``: an amount since midnight, or ``time_format``).
    date_pattern: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Mapping:
        if self.time_unit is not None and self.time_format is not None:
            raise ValueError("give time_unit (epoch numbers) or time_format (text), not both")
        if self.price is None and self.bid is None and self.ask is None:
            raise ValueError("map at least one of price (trades) or bid/ask (quotes)")
        if not self.price_scale > 0:
            raise ValueError("price_scale must be positive")
        if self.symbol_pattern is not None:
            try:
                re.compile(self.symbol_pattern)
            except re.error as exc:
                raise ValueError(f"symbol_pattern is not a regular expression: {exc}") from None
        if self.date_pattern is not None and not set(DATE_CODES) & set(
            re.findall("%.", self.date_pattern)
        ):
            raise ValueError("date_pattern needs strptime date codes, e.g. %Y%m%d")
        return self

    def columns(self) -> dict[str, str]:
        """Tick field -> file column, for every field this mapping names."""
        fields = ("price", "size", "side", "bid", "bid_size", "ask", "ask_size", "venue",
                  "flag_column")  # fmt: skip
        named = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        named["time"] = self.time
        if self.symbol_column is not None:
            named["sym"] = self.symbol_column
        return named


def parse_csv(data: bytes, name: str, mapping: Mapping, symbol: str | None) -> pl.DataFrame:
    sep = mapping.separator
    if mapping.header:
        names = table.header_names(data, sep)
        if not table.first_line(data):
            raise ValueError("the file is empty; a csv file with a header starts with it")
    elif mapping.column_names is not None:
        names = list(mapping.column_names)
    else:
        names = [str(i + 1) for i in range(len(table.first_line(data).split(sep)))]
    wanted = mapping.columns()
    missing = sorted(c for c in wanted.values() if c not in names)
    if missing:
        raise ValueError(f"the file has no column(s) {missing}; its columns are {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"the file names a column twice: {names}")
    # Prefixed so that file columns named like ours (``line``, ``price``, ...) cannot collide.
    columns: dict[str, pl.DataType] = {FILE_PREFIX + c: pl.Utf8() for c in names}
    frame = table.read_rows(data, columns, header=mapping.header, separator=sep)
    return _apply_mapping(frame, mapping, symbol, name)


def parse_parquet(data: bytes, name: str, mapping: Mapping, symbol: str | None) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a readable Parquet file ({first}); fetch it again") from None
    missing = sorted(c for c in mapping.columns().values() if c not in frame.columns)
    if missing:
        raise ValueError(f"the file has no column(s) {missing}; its columns are {frame.columns}")
    frame = frame.rename({c: FILE_PREFIX + c for c in frame.columns})
    frame = frame.with_row_index("line", offset=1).with_columns(
        pl.col("line").cast(pl.Int64),
        reason=pl.lit(None, pl.Utf8),
    )
    return _apply_mapping(frame, mapping, symbol, name)


def date_in_name(name: str, pattern: str) -> dt.date:
    """The date written in ``name`` in the strptime ``pattern`` (e.g. %Y%m%d)."""
    regex = "".join(
        DATE_CODES[part] if part in DATE_CODES else re.escape(part)
        for part in re.split("(%.)", pattern)
        if part
    )
    found = re.search(regex, name)
    if found is not None:
        try:
            return dt.datetime.strptime(found.group(0), pattern).date()
        except ValueError:
            pass
    raise ValueError(f"{name!r} has no date in the form {pattern!r} (date_pattern)")


def _time_of_day(mapping: Mapping, day: dt.date) -> pl.Expr:
    col = pl.col(FILE_PREFIX + mapping.time).cast(pl.Utf8)
    if mapping.time_unit is not None:
        return common.since_midnight_ts(col, mapping.time_unit, day, mapping.timezone)
    prefix = day.isoformat() + " "
    fmt = "%Y-%m-%d " + (mapping.time_format or "%H:%M:%S%.f")
    naive = (pl.lit(prefix) + col.str.strip_chars()).str.strptime(
        pl.Datetime("ns"), fmt, strict=False
    )
    return common.local_ts(naive, mapping.timezone)


def _mapped_time(frame: pl.DataFrame, mapping: Mapping, name: str) -> pl.Expr:
    if mapping.date_pattern is not None:
        return _time_of_day(mapping, date_in_name(name, mapping.date_pattern))
    col = pl.col(FILE_PREFIX + mapping.time)
    dtype = frame.schema[FILE_PREFIX + mapping.time]
    if isinstance(dtype, pl.Datetime):
        ts = col.dt.cast_time_unit("ns")
        if dtype.time_zone is None:
            return common.local_ts(ts, mapping.timezone)
        return ts.dt.convert_time_zone("UTC")
    if mapping.time_unit is not None:
        return common.epoch_ts(common.decimal_ns(col.cast(pl.Utf8), mapping.time_unit))
    if mapping.time_format is not None:
        fmt = mapping.time_format
        parsed = col.cast(pl.Utf8).str.strptime(pl.Datetime("ns"), fmt, strict=False)
        if any(z in fmt for z in ("%z", "%:z", "%#z")):
            return parsed.dt.convert_time_zone("UTC")
        return common.local_ts(parsed, mapping.timezone)
    # ISO-8601: with an offset or Z (converted to UTC), or without (read in mapping.timezone).
    iso = (
        col.cast(pl.Utf8)
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"Z$", "+00:00")
    )
    aware = iso.str.strptime(pl.Datetime("ns"), "%Y-%m-%dT%H:%M:%S%.f%z", strict=False)
    naive = iso.str.strptime(pl.Datetime("ns"), "%Y-%m-%dT%H:%M:%S%.f", strict=False)
    return pl.coalesce(aware.dt.convert_time_zone("UTC"), common.local_ts(naive, mapping.timezone))


def _symbol(mapping: Mapping, symbol: str | None, name: str) -> pl.Expr:
    """The symbol: the argument, else the mapping's column, file-name pattern or fixed name."""
    if symbol is not None:
        return pl.lit(symbol, pl.Utf8)
    if mapping.symbol_column is not None:
        return pl.col(FILE_PREFIX + mapping.symbol_column).cast(pl.Utf8)
    if mapping.symbol_pattern is not None:
        found = re.search(mapping.symbol_pattern, name)
        if found is None:
            raise ValueError(
                f"{name!r} does not match symbol_pattern {mapping.symbol_pattern!r}; pass --symbol"
            )
        return pl.lit(found.group(1) if found.groups() else found.group(0), pl.Utf8)
    if mapping.symbol is not None:
        return pl.lit(mapping.symbol, pl.Utf8)
    raise ValueError(
        "the mapping names no symbol: give --symbol-column, --symbol-pattern or --symbol"
    )


def _apply_mapping(
    frame: pl.DataFrame, mapping: Mapping, symbol: str | None, name: str
) -> pl.DataFrame:
    def num(field: str, scale: float = 1.0) -> pl.Expr:
        column = getattr(mapping, field)
        if column is None:
            return pl.lit(None, pl.Float64)
        value = pl.col(FILE_PREFIX + column).cast(pl.Float64, strict=False)
        return common.unscale(value, scale)

    def word(column: str | None) -> pl.Expr:
        if column is None:
            return pl.lit(None, pl.Utf8)
        value = pl.col(FILE_PREFIX + column).cast(pl.Utf8)
        return pl.when(value != "").then(value)

    sym = _symbol(mapping, symbol, name)
    scale = mapping.price_scale
    is_quote = mapping.bid is not None or mapping.ask is not None
    if mapping.price is None:
        kind = pl.lit("quote")
    elif not is_quote:
        kind = pl.lit("trade")
    else:
        kind = pl.when(num("price").is_not_null()).then(pl.lit("trade")).otherwise(pl.lit("quote"))
    trade, quote = kind == "trade", kind == "quote"
    side = (
        pl.lit(None, pl.Utf8) if mapping.side is None else common.side(FILE_PREFIX + mapping.side)
    )
    return frame.with_columns(
        sym=sym,
        type=kind,
        ts=_mapped_time(frame, mapping, name),
        price=pl.when(trade).then(num("price", scale)),
        size=pl.when(trade).then(num("size")),
        side=pl.when(trade).then(side),
        bid=pl.when(quote).then(num("bid", scale)),
        bid_size=pl.when(quote).then(num("bid_size")),
        ask=pl.when(quote).then(num("ask", scale)),
        ask_size=pl.when(quote).then(num("ask_size")),
        venue=word(mapping.venue),
        flags=_flag(mapping.flag_column),
    )


def _flag(column: str | None) -> pl.Expr:
    if column is None:
        return pl.lit(None, pl.Utf8)
    value = pl.col(FILE_PREFIX + column).cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    return pl.when(value.is_in(["1", "true", "yes", "y"])).then(pl.lit(column.lower()))
