"""``GET /ticks/historical``: stored ticks, enriched ticks or bars as JSON, NDJSON, CSV, Parquet
or Arrow IPC, for a key with the ``historical`` scope; ``GET /ticks/gaps``: where stored ``seq``
is not contiguous in a range.

Queries run in a worker thread (``server.history.query``); NDJSON, CSV and Arrow stream chunk by
chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import orjson
import polars as pl
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.api.encoders import COMPRESSIONS, ArrowStream, CsvRows, Encoder, NdjsonLines
from server.api.errors import ApiError, require_key
from server.api.params import parse_flag, parse_int, parse_time
from server.api.queries import ROWS, RowCount
from server.api.state import AppState
from server.api.ticks import parse_symbols
from server.auth import ApiKey
from server.history.merge import MergeReader, gap_count, open_reader
from server.history.query import (
    FLAGGED,
    INTERVAL_NS,
    INTERVALS,
    TYPES,
    CorruptHistory,
    HistoryQuery,
    HistoryReader,
    Source,
    decode_cursor,
    encode_cursor,
    find_gaps,
)
from server.history.store import history_dir, known_symbols
from server.history.tail import logs_frame
from server.live.bus import UPSTREAM_GAPS_KEPT, stream_entries
from server.replay import fingerprint_range

log = logging.getLogger("tickpipe.history")
MAX_HISTORICAL_SYMBOLS = 1000
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
# JSON pages hold their rows in memory; longer ranges should use a streaming format.
MAX_JSON_RANGE_NS = 31 * 86_400 * 10**9
# Rows per encoded chunk of a streamed answer: big enough that the per-chunk costs vanish,
# small enough that one chunk of NDJSON is a few tens of MB.
CHUNK_ROWS = 131_072
# JSON bars are one answer held in memory: at most this many (empty intervals are absent, so
# this bounds the worst case: every interval of every symbol traded).
MAX_JSON_BARS = 1_000_000
MEDIA = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
    "arrow": "application/vnd.apache.arrow.stream",
}
FORMAT_BY_MEDIA = {v: k for k, v in MEDIA.items()}
GAPS_HEADER = "X-Tickpipe-Gaps"
# Ticks read from the Redis log because the recorder has not stored them yet: a count, or
# "unavailable" (Redis is down: only stored ticks are in the answer), or "<n>+" when more were
# unrecorded than a query reads (the recorder is far behind; the newest ticks are missing).
TAIL_HEADER = "X-Tickpipe-Unrecorded"

R = TypeVar("R")


def _choose_format(request: Request) -> str:
    fmt = request.query_params.get("format")
    if fmt is None:
        accept = request.headers.get("accept", "")
        for part in accept.split(","):
            media = part.split(";")[0].strip().lower()
            if media in FORMAT_BY_MEDIA:
                return FORMAT_BY_MEDIA[media]
        return "json"
    fmt = fmt.strip().lower()
    if fmt not in MEDIA:
        raise ApiError(
            422,
            "bad_parameter",
            f"format={fmt[:32]!r} is unknown; choose one of {', '.join(MEDIA)}",
            valid=list(MEDIA),
        )
    return fmt


def parse_range(request: Request) -> tuple[list[str], int, int]:
    """``symbols``, ``start`` and ``end`` (ns) of a history request, or a 422 saying why not."""
    qp = request.query_params
    syms = parse_symbols(qp.get("symbols"), MAX_HISTORICAL_SYMBOLS)
    start_ns = parse_time("start", qp.get("start"))
    end_ns = parse_time("end", qp.get("end"))
    if start_ns >= end_ns:
        raise ApiError(
            422, "bad_parameter", "start must be before end (start is inclusive, end exclusive)"
        )
    return syms, start_ns, end_ns


def require_entitled(key: ApiKey, syms: list[str]) -> None:
    """A 403 ``not_entitled`` naming the symbols ``key`` may not see, if any."""
    denied = [s for s in syms if not key.allows(s)]
    if denied:
        raise ApiError(
            403, "not_entitled", f"key {key.name!r} may not see these symbols", symbols=denied
        )


async def unknown_symbols(st: AppState, syms: list[str]) -> list[str]:
    """The symbols no feed ever published (Redis ``tp:symbols``) and the store never held
    (``history/symbols.txt``): nothing about them can ever be answered."""
    stored = known_symbols(history_dir(st.settings))
    maybe = [s for s in syms if s not in stored]
    if not maybe:
        return []
    try:
        live = await st.bus.are_known(maybe)
    except Exception:  # Redis down: only the store can tell
        live = [False] * len(maybe)
    return [s for s, ok in zip(maybe, live, strict=True) if not ok]


async def _require_known(request: Request, syms: list[str]) -> None:
    await require_known(request.app.state.tp, syms)


async def require_known(st: AppState, syms: list[str]) -> None:
    """A 404 ``unknown_symbol`` naming the symbols nothing can be answered about, if any."""
    unknown = await unknown_symbols(st, syms)
    if unknown:
        raise ApiError(
            404,
            "unknown_symbol",
            "no feed has published and no import has stored these symbols; check the spelling "
            "(symbols are upper case, e.g. AAPL, BTC-USD)",
            symbols=unknown,
        )


def _parse_query(request: Request, fmt: str) -> HistoryQuery:
    qp = request.query_params
    syms, start_ns, end_ns = parse_range(request)
    types = tuple(
        dict.fromkeys(
            t.strip().lower() for t in qp.get("types", "trade,quote").split(",") if t.strip()
        )
    )
    if not types or any(t not in TYPES for t in types):
        raise ApiError(422, "bad_parameter", "types is a comma-separated subset of trade,quote")
    interval = qp.get("interval")
    if interval is not None and interval not in INTERVALS:
        raise ApiError(
            422,
            "bad_parameter",
            f"interval={interval[:16]!r} is unknown; choose one of {', '.join(INTERVALS)}",
            valid=list(INTERVALS),
        )
    enriched = parse_flag("enriched", qp.get("enriched"))
    flagged = qp.get("flagged", "include").lower()
    if flagged not in FLAGGED:
        raise ApiError(
            422,
            "bad_parameter",
            f"flagged={flagged[:16]!r} is not valid: include (default), exclude or only the "
            "ticks a vendor flagged",
            valid=list(FLAGGED),
        )
    limit: int | None = None
    after = None
    if fmt == "json":
        if end_ns - start_ns > MAX_JSON_RANGE_NS:
            raise ApiError(
                422,
                "range_too_large",
                f"JSON answers ranges up to {MAX_JSON_RANGE_NS // 86_400 // 10**9} days; "
                "use format=ndjson or format=arrow to stream a longer range",
            )
        limit = parse_int("limit", qp.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT)
        if qp.get("cursor") and interval is None:
            try:
                after = decode_cursor(qp["cursor"])
            except ValueError as exc:
                raise ApiError(422, "bad_parameter", str(exc)) from None
    if interval is not None:  # bars: one answer, not paged
        limit, after = None, None
        most = -(-(end_ns - start_ns) // INTERVAL_NS[interval]) * len(syms)
        if fmt == "json" and most > MAX_JSON_BARS:
            raise ApiError(
                422,
                "range_too_large",
                f"up to {most:,} bars ({len(syms)} symbols x {interval} over the range) is more "
                f"than JSON answers at once ({MAX_JSON_BARS:,}); use format=ndjson or "
                "format=arrow, a longer interval, or a shorter range",
            )
    q = HistoryQuery(
        syms, start_ns, end_ns, types, enriched, interval, after, limit, flagged=flagged
    )
    raw_fields = qp.get("fields")
    if raw_fields is None:
        return q
    fields = tuple(dict.fromkeys(f.strip() for f in raw_fields.split(",") if f.strip()))
    unknown = [f[:32] for f in fields if f not in q.columns]
    if not fields or unknown:
        kind = "bars" if interval else "enriched ticks" if enriched else "ticks"
        raise ApiError(
            422,
            "bad_parameter",
            f"fields: {', '.join(unknown) or 'none given'} not among the columns of {kind}; "
            f"choose from {', '.join(q.columns)}",
            valid=list(q.columns),
        )
    return dataclasses.replace(q, fields=fields)


def _corrupt(exc: CorruptHistory) -> ApiError:
    return ApiError(
        500,
        "corrupt_history",
        f"a stored history file cannot be read ({exc.detail}); other dates still answer",
        file=str(exc.path),
    )


def _encoder(request: Request, fmt: str, q: HistoryQuery) -> Encoder | None:
    """The body encoder of a streamed format, with the Arrow options asked for (a 422 for an
    option that does not apply to the format)."""
    qp = request.query_params
    dictionary = parse_flag("dictionary", qp.get("dictionary"))
    compression = qp.get("compression", "none").strip().lower()
    if compression not in ("none", *COMPRESSIONS):
        raise ApiError(
            422,
            "bad_parameter",
            f"compression={compression[:16]!r} is unknown; choose one of none, "
            f"{', '.join(COMPRESSIONS)} (Arrow IPC buffer compression)",
            valid=["none", *COMPRESSIONS],
        )
    if fmt != "arrow" and (dictionary or compression != "none"):
        raise ApiError(
            422,
            "bad_parameter",
            "dictionary and compression apply to format=arrow only; leave them out for "
            f"format={fmt}",
        )
    if fmt == "arrow":
        chosen = next((c for c in COMPRESSIONS if c == compression), None)
        return ArrowStream(q.syms, dictionary, chosen)
    if fmt == "ndjson":
        return NdjsonLines()
    if fmt == "csv":
        return CsvRows()
    return None


async def historical(request: Request) -> Response:
    key = require_key(request, "historical")
    fmt = _choose_format(request)
    q = _parse_query(request, fmt)
    encoder = _encoder(request, fmt, q)
    fingerprint = parse_flag("fingerprint", request.query_params.get("fingerprint"))
    if fingerprint and q.interval is not None:
        raise ApiError(422, "bad_parameter", "fingerprint is for ticks, not bars")
    require_entitled(key, q.syms)
    await _require_known(request, q.syms)
    source, unrecorded = await read_source(request, q.end_ns)
    if encoder is not None and not fingerprint:
        # One worker step counts the gaps, opens the query, reads and encodes the first chunk
        # (a corrupt file fails here, before the 200).
        counter = RowCount()
        if fmt in ("ndjson", "csv"):  # the query log's row count, without counting lines
            request.scope[ROWS] = counter
        opened = await _run(_open_stream, source, q, encoder, fmt != "arrow", counter)
        n_gaps, reader, chunks, first_body = opened
        return _Answer(
            lambda started: _stream(first_body, chunks, encoder, reader, started),
            lambda: _close(chunks, reader),
            media_type=MEDIA[fmt],
            headers={GAPS_HEADER: str(n_gaps), TAIL_HEADER: unrecorded},
        )
    # Gaps of the whole range (all types), so a caller knows the answer is not complete.
    n_gaps = await _run(gap_count, source, q.syms, q.start_ns, q.end_ns)
    headers = {GAPS_HEADER: str(n_gaps), TAIL_HEADER: unrecorded}
    if fingerprint:
        whole = dataclasses.replace(q, limit=None, after=None, fields=None)
        body = await _run(fingerprint_range, source, whole)
        return Response(
            orjson.dumps({**body, "gaps": n_gaps}), media_type=MEDIA["json"], headers=headers
        )
    if fmt == "json":
        page = await _run(_json_page, source, q, n_gaps)
        return Response(page, media_type=MEDIA["json"], headers=headers)
    path = await _run(_parquet_file, source, q)
    return _Answer(
        lambda started: _file_chunks(path, started),
        lambda: path.unlink(missing_ok=True),
        media_type=MEDIA["parquet"],
        headers=headers,
    )


def _open_stream(
    source: Source, q: HistoryQuery, encoder: Encoder, ns_ints: bool, counter: RowCount
) -> tuple[int, HistoryReader | MergeReader, Generator[pl.DataFrame, None, None], bytes]:
    """(gap count, the open query, its remaining chunks, the first chunk encoded). With no rows
    the answer still has its columns (CSV header, Arrow schema). ``counter`` counts the rows
    read."""
    n_gaps = gap_count(source, q.syms, q.start_ns, q.end_ns)
    reader = open_reader(source, q)
    chunks = _frames(reader, ns_ints, counter)
    try:
        first = next(chunks, None)
        if first is None:
            first = q.empty(ns_ints=ns_ints)
        return n_gaps, reader, chunks, encoder.encode(first)
    except BaseException:
        _close(chunks, reader)
        raise


class _Answer(StreamingResponse):
    """A streamed answer that frees its query or file even when its body never starts (the
    client went away before the first chunk, so the generator's own ``finally`` never runs).
    The body generators set ``started`` on their first step; once started, they clean up."""

    def __init__(
        self,
        content: Callable[[dict[str, bool]], AsyncIterator[bytes]],
        cleanup: Callable[[], None],
        **kw: Any,
    ) -> None:
        self.started = {"started": False}
        super().__init__(content(self.started), **kw)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.started["started"]:
                await asyncio.to_thread(self._cleanup)


async def gaps(request: Request) -> Response:
    """Holes in stored ``seq`` per (symbol, epoch) and epoch changes in [start, end)."""
    key = require_key(request, "historical")
    syms, start_ns, end_ns = parse_range(request)
    require_entitled(key, syms)
    await _require_known(request, syms)
    source, _unrecorded = await read_source(request, end_ns)
    found, changes = await _run(find_gaps, source, syms, start_ns, end_ns)
    body = {
        "gaps": found,
        "epoch_changes": changes,
        "count": len(found),
        "upstream_gaps": await _upstream_gaps(request.app.state.tp, syms, start_ns, end_ns),
    }
    return Response(orjson.dumps(body), media_type=MEDIA["json"])


async def _upstream_gaps(
    tp: AppState, syms: list[str], start_ns: int, end_ns: int
) -> list[dict[str, Any]] | None:
    """Holes in venues' own trade ids that live sources found in the range (each marked
    ``upstream``), from the last ``UPSTREAM_GAPS_KEPT`` kept in Redis; None if Redis is down."""
    wanted = set(syms)
    try:
        found = await tp.bus.upstream_gaps(start_ns, end_ns, UPSTREAM_GAPS_KEPT)
    except (RedisError, OSError):
        return None
    return [
        {k: v for k, v in g.items() if k not in ("type", "code", "message")} | {"upstream": True}
        for g in found
        if g["sym"] in wanted
    ]


async def read_source(request: Request, end_ns: int) -> tuple[Source, str]:
    """A snapshot of the store plus, when the range reaches past it, the log entries the recorder
    has not stored yet; and what to say about them in ``X-Tickpipe-Unrecorded``."""
    return await source_for(request.app.state.tp, end_ns)


async def source_for(tp: AppState, end_ns: int) -> tuple[Source, str]:
    """``read_source`` for a caller that is not a Starlette request (MCP)."""
    source = await asyncio.to_thread(
        Source.of,
        history_dir(tp.settings),
        tp.settings.history_query_memory_mb,
        tp.settings.history_cache_mb,
        tp.settings.history_merge,
    )
    logs = tp.bus.layout.logs
    if not source.needs_tail(end_ns, [name for name, _key in logs]):
        return source, "0"
    cap = tp.settings.history_tail_max_batches
    try:
        # Each log from its own high-water mark (one log standalone, one per slot group on a
        # cluster; the pipeline sends each read to the node that holds it).
        async with tp.redis.pipeline(transaction=False) as pipe:
            for name, key in logs:
                ms, n = source.snapshot.high_water_of(name)
                pipe.xrange(key, min=f"({ms}-{n}", max="+", count=cap + 1)
            replies = await pipe.execute()
    except Exception:  # Redis down: answer from the store, and say so
        return source, "unavailable"
    per_log = [
        (stream_entries(reply)[:cap], source.snapshot.high_water_of(name))
        for (name, _key), reply in zip(logs, replies, strict=True)
    ]
    more = any(len(stream_entries(reply)) > cap for reply in replies)
    source.tail = await asyncio.to_thread(logs_frame, per_log)
    return source, f"{source.tail.height}{'+' if more else ''}"


async def run_query(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in a worker thread; a stored file that cannot be read is a 500
    ``corrupt_history`` (REST and MCP)."""
    return await _run(fn, *args)


