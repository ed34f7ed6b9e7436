"""``GET /ticks/historical``: stored ticks, enriched ticks or bars as JSON, NDJSON, CSV, Parquet
or Arrow IPC, for a key with the ``historical`` scope; ``GET /ticks/gaps``: where stored ``seq``
is not contiguous in a range.

Queries run in a worker thread (``server.history``); NDJSON, CSV and Arrow stream chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.api.errors import ApiError, require_key
from server.api.ticks import parse_symbols
from server.auth import ApiKey
from server.bus import LOG_KEY
from server.history import (
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
    tail_frame,
)
from server.replay import fingerprint_range
from server.store import history_dir, stored_symbols

if TYPE_CHECKING:
    from server.api.app import AppState

_Encoder = Callable[[pl.DataFrame | None, dict[str, object]], bytes]
MAX_HISTORICAL_SYMBOLS = 1000
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
# JSON pages hold their rows in memory; longer ranges should use a streaming format.
MAX_JSON_RANGE_NS = 31 * 86_400 * 10**9
CHUNK_ROWS = 50_000
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


def parse_time(name: str, raw: str | None) -> int:
    """ISO-8601 (naive means UTC) or integer ns -> integer ns UTC, or a 422 saying why not."""
    if raw is None or not raw.strip():
        raise ApiError(
            422, "bad_parameter", f"{name} is required: ISO-8601 (e.g. 2026-01-02T14:30:00Z) or ns"
        )
    raw = raw.strip()
    if raw.lstrip("-").isdigit():
        ns = int(raw)
        if abs(ns) >= 2**63 - 86_400 * 10**9:
            raise ApiError(422, "bad_parameter", f"{name} is out of range for nanoseconds")
        return ns
    try:
        # An unescaped "+01:00" in a query string arrives as " 01:00".
        if "T" in raw and raw.count(" ") == 1:
            raw = raw.replace(" ", "+")
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            422,
            "bad_parameter",
            f"{name}={raw[:64]!r} is not a time: use ISO-8601 (e.g. 2026-01-02T14:30:00Z, "
            "naive means UTC) or integer nanoseconds since the epoch",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    ns = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if abs(ns) >= 2**63 - 86_400 * 10**9:
        raise ApiError(
            422, "bad_parameter", f"{name}={raw[:64]!r} is out of range (years 1678 to 2262)"
        )
    return ns


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


def _require_entitled(key: ApiKey, syms: list[str]) -> None:
    denied = [s for s in syms if not key.allows(s)]
    if denied:
        raise ApiError(
            403, "not_entitled", f"key {key.name!r} may not see these symbols", symbols=denied
        )


async def unknown_symbols(st: AppState, syms: list[str]) -> list[str]:
    """The symbols no feed ever published (Redis ``tp:symbols``) and the store never held
    (``history/symbols.txt``): nothing about them can ever be answered."""
    stored = await asyncio.to_thread(stored_symbols, history_dir(st.settings))
    maybe = [s for s in syms if s not in stored]
    if not maybe:
        return []
    try:
        live = await st.bus.are_known(maybe)
    except Exception:  # Redis down: only the store can tell
        live = [False] * len(maybe)
    return [s for s, ok in zip(maybe, live, strict=True) if not ok]


async def _require_known(request: Request, syms: list[str]) -> None:
    unknown = await unknown_symbols(request.app.state.tp, syms)
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
    enriched = qp.get("enriched", "false").lower() in ("1", "true", "yes")
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
        try:
            limit = int(qp.get("limit", DEFAULT_LIMIT))
        except ValueError:
            raise ApiError(422, "bad_parameter", "limit is an integer") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(422, "bad_parameter", f"limit is between 1 and {MAX_LIMIT}")
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
    q = HistoryQuery(syms, start_ns, end_ns, types, enriched, interval, after, limit)
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


async def historical(request: Request) -> Response:
    key = require_key(request, "historical")
    fmt = _choose_format(request)
    q = _parse_query(request, fmt)
    _require_entitled(key, q.syms)
    await _require_known(request, q.syms)
    source, unrecorded = await read_source(request, q.end_ns)
    # Gaps of the whole range (all types), so a caller knows the answer is not complete.
    found, _changes = await _run(find_gaps, source, q.syms, q.start_ns, q.end_ns)
    headers = {GAPS_HEADER: str(len(found)), TAIL_HEADER: unrecorded}
    if request.query_params.get("fingerprint", "false").lower() in ("1", "true", "yes"):
        if q.interval is not None:
            raise ApiError(422, "bad_parameter", "fingerprint is for ticks, not bars")
        whole = dataclasses.replace(q, limit=None, after=None, fields=None)
        body = await _run(fingerprint_range, source, whole)
        return Response(
            orjson.dumps({**body, "gaps": len(found)}), media_type=MEDIA["json"], headers=headers
        )
    if fmt == "json":
        body = await _run(_json_page, source, q, len(found))
        return Response(body, media_type=MEDIA["json"], headers=headers)
    if fmt == "parquet":
        path = await _run(_parquet_file, source, q)
        return _Answer(
            lambda started: _file_chunks(path, started),
            lambda: path.unlink(missing_ok=True),
            media_type=MEDIA["parquet"],
            headers=headers,
        )
    encode = {"ndjson": _ndjson, "csv": _csv, "arrow": _arrow}[fmt]
    reader = await _run(HistoryReader, source, q)
    chunks = _frames(reader, ns_ints=fmt != "arrow")
    try:
        first = await _run(next, chunks, None)  # a corrupt file fails here, before the 200
    except BaseException:
        await asyncio.to_thread(_close, chunks, reader)
        raise
    return _Answer(
        lambda started: _stream(first, chunks, encode, reader, started),
        lambda: _close(chunks, reader),
        media_type=MEDIA[fmt],
        headers=headers,
    )


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
    _require_entitled(key, syms)
    await _require_known(request, syms)
    source, _unrecorded = await read_source(request, end_ns)
    found, changes = await _run(find_gaps, source, syms, start_ns, end_ns)
    body = {"gaps": found, "epoch_changes": changes, "count": len(found)}
    return Response(orjson.dumps(body), media_type=MEDIA["json"])


async def read_source(request: Request, end_ns: int) -> tuple[Source, str]:
    """A snapshot of the store plus, when the range reaches past it, the log entries the recorder
    has not stored yet; and what to say about them in ``X-Tickpipe-Unrecorded``."""
    tp = request.app.state.tp
    source = await asyncio.to_thread(
        Source.of, history_dir(tp.settings), tp.settings.history_query_memory_mb
    )
    if not source.needs_tail(end_ns):
        return source, "0"
    cap = tp.settings.history_tail_max_batches
    try:
        entries = await tp.redis.xrange(LOG_KEY, min=source.tail_after, max="+", count=cap + 1)
    except Exception:  # Redis down: answer from the store, and say so
        return source, "unavailable"
    more = len(entries) > cap
    source.tail = await asyncio.to_thread(tail_frame, entries[:cap], source.snapshot.high_water)
    return source, f"{source.tail.height}{'+' if more else ''}"


async def _run(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.to_thread(fn, *args)
    except CorruptHistory as exc:
        raise _corrupt(exc) from None


def _frames(reader: HistoryReader, ns_ints: bool) -> Iterator[pl.DataFrame]:
    yield from reader.chunks(CHUNK_ROWS, ns_ints=ns_ints)


def _json_page(source: Source, q: HistoryQuery, gap_count: int) -> bytes:
    reader = HistoryReader(source, q)
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


def _encode_next(
    chunks: Iterator[pl.DataFrame], encode: _Encoder, state: dict[str, object]
) -> bytes | None:
    frame = next(chunks, None)
    return None if frame is None else encode(frame, state)


async def _stream(
    first: pl.DataFrame | None,
    chunks: Iterator[pl.DataFrame],
    encode: _Encoder,
    reader: HistoryReader,
    started: dict[str, bool],
) -> AsyncIterator[bytes]:
    """Encoded chunks; the next one is read and encoded in a worker thread while this one is
    being sent."""
    started["started"] = True
    state: dict[str, object] = {}
    ahead: asyncio.Future[bytes | None] | None = None
    try:
        if first is not None:
            body: bytes | None = await asyncio.to_thread(encode, first, state)
            while body is not None:
                ahead = asyncio.ensure_future(
                    asyncio.to_thread(_encode_next, chunks, encode, state)
                )
                yield body
                body = await asyncio.shield(ahead)  # a cancelled request lets it finish
                ahead = None
        yield encode(None, state)
    finally:
        if ahead is not None and not ahead.done():
            # Cancelled while a worker still reads: close when it is done, not under it.
            ahead.add_done_callback(lambda done: _close(chunks, reader, done))
        else:
            _close(chunks, reader, ahead)


def _close(
    chunks: Iterator[pl.DataFrame],
    reader: HistoryReader,
    done: asyncio.Future[bytes | None] | None = None,
) -> None:
    if done is not None and not done.cancelled():
        done.exception()  # retrieved: a request that went away needs no error
    with contextlib.suppress(Exception):
        chunks.close()  # type: ignore[attr-defined]
    reader.close()


def _ndjson(frame: pl.DataFrame | None, state: dict[str, object]) -> bytes:
    if frame is None:
        return b""
    buf = io.BytesIO()
    frame.write_ndjson(buf)
    return buf.getvalue()


def _csv(frame: pl.DataFrame | None, state: dict[str, object]) -> bytes:
    if frame is None:
        return b""
    header = "header" not in state
    state["header"] = True
    return frame.write_csv(include_header=header).encode()


# An Arrow IPC stream is one schema message, then record batches, then an end marker. Polars
# writes a whole stream per frame, so each chunk keeps only its record batches.
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _arrow(frame: pl.DataFrame | None, state: dict[str, object]) -> bytes:
    if frame is None:
        if "schema" not in state:  # no rows at all: still a valid, empty stream
            buf = io.BytesIO()
            pl.DataFrame().write_ipc_stream(buf)
            return buf.getvalue()
        return _EOS
    buf = io.BytesIO()
    frame.write_ipc_stream(buf, compat_level=pl.CompatLevel.oldest())
    stream = buf.getvalue()
    assert stream.endswith(_EOS)
    stream = stream[: -len(_EOS)]
    if "schema" in state:
        (meta_len,) = struct.unpack_from("<i", stream, 4)
        return stream[8 + meta_len :]
    state["schema"] = True
    return stream
