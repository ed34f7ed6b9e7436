"""The history store on disk: immutable, sorted Parquet files in date partitions.

Layout: ``<data_dir>/history/date=YYYY-MM-DD/<name>.parquet``, each file sorted by (sym, ts, seq)
and filed under the day of its first tick. Two kinds of file:

* recorder files, named by the range of tickerplant-log entry ids they hold,
  ``<first id>_<last id>.parquet`` (``1764120000000-0_1764120000999-3.parquet``). A compacted
  file has the same form and covers the ids of the small files it replaced; until those are
  deleted, a file whose id range lies inside another file's range of the same partition is
  *covered* and is never read, so a reader never sees a tick twice.
* imported files, ``import-<digest>_<YYYY-MM-DD>.parquet`` (``server.importers``).

Every file is written under a hidden temporary name, fsynced and renamed into place, so a reader
sees whole files only; hidden ``.*.tmp`` files are never read.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from server.config import Settings
from server.importers import TICK_SCHEMA

# Stored rows: the tick table plus where each tick stands in its symbol's sequence.
SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in TICK_SCHEMA.items() if k in ("sym", "type", "ts")},
    "epoch": pl.Int64(),
    "seq": pl.Int64(),
    **{k: v for k, v in TICK_SCHEMA.items() if k not in ("sym", "type", "ts")},
}
ROW_GROUP_ROWS = 128 * 1024
# Every symbol the store has ever held, one per line, appended by the recorder and importer.
SYMBOLS_FILE = "symbols.txt"
LogId = tuple[int, int]
_LOG_NAME = re.compile(r"^(\d+)-(\d+)_(\d+)-(\d+)$")


def history_dir(settings: Settings) -> Path:
    return settings.data_dir / "history"


def parse_log_id(entry_id: str) -> LogId:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def format_log_id(entry_id: LogId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    day: str
    # (first, last) tickerplant-log ids for a recorder file; None for an imported file.
    ids: tuple[LogId, LogId] | None

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass(frozen=True)
class Snapshot:
    """What the store held at one moment: the files to read and the recorder's high-water mark.

    ``high_water`` is the highest log id in any recorder file: every log entry at or below it is
    stored (or was trimmed from the log before it could be, which the gap index shows), and none
    above it is.
    """

    files: list[StoredFile]
    # (covered file, the file that covers it): merged away, waiting to be deleted.
    covered: list[tuple[StoredFile, StoredFile]] = field(default_factory=list)
    high_water: LogId = (0, 0)

    def paths(self, start_ns: int, end_ns: int) -> list[Path]:
        """Files of the partitions that can hold ticks in [start, end).

        A file sits in the partition of its first tick, so one written across midnight also
        holds ticks of the next day: the partition before ``start`` is read too (DuckDB's row-group
        statistics on ``ts`` skip what is out of range)."""
        first = day_of(start_ns - 86_400 * 10**9)
        last = day_of(max(start_ns, end_ns - 1))
        return [f.path for f in self.files if first <= f.day <= last]


def day_of(ts_ns: int) -> str:
    return dt.datetime.fromtimestamp(ts_ns // 10**9, dt.UTC).strftime("%Y-%m-%d")


def scan(root: Path) -> Snapshot:
    """List the store once: visible files (covered ones set apart) and the high-water mark."""
    files: list[StoredFile] = []
    covered: list[tuple[StoredFile, StoredFile]] = []
    high = (0, 0)
    for part in sorted(root.glob("date=*")):
        day = part.name.partition("=")[2]
        logged: list[StoredFile] = []
        for path in sorted(part.glob("*.parquet")):
            if path.name.startswith("."):
                continue
            m = _LOG_NAME.match(path.stem)
            if m is None:
                files.append(StoredFile(path, day, None))
                continue
            a, b, c, d = (int(x) for x in m.groups())
            logged.append(StoredFile(path, day, ((a, b), (c, d))))
            high = max(high, (c, d))
        # By first id, widest first: a file is covered when an earlier one reaches as far.
        logged.sort(key=lambda f: (f.ids[0], (-f.ids[1][0], -f.ids[1][1])))  # type: ignore[index]
        widest: StoredFile | None = None
        for f in logged:
            assert f.ids is not None
            if widest is not None and f.ids[1] <= widest.ids[1]:  # type: ignore[index]
                covered.append((f, widest))
                continue
            files.append(f)
            widest = f
    files.sort(key=lambda f: (f.day, f.path.name))
    return Snapshot(files, covered, high)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file durable and visible under its final name."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_file(root: Path, frame: pl.DataFrame, first_id: str, last_id: str) -> Path:
    """Atomically place one immutable, sorted Parquet file; returns its path.

    On any error (a full disk, say) the temporary file is removed and the error raised: nothing
    partial is ever visible.
    """
    frame = frame.sort(["sym", "ts", "seq"])
    day = frame["ts"].min().strftime("%Y-%m-%d")  # type: ignore[union-attr]
    part = root / f"date={day}"
    part.mkdir(parents=True, exist_ok=True)
    final = part / f"{first_id}_{last_id}.parquet"
    tmp = part / f".{final.name}.tmp"
    try:
        frame.write_parquet(tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, statistics=True)
        place(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    note_symbols(root, set(frame["sym"].unique()), stored_symbols(root))
    return final


def remove_stale_temporaries(root: Path) -> None:
    """Delete the hidden files of writes cut short by a crash (only the writer may call this)."""
    for stale in root.glob("date=*/.*.tmp"):
        stale.unlink(missing_ok=True)


def stored_symbols(root: Path) -> set[str]:
    """Every symbol ever written to the store (recorded or imported)."""
    try:
        return set((root / SYMBOLS_FILE).read_text().split())
    except FileNotFoundError:
        return set()


def note_symbols(root: Path, syms: set[str], known: set[str]) -> None:
    """Add ``syms`` not yet in ``known`` to the symbol list (``known`` is updated)."""
    new = sorted(syms - known)
    if new:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / SYMBOLS_FILE, "a") as fh:  # O_APPEND: writers never interleave lines
            fh.write("".join(f"{sym}\n" for sym in new))
        known.update(new)
