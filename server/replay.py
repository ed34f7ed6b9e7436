"""Replays: stored events of a range streamed to one WebSocket, paced on a virtual clock.

* Reading: the range is read window by window (``HistoryReader`` in a worker thread, one window
  at a time), so memory stays bounded whatever the range, and the first event leaves after one
  small query. Windows are disjoint in ``ts`` and each is sorted by (ts, seq, sym): the merge
  across symbols holds over the whole range.
* Memory of a connection: its replays share one ``ReadBudget``: together they aim at
  ``replay_conn_rows`` rows held (each window at most ``replay_window_rows``), and at most
  ``QUERIES_PER_CONN`` of their history queries run at once, however many replays it starts.
* Pacing: an event is due when the virtual clock (market time = anchor + wall time x speed)
  reaches its ``ts``; ``max`` sends as fast as the client reads. Events enter the connection's
  buffer only while it holds less than ``replay_buffer_bytes``: a client that cannot keep up slows
  the replay (``status`` ``replay_slowed``) instead of the server buffering without limit.
* Gaps: all types are read, so a jump in ``seq`` within an epoch is a recorded gap, announced
  in-band (``gap``) before the event after it, whatever ``types`` the client asked for.
* ``then_live``: after the stored range, live delivery starts held (see ``Subscriber.hold``),
  the events after the last stored seq are caught up from the store, the unrecorded log and
  Redis (``server.catchup.backlog``), and live is released dropping every seq already sent:
  contiguous seq per symbol across the hand-over (``caught_up``).
* ``replay_done`` carries the count, first/last ts and the fingerprint (``tickpipe.fingerprint``)
  of every tick sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
from redis.exceptions import RedisError

from server import wire
from server.catchup.backlog import SLICE_EVENTS, Backlog, Sources, Want
from server.history.events import fingerprint_lines, tick_events
from server.history.merge import MergeReader, Wanted, fits_rows, open_reader, parts_of
from server.history.query import (
    ENRICHED_COLUMNS,
    TYPES,
    CorruptHistory,
    HistoryQuery,
    HistoryReader,
    Source,
)
from server.live.hub import RedisUnavailable
from server.live.subscriber import MASKS
from tickpipe.fingerprint import Fingerprint, canonical_line

if TYPE_CHECKING:
    from server.live.hub import Hub
    from server.live.subscriber import Subscriber

# Where an enriched row holds its aggressor (after the stored columns and the derived ones).
AGGRESSOR_AT = ENRICHED_COLUMNS.index("aggressor")

log = logging.getLogger("tickpipe.replay")

MAX_SPEED = 1_000_000.0
DAY_NS = 86_400 * 10**9
MIN_WINDOW_NS = 10**9
FIRST_WINDOW_NS = MIN_WINDOW_NS  # then x4 per window at most: dense data never starts big
MAX_WINDOW_NS = DAY_NS
CHUNK_ROWS = 20_000
MIN_WINDOW_ROWS = 1_000
QUERIES_PER_CONN = 2  # history queries of one connection's replays running at once
BEHIND_S = 1.0  # wall seconds behind the virtual clock before the replay slows and says so
SLOWED_EVERY_S = 5.0  # at most one replay_slowed per replay this often


@dataclass
class Figures:
    """Process-wide counts, for /healthz: a client that goes away must leave none behind."""

    active: int = 0
    open_readers: int = 0
    rows_held: int = 0  # rows of the open history queries' results
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def readers(self, delta: int) -> None:
        """Count a history query opened (+1) or closed (-1); called from worker threads."""
        with self._lock:
            self.open_readers += delta

    def held(self, rows: int) -> None:
        """Count the rows of an open query's result (+) or of a closed one (-)."""
        with self._lock:
            self.rows_held += rows


FIGURES = Figures()


def parse_speed(raw: object) -> float | None:
    """A speed as given by a client: a number > 0, or ``"max"`` (returned as None)."""
    if raw == "max":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_SPEED:
        raise ValueError(
            f"speed {str(raw)[:20]!r} is not valid: give a number of seconds of market time per "
            f'second (> 0, e.g. 1, 10, 100, at most {MAX_SPEED:g}) or "max"'
        )
    return float(raw)


