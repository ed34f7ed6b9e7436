"""What one stored file holds, without its ticks: rows, time range, where each symbol's rows are,
and the seq runs of each (sym, epoch).

Stored files never change once placed, so their facts are learnt once: ``write_file`` computes
them from the frame it writes and keeps them in the file's Parquet key-value metadata
(``FACTS_KEY``); a file written before that (or by another tool) has them computed from one read
of its key columns the first time a query needs them. A process keeps the facts of the files it
has seen (``FACTS``).

They let a query skip what a file cannot hold, find a symbol's rows as one slice (files are
sorted by symbol), and count the gaps of a range without reading its ticks
(``server.history.merge.count_gaps``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import orjson
import polars as pl

FACTS_KEY = "tickpipe.facts"
FACTS_VERSION = 1

RUN_SCHEMA: dict[str, pl.DataType] = {
    "sym": pl.String(),
    "epoch": pl.Int64(),
    "first": pl.Int64(),
    "last": pl.Int64(),
    "lo": pl.Int64(),
    "hi": pl.Int64(),
    "gaps": pl.Int64(),
    "ordered": pl.Boolean(),
}


Run = tuple[int, int, int, int, int, int, bool]  # epoch, first, last, lo, hi, gaps, ordered


@dataclass(frozen=True, eq=False)
class FileFacts:
    rows: int
    ts_lo: int  # min and max ts, integer ns (ts_hi < ts_lo for a file without rows)
    ts_hi: int
    # Per symbol: first row and row count, when the file is sorted by (sym, ts, seq) as the
    # store writes it (else empty: its rows are only read with a filter).
    sym_rows: dict[str, tuple[int, int]]
    # Per (sym, epoch), in file order: first and last seq, min and max ts (ns), seq gaps
    # between neighbours, and whether seq rises strictly in file order.
    runs: pl.DataFrame

    @property
    def sorted_by_sym(self) -> bool:
        return bool(self.sym_rows) or not self.rows

    @cached_property
    def runs_by_sym(self) -> dict[str, list[Run]]:
        """``runs`` per symbol, as tuples (epoch, first, last, lo, hi, gaps, ordered)."""
        out: dict[str, list[Run]] = {}
        for sym, *run in self.runs.iter_rows():
            out.setdefault(sym, []).append(tuple(run))
        return out


def seq_runs(keys: pl.DataFrame) -> pl.DataFrame:
    """The runs (``RUN_SCHEMA``) of rows with sym, epoch, seq and ts (integer ns), in order."""
    if not keys.height:
        return pl.DataFrame(schema=RUN_SCHEMA)
    d = pl.col("seq").diff()
    return (
        keys.group_by("sym", "epoch", maintain_order=True)
        .agg(
            pl.col("seq").first().alias("first"),
            pl.col("seq").last().alias("last"),
            pl.col("ts").min().alias("lo"),
            pl.col("ts").max().alias("hi"),
            (d > 1).sum().alias("gaps"),
            (d.fill_null(1) >= 1).all().alias("ordered"),
        )
        .cast(RUN_SCHEMA)  # type: ignore[arg-type]
    )


def key_columns(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """sym, epoch, seq and ts as integer ns of stored rows."""
    return frame.lazy().select("sym", "epoch", "seq", pl.col("ts").dt.epoch("ns")).collect()


def facts_of(keys: pl.DataFrame) -> FileFacts:
    """The facts of a file whose rows have these ``key_columns``, in file order."""
    if not keys.height:
        return FileFacts(0, 0, -1, {}, seq_runs(keys))
    sym_rows: dict[str, tuple[int, int]] = {}
    if _sorted_by_sym_ts_seq(keys):
        at = 0
        for sym, n in keys.group_by("sym", maintain_order=True).len().iter_rows():
            sym_rows[sym] = (at, n)
            at += n
    ts = keys["ts"]
    return FileFacts(keys.height, int(ts.min()), int(ts.max()), sym_rows, seq_runs(keys))  # type: ignore[arg-type]


def _sorted_by_sym_ts_seq(keys: pl.DataFrame) -> bool:
    """Whether rows are in (sym, ts, seq) order."""
    sym, ts, seq = pl.col("sym"), pl.col("ts"), pl.col("seq")
    new_sym = sym != sym.shift()
    ok = (sym > sym.shift()) | (
        ~new_sym & ((ts > ts.shift()) | ((ts == ts.shift()) & (seq >= seq.shift())))
    )
    return bool(keys.select(ok.slice(1).all()).item())


def to_metadata(facts: FileFacts) -> dict[str, str]:
    """The facts as Parquet key-value metadata."""
    body = {
        "version": FACTS_VERSION,
        "rows": facts.rows,
        "ts_lo": facts.ts_lo,
        "ts_hi": facts.ts_hi,
        "sym_rows": facts.sym_rows,
        "runs": facts.runs.to_dict(as_series=False),
    }
    return {FACTS_KEY: orjson.dumps(body).decode()}


def from_metadata(meta: dict[str, str]) -> FileFacts | None:
    """The facts kept in a file's metadata, or None (none kept, or another version)."""
    raw = meta.get(FACTS_KEY)
    if raw is None:
        return None
    try:
        body = orjson.loads(raw)
        if body.get("version") != FACTS_VERSION:
            return None
        runs = pl.DataFrame(body["runs"], schema=RUN_SCHEMA)
        sym_rows = {k: (int(v[0]), int(v[1])) for k, v in body["sym_rows"].items()}
        return FileFacts(int(body["rows"]), int(body["ts_lo"]), int(body["ts_hi"]), sym_rows, runs)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, pl.exceptions.PolarsError):
        return None


def learn(path: Path) -> FileFacts:
    """A stored file's facts: from its metadata, else from one read of its key columns."""
    kept = from_metadata(pl.read_parquet_metadata(path))
    return kept if kept is not None else facts_of(key_columns(pl.scan_parquet(path)))


class FactsCache:
    """The facts of the files this process has read (by path: a placed file never changes)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._known: OrderedDict[Path, FileFacts] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, path: Path) -> FileFacts:
        """The facts of ``path`` (reads the file the first time; PolarsError if it cannot)."""
        with self._lock:
            got = self._known.get(path)
            if got is not None:
                self._known.move_to_end(path)
                return got
        facts = learn(path)
        with self._lock:
            self._known[path] = facts
            while len(self._known) > self.most:
                self._known.popitem(last=False)
        return facts


# A few hundred bytes a file (more for files of many symbols): the facts of 20,000 files.
FACTS = FactsCache(20_000)