async def _run(fn: Callable[..., R], *args: Any) -> R:
    try:
        return await asyncio.to_thread(fn, *args)
    except CorruptHistory as exc:
        raise _corrupt(exc) from None
    except (OSError, duckdb.IOException, duckdb.OutOfMemoryException) as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: Exception) -> ApiError:
    """A query that ran out of disk (a Parquet answer or a sort's spill files are written to
    ``<data_dir>/tmp``) or of memory: a 503 that says which, and what to do."""
    text = str(exc)
    inner = re.search(r'"exception_message":"((?:[^"\\]|\\.)*)"', text)  # DuckDB's own words
    detail = orjson.loads(f'"{inner[1]}"') if inner else text.splitlines()[0] if text else ""
    if isinstance(exc, duckdb.OutOfMemoryException):
        what = "out of memory for this query (history_query_memory_mb)"
        todo = "ask for a shorter range or fewer symbols, or retry later"
    elif getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
        what = "disk full"
        todo = (
            "free space in the data dir's tmp/, or ask for format=arrow or ndjson (streamed, "
            "no temporary file)"
        )
    else:
        what = "the answer could not be written"
        todo = "retry later; the server log has the details"
        log.error("history query failed: %s", text)
    return ApiError(503, "unavailable", f"{what}: {detail[:300]}; {todo}")


