"""The history store on disk: immutable, sorted Parquet files in date partitions.

Layout: ``<data_dir>/history/date=YYYY-MM-DD/<name>.parquet``, each file sorted by (sym, ts, seq)
and filed under the day of its first tick. Two kinds of file:

* recorder files, named by the range of tickerplant-log entry ids they hold,
  ``<first id>_<last id>.parquet`` (``1764120000000-0_1764120000999-3.parquet``); on a Redis
  Cluster, where each slot group has its own log, prefixed with the log's name
  (``g3~1764120000000-0_1764120000999-3.parquet`` for ``tp:log:{g3}``): ids of different logs
  are never compared. A compacted file has the same form and covers the ids of the small files
  of its log it replaced; until those are deleted, a file whose id range lies inside another
  file's range of the same partition and log is *covered* and is never read, so a reader never
  sees a tick twice.
* imported files, ``import-<digest>_<YYYY-MM-DD>.parquet`` (``server.history.importers``).

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
from server.history.facts import facts_of, key_columns, to_metadata

ROW_GROUP_ROWS = 128 * 1024
# Every symbol the store has ever held, one per line, appended by the recorder and importer.
SYMBOLS_FILE = "symbols.txt"
LogId = tuple[int, int]
_LOG_NAME = re.compile(r"^(?:([a-z0-9]+)~)?(\d+)-(\d+)_(\d+)-(\d+)$")


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
    log: str = ""  # the log's name on a cluster (``g3``); "" for the one log of a standalone Redis

    @property
    def span(self) -> tuple[LogId, LogId]:
        """The ``ids`` of a recorder file (an imported file has none)."""
        assert self.ids is not None, f"{self.path} is an imported file: it covers no log ids"
        return self.ids

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass(frozen=True)
class Snapshot:
    """What the store held at one moment: the files to read and the recorder's high-water mark.

    ``high_waters`` holds per log (by name, "" on a standalone Redis) the highest id in any of
    its recorder files: every entry of that log at or below it is stored (or was trimmed from
    the log before it could be, which the gap index shows), and none above it is.
    """

    files: list[StoredFile]
    # (covered file, the file that covers it): merged away, waiting to be deleted.
    covered: list[tuple[StoredFile, StoredFile]] = field(default_factory=list)
    high_waters: dict[str, LogId] = field(default_factory=dict)

    @property
    def high_water(self) -> LogId:
        """The standalone log's high-water mark."""
        return self.high_water_of("")

    def high_water_of(self, log: str) -> LogId:
        return self.high_waters.get(log, (0, 0))

    def recent(self, window_ms: int) -> list[Path]:
        """The recorder files holding log entries of each log's last ``window_ms`` (by entry id,
        up to its high-water mark)."""
        return [
            f.path
            for f in self.files
            if f.ids is not None and f.ids[1][0] >= self.high_water_of(f.log)[0] - window_ms
        ]

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
    high: dict[str, LogId] = {}
    for part in sorted(root.glob("date=*")):
        day = part.name.partition("=")[2]
        logged: dict[str, list[StoredFile]] = {}
        for path in sorted(part.glob("*.parquet")):
            if path.name.startswith("."):
                continue
            m = _LOG_NAME.match(path.stem)
            if m is None:
                files.append(StoredFile(path, day, None))
                continue
            log = m.group(1) or ""
            a, b, c, d = (int(x) for x in m.groups()[1:])
            logged.setdefault(log, []).append(StoredFile(path, day, ((a, b), (c, d)), log))
            high[log] = max(high.get(log, (0, 0)), (c, d))
        for of_log in logged.values():
            # By first id, widest first: a file is covered when an earlier one reaches as far.
            of_log.sort(key=lambda f: (f.span[0], (-f.span[1][0], -f.span[1][1])))
            widest: StoredFile | None = None
            for f in of_log:
                if widest is not None and f.span[1] <= widest.span[1]:
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


def write_file(
    root: Path,
    frame: pl.DataFrame,
    first_id: str,
    last_id: str,
    *,
    presorted: bool = False,
    level: int | None = None,
    log: str = "",
) -> Path:
    """Atomically place one immutable, sorted Parquet file, its facts in its metadata
    (``server.history.facts``); returns its path.

    ``log``: the tickerplant log the ids belong to on a cluster (``g3``; "" standalone).
    ``presorted``: the caller sorted ``frame`` by (sym, ts, seq) already. ``level``: the zstd
    level (None: Polars' default). On any error (a full disk, say) the temporary file is removed
    and the error raised: nothing partial is ever visible.
    """
    if not presorted:
        frame = frame.sort(["sym", "ts", "seq"])
    # The ignore below: polars types min() as any scalar; of a non-empty
    # Datetime column it is a datetime.
    day = frame["ts"].min().strftime("%Y-%m-%d")  # type: ignore[union-attr]
    part = root / f"date={day}"
    part.mkdir(parents=True, exist_ok=True)
    final = part / f"{log + '~' if log else ''}{first_id}_{last_id}.parquet"
    tmp = part / f".{final.name}.tmp"
    facts = facts_of(key_columns(frame))
    try:
        frame.write_parquet(
            tmp,
            compression="zstd",
            compression_level=level,
            row_group_size=ROW_GROUP_ROWS,
            statistics=True,
            metadata=to_metadata(facts),
        )
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


_symbols_read: dict[Path, tuple[tuple[int, int], frozenset[str]]] = {}


def known_symbols(root: Path) -> frozenset[str]:
    """``stored_symbols``, read again only when the (append-only) list changed: a request
    pays one ``stat``."""
    path = root / SYMBOLS_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return frozenset()
    mark = (st.st_mtime_ns, st.st_size)
    seen = _symbols_read.get(root)
    if seen is None or seen[0] != mark:
        seen = _symbols_read[root] = (mark, frozenset(stored_symbols(root)))
    return seen[1]


def note_symbols(root: Path, syms: set[str], known: set[str]) -> None:
    """Add ``syms`` not yet in ``known`` to the symbol list (``known`` is updated)."""
    new = sorted(syms - known)
    if new:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / SYMBOLS_FILE, "a") as fh:  # O_APPEND: writers never interleave lines
            fh.write("".join(f"{sym}\n" for sym in new))
        known.update(new)
