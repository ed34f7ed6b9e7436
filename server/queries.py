"""Query history: every REST query and WebSocket subscribe/unsubscribe, recorded per key.

The request path only appends a tuple to a bounded in-memory deque; a background task flushes it
to SQLite (``<data_dir>/queries.sqlite3``) in a worker thread every ``FLUSH_S``. If that file cannot
be written, records wait in memory up to the bound (oldest dropped and counted) and queries go on.
The key's secret is never recorded: only its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, require_key
from server.auth import bearer_token

log = logging.getLogger("tickpipe.queries")
FLUSH_S = 0.5
MAX_PARAMS_CHARS = 2000
MAX_LIMIT = 10_000
LINE_MEDIA = (b"application/x-ndjson", b"text/csv")
COLUMNS = ("ts", "key", "endpoint", "params", "rows", "bytes", "duration_ms", "status")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts INTEGER NOT NULL,          -- ns since the epoch, when the query started
    key TEXT,                     -- key name; NULL when no valid key was sent
    endpoint TEXT NOT NULL,       -- REST path, or 'ws:subscribe' / 'ws:unsubscribe'
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
        """Remember one query; never blocks and never raises into the caller."""
        if len(self._pending) == self.max_records:
            self.dropped += 1  # the deque drops the oldest itself
        self._pending.append(
            (
                ts if ts is not None else time.time_ns(),
                key,
                endpoint,
                params[:MAX_PARAMS_CHARS],
                rows,
                nbytes,
                round(duration_ms, 3),
                status,
            )
        )

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
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
        merged = [_as_dict(r) for r in mem] + stored
        merged.sort(key=lambda q: q["ts"], reverse=True)
        return merged[:limit]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class QueryRecorder:
    """ASGI middleware: records every ``/ticks/*`` request's status, body bytes and duration."""

    def __init__(self, app: ASGIApp, prefix: str = "/ticks/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        ts = time.time_ns()
        t0 = time.perf_counter()
        status = 500
        nbytes = 0
        lines: int | None = None  # counted for line-per-row formats only

        async def counting_send(message: Message) -> None:
            nonlocal status, nbytes, lines
            if message["type"] == "http.response.start":
                status = message["status"]
                media = dict(message.get("headers", ())).get(b"content-type", b"")
                if status == 200 and media.split(b";")[0] in LINE_MEDIA:
                    lines = -1 if media.startswith(b"text/csv") else 0  # CSV: minus the header
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                nbytes += len(body)
                if lines is not None:
                    lines += body.count(b"\n")
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            with contextlib.suppress(Exception):  # recording must never fail a request
                ms = (time.perf_counter() - t0) * 1000
                self._record(
                    scope, ts, status, nbytes, None if lines is None else max(0, lines), ms
                )

    def _record(
        self, scope: Scope, ts: int, status: int, nbytes: int, rows: int | None, ms: float
    ) -> None:
        st = scope["app"].state.tp
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = bearer_token(value.decode("latin-1"))
                break
        key = st.keys.lookup(token) if token else None
        st.queries.record(
            key.name if key is not None else None,
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            rows,
            nbytes,
            ms,
            str(status),
            ts,
        )


async def queries_endpoint(request: Request) -> Response:
    """``GET /queries?key=&limit=100``: the query history, newest first (admin scope)."""
    require_key(request, "admin")
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, "bad_parameter", f"limit is an integer from 1 to {MAX_LIMIT}")
    key = request.query_params.get("key") or None
    log_: QueryLog = request.app.state.tp.queries
    return JSONResponse({"queries": await log_.recent(key, int(raw))})
