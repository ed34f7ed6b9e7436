"""Compaction merges small recorder files without ever showing a tick twice or losing one."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import duckdb
import polars as pl

from server.config import Settings
from server.history.compactor import Compactor
from server.history.query import HistoryQuery, HistoryReader, Source
from server.history.store import scan, write_file
from server.ticks import STORED_SCHEMA

DAY0 = int(dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()) * 10**9
SEC = 10**9


def _ticks(sym: str, first_seq: int, n: int, t0: int) -> pl.DataFrame:
    rows = [
        {**dict.fromkeys(STORED_SCHEMA), "sym": sym, "type": "trade", "ts": t0 + i * 1000,
         "epoch": 1, "seq": first_seq + i, "price": 100.0 + i, "size": 1.0}
        for i in range(n)
    ]  # fmt: skip
    frame = pl.DataFrame(rows, schema={**STORED_SCHEMA, "ts": pl.Int64()})
    return frame.with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC")))


def _flushes(root: Path, count: int, day_ns: int, first_ms: int = 1000) -> None:
    """``count`` recorder-style files of 10 ticks each (2 symbols), log ids in order."""
    for k in range(count):
        frame = pl.concat([_ticks(s, k * 5 + 1, 5, day_ns + k * SEC) for s in ("AAA", "BBB")])
        write_file(root, frame, f"{first_ms + k}-0", f"{first_ms + k}-9")


def _compactor(root: Path, **kw: object) -> Compactor:
    settings = Settings(
        **{"compact_min_files": 4, "compact_target_rows": 64_000, "compact_grace_s": 60, **kw}
    )
    return Compactor(root, settings)


def _read_all(root: Path) -> pl.DataFrame:
    q = HistoryQuery(["AAA", "BBB"], DAY0 - SEC, time.time_ns() + 2 * 86_400 * SEC)
    reader = HistoryReader(Source.of(root, 256), q)
    try:
        return pl.concat(list(reader.chunks()))
    finally:
        reader.close()


def test_small_files_of_a_finished_day_are_merged_into_one_sorted_file(tmp_path: Path) -> None:
    root = tmp_path / "history"
    _flushes(root, 20, DAY0)
    before = _read_all(root)
    made = _compactor(root).run_once()
    assert [p.name for p in made] == ["1000-0_1019-9.parquet"]
    snap = scan(root)
    assert [f.path for f in snap.files] == made
    assert len(snap.covered) == 20  # still on disk for readers that listed them
    after = _read_all(root)
    assert after.equals(before) and after.height == 200
    merged = pl.read_parquet(made[0])
    assert merged.schema == pl.Schema(STORED_SCHEMA)
    assert merged.select("sym", "ts", "seq").equals(merged.sort("sym", "ts", "seq").select(
        "sym", "ts", "seq"))  # fmt: skip


def test_merged_away_files_are_deleted_only_after_the_grace_period(tmp_path: Path) -> None:
    root = tmp_path / "history"
    _flushes(root, 6, DAY0)
    comp = _compactor(root, compact_grace_s=30)
    (merged,) = comp.run_once()
    comp.run_once(now_ns=time.time_ns() + 10 * SEC)
    assert len(list(merged.parent.glob("*.parquet"))) == 7, "deleted before the grace period"
    comp.run_once(now_ns=time.time_ns() + 31 * SEC)
    assert list(merged.parent.glob("*.parquet")) == [merged]
    assert _read_all(root).height == 60


def test_todays_files_wait_for_enough_small_files_in_a_row(tmp_path: Path) -> None:
    root = tmp_path / "history"
    today = (time.time_ns() // (86_400 * SEC)) * 86_400 * SEC
    _flushes(root, 3, today)
    comp = _compactor(root)
    assert comp.run_once() == []
    _flushes(root, 2, today + 10 * SEC, first_ms=2000)
    assert len(comp.run_once()) == 1
    assert _read_all(root).height == 50


def test_merged_files_never_exceed_the_target_rows(tmp_path: Path) -> None:
    root = tmp_path / "history"
    _flushes(root, 30, DAY0)
    made = _compactor(root, compact_target_rows=100).run_once()
    sizes = [pl.scan_parquet(p).select(pl.len()).collect().item() for p in made]
    assert sizes and max(sizes) <= 100
    assert _read_all(root).height == 300


def test_a_file_of_another_day_inside_the_merged_id_range_is_still_read(tmp_path: Path) -> None:
    """Log order and day order can differ (a feed replaying an older day): only files of the
    same partition are ever covered by a merged file."""
    root = tmp_path / "history"
    _flushes(root, 4, DAY0, first_ms=1000)
    other = write_file(root, _ticks("AAA", 900, 3, DAY0 + 86_400 * SEC), "1002-5", "1002-6")
    _flushes(root, 4, DAY0 + 50 * SEC, first_ms=1004)
    comp = _compactor(root)
    assert len(comp.run_once()) == 1
    snap = scan(root)
    assert other in [f.path for f in snap.files]
    assert _read_all(root).height == 83


def test_a_crash_after_the_merge_leaves_each_tick_visible_once(tmp_path: Path) -> None:
    """The state a crash between renaming the merged file and deleting the small ones leaves;
    and one before the rename (a hidden temporary file)."""
    root = tmp_path / "history"
    _flushes(root, 5, DAY0)
    (merged,) = _compactor(root).run_once()
    (merged.parent / f".{merged.name}.tmp").write_bytes(b"PAR1 half a merge")
    with duckdb.connect() as con:
        files = [str(f.path) for f in scan(root).files]
        n, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT (sym, seq)) FROM read_parquet({files})"
        ).fetchone()
    assert (n, distinct) == (50, 50)


def test_a_merge_that_cannot_be_written_leaves_the_small_files(tmp_path: Path) -> None:
    root = tmp_path / "history"
    _flushes(root, 5, DAY0)
    part = next(root.glob("date=*"))
    os.chmod(part, 0o555)  # nothing can be created in the partition
    try:
        if os.access(part, os.W_OK):  # root ignores permissions: use an unwritable name
            (part / ".1000-0_1004-9.parquet.tmp").mkdir()
        try:
            _compactor(root).run_once()
        except OSError:
            pass
        else:
            raise AssertionError("the merge should have failed")
    finally:
        os.chmod(part, 0o755)
    snap = scan(root)
    assert len(snap.files) == 5 and not snap.covered
    assert _read_all(root).height == 50


def test_files_of_several_logs_are_merged_per_log_and_each_keeps_its_high_water(
    tmp_path: Path,
) -> None:
    """A Redis Cluster's recorder writes one series of files per slot group's log, with ids of
    that log only: ids of different logs interleave, so a file of one log must never cover (or
    be merged with) another's."""
    root = tmp_path / "history"
    for k in range(12):
        for log, sym, first_ms in (("g1", "AAA", 1000), ("g7", "BBB", 1003)):
            frame = _ticks(sym, k * 5 + 1, 5, DAY0 + k * SEC)
            write_file(root, frame, f"{first_ms + k}-0", f"{first_ms + k}-9", log=log)
    snap = scan(root)
    assert snap.high_waters == {"g1": (1011, 9), "g7": (1014, 9)} and not snap.covered
    before = _read_all(root)
    made = _compactor(root).run_once()
    assert sorted(p.name.partition("~")[0] for p in made) == ["g1", "g7"]
    after = scan(root)
    assert after.high_waters == snap.high_waters
    assert sorted(f.path.name for f in after.files) == sorted(p.name for p in made)
    assert _read_all(root).sort(["sym", "seq"]).equals(before.sort(["sym", "seq"]))
