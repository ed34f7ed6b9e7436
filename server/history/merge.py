"""Raw ticks in (ts, seq, sym) order straight from the store's sorted files, without a sort of
the whole range.

Every stored file is sorted by (sym, ts, seq): one sorted run per symbol. The answer's order is
(ts, seq, sym) across symbols and files. Instead of sorting the whole range (DuckDB sorts all of
it before the first row, and spills past its memory limit), the files are cut into *stretches*:
groups of files whose tick-time ranges overlap (``server.history.facts`` knows each file's
range). Stretches are disjoint in time, so each is read once, merged (sorted) on its own and
sent before the next is read: the global order holds, the first rows leave after one stretch,
and a query holds one stretch at a time. A compacted day is one stretch of one file.

A file's rows of one symbol are one slice of it (files are sorted by symbol); for a few symbols
they are read slice by slice through ``SliceCache``, recently read slices kept decoded, so a
backtest that reads the same symbols again reads no file.

Raw ticks only, and only when each stretch fits the query memory: enriched ticks, bars and
bigger stretches are answered in SQL (``server.history.query``); ``open_reader`` picks. Both give
the same rows in the same order (tests/test_history_merge.py).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from server.history.facts import FACTS, FileFacts, Run, facts_of, key_columns, seq_runs
from server.history.query import CorruptHistory, HistoryQuery, HistoryReader, Source
from server.ticks import STORED_SCHEMA

TS = pl.Datetime("ns", "UTC")
COLUMNS = list(STORED_SCHEMA)
# Decoded size of one stored row in Polars with a sort's second copy (strings are views).
ROW_BYTES = 300
# Up to this many symbols a stretch is read symbol by symbol (through the slice cache);
# more are read with one filtered scan per file.
CACHED_SYMBOLS = 8


class SliceCache:
    """Recently read (file, symbol) slices, decoded, up to ``capacity_bytes`` together."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.held = 0
        self._slices: OrderedDict[tuple[Path, str], pl.DataFrame] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, sym: str, facts: FileFacts) -> pl.DataFrame:
        key = (path, sym)
        with self._lock:
            got = self._slices.get(key)
            if got is not None:
                self._slices.move_to_end(key)
                return got
        frame = read_symbol(path, sym, facts)
        size = int(frame.estimated_size())
        if size <= self.capacity // 8:
            with self._lock:
                if key not in self._slices:
                    self._slices[key] = frame
                    self.held += size
                while self.held > self.capacity and self._slices:
                    _, old = self._slices.popitem(last=False)
                    self.held -= int(old.estimated_size())
        return frame


_caches: dict[int, SliceCache] = {}
_caches_lock = threading.Lock()


def slice_cache(capacity_mb: int) -> SliceCache | None:
    """The process's slice cache of this size (None for 0: no cache)."""
    if capacity_mb <= 0:
        return None
    with _caches_lock:
        cache = _caches.get(capacity_mb)
        if cache is None:
            cache = _caches[capacity_mb] = SliceCache(capacity_mb * 2**20)
        return cache


def _conformed(lf: pl.LazyFrame) -> pl.LazyFrame:
    """The stored columns, in order; a column the file predates (``flags``) reads as null."""
    held = lf.collect_schema()
    missing = [pl.lit(None, dtype=STORED_SCHEMA[c]).alias(c) for c in COLUMNS if c not in held]
    return lf.with_columns(missing).select(COLUMNS) if missing else lf.select(COLUMNS)


def read_symbol(path: Path, sym: str, facts: FileFacts) -> pl.DataFrame:
    """One symbol's rows of one file, in file order (row-group statistics skip the others)."""

    def rows(lf: pl.LazyFrame) -> pl.DataFrame:
        if facts.sorted_by_sym:
            first, n = facts.sym_rows.get(sym, (0, 0))
            return lf.slice(first, n).collect()
        return lf.filter(pl.col("sym") == sym).collect()

    try:
        try:
            return rows(pl.scan_parquet(path).select(COLUMNS))
        except pl.exceptions.ColumnNotFoundError:  # a file written before a column was added
            return rows(_conformed(pl.scan_parquet(path)))
    except pl.exceptions.PolarsError as exc:
        raise CorruptHistory(path, str(exc).splitlines()[0]) from exc


