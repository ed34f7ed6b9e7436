"""The recorder: reads the tickerplant log (``tp:log``) and stores every tick exactly once.

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
import io
import logging
import os
import shutil
import signal
import time

import polars as pl
from redis import exceptions as rx
from redis.asyncio import Redis

from server.bus import FIGURES_TTL_S, LOG_KEY
from server.compactor import Compactor
from server.config import Settings
from server.store import (
    SCHEMA,
    history_dir,
    parse_log_id,
    remove_stale_temporaries,
    scan,
    write_file,
)

log = logging.getLogger("tickpipe.recorder")
GROUP = "recorder"
RECORDER_KEY = "tp:recorder"
REDIS_DOWN = (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, OSError)
# A flush that cannot be written (disk full, I/O error, permissions): nothing is acknowledged.
WRITE_FAILED = (OSError, pl.exceptions.PolarsError)
DISK_FULL_BYTES = 16 * 1024 * 1024


# Event fields as the publish script writes them (``ts`` in integer ns); others are ignored.
_EVENT_SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in SCHEMA.items() if k != "epoch"},
    "ts": pl.Int64(),
}
# Put before each entry's events, so every event row knows its entry (no event's type is "#").
_ENTRY_MARK = b'{"type":"#","seq":%d}'
# Where one event of ``d`` ends and the next begins: a '"' inside a JSON string is always
# escaped, so this can only be the publish script's own join.
_EVENT_JOIN = b'},{"type":"'


def _parse_events(parts: list[tuple[int, bytes]]) -> pl.DataFrame:
    """Events of (entry index, ``d``) pairs in order, with the entry index as ``seq`` of a
    ``"#"`` row before each entry's events; parsed in Rust, one line per event."""
    lines = b"\n".join(
        _ENTRY_MARK % idx + b"\n" + d.replace(_EVENT_JOIN, b'}\n{"type":"') for idx, d in parts
    )
    try:
        return pl.read_ndjson(io.BytesIO(lines), schema=_EVENT_SCHEMA)
    except pl.exceptions.PolarsError:  # not split as expected: parse the entries as arrays
        whole = b",".join(_ENTRY_MARK % idx + b"," + d for idx, d in parts)
        return pl.read_json(io.BytesIO(b"[" + whole + b"]"), schema=_EVENT_SCHEMA)


