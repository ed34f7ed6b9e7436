"""Catch-up: every event of some symbols after a seq each, then live, with no hole and no repeat.

kdb+'s ``r.q`` replays the tickerplant log, then subscribes. tickpipe does the same, in this one
place, for the two requests that need it: a ``subscribe`` with ``from_seq``
(``server.catchup.resume``) and the hand-over of a ``then_live`` replay (``server.replay``). The
caller subscribes the symbols with live delivery held (``Hub.subscribe``), then a ``Backlog``:

1. reads Redis' recent events of each symbol after its seq (``tp:hist:S``, up to now);
2. where those no longer reach back, reads the seqs before them from a snapshot of the store
   and from the tickerplant log entries the recorder has not stored yet (those above the
   snapshot's high-water mark, ``server.history.query.Source``), the same join REST history
   makes;
3. queues it all in order under the connection's replay budget (``Subscriber.wait_room``),
   announcing in-band (``gap``) only seqs that none of the three holds;
4. releases live delivery, dropping every seq it already queued (``Subscriber.release``).

A tick is in exactly one of the store snapshot and the unrecorded log, and Redis' recent events
begin where the other two are asked to end, so each seq comes once.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from server import wire
from server.history.query import TICK_COLUMNS, Source, parquet_source
from server.history.store import LogId, Snapshot, history_dir
from server.history.tail import tail_frame
from server.live.bus import stream_entries
from server.live.subscriber import MASKS
from tickpipe.fingerprint import Fingerprint, canonical_event, canonical_line

if TYPE_CHECKING:
    from server.config import Settings
    from server.live.bus import Bus
    from server.live.subscriber import Subscriber

# A tick: (sym, type, ts, epoch, seq, ...), ts in integer ns; then the rest of the stored row
# (``server.history.store.SCHEMA`` order), or for one read from Redis its JSON as published.
Row = tuple[Any, ...]
_Item = tuple[tuple[Any, ...], str, Row]  # (sort key, source, row)
SLICE_EVENTS = 256  # most events queued in one go
CHUNK_ROWS = 20_000
SOURCES = ("store", "log", "redis")
_NO_SINCE = -(2**62)


@dataclass(frozen=True)
class Sources:
    """Where a backlog comes from: Redis (recent events, the tickerplant log) and the store,
    read with the process's one history database (``history_query_memory_mb``)."""

    bus: Bus
    root: Path
    memory_mb: int
    log_page: int  # log entries per read of the unrecorded log
    merge: bool  # raw ticks from the merge of the sorted files (``history_merge``)

    @classmethod
    def of(cls, bus: Bus, settings: Settings) -> Sources:
        return cls(
            bus,
            history_dir(settings),
            settings.history_query_memory_mb,
            settings.history_tail_max_batches,
            settings.history_merge,
        )

    def snapshot(self) -> Source:
        """The store as it is now (blocking: call it in a worker thread)."""
        return Source.of(self.root, self.memory_mb, merge=self.merge)


@dataclass(frozen=True, slots=True)
class Want:
    """One symbol to catch up: its events of ``epoch`` with seq > ``after``. With ``since_ns``
    the seq before is not known (a replay's range held nothing of this epoch: ``after`` is 0),
    so only events at or after ``since_ns`` are wanted and no gap is announced before the first
    of them."""

    epoch: int
    after: int
    since_ns: int | None = None


@dataclass(frozen=True, slots=True)
class _Need:
    """Seqs of one symbol to read from the store and the log: after < seq < before."""

    epoch: int
    after: int
    before: int
    since_ns: int


