"""What identifies imported ticks, so that a file is stored exactly once.

* A file is identified by its bytes (SHA-256). ``history/imports.jsonl`` lists the files whose
  ticks were stored; an entry is written only after every tick of the file is on disk and only
  when it stored at least one tick, so an import that failed or stored nothing (a wrong format,
  every row rejected) never counts as done.
* A tick is identified by its series, (``sym``, ``type``, ``venue``), and its time. Two imports
  overlap when the store already holds ticks of one of the new file's series between that
  series' first and last tick in the file: a partial copy of a file already imported, the
  same day from another download, a monthly file over its daily files. Ticks of other series
  (the quotes next to the trades of the same symbol and day, another venue) never overlap.

By default an overlapping file is refused with what overlaps; ``replace`` removes the stored
imported ticks of those series in those ranges (rewriting the imported files that hold them)
and then stores the file. Ticks recorded from the live feed are never removed: an overlap with
them is refused even with ``replace``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import orjson
import polars as pl

from server.history.importers import common
from server.history.store import place, scan

MANIFEST = "imports.jsonl"
IMPORT_PREFIX = "import-"
SERIES = ("sym", "type", "venue")
# Overlaps listed in a refusal message; the rest are counted.
SHOWN = 5


def manifest_entry(history: Path, digest: str) -> dict[str, object] | None:
    """The manifest entry of a file whose ticks were stored, by SHA-256; None if none."""
    try:
        text = (history / MANIFEST).read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut short by a crash: that import never finished
        if not isinstance(entry, dict):
            continue
        if entry.get("sha256") == digest and int(entry.get("stored", 0)) > 0:
            return {str(k): v for k, v in entry.items()}
    return None


def has_imports(history: Path) -> bool:
    """Whether any import was ever listed (the manifest exists and is not empty)."""
    try:
        return (history / MANIFEST).stat().st_size > 0
    except FileNotFoundError:
        return False


def note_import(history: Path, entry: dict[str, object]) -> None:
    """Append one finished import to the manifest (one line, written at once)."""
    history.mkdir(parents=True, exist_ok=True)
    with (history / MANIFEST).open("ab") as fh:
        fh.write(orjson.dumps(entry) + b"\n")


def ranges(ticks: pl.DataFrame) -> pl.DataFrame:
    """Per series of ``ticks`` (sorted by ts): the first and last ts (integer ns) and the tick
    count."""
    if ticks.height and all(common.constant(ticks[c]) for c in SERIES):  # one series: no grouping
        ts = ticks["ts"].dt.epoch("ns")
        return pl.DataFrame(
            {"sym": ticks["sym"][:1], "type": ticks["type"][:1],
             "venue": ticks["venue"][:1].fill_null(""), "first": ts[:1], "last": ts[-1:],
             "ticks": pl.Series([ticks.height], dtype=pl.UInt32)}
        )  # fmt: skip
    return (
        ticks.lazy()
        .group_by(pl.col("sym"), pl.col("type"), pl.col("venue").fill_null(""))
        .agg(
            first=pl.col("ts").min().dt.epoch("ns"),
            last=pl.col("ts").max().dt.epoch("ns"),
            ticks=pl.len(),
        )
        .collect()
    )


@dataclass(frozen=True)
class Overlap:
    """Stored ticks inside the ranges of a file's series: per series, how many and where."""

    series: pl.DataFrame  # sym, type, venue, first, last (of the new file), stored, recorded
    files: list[Path]  # imported files holding overlapping ticks

    @property
    def stored(self) -> int:
        return int(self.series["stored"].sum()) if self.series.height else 0

    @property
    def recorded(self) -> int:
        return int(self.series["recorded"].sum()) if self.series.height else 0

    def describe(self) -> str:
        """One line: what overlaps (the first few series), and what to do."""
        parts = []
        for row in self.series.head(SHOWN).iter_rows(named=True):
            venue = f" on {row['venue']}" if row["venue"] else ""
            parts.append(
                f"{row['stored']:,} {row['sym']} {row['type']}s{venue} between "
                f"{_iso(row['first'])} and {_iso(row['last'])}"
            )
        more = self.series.height - SHOWN
        listed = "; ".join(parts) + (f"; and {more} more series" if more > 0 else "")
        return f"overlaps ticks already stored: {listed}"


def _iso(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 10**9, dt.UTC).replace(microsecond=(ns % 10**9) // 1000)
    return t.isoformat().replace("+00:00", "Z")


def find_overlap(history: Path, new: pl.DataFrame, own_prefix: str | None = None) -> Overlap:
    """Stored ticks of ``new``'s series (``ranges`` of the file) inside their ranges.

    ``own_prefix``: files of the same import (same bytes), left out (``replace`` of a file by
    itself)."""
    empty = Overlap(new.clear().with_columns(stored=pl.lit(0), recorded=pl.lit(0)), [])
    if new.height == 0 or not history.exists():
        return empty
    lo, hi = int(new["first"].min()), int(new["last"].max())  # type: ignore[arg-type]
    files = scan(history).paths(lo, hi + 1)
    if own_prefix is not None:
        files = [f for f in files if not f.name.startswith(own_prefix)]
    if not files:
        return empty
    ns = pl.col("ts").dt.epoch("ns")
    stored = (
        pl.scan_parquet(
            files, include_file_paths="file", missing_columns="insert", extra_columns="ignore"
        )
        .select("sym", "type", pl.col("venue").fill_null(""), "ts", "epoch", "file")
        .filter(pl.col("sym").is_in(new["sym"].unique().implode()) & ns.is_between(lo, hi))
        .join(new.lazy(), on=list(SERIES))
        .filter(ns.is_between(pl.col("first"), pl.col("last")))
    )
    hits = stored.collect()
    if hits.height == 0:
        return empty
    series = (
        hits.group_by(*SERIES, "first", "last")
        .agg(stored=pl.len(), recorded=(pl.col("epoch") > 0).sum())
        .sort(*SERIES)
    )
    imported = hits.filter(pl.col("file").str.contains(f"/{IMPORT_PREFIX}", literal=True))
    return Overlap(series, sorted({Path(f) for f in imported["file"].unique()}))


def remove_overlap(overlap: Overlap) -> int:
    """Rewrite the imported files holding overlapping ticks without them (a file left empty is
    deleted); returns the ticks removed. Each file is replaced atomically."""
    removed = 0
    cut = overlap.series.select(*SERIES, "first", "last")
    for path in overlap.files:
        frame = pl.read_parquet(path)
        key = frame.with_columns(pl.col("venue").fill_null("").alias("_venue"))
        inside = (
            key.with_row_index("_row")
            .join(cut.rename({"venue": "_venue"}), on=["sym", "type", "_venue"])
            .filter(pl.col("ts").dt.epoch("ns").is_between(pl.col("first"), pl.col("last")))
        )["_row"]
        if inside.len() == 0:
            continue
        keep = frame.with_row_index("_row").filter(~pl.col("_row").is_in(inside.implode()))
        removed += inside.len()
        if keep.height == 0:
            path.unlink(missing_ok=True)
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        keep.drop("_row").write_parquet(tmp, compression="zstd", statistics=True)
        place(tmp, path)
    return removed
