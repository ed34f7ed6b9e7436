"""History queries: DuckDB over the recorder's immutable Parquet files.

Each query runs on its own cursor of the process's one in-memory DuckDB database (memory bounded
by ``history_query_memory_mb``) and reads the visible files of the date
partitions the range touches, as one snapshot of the store (``server.history.store.scan``: hidden
``.*.tmp`` files being written and files already merged by compaction are never read), plus the
log entries above the snapshot's high-water mark that the recorder has not stored yet (a
``Source``), so a range up to now has no hole and no tick twice. Raw ticks,
enriched ticks (quote mid/spread, trade notional, prevailing quote by as-of join, aggressor) and
bars are all computed in SQL; results leave as Arrow chunks handed to Polars, never as one whole
result in Python.
"""

from __future__ import annotations

import base64
import os
import tempfile
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl

from server.history.store import Snapshot, scan
from server.ticks import STORED_SCHEMA

TYPES = ("trade", "quote")
INTERVALS = {"1s": "1 second", "1m": "1 minute", "5m": "5 minutes", "1h": "1 hour", "1d": "1 day"}
INTERVAL_NS = {"1s": 10**9, "1m": 60 * 10**9, "5m": 300 * 10**9, "1h": 3600 * 10**9,
               "1d": 86_400 * 10**9}  # fmt: skip
DAY_NS = 86_400 * 10**9
# The as-of join looks this far before ``start`` for the quote prevailing at the first trades.
QUOTE_LOOKBACK_NS = DAY_NS

TICK_COLUMNS = ", ".join(STORED_SCHEMA)
FLAGGED = ("include", "exclude", "only")
# Added to a query's symbol condition for each ``flagged`` choice.
FLAGGED_SQL = {"include": "", "exclude": " AND flags IS NULL", "only": " AND flags IS NOT NULL"}
ENRICHED_COLUMNS = (*STORED_SCHEMA, "mid", "spread", "spread_bps", "notional", "aggressor")
BAR_COLUMNS = (
    "sym", "start", "open", "high", "low", "close", "volume", "vwap", "trades", "first_seq",
    "last_seq",
)  # fmt: skip
# Ticks not yet recorded are read from the log only when the range ends after this long before
# the newest stored log entry (log ids are Redis' clock; tick ts the feed's).
TAIL_SLACK_NS = 60 * 10**9


# The Polars types of the computed columns (the stored ones are ``STORED_SCHEMA``'s).
_ENRICHED_TYPES: dict[str, pl.DataType] = {
    **{c: pl.Float64() for c in ("mid", "spread", "spread_bps", "notional")},
    "aggressor": pl.Utf8(),
}
_BAR_TYPES: dict[str, pl.DataType] = {
    "sym": pl.Utf8(),
    "start": pl.Datetime("ns", "UTC"),
    **{c: pl.Float64() for c in ("open", "high", "low", "close", "volume", "vwap")},
    **{c: pl.Int64() for c in ("trades", "first_seq", "last_seq")},
}
# DuckDB result types -> Polars, so every chunk of one result has the same schema.
_POLARS_TYPES: dict[str, pl.DataType] = {
    "VARCHAR": pl.Utf8(),
    "BIGINT": pl.Int64(),
    "INTEGER": pl.Int64(),
    "DOUBLE": pl.Float64(),
    "BOOLEAN": pl.Boolean(),
}