def _frames(
    reader: HistoryReader | MergeReader, ns_ints: bool, counter: RowCount | None = None
) -> Generator[pl.DataFrame, None, None]:
    for frame in reader.chunks(CHUNK_ROWS, ns_ints=ns_ints):
        if counter is not None:
            counter.n += frame.height
        yield frame


def _json_page(source: Source, q: HistoryQuery, gap_count: int) -> bytes:
    reader = open_reader(source, q)
    try:
        frames = list(reader.chunks(MAX_LIMIT, project=False))
    finally:
        reader.close()
    frame = pl.concat(frames) if frames else pl.DataFrame()
    cursor = None
    if q.limit is not None and frame.height == q.limit:
        last = frame.row(-1, named=True)
        cursor = encode_cursor(last["ts"], last["seq"], last["sym"])
    if q.fields is not None and frame.height:
        frame = frame.select(q.fields)
    rows = frame.write_json().encode() if frame.height else b"[]"
    tail = orjson.dumps({"count": frame.height, "next_cursor": cursor, "gaps": gap_count})
    return b'{"rows":' + rows + b"," + tail[1:]


def _parquet_file(source: Source, q: HistoryQuery) -> Path:
    spill = source.spill_dir
    if spill is not None:
        spill.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="tickpipe-history-", suffix=".parquet", dir=spill)
    os.close(fd)
    path = Path(name)
    reader = HistoryReader(source, q)
    try:
        reader.copy_parquet(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return path


async def _file_chunks(path: Path, started: dict[str, bool]) -> AsyncIterator[bytes]:
    started["started"] = True
    fh = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, 1 << 20):
            yield chunk
    finally:
        fh.close()
        await asyncio.to_thread(path.unlink, True)


