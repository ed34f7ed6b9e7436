"""Resume by seq: a subscriber that comes back with ``from_seq`` gets every event it missed,
from Redis' recent history (``tp:hist:S``) or, when that no longer reaches back, from the store,
then live, with no gap and no duplicate.

Live delivery of the symbol is held (``Subscriber.hold``) while the backlog is queued, then
released dropping every seq already sent. When the backlog cannot be had (another epoch, a seq
from the future, data older than anything kept), the client gets a ``resume_unavailable`` error
saying how far back data is available, and the subscription continues live.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from server import protocol
from server.history import TICK_COLUMNS, parquet_source, query_cursor, stored_files
from server.hub import MASKS
from server.replay import SLICE_EVENTS, gap_event, row_event

if TYPE_CHECKING:
    from server.bus import Bus, Latest
    from server.hub import Subscriber

CHUNK_ROWS = 20_000

log = logging.getLogger("tickpipe.resume")


async def recent_events(bus: Bus, sym: str, after_seq: int) -> list[str]:
    """Every event of ``sym`` with seq > ``after_seq`` still in Redis' recent history, in order."""
    out: list[str] = []
    cursor = after_seq
    while True:
        new = []
        for fragment in await bus.history(sym, cursor):
            for ev in protocol.split_events(fragment.decode()):
                seq = protocol.event_seq(ev)
                if seq is not None and seq > cursor:
                    new.append(ev)
        if not new:
            return out
        out.extend(new)
        cursor = protocol.event_seq(new[-1]) or cursor


class StoredSeqs:
    """Stored events of one (sym, epoch) with after < seq < before, in seq order, in chunks
    (``next_chunk`` in a worker thread)."""

    def __init__(self, root: Path, sym: str, epoch: int, after: int, before: int) -> None:
        far = time.time_ns() + 2 * 86_400 * 10**9
        self.files = stored_files(root, 0, far)
        self.con = query_cursor(root)
        self.params = [sym, epoch, after, before]
        self._lock = threading.Lock()
        self._cur: duckdb.DuckDBPyConnection | None = None
        self._src = parquet_source(self.files)

    def earliest(self) -> int | None:
        """The lowest stored seq of this (sym, epoch), if any."""
        if not self.files:
            return None
        with self._lock:
            row = self.con.execute(
                f"SELECT min(seq) FROM {self._src} WHERE sym = ? AND epoch = ?", self.params[:2]
            ).fetchone()
        return None if row is None else row[0]

    def next_chunk(self) -> list[tuple[Any, ...]]:
        if not self.files:
            return []
        with self._lock:
            if self._cur is None:
                self._cur = self.con.execute(
                    f"SELECT {TICK_COLUMNS.replace('ts,', 'epoch_ns(ts) AS ts,', 1)} "
                    f"FROM {self._src} WHERE sym = ? AND epoch = ? AND seq > ? AND seq < ? "
                    "ORDER BY seq",
                    self.params,
                )
            return self._cur.fetchmany(CHUNK_ROWS)

    def close(self) -> None:
        with self._lock:
            self.con.close()


def unavailable(
    sub: Subscriber, req_id: Any, sym: str, reason: str, message: str, **fields: Any
) -> None:
    ev = protocol.error("resume_unavailable", message, req_id)
    ev.update(sym=sym, reason=reason, **fields)
    sub.send(ev)


