"""A vendor file's bytes as a typed table, fast: Polars' multi-threaded CSV reader, one pass.

Every row keeps its 1-based line number in the file, so a row that cannot become a tick is
reported with its line and raw text. The raw text is read back only for those rows (a second
read of the bytes, done only when there are rejects).

Rules, the same for every format read this way:

* a value that does not parse as its column's type is null (the tick checks then reject the
  row with the reason of that field, e.g. ``bad_price``);
* a row with more fields than the format has is ``bad_row``; a row with fewer has its missing
  fields null, and when it is rejected its reason says how many fields it had;
* a blank line, or one whose every field is empty, is not a row (it is not counted as read);
* bytes that are not UTF-8 become U+FFFD, and a text field holding one rejects its row
  (``bad_encoding``); CRLF line ends and a UTF-8 byte-order mark are fine.

Line numbers assume no line break inside a quoted field (no vendor format here has one).
"""

from __future__ import annotations

from typing import Literal

import polars as pl

EXTRA = "_extra_field"
BOM = b"\xef\xbb\xbf"
# A byte that does not occur in text files: a whole line read as one field.
LINE_SEPARATOR = "\x1f"


def read_rows(
    data: bytes,
    columns: dict[str, pl.DataType],
    *,
    header: bool,
    separator: str = ",",
    quote: str | None = '"',
    unused: tuple[str, ...] = (),
) -> pl.DataFrame:
    """The data rows of ``data`` as ``columns`` (in file order), plus ``line`` (Int64, 1-based
    line number in the file) and ``reason`` (null, or why the row is not a tick at all).

    ``header``: the first line is a header and is skipped (check it with ``first_line``).
    ``unused``: columns of the file that are not parsed at all (and not returned)."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    schema = {**columns, EXTRA: pl.Utf8()}
    names = [n for n in columns if n not in unused]
    wanted = [i for i, n in enumerate(schema) if n not in unused]

    def read(encoding: Literal["utf8", "utf8-lossy"]) -> pl.DataFrame:
        return pl.read_csv(
            data,
            has_header=False,
            skip_rows=int(header),
            schema=schema,
            columns=wanted if unused else None,
            separator=separator,
            quote_char=quote,
            ignore_errors=True,
            truncate_ragged_lines=True,
            missing_columns="insert",
            encoding=encoding,
            raise_if_empty=False,
        )

    bad_text: pl.Expr = pl.lit(False)
    try:
        frame = read("utf8")
    except pl.exceptions.ComputeError:
        # Bytes that are not UTF-8 somewhere: read them as U+FFFD and reject their rows.
        try:
            frame = read("utf8-lossy")
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"cannot be read as CSV ({str(exc).splitlines()[0]})") from None
        text = [n for n in names if columns[n] == pl.Utf8()]
        bad_text = pl.any_horizontal(
            [pl.col(n).str.contains("\ufffd", literal=True) for n in text] or [pl.lit(False)]
        ).fill_null(False)
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"cannot be read as CSV ({str(exc).splitlines()[0]})") from None
    return (
        frame.with_row_index("line", offset=1 + int(header))
        .with_columns(pl.col("line").cast(pl.Int64))
        .filter(~pl.all_horizontal([pl.col(n).is_null() for n in names]))
        .with_columns(
            reason=pl.when(bad_text)
            .then(pl.lit("bad_encoding: invalid UTF-8 bytes"))
            .when(pl.col(EXTRA).is_not_null())
            .then(pl.lit(f"bad_row: more than {len(names)} fields"))
        )
        .drop(EXTRA)
    )


def first_line(data: bytes) -> str:
    """The first line of ``data`` (a header), without its line end or a byte-order mark."""
    head = data.removeprefix(BOM)[:65_536].split(b"\n", 1)[0]
    return head.decode("utf-8", errors="replace").rstrip("\r")


def header_names(data: bytes, separator: str = ",") -> list[str]:
    """The column names of a header line (spaces and quotes around them removed)."""
    return [c.strip().strip('"') for c in first_line(data).split(separator)]


def with_raw(
    rejects: pl.DataFrame, data: bytes, fields: int | None, separator: str = ","
) -> pl.DataFrame:
    """``rejects`` (``line``, ``reason``, ``raw``) with the raw text of each line filled in from
    ``data``; when ``fields`` is given, a rejected line with another field count gets the
    reason ``bad_row: expected N fields, got K (truncated?)`` instead (its other problems
    follow from that one)."""
    if rejects.height == 0 or rejects["raw"].null_count() == 0:
        return rejects
    if data.startswith(BOM):
        data = data[len(BOM) :]
    lines = pl.read_csv(
        data,
        has_header=False,
        schema={"raw": pl.Utf8()},
        separator=LINE_SEPARATOR,
        quote_char=None,
        truncate_ragged_lines=True,
        encoding="utf8-lossy",
        raise_if_empty=False,
    ).with_row_index("line", offset=1)
    texts = lines.with_columns(
        pl.col("line").cast(pl.Int64), pl.col("raw").str.strip_suffix("\r")
    ).filter(pl.col("line").is_in(rejects["line"].implode()))
    out = rejects.drop("raw").join(texts, on="line", how="left")
    if fields is not None:
        got = pl.col("raw").str.count_matches(separator, literal=True) + 1
        miscounted = (got != fields) & ~pl.col("raw").str.contains('"', literal=True)
        out = out.with_columns(
            reason=pl.when(miscounted)
            .then(
                pl.format("bad_row: expected {} fields, got {} (truncated?)", pl.lit(fields), got)
            )
            .otherwise(pl.col("reason"))
        )
    return out.select("line", "reason", "raw").sort("line")