@dataclass
class Part:
    """One input of a merge: a stored file, or the unrecorded log's rows (``frame``)."""

    facts: FileFacts
    path: Path | None = None
    frame: pl.DataFrame | None = None


def parts_of(source: Source, syms: list[str], start_ns: int, end_ns: int) -> list[Part]:
    """The files a query of [start, end) reads (those ``HistoryReader`` reads) and the log
    tail's rows of these symbols in the range."""
    parts: list[Part] = []
    for path in source.snapshot.paths(start_ns, end_ns):
        try:
            parts.append(Part(FACTS.of(path), path=path))
        except pl.exceptions.PolarsError as exc:
            raise CorruptHistory(path, str(exc).splitlines()[0]) from exc
    if source.tail is not None and source.tail.height:
        ns = pl.col("ts").dt.epoch("ns")
        rows = source.tail.filter(pl.col("sym").is_in(syms) & (ns >= start_ns) & (ns < end_ns))
        if rows.height:
            rows = rows.select(COLUMNS)
            parts.append(Part(facts_of(key_columns(rows)), frame=rows))
    return parts


def stretches(parts: list[Part], start_ns: int, end_ns: int) -> list[list[Part]]:
    """The parts that can hold ticks in [start, end), in groups disjoint in time, in time
    order."""
    live = sorted(
        (p for p in parts if p.facts.rows and p.facts.ts_hi >= start_ns and p.facts.ts_lo < end_ns),
        key=lambda p: p.facts.ts_lo,
    )
    groups: list[list[Part]] = []
    reach = 0
    for p in live:
        if not groups or p.facts.ts_lo > reach:
            groups.append([])
            reach = p.facts.ts_hi
        groups[-1].append(p)
        reach = max(reach, p.facts.ts_hi)
    return groups


@dataclass(frozen=True)
class Wanted:
    """Which raw ticks a merge yields (a ``HistoryQuery`` of raw ticks)."""

    syms: tuple[str, ...]
    start_ns: int
    end_ns: int
    types: tuple[str, ...]
    after: tuple[int, int, str] | None = None
    limit: int | None = None
    flagged: str = "include"

    @classmethod
    def of(cls, q: HistoryQuery) -> Wanted:
        return cls(tuple(q.syms), q.start_ns, q.end_ns, q.types, q.after, q.limit, q.flagged)

    def rows_filter(self) -> pl.Expr:
        lo = pl.lit(self.start_ns).cast(TS)
        hi = pl.lit(self.end_ns).cast(TS)
        cond = (pl.col("ts") >= lo) & (pl.col("ts") < hi)
        if set(self.types) != {"trade", "quote"}:
            cond &= pl.col("type").is_in(list(self.types))
        if self.flagged == "exclude":
            cond &= pl.col("flags").is_null()
        elif self.flagged == "only":
            cond &= pl.col("flags").is_not_null()
        if self.after is not None:
            ts_ns, seq, sym = self.after
            at = pl.lit(ts_ns).cast(TS)
            cond &= (pl.col("ts") > at) | (
                (pl.col("ts") == at)
                & ((pl.col("seq") > seq) | ((pl.col("seq") == seq) & (pl.col("sym") > sym)))
            )
        return cond


def stretch_rows(group: list[Part], want: Wanted) -> int:
    """At most how many rows a stretch holds for the wanted symbols."""
    total = 0
    for p in group:
        if p.frame is not None or not p.facts.sorted_by_sym:
            total += p.facts.rows
        else:
            total += sum(p.facts.sym_rows.get(s, (0, 0))[1] for s in want.syms)
    return total


def read_stretch(group: list[Part], want: Wanted, cache: SliceCache | None) -> pl.DataFrame:
    """The wanted rows of one stretch in (ts, seq, sym) order."""
    frames: list[pl.DataFrame] = []
    by_symbol = cache is not None and len(want.syms) <= CACHED_SYMBOLS
    for p in group:
        if p.frame is not None:
            frames.append(p.frame)
        elif by_symbol:
            assert p.path is not None and cache is not None
            frames += [
                cache.get(p.path, s, p.facts)
                for s in want.syms
                if not p.facts.sorted_by_sym or s in p.facts.sym_rows
            ]
        else:
            frames.append(_read_file(p, want))
    if not frames:
        return pl.DataFrame(schema=STORED_SCHEMA)
    one = len(frames) == 1
    frame = frames[0] if one else pl.concat(frames, how="vertical", rechunk=False)
    if not _wholly_wanted(group, want):
        frame = frame.filter(want.rows_filter())
    if one and len(want.syms) == 1 and group[0].path is not None and group[0].facts.sym_rows:
        return frame  # one symbol of a file in (sym, ts, seq) order: (ts, seq, sym) order
    return frame.sort("ts", "seq", "sym")


