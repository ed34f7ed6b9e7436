"""Replay events of stored rows, a whole chunk at a time (Polars expressions, no Python per row).

For a chunk of stored rows (``STORED_SCHEMA`` order, ``ts`` as integer ns) this builds, as
column expressions, exactly what the per-row functions build: the live-format JSON of each tick
(``server.wire.row_event``: the fields a tick has, in the live order, then ``epoch``, then
the ``close`` text) and its fingerprint line (``tickpipe.fingerprint.canonical_line``).

Polars writes a float as its shortest round-trip digits, like orjson, so the JSON is the same;
the fingerprint line needs Python's ``repr``, which differs only for magnitudes below 1e-4
(``1e-05`` against ``1e-5``), so a chunk holding such a value, or a string that JSON would have to
escape, is left to the per-row functions (``None``).
"""

from __future__ import annotations

import polars as pl

from server import wire
from tickpipe.fingerprint import canonical_line

_FLOATS = ("price", "size", "bid", "bid_size", "ask", "ask_size")
_STRINGS = ("sym", "side", "venue", "flags")
# Strings JSON writes as they are: no quote, backslash or control character.
_PLAIN = r'^[^"\\\x00-\x1f]*$'


def _num(c: str) -> pl.Expr:
    return pl.col(c).cast(pl.String)


def _opt(name: str, value: pl.Expr, quoted: bool = False) -> pl.Expr:
    """``,"name":value`` where the value is not null, else nothing."""
    q = '"' if quoted else ""
    return pl.concat_str([pl.lit(f',"{name}":{q}'), value, pl.lit(q)]).fill_null("")


def event_text_expr(close: str) -> pl.Expr:
    """The JSON text of each raw tick row (``row_event`` of a stored row)."""
    head = pl.concat_str(
        [
            pl.lit('{"type":"'),
            pl.col("type"),
            pl.lit('","sym":"'),
            pl.col("sym"),
            pl.lit('","seq":'),
            _num("seq"),
            pl.lit(',"ts":'),
            _num("ts"),
        ]
    )
    trade = pl.concat_str(
        [
            pl.lit(',"price":'),
            _num("price").fill_null("null"),
            pl.lit(',"size":'),
            _num("size").fill_null("null"),
            _opt("side", pl.col("side"), quoted=True),
        ]
    )
    quote = pl.concat_str(
        [
            _opt("bid", _num("bid")),  # absent on a one-sided quote, as in the live event
            _opt("bid_size", _num("bid_size")),
            _opt("ask", _num("ask")),
            _opt("ask_size", _num("ask_size")),
            pl.when(pl.col("crossed").fill_null(False))
            .then(pl.lit(',"crossed":true'))
            .otherwise(pl.lit("")),
        ]
    )
    body = pl.when(pl.col("type") == "trade").then(trade).otherwise(quote)
    return pl.concat_str(
        [
            head,
            body,
            _opt("venue", pl.col("venue"), quoted=True),
            _opt("flags", pl.col("flags"), quoted=True),
            pl.lit(',"epoch":'),
            _num("epoch").fill_null("null"),
            pl.lit(close),
        ]
    )


def fingerprint_line_expr() -> pl.Expr:
    """The canonical fingerprint line of each row (``canonical_line``), newline included."""
    fields = [
        pl.col("sym"),
        pl.col("type"),
        _num("ts"),
        _num("epoch").fill_null(""),
        _num("seq"),
        *[_num(c).fill_null("") for c in ("price", "size")],
        pl.col("side").fill_null(""),
        *[_num(c).fill_null("") for c in ("bid", "bid_size", "ask", "ask_size")],
        pl.col("venue").fill_null(""),
        pl.when(pl.col("crossed").fill_null(False)).then(pl.lit("1")).otherwise(pl.lit("")),
    ]
    return pl.concat_str([pl.concat_str(fields, separator="|"), pl.lit("\n")])


def vectorizable(frame: pl.DataFrame) -> bool:
    """Whether Polars writes every value of this chunk as the per-row functions do."""
    tiny = pl.any_horizontal((pl.col(c).abs() < 1e-4) & (pl.col(c) != 0) for c in _FLOATS).any()
    odd = pl.any_horizontal(~pl.col(c).str.contains(_PLAIN).fill_null(True) for c in _STRINGS).any()
    bad_type = (~pl.col("type").is_in(["trade", "quote"])).any()
    got = frame.select(tiny.alias("tiny"), odd.alias("odd"), bad_type.alias("bad")).row(0)
    return not any(got)


def fingerprint_lines(frame: pl.DataFrame) -> list[str]:
    """The fingerprint line of each row of stored ticks (``ts`` as integer ns)."""
    if vectorizable(frame):
        return frame.select(fingerprint_line_expr()).to_series().to_list()
    return [canonical_line(*row[:14]) for row in frame.rows()]


def tick_events(frame: pl.DataFrame, close: str) -> tuple[list[int], list[str], list[str]]:
    """(ts, event JSON, fingerprint line) of each row of stored raw ticks (``ts`` as integer
    ns), as ``wire.row_event`` and ``canonical_line`` give them."""
    if not vectorizable(frame):
        rows = frame.rows()
        return (
            [r[2] for r in rows],
            [wire.row_event(r, close) for r in rows],
            [canonical_line(*r[:14]) for r in rows],
        )
    out = (
        frame.lazy()
        .select("ts", event_text_expr(close).alias("text"), fingerprint_line_expr().alias("line"))
        .collect()
    )
    return out["ts"].to_list(), out["text"].to_list(), out["line"].to_list()