@dataclass
class Resume:
    """One symbol's resume: what the client asked for and where the symbol stands now."""

    sub: Subscriber
    bus: Bus
    root: Path
    req_id: Any
    sym: str
    from_seq: int
    epoch: int | None
    state: Latest  # read after live delivery of ``sym`` started (held)
    mask: int
    room: int

    async def run(self) -> None:
        """Queue the events after ``from_seq`` (or say why not), then release live."""
        upto = self.state.seq
        try:
            upto = await self._backlog()
        except Exception as exc:  # never a silent loss: say it, then go on live
            log.error("resume of %s after seq %d failed", self.sym, self.from_seq, exc_info=exc)
            unavailable(
                self.sub,
                self.req_id,
                self.sym,
                "internal",
                f"the server failed reading the events of {self.sym} after seq {self.from_seq} "
                f"({type(exc).__name__}); the subscription continues live from seq "
                f"{self.state.seq + 1}: resume again to retry",
                epoch=self.state.epoch,
                seq=self.state.seq,
            )
        finally:
            # Whatever happened, the subscription continues live from where the backlog ended.
            if self.sub.close_code is None:
                self.sub.release(self.sym, upto, self.mask)

    async def _backlog(self) -> int:
        """Queue the backlog; returns the last seq it covered."""
        sub, bus, root, req_id, sym = self.sub, self.bus, self.root, self.req_id, self.sym
        from_seq, epoch, state, mask, room = (
            self.from_seq,
            self.epoch,
            self.state,
            self.mask,
            self.room,
        )
        if state.epoch is None:
            unavailable(sub, req_id, sym, "no_data", f"{sym} has no live data to resume from")
            return state.seq
        if epoch is not None and epoch != state.epoch:
            earliest = await _earliest(bus, root, sym, state.epoch)
            unavailable(
                sub,
                req_id,
                sym,
                "epoch_changed",
                f"epoch {epoch} of {sym} is over (the server lost its sequence state); it is now "
                f"epoch {state.epoch}, with data from seq {earliest}: re-subscribe with that epoch "
                "and from_seq, or replay by time",
                epoch=state.epoch,
                available_from_seq=earliest,
                seq=state.seq,
            )
            return state.seq
        if from_seq > state.seq:
            unavailable(
                sub,
                req_id,
                sym,
                "seq_from_future",
                f"from_seq {from_seq} of {sym} is beyond its last seq {state.seq} "
                f"(epoch {state.epoch}); check the epoch and the seq you saw last",
                epoch=state.epoch,
                seq=state.seq,
            )
            return state.seq
        recent = await recent_events(bus, sym, from_seq)
        first_recent = (protocol.event_seq(recent[0]) or 0) if recent else state.seq + 1
        count, last, source = 0, from_seq, "redis"
        if first_recent > from_seq + 1:
            src = await asyncio.to_thread(
                StoredSeqs, root, sym, state.epoch, from_seq, first_recent
            )
            try:
                rows = await asyncio.to_thread(src.next_chunk)
                if not rows or rows[0][4] != from_seq + 1:
                    earliest = await asyncio.to_thread(src.earliest)
                    avail = first_recent if earliest is None else min(earliest, first_recent)
                    unavailable(
                        sub,
                        req_id,
                        sym,
                        "too_old",
                        f"events of {sym} after seq {from_seq} are no longer kept: data is "
                        f"available from seq {avail} of epoch {state.epoch}; the subscription "
                        "continues live",
                        epoch=state.epoch,
                        available_from_seq=avail,
                        seq=state.seq,
                    )
                    return state.seq
                source = "store"
                while rows:
                    texts = []
                    for row in rows:
                        seq = row[4]
                        if seq > last + 1:
                            texts.append(gap_event(req_id, sym, state.epoch, last + 1, seq - 1))
                        last = seq
                        if _wanted(row[1], mask):
                            texts.append(row_event(row, "}"))
                    count += await _queue(sub, texts, room)
                    if sub.close_code is not None:
                        return last
                    rows = await asyncio.to_thread(src.next_chunk)
            finally:
                await asyncio.to_thread(src.close)
            if last < first_recent - 1:
                sub.send_raw(gap_event(req_id, sym, state.epoch, last + 1, first_recent - 1))
        close = f',"epoch":{state.epoch}}}'
        texts = []
        for ev in recent:
            last = protocol.event_seq(ev) or last
            if _wanted(protocol.event_type(ev), mask):
                texts.append(ev[:-1] + close)
        count += await _queue(sub, texts, room)
        sub.send(
            {
                "type": "resumed",
                "id": req_id,
                "sym": sym,
                "epoch": state.epoch,
                "from_seq": from_seq,
                "to_seq": last,
                "count": count,
                "source": source,
            }
        )
        return last


def _wanted(kind: str, mask: int) -> bool:
    return bool(MASKS.get(kind, 0) & mask)


async def _queue(sub: Subscriber, texts: list[str], room: int) -> int:
    """Queue events a slice at a time, waiting while the connection's buffer is full."""
    for k in range(0, len(texts), SLICE_EVENTS):
        await sub.wait_room(room)
        if sub.close_code is not None:
            return k
        sub.send_raw(",".join(texts[k : k + SLICE_EVENTS]))
    return sum(1 for t in texts if not t.startswith('{"type":"gap"'))


async def _earliest(bus: Bus, root: Path, sym: str, epoch: int) -> int | None:
    oldest = await bus.history(sym, 0, count=1)
    first_recent = protocol.event_seq(oldest[0].decode()) if oldest else None
    src = await asyncio.to_thread(StoredSeqs, root, sym, epoch, 0, 0)
    try:
        stored = await asyncio.to_thread(src.earliest)
    finally:
        await asyncio.to_thread(src.close)
    found = [s for s in (stored, first_recent) if s is not None]
    return min(found) if found else None