class CorruptHistory(Exception):
    """A stored Parquet file could not be read."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


@dataclass(frozen=True)
class HistoryQuery:
    syms: list[str]
    start_ns: int
    end_ns: int
    types: tuple[str, ...] = TYPES
    enriched: bool = False
    interval: str | None = None
    # Keyset paging: rows strictly after this (ts, seq, sym).
    after: tuple[int, int, str] | None = None
    limit: int | None = None
    # Output columns, in this order (None: all of them).
    fields: tuple[str, ...] | None = None
    # Ticks a vendor flagged (``flags`` not null): "include" (default), "exclude" or "only".
    flagged: str = "include"

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column this query's rows have before ``fields`` picks some."""
        if self.interval is not None:
            return BAR_COLUMNS
        return ENRICHED_COLUMNS if self.enriched else tuple(STORED_SCHEMA)

    def empty(self, ns_ints: bool = True, project: bool = True) -> pl.DataFrame:
        """No rows, with the columns and types of this query's answer (``ns_ints``: the time
        column as integer ns; ``project``: only ``fields``), as ``HistoryReader.chunks`` gives
        them."""
        types = {**STORED_SCHEMA, **_ENRICHED_TYPES, **_BAR_TYPES}
        schema = {c: types[c] for c in self.columns}
        time_col = "start" if self.interval is not None else "ts"
        if ns_ints:
            schema[time_col] = pl.Int64()
        if project and self.fields is not None:
            schema = {c: schema[c] for c in self.fields}
        return pl.DataFrame(schema=schema)


def encode_cursor(ts_ns: int, seq: int, sym: str) -> str:
    """An opaque cursor for the row after (ts, seq, sym)."""
    return base64.urlsafe_b64encode(orjson.dumps([ts_ns, seq, sym])).decode()


def decode_cursor(cursor: str) -> tuple[int, int, str]:
    """The (ts, seq, sym) a cursor names; ValueError if it is not one of ours."""
    try:
        ts_ns, seq, sym = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except Exception as exc:
        raise ValueError("cursor is not valid; pass next_cursor from the previous page") from exc
    ok = isinstance(ts_ns, int) and isinstance(seq, int) and isinstance(sym, str)
    if not ok or abs(ts_ns) >= 2**63 or abs(seq) >= 2**63:
        raise ValueError("cursor is not valid; pass next_cursor from the previous page")
    return ts_ns, seq, sym


@dataclass
class Source:
    """Where one request's rows come from: a snapshot of the store and, for a range reaching up
    to now, the log entries the recorder has not stored yet (``tail``, in the stored schema).

    Taken once per request so that every part of the answer (rows, gap count, pages) agrees:
    log entries above the snapshot's high-water mark are in no file of the snapshot, so a tick
    is read from exactly one place."""

    snapshot: Snapshot
    # DuckDB's working memory for the process's history queries (``history_query_memory_mb``);
    # sorts past it spill to ``spill_dir``.
    memory_mb: int
    spill_dir: Path
    tail: pl.DataFrame | None = None
    # Recently read symbol slices kept decoded (``history_cache_mb``; 0: none), see
    # ``server.history.merge.SliceCache``.
    cache_mb: int = 0
    # Raw ticks from the merge of the sorted files (``server.history.merge``); False: SQL.
    merge: bool = True

    @classmethod
    def of(cls, root: Path, memory_mb: int, cache_mb: int = 0, merge: bool = True) -> Source:
        """The store under ``root`` as it is now (blocking: lists the files)."""
        return cls(scan(root), memory_mb, root.parent / "tmp", cache_mb=cache_mb, merge=merge)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor on the process's shared history database (see ``_database``), in UTC."""
        con = _database(self.memory_mb, self.spill_dir).cursor()
        con.execute("SET TimeZone = 'UTC'")
        return con

    def needs_tail(self, end_ns: int, logs: Sequence[str] = ("",)) -> bool:
        """Whether ticks up to ``end_ns`` may still be only in the tickerplant ``logs`` (by
        name: "" standalone, one per slot group on a cluster)."""
        ms = min(self.snapshot.high_water_of(log)[0] for log in logs)
        return end_ns > ms * 10**6 - TAIL_SLACK_NS


# Columns added to the store after its first files were written, as typed nulls.
LATER_COLUMNS = "NULL::VARCHAR AS flags"


def parquet_source(files: list[Path]) -> str:
    names = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    # By name, and with the columns added to the store since files were first written: a file
    # written before (no ``flags``) reads them as null, also when it is the only file read.
    # The empty side costs nothing: DuckDB still pushes filters and projections into the scan.
    return (
        f"(SELECT * FROM read_parquet([{names}], union_by_name = true)"
        f" UNION ALL BY NAME SELECT {LATER_COLUMNS} WHERE false)"
    )


def _ns(expr: str) -> str:
    return f"epoch_ns({expr})"


