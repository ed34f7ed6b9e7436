"""Files into history: parsed ticks stored in the recorder's Parquet layout, exactly once.

What identifies an import and its ticks, and what happens on overlap: ``identity``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from server.history.importers import common, identity
from server.history.importers.formats import read_file
from server.history.importers.mapped import Mapping
from server.history.store import write_file
from server.ticks import STORED_SCHEMA

# Imported files are written once and never compacted: a fast zstd level.
ZSTD_LEVEL = 1
PREVIEW_ROWS = 10


@dataclass
class ImportReport:
    """What ``import_file`` did with one file.

    ``status``: ``stored``; ``already imported`` (the same bytes were stored before: every row
    counts as a duplicate); ``refused`` (its ticks overlap stored ones, ``message`` says which);
    ``no ticks`` (nothing in it could be stored); ``dry run`` (nothing written, ``preview``
    holds the first ticks as they would be stored)."""

    path: Path
    status: str
    read: int = 0
    stored: int = 0
    rejected: int = 0
    duplicate: int = 0
    flagged: int = 0
    skipped: int = 0
    replaced: int = 0
    epoch: int = 0
    seconds: float = 0.0
    rejects_file: Path | None = None
    message: str = ""
    preview: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        """Refused, or a file with rows of which none could be stored."""
        return self.status == "refused" or (self.status == "no ticks" and self.rejected > 0)


def import_epoch(digest: str) -> int:
    """Imported ticks get a negative epoch derived from the file's SHA-256.

    Live epochs are positive (Redis' clock in ms), so imported history can never collide with
    live sequence numbers; seq counts the file's ticks per symbol from 1, in time order.
    """
    return -int(digest[:13], 16)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def import_file(
    history: Path,
    path: Path,
    fmt: str,
    *,
    symbol: str | None = None,
    mapping: Mapping | None = None,
    date: dt.date | None = None,
    lean_market: str | None = None,
    replace: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """Parse ``path`` and store its ticks in ``history`` (the recorder's Parquet layout).

    A file whose bytes were stored before stores nothing (``already imported``); a file whose
    ticks overlap stored ones is refused, unless ``replace``: then the overlapping imported
    ticks are removed first. Rejected rows go to
    ``<history>/../imports/<name>.<digest>.rejects.csv``. ``dry_run``: parse and check only.
    """
    t0 = time.perf_counter()
    raw = path.read_bytes()
    with ThreadPoolExecutor(1) as pool:
        # The digest (hashlib lets go of the GIL) while Polars parses, unless earlier imports
        # are listed: then it decides first whether there is anything to parse.
        hashing = pool.submit(_sha256, raw)
        if not replace and identity.has_imports(history):
            seen = identity.manifest_entry(history, hashing.result())
            if seen is not None:
                read, skipped = int(seen["read"]), int(seen["skipped"])  # type: ignore[call-overload]
                return ImportReport(
                    path, "already imported", read=read, duplicate=read - skipped,
                    skipped=skipped, epoch=import_epoch(hashing.result()),
                    seconds=time.perf_counter() - t0,
                )  # fmt: skip
        result = read_file(
            path, fmt, symbol=symbol, mapping=mapping, date=date, lean_market=lean_market, raw=raw
        )
        digest = hashing.result()
    del raw
    epoch = import_epoch(digest)
    prefix = f"{identity.IMPORT_PREFIX}{digest[:16]}"
    ticks = result.ticks
    report = ImportReport(
        path, "stored", read=result.read, rejected=result.rejects.height, skipped=result.skipped,
        flagged=ticks.height - ticks["flags"].null_count(), epoch=epoch,
    )  # fmt: skip
    if result.rejects.height and not dry_run:
        rejects_dir = history.parent / "imports"
        rejects_dir.mkdir(parents=True, exist_ok=True)
        report.rejects_file = rejects_dir / f"{path.name}.{digest[:12]}.rejects.csv"
        result.rejects.write_csv(report.rejects_file)
    overlap = identity.find_overlap(
        history, identity.ranges(ticks), own_prefix=prefix if replace else None
    )
    if dry_run:
        preview = [rows for _, rows in _stored_days(ticks.head(PREVIEW_ROWS), epoch)]
        report.status = "dry run"
        report.preview = pl.concat(preview) if preview else pl.DataFrame(schema=STORED_SCHEMA)
        report.message = overlap.describe() if overlap.stored else ""
    elif ticks.height == 0:
        report.status = "no ticks"
    elif overlap.stored and not replace:
        report.status = "refused"
        report.message = (
            f"{overlap.describe()}; nothing stored. To store this file in their place, import "
            "it again with --replace"
        )
    elif overlap.recorded:
        report.status = "refused"
        report.message = (
            f"{overlap.describe()}; {overlap.recorded:,} of them were recorded from the live "
            "feed, which --replace never removes; nothing stored"
        )
    else:
        report.replaced = identity.remove_overlap(overlap) if overlap.stored else 0
        for day, rows in _stored_days(ticks, epoch):
            write_file(history, rows, prefix, str(day), presorted=True, level=ZSTD_LEVEL)
            report.stored += rows.height
        # Only now, with every tick on disk, does the import count as done.
        identity.note_import(
            history,
            {"sha256": digest, "file": path.name, "format": fmt, "epoch": epoch,
             "read": result.read, "skipped": result.skipped, "stored": report.stored,
             "replaced": report.replaced, "at_ns": time.time_ns()},
        )  # fmt: skip
    report.seconds = time.perf_counter() - t0
    return report


def _stored_days(ticks: pl.DataFrame, epoch: int) -> list[tuple[dt.date, pl.DataFrame]]:
    """The ticks (sorted by ts) as stored rows, per UTC day of their ts: each day's rows sorted
    by (sym, ts), ``seq`` counting each symbol's ticks from 1 in time order (file order breaks
    ties). Split by symbol, not sorted: the rows of a symbol keep their order."""
    if ticks.height == 0:
        return []
    parts = [ticks]
    if not common.constant(ticks["sym"]):
        parts = sorted(ticks.partition_by("sym", maintain_order=True), key=lambda p: p["sym"][0])
    days: dict[dt.date, list[pl.DataFrame]] = {}
    for part in parts:
        rows = part.with_columns(
            epoch=pl.lit(epoch, pl.Int64), seq=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
        ).select(list(STORED_SCHEMA))
        first, last = rows["ts"][0].date(), rows["ts"][-1].date()
        if first == last:  # the rows of a symbol are in time order
            days.setdefault(first, []).append(rows)
            continue
        for (d,), piece in rows.group_by(pl.col("ts").dt.date(), maintain_order=True):
            days.setdefault(d, []).append(piece)
    return [(d, pl.concat(frames, rechunk=False)) for d, frames in sorted(days.items())]
