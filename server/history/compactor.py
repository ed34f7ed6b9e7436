"""Compaction: merges the recorder's many small per-flush files into few large sorted ones.

The recorder writes one file per flush (about one a second), which keeps ticks durable quickly
but leaves a query thousands of files to open. Now and then, inside the recorder process, runs of
small files of one day that are neighbours in log order are merged into one file named by the
whole id range (``server.history.store``): readers skip the small files from the moment the
merged file is renamed into place, and the small files are deleted ``compact_grace_s`` later, so a
query that listed them just before still finds them. A crash at any point leaves either the small
files or the merged file visible to readers, never both, never neither.

Two tiers keep rewriting bounded: files under 1/64 of ``compact_target_rows`` are merged once
``compact_min_files`` of them are in a row; files under half the target are merged when 8 are in
a row; a day that is over merges whatever is left. A merged group never exceeds the target.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import polars as pl

from server.config import Settings
from server.history.store import StoredFile, day_of, format_log_id, scan, write_file
from server.ticks import STORED_SCHEMA

log = logging.getLogger("tickpipe.compactor")
TIER1_MIN_FILES = 8


class Compactor:
    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.target = settings.compact_target_rows
        self.min_files = settings.compact_min_files
        self.grace_s = settings.compact_grace_s
        self.files_merged = 0
        self._rows: dict[Path, int] = {}

    def rows(self, f: StoredFile) -> int:
        if f.path not in self._rows:
            self._rows[f.path] = pl.scan_parquet(f.path).select(pl.len()).collect().item()
        return self._rows[f.path]

    def tier(self, f: StoredFile) -> int | None:
        n = self.rows(f)
        if n < self.target // 64:
            return 0
        if n < self.target // 2:
            return 1
        return None  # big enough: left alone

    def run_once(self, now_ns: int | None = None) -> list[Path]:
        """One pass: delete files merged away long enough ago, then merge. Returns new files."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        snap = scan(self.root)
        self._delete_merged_away(snap.covered, now_ns)
        open_day = day_of(now_ns - 3600 * 10**9)  # a day is over an hour after its midnight
        # Per day and per log: ids of different logs (a cluster's slot groups) never mix.
        by_day: dict[tuple[str, str], list[StoredFile]] = {}
        for f in snap.files:
            if f.ids is not None:
                by_day.setdefault((f.day, f.log), []).append(f)
        made: list[Path] = []
        for (day, _log), files in sorted(by_day.items()):
            files.sort(key=lambda f: f.span)
            for group in self._groups(files, closed=day < open_day):
                made.append(self._merge(group))
        return made

    def _groups(self, files: list[StoredFile], closed: bool) -> list[list[StoredFile]]:
        """Runs of neighbouring files worth merging, each cut to at most the target rows."""
        runs: list[list[StoredFile]] = []
        run: list[StoredFile] = []
        run_tier: int | None = None
        for f in files:
            t = self.tier(f)
            same = t is not None and (closed or t == run_tier)
            if not same:
                runs.append(run)
                run = []
            if t is not None:
                run.append(f)
            run_tier = t
        runs.append(run)
        groups: list[list[StoredFile]] = []
        for run in runs:
            if not run:
                continue
            tier = self.tier(run[0])
            wanted = 2 if closed else (self.min_files if tier == 0 else TIER1_MIN_FILES)
            if len(run) < wanted:
                continue
            group: list[StoredFile] = []
            rows = 0
            for f in run:
                if group and rows + self.rows(f) > self.target:
                    if len(group) >= 2:
                        groups.append(group)
                    group, rows = [], 0
                group.append(f)
                rows += self.rows(f)
            if len(group) >= 2:
                groups.append(group)
        return groups

    def _merge(self, group: list[StoredFile]) -> Path:
        # Files written before a column was added (``flags``) read it as null.
        frame = pl.read_parquet([f.path for f in group], missing_columns="insert").select(
            [pl.col(c).cast(t) for c, t in STORED_SCHEMA.items()]
        )
        first = format_log_id(group[0].span[0])
        last = format_log_id(max(f.span[1] for f in group))
        path = write_file(self.root, frame, first, last, log=group[0].log)
        self._rows[path] = frame.height
        self.files_merged += len(group)
        log.info("merged %d files (%d rows) into %s", len(group), frame.height, path.name)
        return path

    def _delete_merged_away(
        self, covered: list[tuple[StoredFile, StoredFile]], now_ns: int
    ) -> None:
        for small, cover in covered:
            try:
                age_s = now_ns / 1e9 - cover.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age_s >= self.grace_s:
                small.path.unlink(missing_ok=True)
                self._rows.pop(small.path, None)
