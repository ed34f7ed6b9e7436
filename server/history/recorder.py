"""The recorder: reads the tickerplant log (``tp:log``) and stores every tick exactly once.

On a Redis Cluster there is one log per slot group (``tp:log:{gN}``, see ``server.live.bus``):
the recorder reads each with its own loop, consumer group and high-water mark, and names its
files after the log (``g3~<first id>_<last id>.parquet``); what follows holds per log.

History is immutable Parquet files under ``<data_dir>/history/date=YYYY-MM-DD/``, one file per
flush, sorted by (sym, ts, seq), named by the range of log entry ids it holds:
``<first id>_<last id>.parquet``. A file is written to a temporary name, fsynced and renamed into
place; only then are its log entries acknowledged. On start the recorder takes the highest
stored entry id as its high-water mark and skips (acknowledges) any redelivered entry at or
below it, so a SIGKILL at any moment neither loses nor doubles a tick: an entry is either in
exactly one renamed file, or still pending in the consumer group.

Why files and not one DuckDB database: DuckDB allows one writer process per database file and a
second process cannot even open it while it is held; immutable Parquet files can be read by any
number of web processes with DuckDB while the recorder writes (see plan.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import cast

import polars as pl
from redis import exceptions as rx

from server.config import Settings
from server.history.compactor import Compactor
from server.history.store import (
    history_dir,
    parse_log_id,
    remove_stale_temporaries,
    scan,
    write_file,
)
from server.history.tail import entries_to_frame
from server.live.bus import RECORDER_GROUP, Layout, StreamEntry, stream_entries
from server.live.connection import REDIS_DOWN, open_redis
from server.ops.heartbeat import RecorderBeat, publish_recorder

log = logging.getLogger("tickpipe.recorder")
# How far back (in log time) a publish can be retried after a failover: the stored seqs of the
# logs' last minutes are read on start, so a restarted recorder still knows them.
RETRY_WINDOW_MS = 10 * 60_000
READ_PAUSE_S = 0.05  # after a read of a few entries, before the next (a quarter of a short flush)
# A flush that cannot be written (disk full, I/O error, permissions): nothing is acknowledged.
WRITE_FAILED = (OSError, pl.exceptions.PolarsError)
UNREADABLE = WRITE_FAILED  # a stored file that cannot be read
DISK_FULL_BYTES = 16 * 1024 * 1024


class WriteFailed(Exception):
    """A flush could not be made durable; its entries stay unacknowledged in the log."""


class Recorder:
    def __init__(self, settings: Settings, consumer: str = "r1") -> None:
        self.settings = settings
        self.consumer = consumer
        self.root = history_dir(settings)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)  # writes cut short by a crash
        self.layout = Layout.of(settings)
        # Per log (by name): the highest stored entry id.
        snapshot = scan(self.root)
        self.hwms = dict(snapshot.high_waters)
        # Per symbol, the epoch and highest seq stored (``_unstored``).
        self.stored_seqs = last_stored_seqs(snapshot.recent(RETRY_WINDOW_MS))
        self.repeats_dropped = 0
        self.redis = open_redis(settings, socket_timeout=10)
        self.compactor = Compactor(self.root, settings)
        self.rows_stored = 0
        self.entries_stored = 0
        self.last_flush_ns = 0
        self.last_tick_ns = 0
        self.write_error: str | None = None
        self.write_errors = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def hwm(self) -> tuple[int, int]:
        """The standalone log's high-water mark."""
        return self.hwms.get("", (0, 0))

    async def _ensure_group(self, key: str | None = None) -> None:
        try:
            await self.redis.xgroup_create(
                key or self.layout.log_key(0), RECORDER_GROUP, id="0", mkstream=True
            )
        except rx.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, pending: bool, key: str | None = None) -> list[StreamEntry]:
        reply = await self.redis.xreadgroup(
            RECORDER_GROUP,
            self.consumer,
            {key or self.layout.log_key(0): "0" if pending else ">"},
            count=self.settings.recorder_batch,
            block=None if pending else 200,
        )
        # One stream asked for: [[name, entries]] (RESP2), or nothing new.
        return stream_entries(cast(list[list[object]], reply)[0][1]) if reply else []

    async def flush(self, entries: list[tuple[bytes, dict[bytes, bytes]]], group: int = 0) -> None:
        """Store the entries (of slot group ``group``'s log) above its high-water mark, then
        acknowledge all of them.

        Raises ``WriteFailed`` (nothing acknowledged, nothing visible) when the file cannot be
        written, e.g. on a full disk."""
        name, key = self.layout.log_name(group), self.layout.log_key(group)
        hwm = self.hwms.get(name, (0, 0))
        # Above the high-water mark, each entry once and in log order: after a failover the
        # promoted replica's consumer group may hand out again entries read from the old master
        # that are still in this batch, unwritten.
        fresh = []
        top = hwm
        for entry in entries:
            entry_id = parse_log_id(entry[0].decode())
            if entry_id > top:
                fresh.append(entry)
                top = entry_id
        if fresh:
            frame, tops = self._unstored(entries_to_frame(fresh))
            first, last = fresh[0][0].decode(), fresh[-1][0].decode()
            if frame.height:
                try:
                    await asyncio.to_thread(write_file, self.root, frame, first, last, log=name)
                except WRITE_FAILED as exc:
                    raise WriteFailed(self._explain(exc)) from exc
                raise_marks(self.stored_seqs, tops)  # only once durable: a failed write is retried
                self.rows_stored += frame.height
                # The ignore below: polars types max() as any scalar; of a
                # non-empty Datetime column it is a datetime.
                self.last_tick_ns = int(frame["ts"].max().timestamp() * 1e9)  # type: ignore[union-attr]
            self.entries_stored += len(fresh)
            self.hwms[name] = parse_log_id(last)
            self.last_flush_ns = time.time_ns()
        await self.redis.xack(key, RECORDER_GROUP, *[e[0] for e in entries])
        if self.write_error is not None:
            log.warning("history is written again; the backlog was stored")
            self.write_error = None

    def _unstored(self, frame: pl.DataFrame) -> tuple[pl.DataFrame, list[tuple[str, int, int]]]:
        """The rows whose seq is above the highest stored for their symbol and epoch, each
        (sym, epoch, seq) once; and the highest seq per (sym, epoch) of the frame, for
        ``raise_marks`` once the rows are written.

        A seq is handed out once, so a stored one comes again only as the same tick: a batch
        whose publish reached a master that then died, its replica never getting it, is
        retried on the promoted replica under the same seqs (the feed's floor), in that log
        under a new entry id, after the recorder stored it from the dead master's log (or
        before it did so: then both are in one flush)."""
        if not frame.height:
            return frame, []
        # The usual flush holds no seq at or below one stored and none twice: found from
        # (sym, epoch) ranges, without touching every row.
        stored = self.stored_seqs
        spans = frame.group_by("sym", "epoch").agg(
            pl.col("seq").min().alias("lo"),
            pl.col("seq").max().alias("hi"),
            (pl.len() - pl.col("seq").n_unique()).alias("twice"),
        )
        known = []
        tops = []
        twice = 0
        for sym, epoch, lo, hi, again in spans.iter_rows():
            tops.append((sym, epoch, hi))
            twice += again
            if sym in stored and stored[sym][0] == epoch and lo <= stored[sym][1]:
                known.append((sym, epoch, stored[sym][1]))
        if twice:  # a retried batch and its first try both in this flush: the first counts
            frame = frame.unique(["sym", "epoch", "seq"], keep="first", maintain_order=True)
        if known:
            marks = pl.DataFrame(
                known, schema={"sym": pl.Utf8, "epoch": pl.Int64, "_seq": pl.Int64}, orient="row"
            )
            kept = (
                frame.join(marks, on=["sym", "epoch"], how="left", maintain_order="left")
                .filter(pl.col("_seq").is_null() | (pl.col("seq") > pl.col("_seq")))
                .drop("_seq")
            )
            twice += frame.height - kept.height
            frame = kept
        if twice:
            self.repeats_dropped += twice
            log.warning(
                "dropped %d ticks whose seqs are stored already (a publish retried after a "
                "Redis failover)", twice,
            )  # fmt: skip
        return frame, tops

    def _explain(self, exc: BaseException) -> str:
        """What went wrong, in words: a full disk is named as such (Polars reports ENOSPC
        during a Parquet write as an opaque transport error)."""
        detail = f"{type(exc).__name__}: {exc}"
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return detail
        full = getattr(exc, "errno", None) == errno.ENOSPC or free < DISK_FULL_BYTES
        prefix = "disk full: " if full else ""
        return f"{prefix}{detail} ({free} bytes free on the history filesystem)"

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._compact())]
        try:
            await self._record()
        finally:
            for task in tasks:
                task.cancel()
            await self.redis.aclose()

    async def _record(self) -> None:
        """Read every log until stopped, each on its own: redelivered (pending) entries first,
        then new ones; a log's entries are stored once its batch is full or has waited
        ``recorder_flush_s``."""
        s = self.settings
        groups = range(self.layout.groups)
        pending_phase = dict.fromkeys(groups, True)
        buffers: dict[int, list[StreamEntry]] = {g: [] for g in groups}
        started = dict.fromkeys(groups, time.monotonic())
        backoff = 0.5
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    for g in groups:
                        await self._ensure_group(self.layout.log_key(g))
                    ready = True
                read = await self._read_logs(pending_phase)
                got = sum(map(len, read.values()))
                for g, entries in read.items():
                    buffer = buffers[g]
                    if pending_phase[g] and not entries:
                        pending_phase[g] = False  # redelivered backlog done; now new entries
                    buffer.extend(entries)
                    due = time.monotonic() - started[g] >= s.recorder_flush_s
                    if buffer and (due or len(buffer) >= s.recorder_batch or pending_phase[g]):
                        await self.flush(buffer, g)
                        buffers[g] = []
                        started[g] = time.monotonic()
                        backoff = 0.5
                    elif not buffer:
                        started[g] = time.monotonic()
                # A slow feed's entries come a few per read: let them gather for a moment
                # instead of asking Redis a hundred times a second (they are stored after
                # recorder_flush_s anyway); a full read or a backlog is read on at once.
                if 0 < got < s.recorder_batch and not any(pending_phase.values()):
                    await asyncio.sleep(min(READ_PAUSE_S, s.recorder_flush_s / 4))
            except WriteFailed as exc:
                # Keep nothing in memory: the entries stay pending in the consumer group and
                # are read again, oldest first, once the disk takes writes again.
                self.write_errors += 1
                self.write_error = str(exc)
                log.error(
                    "cannot write history (%s); nothing acknowledged, %d log entries wait "
                    "in Redis; retrying in %.1f s. Free disk space under %s.",
                    exc, sum(map(len, buffers.values())), backoff, self.root,
                )  # fmt: skip
                buffers = {g: [] for g in groups}
                pending_phase = dict.fromkeys(groups, True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
            except REDIS_DOWN as exc:
                log.warning("redis unreachable (%s); retrying", exc)
                buffers = {g: [] for g in groups}  # unacknowledged: they come back as pending
                pending_phase = dict.fromkeys(groups, True)
                ready = False
                await asyncio.sleep(0.5)

    async def _read_logs(self, pending: dict[int, bool]) -> dict[int, list[StreamEntry]]:
        """The next entries of each log. One log (standalone): a read that waits up to 200 ms
        for new entries. Several (a cluster): one pipelined read of all of them, which the
        client sends to each master at once, and a 50 ms pause when all were empty."""
        if len(pending) == 1:
            return {0: await self._read(pending[0], self.layout.log_key(0))}
        async with self.redis.pipeline(transaction=False) as pipe:
            for g, redelivered in pending.items():
                pipe.xreadgroup(
                    RECORDER_GROUP,
                    self.consumer,
                    {self.layout.log_key(g): "0" if redelivered else ">"},
                    count=self.settings.recorder_batch,
                )
            replies = await pipe.execute()
        read = {
            g: stream_entries(cast(list[list[object]], reply)[0][1]) if reply else []
            for g, reply in zip(pending, replies, strict=True)
        }
        if not any(read.values()) and not any(pending.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)
        return read

    async def _compact(self) -> None:
        """Merge small files now and then, off the event loop; errors never stop recording."""
        while True:
            await asyncio.sleep(self.settings.compact_every_s)
            try:
                await asyncio.to_thread(self.compactor.run_once)
            except WRITE_FAILED as exc:
                log.error("compaction failed (%s); the small files stay as they are", exc)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(*REDIS_DOWN, rx.ResponseError):
                lag, pending = await self._lag()
                now = time.time_ns()
                beat = RecorderBeat(
                    pid=os.getpid(),
                    state="write_failed" if self.write_error else "ok",
                    error=self.write_error or "",
                    write_errors=self.write_errors,
                    rows_stored=self.rows_stored,
                    lag_batches=-1 if lag is None else lag,
                    # Estimated from the ticks per batch stored so far.
                    lag_ticks=-1
                    if lag is None or not self.entries_stored
                    else round(lag * self.rows_stored / self.entries_stored),
                    pending_batches=-1 if pending is None else pending,
                    lag_s=round((now - self.last_tick_ns) / 1e9, 3) if self.last_tick_ns else -1,
                    last_flush_ns=self.last_flush_ns,
                    files_compacted=self.compactor.files_merged,
                    updated_ns=now,
                    repeats_dropped=self.repeats_dropped,
                )
                await publish_recorder(self.redis, beat)

    async def _lag(self) -> tuple[int | None, int | None]:
        """Entries not yet read and read but not acknowledged, over every log (None: unknown)."""
        lag: int | None = 0
        pending: int | None = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.layout.log_keys:
                pipe.xinfo_groups(key)
            replies = await pipe.execute(raise_on_error=False)
        for groups in replies:
            if isinstance(groups, Exception):  # a log not made yet (nothing published to it)
                continue
            group = next((g for g in groups if g["name"] == RECORDER_GROUP.encode()), None)
            if group is None:
                continue
            lag = None if lag is None or group.get("lag") is None else lag + group["lag"]
            pending = (
                None
                if pending is None or group.get("pending") is None
                else pending + group["pending"]
            )
        return lag, pending


def raise_marks(seqs: dict[str, tuple[int, int]], tops: list[tuple[str, int, int]]) -> None:
    """Raise each symbol's (epoch, highest seq) in ``seqs`` to the (sym, epoch, seq) given."""
    for sym, epoch, seq in tops:
        if (epoch, seq) > seqs.get(sym, (0, 0)):
            seqs[sym] = (epoch, seq)


def _tops(frame: pl.DataFrame) -> list[tuple[str, int, int]]:
    return list(frame.group_by("sym", "epoch").agg(pl.col("seq").max()).iter_rows())


def last_stored_seqs(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """Each symbol's (epoch, highest seq) in these files; a file that cannot be read (corrupt,
    which history queries report) is passed over, never a reason not to record."""
    seqs: dict[str, tuple[int, int]] = {}
    if not paths:
        return seqs
    columns = ["sym", "epoch", "seq"]
    try:
        raise_marks(seqs, _tops(pl.read_parquet(paths, columns=columns)))
    except UNREADABLE:
        for path in paths:
            try:
                raise_marks(seqs, _tops(pl.read_parquet(path, columns=columns)))
            except UNREADABLE as exc:
                log.warning("cannot read %s for its seqs (%s); passed over", path, exc)
    return seqs


async def run_recorder(settings: Settings) -> None:
    rec = Recorder(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, rec.stop)
    logs = rec.layout.log_keys
    log.info("recording %s into %s (high-water marks %s)", ", ".join(logs), rec.root, rec.hwms)
    await rec.run()