def type_mask(types: tuple[str, ...] | list[str]) -> int:
    mask = 0
    for t in types:
        mask |= MASKS[t]
    return mask


def row_line(row: tuple[Any, ...]) -> str:
    """The fingerprint line of one stored row."""
    return canonical_line(*row[:14])


def fingerprint_range(source: Source, q: HistoryQuery) -> dict[str, Any]:
    """``count``, ``first_ts``, ``last_ts`` and ``fingerprint`` of a stored range: the same
    fingerprint a WebSocket replay of that range reports."""
    fp = Fingerprint()
    reader = open_reader(source, q)
    try:
        for frame in reader.chunks(CHUNK_ROWS):
            fp.add_lines(fingerprint_lines(frame), frame["ts"][0], frame["ts"][-1])
    finally:
        reader.close()
    return fp.summary()


class ReadBudget:
    """What the replays of one connection hold and run together: each running replay reads
    windows of an equal share of ``rows`` (at most ``max_window_rows``), and
    ``QUERIES_PER_CONN`` history queries run at once."""

    def __init__(self, rows: int, max_window_rows: int) -> None:
        self.rows = rows
        self.max_window_rows = max_window_rows
        self.running = 0  # replays reading; changed on the event loop, read by worker threads
        self.queries = asyncio.Semaphore(QUERIES_PER_CONN)

    def window_rows(self) -> int:
        """The rows one replay's next window aims at."""
        share = self.rows // max(1, self.running)
        return max(MIN_WINDOW_ROWS, min(self.max_window_rows, share))


@dataclass(slots=True)
class Batch:
    """Prepared events: their ts, JSON text, and fingerprint line (None: not a tick)."""

    ts: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    lines: list[str | None] = field(default_factory=list)
    ticks_only: bool = False  # every event is a tick (no None line)


@dataclass(frozen=True, kw_only=True)
class ReplaySpec:
    """A validated replay request (times in ns; ``speed`` None is ``max``)."""

    rid: str | int
    syms: list[str]
    start_ns: int
    end_ns: int | None  # None with then_live: up to now
    types: tuple[str, ...]
    speed: float | None
    enriched: bool = False
    then_live: bool = False
    after: tuple[int, int, str] | None = None