class Backlog:
    """The events of ``wants`` after each one's seq, from the store, the unrecorded log and
    Redis; ``open`` reads where they are, ``queue`` sends them, ``release`` goes live.

    ``close`` ends each event (``'}'``; a replay's ``',"replay":"r1"}'``), ``mask`` picks the
    types sent (seq gaps are judged on all types), ``by_time`` merges symbols in (ts, seq, sym)
    order (a replay) instead of seq order per symbol, and ``fingerprint`` gets every tick sent.
    """

    def __init__(
        self,
        sources: Sources,
        wants: dict[str, Want],
        *,
        rid: Any,
        mask: int,
        close: str = "}",
        by_time: bool = False,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        self.sources = sources
        self.wants = wants
        self.rid = rid
        self.mask = mask
        self.close_text = close
        self.by_time = by_time
        self.fp = fingerprint
        # The last seq covered per symbol: live continues after it.
        self.last: dict[str, int] = {sym: w.after for sym, w in wants.items()}
        # Ticks queued per symbol and source.
        self.sent: dict[str, dict[str, int]] = {sym: dict.fromkeys(SOURCES, 0) for sym in wants}
        self._recent: dict[str, list[Row]] = {}
        self._log: list[Row] = []
        self._store: _StoredRows | None = None
        self._store_first: dict[str, int] = {}

    @property
    def _key(self) -> Callable[[Row], tuple[Any, ...]]:
        return _time_key if self.by_time else _seq_key

    async def open(self) -> None:
        """Find the backlog: Redis first (it reaches up to now), then the store and the log for
        the seqs before the oldest event Redis still holds."""
        need: dict[str, _Need] = {}
        for sym, w in self.wants.items():
            rows = await recent_rows(self.sources.bus, sym, w.epoch, w.after)
            if not rows:  # Redis holds an epoch's newest events: none after ``after`` exist
                continue
            first = next(r[4] for r in rows if r[1] != "status")
            if first > w.after + 1:
                need[sym] = _Need(w.epoch, w.after, first, _since(w))
            self._recent[sym] = [r for r in rows if w.since_ns is None or r[2] >= w.since_ns]
        if not need:
            return
        snap = await asyncio.to_thread(self.sources.snapshot)
        self._store = await asyncio.to_thread(_StoredRows, snap, need, self.by_time)
        spans = await asyncio.to_thread(self._store.spans)
        self._store_first = {sym: first for sym, (first, _last) in spans.items()}
        # The log only for symbols the store does not cover up to where Redis takes over.
        short = {s: n for s, n in need.items() if s not in spans or spans[s][1] < n.before - 1}
        if short:
            self._log = await self._unrecorded(snap.snapshot, short)

    def first(self, sym: str) -> int | None:
        """The first seq of ``sym`` this backlog holds (after ``open``), if any."""
        found = [self._store_first.get(sym)]
        found += [next((r[4] for r in self._log if r[0] == sym), None)]
        found += [next((r[4] for r in self._recent.get(sym, []) if r[1] != "status"), None)]
        seqs = [s for s in found if s is not None]
        return min(seqs) if seqs else None

    async def queue(self, sub: Subscriber, room: int) -> None:
        """Queue every event in order, a slice at a time while the connection has room; a seq
        that none of the sources holds goes in-band as a ``gap`` before the event after it.
        Each part is merged and encoded in a worker thread."""
        known = {sym: w.since_ns is None for sym, w in self.wants.items()}
        async for stored, rest in self._parts():
            texts, lines, stamps = await asyncio.to_thread(self._encode, stored, rest, known)
            for k in range(0, len(texts), SLICE_EVENTS):
                await sub.wait_room(room)
                if sub.close_code is not None:
                    return
                sub.send_raw(",".join(texts[k : k + SLICE_EVENTS]))
            if self.fp is not None and lines:
                self.fp.add_lines(lines, stamps[0], stamps[-1])

    def _encode(
        self, stored: list[Row], rest: list[_Item], known: dict[str, bool]
    ) -> tuple[list[str], list[str], list[int]]:
        """The events of one part in order (stored rows merged with log and Redis rows), with
        the fingerprint lines and ts of the ticks among them; advances ``last``."""
        key, last, wanted, close, fp = self._key, self.last, self.mask, self.close_text, self.fp
        texts: list[str] = []
        lines: list[str] = []
        stamps: list[int] = []
        # Keys are unique (one seq per symbol), so merging never compares further.
        for _key, source, row in heapq.merge([(key(r), "store", r) for r in stored], rest):
            if row[1] == "status":  # an upstream gap, right before the tick after its hole
                texts.append(row[5])
                continue
            sym, seq = row[0], row[4]
            if known[sym] and seq > last[sym] + 1:
                texts.append(wire.gap_event(self.rid, sym, row[3], last[sym] + 1, seq - 1))
            known[sym] = True
            last[sym] = seq
            if not MASKS.get(row[1], 0) & wanted:
                continue
            self.sent[sym][source] += 1
            if source == "redis":  # as published: only the epoch (and close) is added
                text = f'{row[5][:-1]},"epoch":{row[3]}{close}'
                texts.append(text)
                if fp is not None:
                    lines.append(canonical_event(orjson.loads(text)))
            else:
                texts.append(wire.row_event(row, close))
                if fp is not None:
                    lines.append(canonical_line(*row[:14]))
            if fp is not None:
                stamps.append(row[2])
        return texts, lines, stamps

    def release(self, sub: Subscriber, syms: Iterable[str]) -> None:
        """Let live events of ``syms`` flow again, after the last seq this backlog covered."""
        if sub.close_code is not None:
            return
        for sym in syms:
            sub.release(sym, self.last.get(sym, 0), sub.symbols.get(sym, self.mask))

    async def close(self) -> None:
        if self._store is not None:
            await asyncio.shield(asyncio.to_thread(self._store.close))

    def count(self, sym: str) -> int:
        return sum(self.sent[sym].values())

    async def _parts(self) -> AsyncIterator[tuple[list[Row], list[_Item]]]:
        """The backlog in ordered parts: a chunk of stored rows and the log and Redis rows
        (as sort key, source, row) that sort before it ends; then the rest of those."""
        key = self._key
        rest, keys = await asyncio.to_thread(self._rest)
        i = 0
        if self._store is not None:
            while chunk := await asyncio.to_thread(self._store.next_chunk):
                j = bisect.bisect_right(keys, key(chunk[-1]), lo=i)
                yield chunk, rest[i:j]
                i = j
        for k in range(i, len(rest), CHUNK_ROWS):
            yield [], rest[k : k + CHUNK_ROWS]

    def _rest(self) -> tuple[list[_Item], list[tuple[Any, ...]]]:
        """The log and Redis rows as (sort key, source, row) in order, and their keys."""
        key = self._key
        rest: list[_Item] = [(key(r), "log", r) for r in self._log]
        rest += [(key(r), "redis", r) for rows in self._recent.values() for r in rows]
        rest.sort(key=lambda item: item[0])
        return rest, [item[0] for item in rest]

    async def _unrecorded(self, snapshot: Snapshot, need: dict[str, _Need]) -> list[Row]:
        """Rows of ``need`` from the log entries above each log's high-water mark (not in the
        snapshot), read a page at a time until each symbol reached the seq where Redis takes
        over. Only the logs of the needed symbols are read (one per slot group on a cluster)."""
        layout = self.sources.bus.layout
        by_log: dict[tuple[str, str], dict[str, _Need]] = {}
        for sym, n in need.items():
            by_log.setdefault(layout.log_of(sym), {})[sym] = n
        rows: list[Row] = []
        for (name, key), needed in by_log.items():
            rows += await self._unrecorded_of(key, snapshot.high_water_of(name), needed)
        return sorted(rows, key=self._key)

    async def _unrecorded_of(
        self, key: str, high_water: LogId, need: dict[str, _Need]
    ) -> list[Row]:
        redis, page = self.sources.bus.redis, self.sources.log_page
        start = f"({high_water[0]}-{high_water[1]}"
        rows: list[Row] = []
        open_syms = set(need)
        while open_syms:
            entries = stream_entries(await redis.xrange(key, min=start, max="+", count=page))
            if not entries:
                break
            found = await asyncio.to_thread(_log_rows, entries, high_water, need)
            rows += found
            for row in found:
                if row[4] >= need[row[0]].before - 1:
                    open_syms.discard(row[0])
            if len(entries) < page:
                break
            start = "(" + entries[-1][0].decode()
        return rows


async def recent_rows(bus: Bus, sym: str, epoch: int, after: int) -> list[Row]:
    """Every tick of ``sym`` with seq > ``after`` still in Redis' recent history, in order,
    as (sym, type, ts, epoch, seq, event JSON); Redis holds the live epoch only. A live
    source's upstream gap before one of them comes as a row of type ``status`` just before it
    (its ts, its seq less a half: it sorts right before it)."""
    out: list[Row] = []
    cursor = after
    while True:
        new: list[Row] = []
        gaps: list[str] = []
        for fragment in await bus.history(sym, cursor):
            for ev in wire.split_events(fragment.decode()):
                seq = wire.event_seq(ev)
                if seq is None:
                    if wire.is_upstream_gap(ev):
                        gaps.append(ev)
                    continue
                if seq > cursor:
                    ts = _event_ts(ev)
                    new.extend((sym, "status", ts, epoch, seq - 0.5, gap) for gap in gaps)
                    new.append((sym, wire.event_type(ev), ts, epoch, seq, ev))
                gaps = []
        if not new:
            return out
        out.extend(new)
        cursor = new[-1][4]


async def earliest(sources: Sources, sym: str, epoch: int) -> int | None:
    """The lowest seq of ``sym`` in ``epoch`` that the store or Redis still holds."""
    oldest = await sources.bus.history(sym, 0, count=1)
    first_recent = wire.event_seq(oldest[0].decode()) if oldest else None
    stored = await asyncio.to_thread(_stored_earliest, sources, sym, epoch)
    found = [s for s in (stored, first_recent) if s is not None]
    return min(found) if found else None


def _time_key(row: Row) -> tuple[Any, ...]:
    return (row[2], row[4], row[0])


def _seq_key(row: Row) -> tuple[Any, ...]:
    return (row[0], row[4])


def _since(w: Want) -> int:
    return _NO_SINCE if w.since_ns is None else w.since_ns


def _event_ts(event: str) -> int:
    """The ``ts`` of a published tick event (every one has it, as an integer)."""
    i = event.index('"ts":') + 5
    j = i + 1
    while j < len(event) and event[j].isdigit():
        j += 1
    return int(event[i:j])


def _log_rows(
    entries: list[tuple[bytes, dict[bytes, bytes]]], high_water: LogId, need: dict[str, _Need]
) -> list[Row]:
    frame = tail_frame(entries, high_water)
    if not frame.height:
        return []
    bounds = pl.DataFrame(
        {
            "sym": list(need),
            "epoch": [n.epoch for n in need.values()],
            "_after": [n.after for n in need.values()],
            "_before": [n.before for n in need.values()],
            "_since": [n.since_ns for n in need.values()],
        },
        schema={"sym": pl.Utf8(), "epoch": pl.Int64(), "_after": pl.Int64(),
                "_before": pl.Int64(), "_since": pl.Int64()},
    )  # fmt: skip
    ts = pl.col("ts").cast(pl.Int64)
    picked = (
        frame.join(bounds, on=["sym", "epoch"])
        .filter(
            (pl.col("seq") > pl.col("_after"))
            & (pl.col("seq") < pl.col("_before"))
            & (ts >= pl.col("_since"))
        )
        .with_columns(ts)
        .select(frame.columns)
    )
    return picked.rows()


def _stored_earliest(sources: Sources, sym: str, epoch: int) -> int | None:
    snap = sources.snapshot()
    files = snap.snapshot.paths(_epoch_start_ns(epoch), _far_ns())
    if not files:
        return None
    con = snap.cursor()
    try:
        row = con.execute(
            f"SELECT min(seq) FROM {parquet_source(files)} WHERE sym = ? AND epoch = ?",
            [sym, epoch],
        ).fetchone()
    finally:
        con.close()
    return None if row is None else row[0]


def _epoch_start_ns(epoch: int) -> int:
    """An epoch is Redis' clock in ms when the sequence started: no tick of it is older (the
    partition of the day before is read too, for clocks that disagree)."""
    return epoch * 10**6 if epoch > 0 else 0


def _far_ns() -> int:
    return time.time_ns() + 2 * 86_400 * 10**9


class _StoredRows:
    """Stored rows of each symbol of ``need`` in (after, before), in order, in chunks
    (``next_chunk`` in a worker thread; ``close`` from any thread)."""

    def __init__(self, source: Source, need: dict[str, _Need], by_time: bool) -> None:
        lo = min(max(_epoch_start_ns(n.epoch), n.since_ns) for n in need.values())
        self.files = source.snapshot.paths(lo, _far_ns())
        self.con = source.cursor()
        self._lock = threading.Lock()
        self._cur: Any = None
        src = parquet_source(self.files)
        columns = TICK_COLUMNS.replace("ts,", "epoch_ns(ts) AS ts,", 1)
        self._from = f"""
            FROM {src} JOIN (
                SELECT unnest(?::VARCHAR[]) AS w_sym, unnest(?::BIGINT[]) AS w_epoch,
                       unnest(?::BIGINT[]) AS w_after, unnest(?::BIGINT[]) AS w_before,
                       unnest(?::BIGINT[]) AS w_since
            ) ON sym = w_sym AND epoch = w_epoch
            WHERE sym IN (SELECT unnest(?::VARCHAR[])) AND seq > w_after AND seq < w_before
              AND epoch_ns(ts) >= w_since"""
        syms = list(need)
        self._params = [
            syms,
            [n.epoch for n in need.values()],
            [n.after for n in need.values()],
            [n.before for n in need.values()],
            [n.since_ns for n in need.values()],
            syms,
        ]
        order = "ts, seq, sym" if by_time else "sym, seq"
        self._sql = f"SELECT {columns} {self._from} ORDER BY {order}"

    def spans(self) -> dict[str, tuple[int, int]]:
        """The first and last stored seq per symbol in its range."""
        if not self.files:
            return {}
        with self._lock:
            rows = self.con.execute(
                f"SELECT sym, min(seq), max(seq) {self._from} GROUP BY sym", self._params
            ).fetchall()
        return {sym: (first, last) for sym, first, last in rows}

    def next_chunk(self) -> list[Row]:
        if not self.files:
            return []
        with self._lock:
            if self._cur is None:
                self._cur = self.con.execute(self._sql, self._params)
            rows: list[Row] = self._cur.fetchmany(CHUNK_ROWS)
            return rows

    def close(self) -> None:
        with self._lock:
            self.con.close()