def build_sql(q: HistoryQuery, files: list[Path]) -> tuple[str, list[object]]:
    """The SQL (timestamps as TIMESTAMPTZ_NS) and its parameters for this query."""
    src = parquet_source(files)
    sym_in = "sym IN (SELECT unnest(?::VARCHAR[]))" + FLAGGED_SQL[q.flagged]
    params: list[object]
    if q.interval is not None:
        sql = f"""
            SELECT sym,
                   time_bucket(INTERVAL '{INTERVALS[q.interval]}', ts)::TIMESTAMPTZ_NS AS start,
                   first(price ORDER BY ts, seq) AS open, max(price) AS high, min(price) AS low,
                   last(price ORDER BY ts, seq) AS close, sum(size) AS volume,
                   sum(price * size) / nullif(sum(size), 0) AS vwap, count(*) AS trades,
                   first(seq ORDER BY ts, seq) AS first_seq, last(seq ORDER BY ts, seq) AS last_seq
            FROM {src}
            WHERE type = 'trade' AND {sym_in} AND {_ns("ts")} >= ? AND {_ns("ts")} < ?
            GROUP BY ALL ORDER BY start, sym"""
        return sql, [q.syms, q.start_ns, q.end_ns]
    if q.enriched:
        lookback = q.start_ns - QUOTE_LOOKBACK_NS
        sql = f"""
            WITH base AS (
                SELECT {TICK_COLUMNS} FROM {src}
                WHERE {sym_in} AND {_ns("ts")} >= ? AND {_ns("ts")} < ?
            ),
            quotes AS (SELECT sym, ts, seq, bid, ask FROM base WHERE type = 'quote'),
            trades AS (
                SELECT t.*, q.bid AS q_bid, q.ask AS q_ask
                FROM (SELECT * FROM base WHERE type = 'trade' AND {_ns("ts")} >= ?) t
                ASOF LEFT JOIN quotes q ON t.sym = q.sym AND t.ts >= q.ts
            ),
            ruled AS (
                SELECT *, coalesce(
                    side,
                    CASE WHEN price >= q_ask THEN 'buy' WHEN price <= q_bid THEN 'sell' END,
                    CASE WHEN price > lag(price) OVER w THEN 'buy'
                         WHEN price < lag(price) OVER w THEN 'sell' END
                ) AS direct
                FROM trades WINDOW w AS (PARTITION BY sym ORDER BY ts, seq)
            ),
            enriched_trades AS (
                SELECT sym, type, ts, epoch, seq, price, size, side, q_bid AS bid,
                       bid_size, q_ask AS ask, ask_size, venue, crossed, flags,
                       NULL::DOUBLE AS mid, NULL::DOUBLE AS spread, NULL::DOUBLE AS spread_bps,
                       price * size AS notional,
                       coalesce(direct, last_value(direct IGNORE NULLS) OVER (
                           PARTITION BY sym ORDER BY ts, seq
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS aggressor
                FROM ruled
            ),
            enriched_quotes AS (
                SELECT {TICK_COLUMNS}, (bid + ask) / 2 AS mid, ask - bid AS spread,
                       (ask - bid) / ((bid + ask) / 2) * 1e4 AS spread_bps,
                       NULL::DOUBLE AS notional, NULL::VARCHAR AS aggressor
                FROM base WHERE type = 'quote' AND {_ns("ts")} >= ?
            ),
            rows AS (SELECT * FROM enriched_trades UNION ALL SELECT * FROM enriched_quotes)
            SELECT * FROM rows WHERE type IN (SELECT unnest(?::VARCHAR[]))"""
        params = [q.syms, lookback, q.end_ns, q.start_ns, q.start_ns, list(q.types)]
    else:
        sql = f"""
            SELECT {TICK_COLUMNS} FROM {src}
            WHERE {sym_in} AND {_ns("ts")} >= ? AND {_ns("ts")} < ?
              AND type IN (SELECT unnest(?::VARCHAR[]))"""
        params = [q.syms, q.start_ns, q.end_ns, list(q.types)]
    if q.after is not None:
        sql = f"""SELECT * FROM ({sql}) WHERE
            {_ns("ts")} > ? OR ({_ns("ts")} = ? AND (seq > ? OR (seq = ? AND sym > ?)))"""
        ts_ns, seq, sym = q.after
        params += [ts_ns, ts_ns, seq, seq, sym]
    sql = f"SELECT * FROM ({sql}) ORDER BY ts, seq, sym"
    if q.limit is not None:
        sql += f" LIMIT {int(q.limit)}"
    return sql, params


