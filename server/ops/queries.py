"""Query history: every REST query and WebSocket subscribe/unsubscribe, recorded per key.

The request path only appends a tuple to a bounded in-memory deque; a background task flushes it
to SQLite (``<data_dir>/queries.sqlite3``) in a worker thread every ``FLUSH_S``. If that file cannot
be written, records wait in memory up to the bound (oldest dropped and counted) and queries go on.
The key's secret is never recorded: only its name; a key a client put in the URL, a path or an
op's fields is masked (``server.privacy.redact``). The file is readable by its owner only.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from server.privacy import private_sqlite, redact

log = logging.getLogger("tickpipe.queries")
FLUSH_S = 0.5
MAX_PARAMS_CHARS = 2000
COLUMNS = ("ts", "key", "endpoint", "params", "rows", "bytes", "duration_ms", "status")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts INTEGER NOT NULL,          -- ns since the epoch, when the query started
    key TEXT,                     -- key name; NULL when no valid key was sent
    endpoint TEXT NOT NULL,       -- REST path, ws:subscribe|unsubscribe, or mcp:<tool>
    params TEXT NOT NULL,         -- the query string, or the op's fields as JSON
    rows INTEGER,                 -- events/rows returned, where known
    bytes INTEGER,                -- response body bytes, where known
    duration_ms REAL NOT NULL,
    status TEXT NOT NULL          -- HTTP status, or 'ok' / an error code
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries(ts);
CREATE INDEX IF NOT EXISTS queries_key_ts ON queries(key, ts);
"""

Record = tuple[int, str | None, str, str, int | None, int | None, float, str]


def _as_dict(rec: Record) -> dict[str, Any]:
    return dict(zip(COLUMNS, rec, strict=True))


def read_queries(path: Path, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` stored records (optionally of one key), newest first."""
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _select(db, key, limit)
    finally:
        db.close()


def _select(db: sqlite3.Connection, key: str | None, limit: int) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(COLUMNS)} FROM queries"
    args: tuple[object, ...] = ()
    if key is not None:
        sql, args = sql + " WHERE key = ?", (key,)
    rows = db.execute(sql + " ORDER BY ts DESC LIMIT ?", (*args, limit)).fetchall()
    return [_as_dict(r) for r in rows]


class QueryLog:
    """Bounded in-memory buffer of query records, flushed to SQLite by ``run``."""

    def __init__(self, path: Path, max_records: int) -> None:
        self.path = path
        self.max_records = max_records
        self._pending: deque[Record] = deque(maxlen=max_records)
        self._inflight: list[Record] = []
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads
        self.dropped = 0
        self.flush_failures = 0

    def record(
        self,
        key: str | None,
        endpoint: str,
        params: str,
        rows: int | None,
        nbytes: int | None,
        duration_ms: float,
        status: str,
        ts: int | None = None,
    ) -> None:
        """Remember one query; never blocks and never raises into the caller. Anything in
        ``endpoint`` or ``params`` that looks like a key is masked."""
        if len(self._pending) == self.max_records:
            self.dropped += 1  # the deque drops the oldest itself
        self._pending.append(
            (
                ts if ts is not None else time.time_ns(),
                key,
                redact(endpoint),
                redact(params)[:MAX_PARAMS_CHARS],
                rows,
                nbytes,
                round(duration_ms, 3),
                status,
            )
        )

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            private_sqlite(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA busy_timeout=2000")
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def _write(self, batch: list[Record]) -> None:
        with self._lock:
            db = self._connect()
            with db:
                db.execute("BEGIN")
                db.executemany("INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)

    async def flush(self) -> bool:
        """Move what is in memory to SQLite; on failure keep it in memory (bounded)."""
        if not self._pending:
            return True
        self._inflight = list(self._pending)
        self._pending.clear()
        try:
            await asyncio.to_thread(self._write, self._inflight)
        except Exception as exc:  # storage unavailable: log, count, keep the records
            self.flush_failures += 1
            if self.flush_failures in (1, 10) or self.flush_failures % 1000 == 0:
                log.warning(
                    "query history not stored in %s (%s; %d failures so far); kept in memory",
                    self.path,
                    exc,
                    self.flush_failures,
                )
            kept = self._inflight + list(self._pending)
            self.dropped += max(0, len(kept) - self.max_records)
            self._pending.clear()
            self._pending.extend(kept[-self.max_records :])
            return False
        finally:
            self._inflight = []
        return True

    async def run(self) -> None:
        """Flush every ``FLUSH_S`` until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    def _read(self, key: str | None, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            return _select(self._connect(), key, limit)

    async def recent(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: what is still in memory, then what is stored."""
        mem = [r for r in (*self._inflight, *self._pending) if key is None or r[1] == key]
        try:
            stored = await asyncio.to_thread(self._read, key, limit)
        except Exception as exc:
            log.warning("query history unreadable in %s (%s)", self.path, exc)
            stored = []
        # A flush that committed while we read has put some of ``mem`` in ``stored`` too.
        seen = {tuple(q[c] for c in COLUMNS) for q in stored}
        merged = [_as_dict(r) for r in mem if r not in seen] + stored
        merged.sort(key=lambda q: q["ts"], reverse=True)
        return merged[:limit]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