def entries_to_frame(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> pl.DataFrame:
    """Tick rows of these log entries (status events are not ticks and are left out).

    Events are parsed by Polars (no Python object per tick); each event's ``epoch`` is its
    symbol's in the ``e`` field of its own entry."""
    parts: list[tuple[int, bytes]] = []
    e_entry: list[int] = []
    e_sym: list[str] = []
    e_epoch: list[int] = []
    for entry_id, fields in entries:
        if not fields:  # trimmed from the log before it was stored: a gap the index will show
            log.error("log entry %s was trimmed before it was stored", entry_id)
            continue
        epochs = dict(p.split("=", 1) for p in fields[b"e"].decode().split(",") if p)
        if not fields[b"d"]:
            continue
        idx = len(parts)
        parts.append((idx, fields[b"d"]))
        for sym, epoch in epochs.items():
            e_entry.append(idx)
            e_sym.append(sym)
            e_epoch.append(int(epoch))
    if not parts:
        return pl.DataFrame(schema=SCHEMA)
    ticks = (
        _parse_events(parts)
        .with_columns(
            pl.when(pl.col("type") == "#").then(pl.col("seq")).forward_fill().alias("_entry")
        )
        .filter(pl.col("type").is_in(["trade", "quote"]))
    )
    if not ticks.height:
        return pl.DataFrame(schema=SCHEMA)
    epochs_frame = pl.DataFrame(
        {"_entry": e_entry, "sym": e_sym, "epoch": e_epoch},
        schema={"_entry": pl.Int64(), "sym": pl.Utf8(), "epoch": pl.Int64()},
    )
    frame = ticks.join(epochs_frame, on=["_entry", "sym"], how="left", maintain_order="left")
    missing = frame.filter(pl.col("epoch").is_null())
    if missing.height:  # an event of a symbol its entry gives no epoch for
        raise KeyError(missing["sym"][0])
    return frame.with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC"))).select(list(SCHEMA))


class WriteFailed(Exception):
    """A flush could not be made durable; its entries stay unacknowledged in the log."""


class Recorder:
    def __init__(self, settings: Settings, consumer: str = "r1") -> None:
        self.settings = settings
        self.consumer = consumer
        self.root = history_dir(settings)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)  # writes cut short by a crash
        self.hwm = scan(self.root).high_water
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=2)
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

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(LOG_KEY, GROUP, id="0", mkstream=True)
        except rx.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, pending: bool) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            {LOG_KEY: "0" if pending else ">"},
            count=self.settings.recorder_batch,
            block=None if pending else 200,
        )
        return reply[0][1] if reply else []

    async def flush(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Store the entries above the high-water mark, then acknowledge all of them.

        Raises ``WriteFailed`` (nothing acknowledged, nothing visible) when the file cannot be
        written, e.g. on a full disk."""
        fresh = [e for e in entries if parse_log_id(e[0].decode()) > self.hwm]
        if fresh:
            frame = entries_to_frame(fresh)
            first, last = fresh[0][0].decode(), fresh[-1][0].decode()
            if frame.height:
                try:
                    await asyncio.to_thread(write_file, self.root, frame, first, last)
                except WRITE_FAILED as exc:
                    raise WriteFailed(self._explain(exc)) from exc
                self.rows_stored += frame.height
                self.last_tick_ns = int(frame["ts"].max().timestamp() * 1e9)  # type: ignore[union-attr]
            self.entries_stored += len(fresh)
            self.hwm = parse_log_id(last)
            self.last_flush_ns = time.time_ns()
        await self.redis.xack(LOG_KEY, GROUP, *[e[0] for e in entries])
        if self.write_error is not None:
            log.warning("history is written again; the backlog was stored")
            self.write_error = None

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
        s = self.settings
        pending_phase = True
        buffer: list[tuple[bytes, dict[bytes, bytes]]] = []
        started = time.monotonic()
        backoff = 0.5
        tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._compact())]
        try:
            while not self._stop.is_set():
                try:
                    await self._ensure_group()
                    entries = await self._read(pending_phase)
                    if pending_phase and not entries:
                        pending_phase = False  # redelivered backlog done; now new entries
                    buffer.extend(entries)
                    due = time.monotonic() - started >= s.recorder_flush_s
                    if buffer and (due or len(buffer) >= s.recorder_batch or pending_phase):
                        await self.flush(buffer)
                        buffer = []
                        started = time.monotonic()
                        backoff = 0.5
                    elif not buffer:
                        started = time.monotonic()
                except WriteFailed as exc:
                    # Keep nothing in memory: the entries stay pending in the consumer group and
                    # are read again, oldest first, once the disk takes writes again.
                    self.write_errors += 1
                    self.write_error = str(exc)
                    log.error(
                        "cannot write history (%s); nothing acknowledged, %d log entries wait "
                        "in Redis; retrying in %.1f s. Free disk space under %s.",
                        exc, len(buffer), backoff, self.root,
                    )  # fmt: skip
                    buffer = []
                    pending_phase = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), backoff)
                    backoff = min(backoff * 2, 10.0)
                except REDIS_DOWN as exc:
                    log.warning("redis unreachable (%s); retrying", exc)
                    buffer = []  # unacknowledged: they come back as pending
                    pending_phase = True
                    await asyncio.sleep(0.5)
        finally:
            for task in tasks:
                task.cancel()
            await self.redis.aclose()

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
                groups = await self.redis.xinfo_groups(LOG_KEY)
                group = next((g for g in groups if g["name"] == GROUP.encode()), None)
                lag = group.get("lag") if group else None
                pending = group.get("pending") if group else None
                now = time.time_ns()
                await self.redis.hset(
                    RECORDER_KEY,
                    mapping={
                        "pid": os.getpid(),
                        "state": "write_failed" if self.write_error else "ok",
                        "error": self.write_error or "",
                        "write_errors": self.write_errors,
                        "rows_stored": self.rows_stored,
                        "lag_batches": -1 if lag is None else lag,
                        # Estimated from the ticks per batch stored so far.
                        "lag_ticks": -1
                        if lag is None or not self.entries_stored
                        else round(lag * self.rows_stored / self.entries_stored),
                        "pending_batches": -1 if pending is None else pending,
                        "lag_s": round((now - self.last_tick_ns) / 1e9, 3)
                        if self.last_tick_ns
                        else -1,
                        "last_flush_ns": self.last_flush_ns,
                        "files_compacted": self.compactor.files_merged,
                        "updated_ns": now,
                    },
                )
                await self.redis.expire(RECORDER_KEY, FIGURES_TTL_S)


async def run_recorder(settings: Settings) -> None:
    rec = Recorder(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, rec.stop)
    log.info("recording %s into %s (high-water mark %s)", LOG_KEY, rec.root, rec.hwm)
    await rec.run()
