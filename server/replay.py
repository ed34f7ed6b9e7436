"""Replays: stored events of a range streamed to one WebSocket, paced on a virtual clock.

* Reading: the range is read window by window (``HistoryReader`` in a worker thread, one window
  at a time, each sized to hold about ``replay_window_rows`` rows), so memory stays bounded
  whatever the range, and the first event leaves after one small query. Windows are disjoint in
  ``ts`` and each is sorted by (ts, seq, sym): the merge across symbols holds over the whole range.
* Pacing: an event is due when the virtual clock (market time = anchor + wall time x speed)
  reaches its ``ts``; ``max`` sends as fast as the client reads. Events enter the connection's
  buffer only while it holds less than ``replay_buffer_bytes``: a client that cannot keep up slows
  the replay (``status`` ``replay_slowed``) instead of the server buffering without limit.
* Gaps: all types are read, so a jump in ``seq`` within an epoch is a recorded gap, announced
  in-band (``gap``) before the event after it, whatever ``types`` the client asked for.
* ``then_live``: after the stored range, live delivery starts held (see ``Subscriber.hold``),
  the recent events after the last stored seq come from Redis, and live is released dropping
  every seq already sent: contiguous seq per symbol across the hand-over (``caught_up``).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl
from redis.exceptions import RedisError

from server import protocol
from server.history import (
    TYPES,
    CorruptHistory,
    HistoryQuery,
    HistoryReader,
    Source,
)
from server.hub import MASKS, RedisUnavailable
from tickpipe.fingerprint import Fingerprint, canonical_line

if TYPE_CHECKING:
    from server.bus import Bus
    from server.hub import Hub, Subscriber

log = logging.getLogger("tickpipe.replay")

MAX_SPEED = 1_000_000.0
DAY_NS = 86_400 * 10**9
FIRST_WINDOW_NS = 60 * 10**9
MIN_WINDOW_NS = 10**9
MAX_WINDOW_NS = DAY_NS
CHUNK_ROWS = 20_000
SLICE_EVENTS = 256  # most events queued in one go
BEHIND_S = 1.0  # wall seconds behind the virtual clock before the replay slows and says so
SLOWED_EVERY_S = 5.0  # at most one replay_slowed per replay this often
ENRICHED_FIELDS = ("mid", "spread", "spread_bps", "notional", "aggressor")


@dataclass
class Figures:
    """Process-wide counts, for /healthz: a client that goes away must leave none behind."""

    active: int = 0
    open_readers: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def readers(self, delta: int) -> None:
        """Count a history query opened (+1) or closed (-1); called from worker threads."""
        with self._lock:
            self.open_readers += delta


FIGURES = Figures()


def parse_speed(raw: object) -> float | None:
    """A speed as given by a client: a number > 0, or ``"max"`` (returned as None)."""
    if raw == "max":
        return None
    ok = isinstance(raw, int | float) and not isinstance(raw, bool)
    if not ok or not 0 < raw <= MAX_SPEED:  # type: ignore[operator]
        raise ValueError(
            f"speed {str(raw)[:20]!r} is not valid: give a number of seconds of market time per "
            f'second (> 0, e.g. 1, 10, 100, at most {MAX_SPEED:g}) or "max"'
        )
    return float(raw)  # type: ignore[arg-type]


def type_mask(types: tuple[str, ...] | list[str]) -> int:
    mask = 0
    for t in types:
        mask |= MASKS[t]
    return mask


# Stored rows -> events ---------------------------------------------------------------------


def row_event(row: tuple[Any, ...], close: str) -> str:
    """The live-format JSON of one stored row (plus its ``epoch``), ending with ``close``
    (``'}'``, or e.g. ``',"replay":"r1"}'`` to mark it as replayed)."""
    sym, typ, ts, epoch, seq, price, size, side, bid, bid_size, ask, ask_size, venue, crossed = row[
        :14
    ]
    ev: dict[str, Any]
    if typ == "trade":
        ev = {"type": "trade", "sym": sym, "seq": seq, "ts": ts, "price": price, "size": size}
        if side is not None:
            ev["side"] = side
        if len(row) > 14:  # enriched: the prevailing quote
            if bid is not None:
                ev["bid"] = bid
            if ask is not None:
                ev["ask"] = ask
    else:
        ev = {"type": "quote", "sym": sym, "seq": seq, "ts": ts, "bid": bid}
        if bid_size is not None:
            ev["bid_size"] = bid_size
        ev["ask"] = ask
        if ask_size is not None:
            ev["ask_size"] = ask_size
        if crossed:
            ev["crossed"] = True
    if venue is not None:
        ev["venue"] = venue
    ev["epoch"] = epoch
    for name, value in zip(ENRICHED_FIELDS, row[14:], strict=False):
        if value is not None:
            ev[name] = value
    return orjson.dumps(ev)[:-1].decode() + close


def row_line(row: tuple[Any, ...]) -> str:
    """The fingerprint line of one stored row."""
    return canonical_line(*row[:14])


def fingerprint_range(root: Source | Path, q: HistoryQuery) -> dict[str, Any]:
    """``count``, ``first_ts``, ``last_ts`` and ``fingerprint`` of a stored range: the same
    fingerprint a WebSocket replay of that range reports."""
    fp = Fingerprint()
    reader = HistoryReader(root, q)
    try:
        for frame in reader.chunks(CHUNK_ROWS):
            rows = frame.rows()
            fp.add_lines([row_line(r) for r in rows], rows[0][2], rows[-1][2])
    finally:
        reader.close()
    return fp.summary()


@dataclass(slots=True)
class Batch:
    """Prepared events: their ts, JSON text, and fingerprint line (None: not a tick)."""

    ts: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    lines: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
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

    def __init__(self, root: Path, spec: ReplaySpec, end_ns: int, window_rows: int) -> None:
        self.root = root
        self.spec = spec
        self.end_ns = end_ns
        self.window_rows = window_rows
        self.close_text = ',"replay":' + orjson.dumps(spec.rid).decode() + "}"
        self.wanted = frozenset(spec.types)
        self.last: dict[str, tuple[int, int]] = {}  # sym -> (epoch, seq) of the last stored row
        self._w_start = max(spec.start_ns, spec.after[0]) if spec.after else spec.start_ns
        self._w_end = self._w_start
        self._window = FIRST_WINDOW_NS
        self._rows = 0
        self._first = True
        self._reader: HistoryReader | None = None
        self._chunks: Any = None
        self._lock = threading.Lock()
        self._closed = False
        # Start of each stored date partition: an empty stretch is skipped to the next one.
        self._days = sorted(
            int(dt.datetime.fromisoformat(p.name.partition("=")[2]).replace(tzinfo=dt.UTC)
                .timestamp()) * 10**9
            for p in root.glob("date=*")
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
                    grow = min(4.0, self.window_rows / max(self._rows, 1))
                    self._window = int(min(MAX_WINDOW_NS, max(MIN_WINDOW_NS, self._window * grow)))
                    self._w_start = self._w_end
                    continue
                self._rows += frame.height
                return self._prepare(frame)
            return None

    def _open_window(self) -> None:
        self._w_end = min(self.end_ns, self._w_start + self._window)
        after = self.spec.after if self._first else None
        self._first = False
        q = HistoryQuery(
            syms=self.spec.syms,
            start_ns=self._w_start,
            end_ns=self._w_end,
            types=TYPES,
            enriched=self.spec.enriched,
            after=after,
        )
        self._reader = HistoryReader(self.root, q)
        FIGURES.readers(1)
        self._chunks = self._reader.chunks(CHUNK_ROWS)
        self._rows = 0

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._chunks.close()
            self._reader.close()
            self._reader = None
            self._chunks = None
            FIGURES.readers(-1)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_reader()

    def _prepare(self, frame: pl.DataFrame) -> Batch:
        out = Batch()
        ts_l, texts, lines = out.ts, out.texts, out.lines
        last, wanted, close, rid = self.last, self.wanted, self.close_text, self.spec.rid
        for row in frame.iter_rows():
            sym, typ, ts, epoch, seq = row[:5]
            prev = last.get(sym)
            if prev is not None and prev[0] == epoch and seq > prev[1] + 1:
                ts_l.append(ts)
                texts.append(gap_event(rid, sym, epoch, prev[1] + 1, seq - 1))
                lines.append(None)
            last[sym] = (epoch, seq)
            if typ in wanted:
                ts_l.append(ts)
                texts.append(row_event(row, close))
                lines.append(row_line(row))
        return out


def gap_event(rid: str | int, sym: str, epoch: int | None, from_seq: int, to_seq: int) -> str:
    return protocol.event_json(
        {
            "type": "gap",
            "id": rid,
            "sym": sym,
            "epoch": epoch,
            "from_seq": from_seq,
            "to_seq": to_seq,
            "missing": to_seq - from_seq + 1,
            "message": "these events were never recorded; the replay goes on after them",
        }
    )


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
        spec: ReplaySpec,
        sub: Subscriber,
        root: Path,
        hub: Hub,
        bus: Bus,
        room_bytes: int,
        window_rows: int,
        on_end: Callable[[Replay], None],
    ) -> None:
        self.spec = spec
        self.sub = sub
        self.root = root
        self.hub = hub
        self.bus = bus
        self.room = room_bytes
        self.window_rows = window_rows
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

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"replay-{self.spec.rid}")

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
        end_ns = spec.end_ns if spec.end_ns is not None else time.time_ns()
        src: StoredEvents | None = None
        pending: asyncio.Future[Batch | None] | None = None
        done = False
        try:
            src = await asyncio.to_thread(StoredEvents, self.root, spec, end_ns, self.window_rows)
            pending = asyncio.ensure_future(asyncio.to_thread(src.next_batch))
            while True:
                batch = await pending
                pending = None
                if batch is None:
                    break
                pending = asyncio.ensure_future(asyncio.to_thread(src.next_batch))
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
                protocol.error(
                    "corrupt_history",
                    f"a stored history file cannot be read ({exc.detail}); the replay stopped",
                    spec.rid,
                )
            )
        except Exception:
            log.exception("replay %r failed", spec.rid)
            self.sub.send(
                protocol.error("replay_failed", "the replay failed on the server; retry", spec.rid)
            )
        finally:
            FIGURES.active -= 1
            if not done:
                self.state = "failed"
            self.on_end(self)  # before any await: a control that follows finds it finished
            if pending is not None:
                pending.cancel()
            if src is not None:
                await asyncio.shield(asyncio.to_thread(src.close))

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
            ticks = [k for k in range(i, j) if batch.lines[k] is not None]
            if ticks:
                self.fp.add_lines(
                    [batch.lines[k] for k in ticks],  # type: ignore[misc]
                    ts_l[ticks[0]],
                    ts_l[ticks[-1]],
                )
            i = j
        return True

    def _slowed(self, behind_s: float) -> None:
        now = time.monotonic()
        if now - self._slowed_at < SLOWED_EVERY_S:
            return
        self._slowed_at = now
        self.sub.send(
            protocol.status(
                "replay_slowed",
                f"replay {self.spec.rid!r} fell {behind_s:.1f}s behind its clock (the client is "
                "not reading fast enough, or the store is slow): it continues from here, slower",
                id=self.spec.rid,
                behind_ms=round(behind_s * 1000),
            )
        )

    async def _hand_over(self, stored_last: dict[str, tuple[int, int]]) -> None:
        """After the stored range: Redis' recent events, then live, with no gap and no
        duplicate per symbol."""
        from server.resume import recent_events

        spec, sub = self.spec, self.sub
        new = [s for s in spec.syms if s not in sub.symbols]
        already = [s for s in spec.syms if s in sub.symbols]
        try:
            # Symbols already live on this connection keep their subscription (and its types).
            latest = await self.hub.subscribe(sub, new, list(spec.types)) if new else {}
            if already:
                latest.update(await self.bus.latest(already))
        except (RedisUnavailable, RedisError, OSError) as exc:
            sub.send(self._done())
            sub.send(
                protocol.error(
                    "unavailable",
                    f"Redis is unreachable ({exc}); the replay ended without going live: "
                    "subscribe again with from_seq",
                    spec.rid,
                )
            )
            return
        try:
            tail: list[tuple[int, int, str, str]] = []
            upto: dict[str, int] = {}
            extra: list[str] = []
            for sym in spec.syms:
                state = latest[sym]
                prev = stored_last.get(sym)
                after = prev[1] if prev is not None and prev[0] == state.epoch else 0
                if prev is not None and prev[0] != state.epoch:
                    extra.append(
                        protocol.event_json(
                            protocol.status(
                                "epoch_changed",
                                "the live sequence is in a new epoch; seq restarts",
                                sym=sym,
                                epoch=state.epoch,
                            )
                        )
                    )
                events = await recent_events(self.bus, sym, after)
                upto[sym] = after
                first = True
                for ev in events:
                    seq = protocol.event_seq(ev) or 0
                    if first and after and seq > after + 1:
                        extra.append(gap_event(spec.rid, sym, state.epoch, after + 1, seq - 1))
                    first = False
                    upto[sym] = seq
                    parsed = orjson.loads(ev)
                    if parsed["ts"] < spec.start_ns or parsed["type"] not in spec.types:
                        continue
                    close = f',"epoch":{state.epoch},"replay":{orjson.dumps(spec.rid).decode()}}}'
                    tail.append((parsed["ts"], seq, sym, ev[:-1] + close))
            tail.sort(key=lambda t: t[:3])
            if extra:
                sub.send_raw(",".join(extra))
            for k in range(0, len(tail), SLICE_EVENTS):
                part = tail[k : k + SLICE_EVENTS]
                await sub.wait_room(self.room)
                if sub.close_code is not None:
                    return
                sub.send_raw(",".join(t[3] for t in part))
                for t in part:
                    self.fp.add_event(orjson.loads(t[3]))
            sub.send(self._done())
            sub.send(
                {
                    "type": "caught_up",
                    "id": spec.rid,
                    "symbols": spec.syms,
                    "seq": {s: {"epoch": latest[s].epoch, "seq": upto[s]} for s in spec.syms},
                }
            )
        except BaseException:
            # Never leave the new symbols held (their live events would pile up unsent).
            sub.unhold(new)
            self.hub.unsubscribe(sub, new)
            raise
        for sym in new:
            sub.release(sym, upto[sym], sub.symbols.get(sym, type_mask(spec.types)))