def _encode_next(chunks: Generator[pl.DataFrame, None, None], encoder: Encoder) -> bytes | None:
    frame = next(chunks, None)
    return None if frame is None else encoder.encode(frame)


async def _stream(
    first: bytes,
    chunks: Generator[pl.DataFrame, None, None],
    encoder: Encoder,
    reader: HistoryReader | MergeReader,
    started: dict[str, bool],
) -> AsyncIterator[bytes]:
    """The encoded first chunk, then the others: the next one is read and encoded in a worker
    thread while this one is being sent."""
    started["started"] = True
    ahead: asyncio.Future[bytes | None] | None = None
    try:
        body: bytes | None = first
        while body is not None:
            ahead = asyncio.ensure_future(asyncio.to_thread(_encode_next, chunks, encoder))
            yield body
            body = await asyncio.shield(ahead)  # a cancelled request lets it finish
            ahead = None
        yield encoder.encode(None)
    finally:
        if ahead is not None and not ahead.done():
            # Cancelled while a worker still reads: close when it is done, not under it.
            ahead.add_done_callback(lambda done: _close(chunks, reader, done))
        else:
            _close(chunks, reader, ahead)


def _close(
    chunks: Generator[pl.DataFrame, None, None],
    reader: HistoryReader | MergeReader,
    done: asyncio.Future[bytes | None] | None = None,
) -> None:
    if done is not None and not done.cancelled():
        done.exception()  # retrieved: a request that went away needs no error
    with contextlib.suppress(Exception):
        chunks.close()
    reader.close()