# Gaps: consecutive stored seqs of one (sym, epoch) more than one apart. Epoch changes: the
# epochs of a symbol in order of their first tick (imported history has negative epochs and is
# treated alike). Only seq, epoch and ts are read, so the row groups' other columns are skipped.
GAPS_SQL = """
    WITH t AS (
        SELECT sym, epoch, seq, epoch_ns(ts) AS ts_ns FROM {src}
        WHERE sym IN (SELECT unnest(?::VARCHAR[])) AND epoch_ns(ts) >= ? AND epoch_ns(ts) < ?
    ),
    w AS (
        SELECT sym, epoch, seq, ts_ns,
               lag(seq) OVER (PARTITION BY sym, epoch ORDER BY seq) AS prev_seq,
               lag(ts_ns) OVER (PARTITION BY sym, epoch ORDER BY seq) AS prev_ts
        FROM t
    ),
    epochs AS (
        SELECT sym, epoch, min(ts_ns) AS first_ts, min(seq) AS first_seq FROM t GROUP BY sym, epoch
    ),
    changes AS (
        SELECT sym, epoch, first_ts, first_seq,
               lag(epoch) OVER (PARTITION BY sym ORDER BY first_ts, epoch) AS prev_epoch
        FROM epochs
    )
    SELECT 'gap' AS kind, sym, epoch, prev_seq + 1 AS from_seq, seq - 1 AS to_seq,
           prev_ts AS after_ts, ts_ns AS before_ts, NULL::BIGINT AS prev_epoch
    FROM w WHERE seq - prev_seq > 1
    UNION ALL
    SELECT 'epoch_change', sym, epoch, NULL, NULL, NULL, first_ts, prev_epoch
    FROM changes WHERE prev_epoch IS NOT NULL
    ORDER BY kind DESC, sym, before_ts, from_seq
"""


# One row per symbol: what a range holds, without its rows (MCP's tick_summary, export sizes).
# Spreads are of quotes with both sides; trade figures of trades only.
SUMMARY_SQL = """
    WITH t AS (
        SELECT sym, type, epoch_ns(ts) AS ts_ns, seq, price, size, bid, ask FROM {src}
        WHERE sym IN (SELECT unnest(?::VARCHAR[])) AND epoch_ns(ts) >= ? AND epoch_ns(ts) < ?
    )
    SELECT sym,
           count(*) FILTER (WHERE type = 'trade') AS trades,
           count(*) FILTER (WHERE type = 'quote') AS quotes,
           min(ts_ns) AS first_ts, max(ts_ns) AS last_ts,
           arg_min(price, (ts_ns, seq)) FILTER (WHERE type = 'trade') AS first_price,
           arg_max(price, (ts_ns, seq)) FILTER (WHERE type = 'trade') AS last_price,
           max(price) FILTER (WHERE type = 'trade') AS high,
           min(price) FILTER (WHERE type = 'trade') AS low,
           sum(size) FILTER (WHERE type = 'trade') AS volume,
           sum(price * size) FILTER (WHERE type = 'trade')
               / nullif(sum(size) FILTER (WHERE type = 'trade'), 0) AS vwap,
           avg(ask - bid) FILTER (WHERE type = 'quote') AS spread_mean,
           min(ask - bid) FILTER (WHERE type = 'quote') AS spread_min,
           max(ask - bid) FILTER (WHERE type = 'quote') AS spread_max,
           avg((ask - bid) / ((ask + bid) / 2) * 1e4) FILTER (WHERE type = 'quote')
               AS spread_bps_mean
    FROM t GROUP BY sym ORDER BY sym
"""
SUMMARY_COLUMNS = (
    "sym", "trades", "quotes", "first_ts", "last_ts", "first_price", "last_price", "high", "low",
    "volume", "vwap", "spread_mean", "spread_min", "spread_max", "spread_bps_mean",
)  # fmt: skip