class StoredEvents:
    """The stored events of a replay, read window by window; ``next_batch`` runs in a worker
    thread (one at a time), ``close`` frees the query from any thread."""

    def __init__(
        self, *, sources: Sources, spec: ReplaySpec, end_ns: int, budget: ReadBudget
    ) -> None:
        self.root = sources.root
        self.memory_mb = sources.memory_mb
        self.merge = sources.merge
        self.spec = spec
        self.end_ns = end_ns
        self.budget = budget
        self.close_text = wire.event_end(replay=spec.rid)
        self.wanted = frozenset(spec.types)
        self.last: dict[str, tuple[int, int]] = {}  # sym -> (epoch, seq) of the last stored row
        # Enriched: sym -> (price, aggressor) of its last trade, and the symbols with a trade in
        # the open window, to carry the aggressor's tick rule across windows.
        self._trade: dict[str, tuple[float, str | None]] = {}
        self._window_syms: set[str] = set()
        self._w_start = max(spec.start_ns, spec.after[0]) if spec.after else spec.start_ns
        self._w_end = self._w_start
        self._window = FIRST_WINDOW_NS
        self._rows = 0
        self._held = 0  # rows of the open window's result
        self._first = True
        self._reader: HistoryReader | MergeReader | None = None
        self._chunks: Any = None
        self._lock = threading.Lock()
        self._closed = False
        # Start of each stored date partition: an empty stretch is skipped to the next one.
        self._days = sorted(
            int(dt.datetime.fromisoformat(p.name.partition("=")[2]).replace(tzinfo=dt.UTC)
                .timestamp()) * 10**9
            for p in self.root.glob("date=*")
        )  # fmt: skip

    def next_batch(self) -> Batch | None:
        """The next prepared chunk of events, or None at the end."""
        with self._lock:
            while not self._closed:
                if self._chunks is None:
                    if self._w_start >= self.end_ns:
                        return None
                    self._open_window()
                frame = next(self._chunks, None)
                if frame is None:
                    had_files = bool(self._reader.files) if self._reader is not None else True
                    self._close_reader()
                    if not had_files:  # nothing stored up to w_end: go to the next partition
                        later = [d for d in self._days if d >= self._w_end]
                        self._w_end = max(self._w_end, later[0] if later else self.end_ns)
                    grow = min(4.0, self.budget.window_rows() / max(self._rows, 1))
                    self._window = int(min(MAX_WINDOW_NS, max(MIN_WINDOW_NS, self._window * grow)))
                    self._w_start = self._w_end
                    continue
                held = (self._reader.rows or 0) if self._reader is not None else 0
                if held != self._held:  # a merge's next stretch, or a window's result
                    FIGURES.held(held - self._held)
                    self._held = held
                self._rows += frame.height
                return self._prepare(frame)
            return None

    def _open_window(self) -> None:
        after = self.spec.after if self._first else None
        first, self._first = self._first, False
        source = Source.of(self.root, self.memory_mb, merge=self.merge)
        if first and self.merge and not self.spec.enriched:
            # Stored files cut into stretches no bigger than a window: one merge of the whole
            # range reads each file once, a stretch at a time (server.history.merge).
            q = self._query(self.end_ns, after)
            parts = parts_of(source, q.syms, q.start_ns, q.end_ns)
            if fits_rows(parts, Wanted.of(q), self.budget.window_rows()):
                self._w_end = self.end_ns
                self._reader = MergeReader(q, parts, None)
                self._start_chunks()
                return
        self._w_end = min(self.end_ns, self._w_start + self._window)
        self._reader = open_reader(source, self._query(self._w_end, after))
        self._start_chunks()

    def _query(self, end_ns: int, after: tuple[int, int, str] | None) -> HistoryQuery:
        return HistoryQuery(
            syms=self.spec.syms,
            start_ns=self._w_start,
            end_ns=end_ns,
            types=TYPES,
            enriched=self.spec.enriched,
            after=after,
        )

    def _start_chunks(self) -> None:
        assert self._reader is not None
        FIGURES.readers(1)
        # Prepared events of a chunk are held twice (one being sent, one read ahead): a few
        # chunks per window keep them small next to the window.
        chunk_rows = min(CHUNK_ROWS, max(SLICE_EVENTS, self.budget.window_rows() // 8))
        self._chunks = self._reader.chunks(chunk_rows)
        self._rows = 0
        self._window_syms.clear()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._chunks.close()
            self._reader.close()
            self._reader = None
            self._chunks = None
            FIGURES.readers(-1)
            FIGURES.held(-self._held)
            self._held = 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_reader()

    def _prepare(self, frame: pl.DataFrame) -> Batch:
        if not self.spec.enriched:
            fast = self._prepare_ticks(frame)
            if fast is not None:
                return fast
        return self._prepare_rows(frame)

    def _prepare_ticks(self, frame: pl.DataFrame) -> Batch | None:
        """The events of a chunk of raw ticks built column-wise (``server.history.events``);
        None when the chunk holds a gap (left to ``_prepare_rows``, which puts it in place)."""
        ends = frame.group_by("sym", maintain_order=True).agg(
            pl.col("epoch").first().alias("e0"),
            pl.col("seq").first().alias("s0"),
            pl.col("epoch").last().alias("e1"),
            pl.col("seq").last().alias("s1"),
        )
        last = self.last
        for sym, e0, s0, _e1, _s1 in ends.iter_rows():
            prev = last.get(sym)
            if prev is not None and prev[0] == e0 and s0 > prev[1] + 1:
                return None
        same = pl.col("epoch") == pl.col("epoch").shift().over("sym")
        jump = pl.col("seq") > pl.col("seq").shift().over("sym") + 1
        if frame.select((same & jump).any()).item():
            return None
        for sym, _e0, _s0, e1, s1 in ends.iter_rows():
            last[sym] = (e1, s1)
        if self.wanted != set(TYPES):
            frame = frame.filter(pl.col("type").is_in(list(self.wanted)))
        ts, texts, lines = tick_events(frame, self.close_text)
        return Batch(ts, texts, lines, ticks_only=True)  # type: ignore[arg-type]

    def _prepare_rows(self, frame: pl.DataFrame) -> Batch:
        out = Batch()
        ts_l, texts, lines = out.ts, out.texts, out.lines
        last, wanted, close, rid = self.last, self.wanted, self.close_text, self.spec.rid
        enriched = self.spec.enriched
        for row in frame.iter_rows():
            sym, typ, ts, epoch, seq = row[:5]
            if enriched and typ == "trade":
                row = self._carry_aggressor(row)
            prev = last.get(sym)
            if prev is not None and prev[0] == epoch and seq > prev[1] + 1:
                ts_l.append(ts)
                texts.append(wire.gap_event(rid, sym, epoch, prev[1] + 1, seq - 1))
                lines.append(None)
            last[sym] = (epoch, seq)
            if typ in wanted:
                ts_l.append(ts)
                texts.append(wire.row_event(row, close))
                lines.append(row_line(row))
        return out

    def _carry_aggressor(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """An enriched trade with the aggressor one query over the whole range gives it: a
        window's query sees no trade before the window, so the first trade of a symbol in it
        takes the tick rule and the last known aggressor from the windows before."""
        sym, price, side, bid, ask = row[0], row[5], row[7], row[8], row[10]
        aggressor = row[AGGRESSOR_AT]
        last_price, last_aggressor = self._trade.get(sym, (None, None))
        if sym not in self._window_syms:
            self._window_syms.add(sym)
            if side is not None:
                aggressor = side
            elif ask is not None and price >= ask:
                aggressor = "buy"
            elif bid is not None and price <= bid:
                aggressor = "sell"
            elif last_price is not None and price != last_price:
                aggressor = "buy" if price > last_price else "sell"
            else:
                aggressor = last_aggressor
        elif aggressor is None:
            aggressor = last_aggressor
        self._trade[sym] = (price, aggressor or last_aggressor)
        if aggressor == row[AGGRESSOR_AT]:
            return row
        return (*row[:AGGRESSOR_AT], aggressor, *row[AGGRESSOR_AT + 1 :])


class VirtualClock:
    """Market time that advances at ``speed`` x wall time; it can pause and change speed."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.anchor_ts: float | None = None
        self.anchor_wall = 0.0
        self.paused_at: float | None = None

    def start(self, ts: float) -> None:
        self.anchor_ts, self.anchor_wall = ts, time.monotonic()

    def now(self) -> float:
        if self.paused_at is not None:
            return self.paused_at
        assert self.anchor_ts is not None
        return self.anchor_ts + (time.monotonic() - self.anchor_wall) * 1e9 * self.speed

    def set_speed(self, speed: float) -> None:
        if self.anchor_ts is not None and self.paused_at is None:
            self.start(self.now())
        self.speed = speed

    def pause(self) -> None:
        if self.anchor_ts is not None and self.paused_at is None:
            self.paused_at = self.now()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.start(self.paused_at)
            self.paused_at = None


class Replay:
    """One running replay on one connection."""

    def __init__(
        self,
        *,
        spec: ReplaySpec,
        sub: Subscriber,
        sources: Sources,
        hub: Hub,
        room_bytes: int,
        budget: ReadBudget,
        on_end: Callable[[Replay], None],
    ) -> None:
        self.spec = spec
        self.sub = sub
        self.sources = sources
        self.hub = hub
        self.room = room_bytes
        self.budget = budget
        self.on_end = on_end
        self.speed = spec.speed
        self.clock = VirtualClock(spec.speed or 1.0)
        self.state = "running"
        self.fp = Fingerprint()
        self._stopped = False
        self._changed = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._slowed_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name=f"replay-{self.spec.rid}")
        return self.task

    # -- controls (called by the connection's reader) --

    def pause(self) -> None:
        self.state = "paused"
        self.clock.pause()
        self._running.clear()
        self._changed.set()

    def resume(self) -> None:
        self.state = "running"
        self.clock.resume()
        self._running.set()
        self._changed.set()

    def set_speed(self, speed: float | None) -> None:
        if speed is None:
            self.clock.anchor_ts = None  # re-anchored at the next event if paced again
        else:
            self.clock.set_speed(speed)
        self.speed = speed
        self._changed.set()

    def stop(self) -> None:
        self._stopped = True
        self._changed.set()
        self._running.set()

    def describe(self) -> dict[str, Any]:
        return {"id": self.spec.rid, "state": self.state, "speed": self.speed or "max"}

    # -- the task --

    async def _run(self) -> None:
        spec = self.spec
        FIGURES.active += 1
        self.budget.running += 1
        end_ns = spec.end_ns if spec.end_ns is not None else time.time_ns()
        src: StoredEvents | None = None
        pending: asyncio.Future[Batch | None] | None = None
        done = False
        try:
            src = await asyncio.to_thread(
                lambda: StoredEvents(
                    sources=self.sources, spec=spec, end_ns=end_ns, budget=self.budget
                )
            )
            pending = asyncio.ensure_future(self._read(src))
            while True:
                batch = await pending
                pending = None
                if batch is None:
                    break
                pending = asyncio.ensure_future(self._read(src))
                if not await self._deliver(batch):
                    break
            if self.sub.close_code is not None:
                return
            if spec.then_live and not self._stopped:
                await self._hand_over(src.last)
            else:
                self.sub.send(self._done())
            done = True
        except CorruptHistory as exc:
            self.sub.send(
                wire.error(
                    "corrupt_history",
                    f"a stored history file cannot be read ({exc.detail}); the replay stopped",
                    spec.rid,
                )
            )
        except Exception:
            log.exception("replay %r failed", spec.rid)
            self.sub.send(
                wire.error("replay_failed", "the replay failed on the server; retry", spec.rid)
            )
        finally:
            FIGURES.active -= 1
            self.budget.running -= 1
            if not done:
                self.state = "failed"
            self.on_end(self)  # before any await: a control that follows finds it finished
            if pending is not None and not pending.cancel() and not pending.cancelled():
                pending.exception()  # a prefetch that failed after the replay ended: seen
            if src is not None:
                # Shielded: cancelled again, the thread still closes the reader (it waits for
                # a prefetch still running in its thread, then frees its query).
                await asyncio.shield(asyncio.to_thread(src.close))

    async def _read(self, src: StoredEvents) -> Batch | None:
        async with self.budget.queries:
            return await asyncio.to_thread(src.next_batch)

    def _done(self) -> dict[str, Any]:
        self.state = "done"
        return {
            "type": "replay_done",
            "id": self.spec.rid,
            **self.fp.summary(),
            "stopped": self._stopped,
        }

    async def _deliver(self, batch: Batch) -> bool:
        """Queue the batch at the pace asked for; False if the replay was stopped or the
        connection closed."""
        sub, clock = self.sub, self.clock
        ts_l, n, i = batch.ts, len(batch.ts), 0
        while i < n:
            if self._stopped or sub.close_code is not None:
                return False
            if not self._running.is_set():
                await self._running.wait()
                continue
            if self.speed is None:
                j = min(n, i + SLICE_EVENTS)
            else:
                if clock.anchor_ts is None:
                    clock.start(ts_l[i])
                now = clock.now()
                wait = (ts_l[i] - now) / 1e9 / clock.speed
                if wait > 0:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait)
                    continue
                if -wait > BEHIND_S:
                    self._slowed(-wait)
                    clock.start(ts_l[i])
                    now = ts_l[i]
                j = i + 1
                while j < n and j - i < SLICE_EVENTS and ts_l[j] <= now:
                    j += 1
            await sub.wait_room(self.room)
            if sub.close_code is not None:
                return False
            sub.send_raw(",".join(batch.texts[i:j]))
            if batch.ticks_only:
                # Every line is a tick's (no gap event in the batch): no scan for None.
                self.fp.add_lines(batch.lines[i:j], ts_l[i], ts_l[j - 1])  # type: ignore[arg-type]
                i = j
                continue
            ticks = [(k, line) for k in range(i, j) if (line := batch.lines[k]) is not None]
            if ticks:
                self.fp.add_lines(
                    [line for _k, line in ticks], ts_l[ticks[0][0]], ts_l[ticks[-1][0]]
                )
            i = j
        return True

    def _slowed(self, behind_s: float) -> None:
        now = time.monotonic()
        if now - self._slowed_at < SLOWED_EVERY_S:
            return
        self._slowed_at = now
        self.sub.send(
            wire.status(
                "replay_slowed",
                f"replay {self.spec.rid!r} fell {behind_s:.1f}s behind its clock (the client is "
                "not reading fast enough, or the store is slow): it continues from here, slower",
                id=self.spec.rid,
                behind_ms=round(behind_s * 1000),
            )
        )

    async def _hand_over(self, stored_last: dict[str, tuple[int, int]]) -> None:
        """After the stored range: the events after the last stored seq of each symbol (from
        the store, the unrecorded log or Redis: ``server.catchup.backlog``), then live, with no gap
        and no duplicate per symbol."""
        spec, sub = self.spec, self.sub
        new = [s for s in spec.syms if s not in sub.symbols]
        already = [s for s in spec.syms if s in sub.symbols]
        try:
            # Symbols already live on this connection keep their subscription (and its types).
            latest = await self.hub.subscribe(sub, new, list(spec.types)) if new else {}
            if already:
                latest.update(await self.sources.bus.latest(already))
        except (RedisUnavailable, RedisError, OSError) as exc:
            sub.send(self._done())
            sub.send(
                wire.error(
                    "unavailable",
                    f"Redis is unreachable ({exc}); the replay ended without going live: "
                    "subscribe again with from_seq",
                    spec.rid,
                )
            )
            return
        try:
            wants: dict[str, Want] = {}
            changed: list[dict[str, Any]] = []
            for sym in spec.syms:
                epoch = latest[sym].epoch
                if epoch is None:  # never published live: nothing to catch up
                    continue
                prev = stored_last.get(sym)
                if prev is not None and prev[0] == epoch:
                    wants[sym] = Want(epoch, prev[1])
                    continue
                wants[sym] = Want(epoch, 0, since_ns=spec.start_ns)
                if prev is not None:
                    changed.append(
                        wire.status(
                            "epoch_changed",
                            "the live sequence is in a new epoch; seq restarts",
                            sym=sym,
                            epoch=epoch,
                        )
                    )
            close = wire.event_end(replay=spec.rid)
            backlog = Backlog(
                self.sources,
                wants,
                rid=spec.rid,
                mask=type_mask(spec.types),
                close=close,
                by_time=True,
                fingerprint=self.fp,
            )
            try:
                await backlog.open()
                sub.send(*changed)
                await backlog.queue(sub, self.room)
            finally:
                await backlog.close()
            if sub.close_code is not None:
                return
            sub.send(self._done())
            sub.send(
                {
                    "type": "caught_up",
                    "id": spec.rid,
                    "symbols": spec.syms,
                    "seq": {
                        s: {"epoch": latest[s].epoch, "seq": backlog.last.get(s, 0)}
                        for s in spec.syms
                    },
                }
            )
        except BaseException:
            # Never leave the new symbols held (their live events would pile up unsent).
            sub.unhold(new)
            self.hub.unsubscribe(sub, new)
            raise
        backlog.release(sub, new)
