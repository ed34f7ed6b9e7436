"""Resume by seq: a subscriber that comes back with ``from_seq`` gets every event it missed,
then live, with no gap and no duplicate.

The backlog is a catch-up (``server.catchup.backlog``): Redis' recent events, and before them the
store and the log entries the recorder has not stored yet. Live delivery of the symbol is held
(``Subscriber.hold``) meanwhile, then released dropping every seq already sent. When the backlog
cannot be had (another epoch, a seq from the future, data older than anything kept), the client
gets a ``resume_unavailable`` error saying from which seq data is available, and the
subscription continues live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server import wire
from server.catchup.backlog import Backlog, Sources, Want, earliest

if TYPE_CHECKING:
    from server.live.bus import Latest
    from server.live.subscriber import Subscriber

log = logging.getLogger("tickpipe.resume")


def unavailable(
    sub: Subscriber, req_id: Any, sym: str, reason: str, message: str, **fields: Any
) -> None:
    ev = wire.error("resume_unavailable", message, req_id)
    ev.update(sym=sym, reason=reason, **fields)
    sub.send(ev)


@dataclass(kw_only=True)
class Resume:
    """One symbol's resume: what the client asked for and where the symbol stands now."""

    sub: Subscriber
    sources: Sources
    req_id: Any
    sym: str
    from_seq: int
    epoch: int | None
    state: Latest  # read after live delivery of ``sym`` started (held)
    mask: int
    room: int

    async def run(self) -> None:
        """Queue the events after ``from_seq`` (or say why not), then release live."""
        backlog: Backlog | None = None
        try:
            backlog = await self._backlog()
        except Exception as exc:  # never a silent loss: say it, then go on live
            log.error("resume of %s after seq %d failed", self.sym, self.from_seq, exc_info=exc)
            self._unavailable(
                "internal",
                f"the server failed reading the events of {self.sym} after seq {self.from_seq} "
                f"({type(exc).__name__}); the subscription continues live from seq "
                f"{self.state.seq + 1}: resume again to retry",
            )
            backlog = None
        finally:
            # Whatever happened, the subscription continues live from where the backlog ended.
            if backlog is not None:
                backlog.release(self.sub, [self.sym])
            elif self.sub.close_code is None:
                self.sub.release(self.sym, self.state.seq, self.mask)

    def _unavailable(self, reason: str, message: str, **fields: Any) -> None:
        fields.setdefault("epoch", self.state.epoch)
        unavailable(self.sub, self.req_id, self.sym, reason, message, seq=self.state.seq, **fields)

    async def _backlog(self) -> Backlog | None:
        """Queue the backlog and ``resumed``; the backlog, or None when it cannot be had."""
        sym, from_seq, epoch, state = self.sym, self.from_seq, self.epoch, self.state
        if state.epoch is None:
            self._unavailable("no_data", f"{sym} has no live data to resume from")
            return None
        if epoch is not None and epoch != state.epoch:
            avail = await earliest(self.sources, sym, state.epoch)
            self._unavailable(
                "epoch_changed",
                f"epoch {epoch} of {sym} is over (the server lost its sequence state); it is now "
                f"epoch {state.epoch}, with data from seq {avail}: re-subscribe with that epoch "
                "and from_seq, or replay by time",
                available_from_seq=avail,
            )
            return None
        if from_seq > state.seq:
            avail = await earliest(self.sources, sym, state.epoch)
            self._unavailable(
                "seq_from_future",
                f"from_seq {from_seq} of {sym} is beyond its last seq {state.seq} "
                f"(epoch {state.epoch}, data from seq {avail}); check the epoch and the seq you "
                "saw last",
                available_from_seq=avail,
            )
            return None
        want = {sym: Want(state.epoch, from_seq)}
        backlog = Backlog(self.sources, want, rid=self.req_id, mask=self.mask)
        try:
            await backlog.open()
            if await self._too_old(backlog, state.epoch):
                return None
            await backlog.queue(self.sub, self.room)
        finally:
            await backlog.close()
        sent = backlog.sent[sym]
        self.sub.send(
            {
                "type": "resumed",
                "id": self.req_id,
                "sym": sym,
                "epoch": state.epoch,
                "from_seq": from_seq,
                "to_seq": backlog.last[sym],
                "count": backlog.count(sym),
                "source": "store" if sent["store"] or sent["log"] else "redis",
                "sources": sent,
            }
        )
        return backlog

    async def _too_old(self, backlog: Backlog, epoch: int) -> bool:
        """Whether the event after ``from_seq`` is gone (said to the client if so). A hole
        after events that are still kept is not: it goes in-band as a ``gap``."""
        sym, from_seq, state = self.sym, self.from_seq, self.state
        first = backlog.first(sym)
        if first is None and from_seq >= state.seq:
            return False  # nothing was missed
        if first is not None and first == from_seq + 1:
            return False
        avail = await earliest(self.sources, sym, epoch)
        if first is not None and avail is not None and avail <= from_seq:
            return False
        avail = first if avail is None else avail
        self._unavailable(
            "too_old",
            f"events of {sym} after seq {from_seq} are no longer kept: data is available from "
            f"seq {avail} of epoch {state.epoch}; the subscription continues live",
            available_from_seq=avail,
        )
        return True