def _read_file(p: Part, want: Wanted) -> pl.DataFrame:
    """The rows of the wanted symbols of a stored file. Read whole, then filtered: Polars'
    Parquet predicate for ``is_in`` many symbols costs 30 times the read."""
    assert p.path is not None
    try:
        frame = pl.read_parquet(p.path, columns=COLUMNS)
    except pl.exceptions.ColumnNotFoundError:  # a file written before a column was added
        frame = _conformed(pl.scan_parquet(p.path)).collect()
    except pl.exceptions.PolarsError as exc:
        raise CorruptHistory(p.path, str(exc).splitlines()[0]) from exc
    held = p.facts.sym_rows.keys() if p.facts.sorted_by_sym else None
    if held is not None and set(held) <= set(want.syms):
        return frame  # every symbol of the file is wanted
    return frame.filter(pl.col("sym").is_in(want.syms))


def _wholly_wanted(group: list[Part], want: Wanted) -> bool:
    """Whether every row of the wanted symbols of these parts is wanted (no filter needed)."""
    return (
        want.after is None
        and want.flagged == "include"
        and set(want.types) >= {"trade", "quote"}
        and all(want.start_ns <= p.facts.ts_lo and p.facts.ts_hi < want.end_ns for p in group)
    )


def merged(parts: list[Part], want: Wanted, cache: SliceCache | None) -> Iterator[pl.DataFrame]:
    """The wanted rows, stretch after stretch, each in order (``limit`` applied)."""
    left = want.limit
    for group in stretches(parts, want.start_ns, want.end_ns):
        frame = read_stretch(group, want, cache)
        if not frame.height:
            continue
        if left is not None:
            frame = frame.head(left)
            left -= frame.height
        yield frame
        if left is not None and left <= 0:
            return


class MergeReader:
    """A raw-tick query answered by ``merged``; the interface of ``HistoryReader.chunks``."""

    def __init__(self, q: HistoryQuery, parts: list[Part], cache: SliceCache | None) -> None:
        self.q = q
        self.parts = parts
        self.cache = cache
        self.files = [p.path for p in parts if p.path is not None]
        self.rows: int | None = None  # rows of the stretch being read (what the query holds)

    def chunks(
        self, size: int = 50_000, ns_ints: bool = True, project: bool = True
    ) -> Iterator[pl.DataFrame]:
        """The answer as frames of at most ``size`` rows, in order (as ``HistoryReader``)."""
        for frame in merged(self.parts, Wanted.of(self.q), self.cache):
            self.rows = frame.height
            if ns_ints:
                frame = frame.with_columns(pl.col("ts").dt.epoch("ns"))
            if project and self.q.fields is not None:
                frame = frame.select(self.q.fields)
            for lo in range(0, frame.height, size):
                yield frame.slice(lo, size)

    def close(self) -> None:
        """Nothing to free: chunks are slices of the stretch being read."""


def fits_rows(parts: list[Part], want: Wanted, most_rows: int) -> bool:
    """Whether no stretch of the query holds more than ``most_rows`` rows."""
    groups = stretches(parts, want.start_ns, want.end_ns)
    return all(stretch_rows(g, want) <= most_rows for g in groups)