_databases: dict[tuple[int, Path], duckdb.DuckDBPyConnection] = {}
_databases_lock = threading.Lock()


def _database(memory_mb: int, spill_dir: Path) -> duckdb.DuckDBPyConnection:
    """The process's in-memory DuckDB database for history queries (one per setting).

    Opening a database costs about 20 ms, a cursor on it microseconds; each query gets its own
    cursor (its own connection: temporary tables and settings are its own). ``memory_mb``
    bounds the working memory of all of this process's history queries together; bigger sorts
    spill to ``spill_dir``."""
    with _databases_lock:
        con = _databases.get((memory_mb, spill_dir))
        if con is None:
            spill_dir.mkdir(parents=True, exist_ok=True)
            config: dict[str, str | bool | int | float | list[str]] = {
                "memory_limit": f"{memory_mb}MB",
                "temp_directory": str(spill_dir),
            }
            con = _databases[(memory_mb, spill_dir)] = duckdb.connect(config=config)
        return con


class HistoryReader:
    """Runs one query on its own in-memory DuckDB connection; close it when done."""

    def __init__(self, source: Source, q: HistoryQuery) -> None:
        self.q = q
        # The as-of join needs the day before start for the quote prevailing at the first trade.
        lo = q.start_ns - (QUOTE_LOOKBACK_NS if q.enriched else 0)
        self.files = source.snapshot.paths(lo, q.end_ns)
        self._tail_file: Path | None = None
        if source.tail is not None and source.tail.height:
            ns = pl.col("ts").cast(pl.Int64)
            rows = source.tail.filter(pl.col("sym").is_in(q.syms) & (ns >= lo) & (ns < q.end_ns))
            if rows.height:  # DuckDB reads it like any stored file
                fd, name = tempfile.mkstemp(prefix="tickpipe-tail-", suffix=".parquet")
                os.close(fd)
                self._tail_file = Path(name)
                rows.write_parquet(self._tail_file, statistics=True)
                self.files.append(self._tail_file)
        self.con = source.cursor()
        self.rows: int | None = None  # rows of the result, once ``chunks`` has run the query

    def close(self) -> None:
        """Free the query (safe to call more than once)."""
        self.con.close()
        if self._tail_file is not None:
            self._tail_file.unlink(missing_ok=True)

    def _execute(self, sql: str, params: list[object]) -> duckdb.DuckDBPyConnection:
        try:
            return self.con.execute(sql, params)
        except duckdb.Error as exc:
            raise self._corruption(exc) from exc

    def gaps(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Holes in stored ``seq`` per (sym, epoch) and epoch changes per symbol in the range.

        Types are ignored (seq counts trades and quotes together). A gap is only seen between
        two stored ticks of the range, so a range that starts or ends inside a hole does not
        report it. Timestamps are integer ns.
        """
        if not self.files:
            return [], []
        sql = GAPS_SQL.format(src=parquet_source(self.files))
        rows = self._execute(sql, [self.q.syms, self.q.start_ns, self.q.end_ns]).fetchall()
        gaps: list[dict[str, Any]] = []
        changes: list[dict[str, Any]] = []
        for kind, sym, epoch, from_seq, to_seq, after_ts, before_ts, prev_epoch in rows:
            if kind == "gap":
                gaps.append(
                    {
                        "sym": sym,
                        "epoch": epoch,
                        "from_seq": from_seq,
                        "to_seq": to_seq,
                        "missing": to_seq - from_seq + 1,
                        "after_ts": after_ts,
                        "before_ts": before_ts,
                    }
                )
            else:
                changes.append(
                    {
                        "sym": sym,
                        "kind": "epoch_change",
                        "from_epoch": prev_epoch,
                        "to_epoch": epoch,
                        "at_ts": before_ts,
                    }
                )
        return gaps, changes

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per symbol with ticks in the range: counts, first and last tick times (integer ns),
        first/last/high/low trade price, volume, VWAP and quote spread statistics."""
        if not self.files:
            return {}
        sql = SUMMARY_SQL.format(src=parquet_source(self.files))
        rows = self._execute(sql, [self.q.syms, self.q.start_ns, self.q.end_ns]).fetchall()
        return {row[0]: dict(zip(SUMMARY_COLUMNS, row, strict=True)) for row in rows}

    def _corruption(self, exc: duckdb.Error) -> Exception:
        """Name the file that fails to read, if one does; else the original error."""
        for f in self.files:
            try:
                with duckdb.connect() as probe:
                    probe.execute(f"SELECT count(*), max(ts) FROM {parquet_source([f])}").fetchall()
            except duckdb.Error as bad:
                return CorruptHistory(f, str(bad).splitlines()[0])
        return exc

    @property
    def _time_col(self) -> str:
        return "start" if self.q.interval is not None else "ts"

    def chunks(
        self, size: int = 50_000, ns_ints: bool = True, project: bool = True
    ) -> Generator[pl.DataFrame, None, None]:
        """The result as Polars frames of at most ``size`` rows, in order.

        ``ns_ints`` gives timestamps as integer ns; otherwise ``Datetime("ns", "UTC")``.
        ``project`` keeps only the query's ``fields``. The sorted result is kept in a temporary
        DuckDB table (DuckDB sorts all of it before the first row anyway, and spills to disk
        past the connection's memory limit); each chunk is a range of its rows handed to
        Polars as Arrow, with no Python object per row or value.
        """
        if not self.files:
            return
        sql, params = build_sql(self.q, self.files)
        col = self._time_col
        self._execute(f"CREATE OR REPLACE TEMP TABLE result AS {sql}", params).fetchall()
        cur = self.con.execute("SELECT * FROM result LIMIT 0")
        described = cur.description or []
        cur.fetchall()
        schema: dict[Any, pl.DataType] = {
            d[0]: _POLARS_TYPES[str(d[1])] for d in described if str(d[1]) in _POLARS_TYPES
        }
        ((total,),) = self.con.execute("SELECT count(*) FROM result").fetchall()
        self.rows = total
        for lo in range(0, total, size):
            try:
                rel = self.con.sql(
                    f"SELECT * FROM result WHERE rowid >= {lo} AND rowid < {lo + size}"
                    " ORDER BY rowid"
                )
                frame = pl.DataFrame(rel)
            except duckdb.Error as exc:
                raise self._corruption(exc) from exc
            frame = frame.cast(schema)
            if ns_ints:
                frame = frame.with_columns(pl.col(col).cast(pl.Int64))
            if project and self.q.fields is not None:
                frame = frame.select(self.q.fields)
            yield frame

    def copy_parquet(self, dest: Path) -> None:
        """Write the whole result to ``dest`` as Parquet (timestamps ns UTC) with DuckDB COPY;
        with no file to read, an empty file that still has the answer's columns."""
        if not self.files:
            self.q.empty(ns_ints=False).write_parquet(dest)
            return
        sql, params = build_sql(self.q, self.files)
        if self.q.fields is not None:
            cols = ", ".join('"' + c + '"' for c in self.q.fields)  # names checked by the caller
            sql = f"SELECT {cols} FROM ({sql})"
        path = str(dest).replace("'", "''")
        self._execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet)", params)


def find_gaps(
    source: Source, syms: list[str], start_ns: int, end_ns: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(gaps, epoch_changes) in history (stored and not yet recorded) for these symbols in
    [start, end). See ``HistoryReader.gaps`` for the shape of each entry.
    """
    reader = HistoryReader(source, HistoryQuery(syms, start_ns, end_ns))
    try:
        return reader.gaps()
    finally:
        reader.close()


def summarize(
    source: Source, syms: list[str], start_ns: int, end_ns: int
) -> dict[str, dict[str, Any]]:
    """``HistoryReader.summary`` of these symbols in [start, end): stored and not yet recorded."""
    reader = HistoryReader(source, HistoryQuery(syms, start_ns, end_ns))
    try:
        return reader.summary()
    finally:
        reader.close()