def fits(parts: list[Part], want: Wanted, memory_mb: int) -> bool:
    """Whether every stretch of the query can be held within the query memory."""
    return fits_rows(parts, want, memory_mb * 2**20 // ROW_BYTES)


def open_reader(source: Source, q: HistoryQuery) -> HistoryReader | MergeReader:
    """The reader for this query: the merge of the sorted files for raw ticks whose stretches
    fit the query memory, SQL for the rest."""
    if q.enriched or q.interval is not None or not source.merge:
        return HistoryReader(source, q)
    parts = parts_of(source, q.syms, q.start_ns, q.end_ns)
    if not fits(parts, Wanted.of(q), source.memory_mb):
        return HistoryReader(source, q)
    return MergeReader(q, parts, slice_cache(source.cache_mb))


def gap_count(source: Source, syms: list[str], start_ns: int, end_ns: int) -> int:
    """``len(find_gaps(...)[0])``, mostly from the files' facts (see ``count_gaps``)."""
    return count_gaps(parts_of(source, syms, start_ns, end_ns), syms, start_ns, end_ns)


def count_gaps(parts: list[Part], syms: list[str], start_ns: int, end_ns: int) -> int:
    """How many gaps ``find_gaps`` reports for these symbols in [start, end): consecutive stored
    seqs of one (sym, epoch) more than one apart, both in the range.

    A (sym, epoch) run of a part that lies wholly in the range, with seq rising in file order,
    is taken from the part's facts; other runs are read. Runs of one (sym, epoch) in different
    parts that overlap in seq fall back to sorting every seq of the range."""
    # (sym, epoch) -> [(first, last, gaps)] of the runs in the range
    runs: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for p in parts:
        f = p.facts
        if not f.rows or f.ts_hi < start_ns or f.ts_lo >= end_ns:
            continue
        partial: list[str] = []
        by_sym = f.runs_by_sym
        for sym in syms:
            for epoch, first, last, lo, hi, gaps, ordered in by_sym.get(sym, ()):
                if start_ns <= lo and hi < end_ns and ordered:
                    runs.setdefault((sym, epoch), []).append((first, last, gaps))
                elif hi >= start_ns and lo < end_ns:
                    partial.append(sym)
        if partial:
            read = seq_runs(_keys(p, sorted(set(partial)), start_ns, end_ns))
            if not read["ordered"].all():
                return _count_gaps_sorted(parts, syms, start_ns, end_ns)
            for sym, epoch, first, last, _lo, _hi, gaps, _ok in read.iter_rows():
                if not _taken(by_sym[sym], epoch, start_ns, end_ns):
                    runs.setdefault((sym, epoch), []).append((first, last, gaps))
    total = 0
    for pieces in runs.values():
        pieces.sort()
        total += sum(g for _f, _l, g in pieces)
        for (_f0, last, _g0), (first, _l1, _g1) in itertools.pairwise(pieces):
            if first <= last:
                return _count_gaps_sorted(parts, syms, start_ns, end_ns)
            total += first - last > 1
    return total


def _taken(runs: list[Run], epoch: int, start_ns: int, end_ns: int) -> bool:
    """Whether the (sym, epoch) run of a part was taken whole from its facts."""
    return any(
        e == epoch and start_ns <= lo and hi < end_ns and ordered
        for e, _f, _l, lo, hi, _g, ordered in runs
    )


def _keys(p: Part, syms: list[str], start_ns: int, end_ns: int) -> pl.DataFrame:
    """sym, epoch, seq, ts (ns) of a part's rows of these symbols in [start, end)."""
    try:
        if p.frame is not None:
            rows = p.frame.select("sym", "epoch", "seq", "ts")
        else:  # read, then filtered (see ``_read_file``)
            rows = pl.read_parquet(p.path, columns=["sym", "epoch", "seq", "ts"])  # type: ignore[arg-type]
    except pl.exceptions.PolarsError as exc:
        raise CorruptHistory(p.path or Path("<log>"), str(exc).splitlines()[0]) from exc
    lo, hi = pl.lit(start_ns).cast(TS), pl.lit(end_ns).cast(TS)
    return key_columns(
        rows.filter(pl.col("sym").is_in(syms) & (pl.col("ts") >= lo) & (pl.col("ts") < hi))
    )


def _count_gaps_sorted(parts: list[Part], syms: list[str], start_ns: int, end_ns: int) -> int:
    frames = [_keys(p, syms, start_ns, end_ns) for p in parts if p.facts.rows]
    if not frames:
        return 0
    keys = pl.concat(frames)
    d = pl.col("seq").sort().diff().over("sym", "epoch")
    return int(keys.select((d > 1).sum()).item())
