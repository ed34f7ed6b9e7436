"""The replay ops of one WebSocket connection: ``replay`` (validated here, at the edge) and the
controls ``pause``, ``resume``, ``speed``, ``stop``; the replays themselves run in
``server.replay``."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from server import wire
from server.api.errors import ApiError
from server.api.history import unknown_symbols
from server.api.params import parse_time
from server.api.state import AppState
from server.auth import ApiKey
from server.catchup.backlog import Sources
from server.live.subscriber import Subscriber
from server.replay import ReadBudget, Replay, ReplaySpec, parse_speed

FINISHED_KEPT = 256  # ids of finished replays remembered, to answer a late control clearly


class ConnectionReplays:
    """Every replay of one connection, by the client's ``id``."""

    def __init__(self, st: AppState, key: ApiKey, sub: Subscriber) -> None:
        self.st = st
        self.key = key
        self.sub = sub
        self.running: dict[str | int, Replay] = {}
        self.finished: collections.OrderedDict[str | int, str] = collections.OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()  # every replay task until it has ended
        self.closed = False  # the connection is gone: nothing starts any more
        s = st.settings
        self.budget = ReadBudget(s.replay_conn_rows, s.replay_window_rows)

    def _error(self, code: str, message: str, req_id: Any, **fields: Any) -> None:
        self.sub.send({**wire.error(code, message, req_id), **fields})

    async def start(self, op: wire.Replay) -> tuple[int, str]:
        """Validate and start a replay; returns the count of symbols accepted and a status."""
        st, key, rid = self.st, self.key, op.id
        if rid is None:
            self._error("bad_request", 'a replay needs an "id" (its events carry it)', None)
            return 0, "bad_request"
        if rid in self.running:
            self._error(
                "replay_exists", f"replay {rid!r} is running; stop it or use another id", rid
            )
            return 0, "replay_exists"
        if not (key.has_scope("replay") or key.has_scope("historical")):
            self._error(
                "forbidden", f"key {key.name!r} lacks the 'replay' (or 'historical') scope", rid
            )
            return 0, "forbidden"
        if op.then_live and not key.has_scope("realtime"):
            self._error(
                "forbidden", f"then_live needs the 'realtime' scope, which {key.name!r} lacks", rid
            )
            return 0, "forbidden"
        limit = st.settings.max_replays_per_conn
        if len(self.running) >= limit:
            self._error(
                "too_many_replays",
                f"{limit} replays are running on this connection; wait for one to finish or "
                "stop one",
                rid,
            )
            return 0, "too_many_replays"
        try:
            spec_args = self._times_and_speed(op)
        except ValueError as exc:
            self._error("bad_request", str(exc), rid)
            return 0, "bad_request"
        start_ns, end_ns, speed = spec_args
        syms, rejected = await self._symbols(op, start_ns, end_ns)
        if self.closed:  # the connection went away while the symbols were checked
            return 0, "closed"
        if not syms:
            self._error(
                "no_symbols",
                "none of the symbols can be replayed (see rejected)",
                rid,
                rejected=rejected,
            )
            return 0, "no_symbols"
        spec = ReplaySpec(
            rid=rid,
            syms=syms,
            start_ns=start_ns,
            end_ns=end_ns,
            types=tuple(op.types),
            speed=speed,
            enriched=op.enriched,
            then_live=op.then_live,
            after=op.after,
        )
        self.sub.send(
            {
                "type": "replay_started",
                "id": rid,
                "symbols": syms,
                "start": start_ns,
                "end": end_ns,
                "types": list(spec.types),
                "speed": speed or "max",
                "enriched": op.enriched,
                "then_live": op.then_live,
                "rejected": rejected,
            }
        )
        s = st.settings
        replay = Replay(
            spec=spec,
            sub=self.sub,
            sources=Sources.of(st.bus, s),
            hub=st.hub,
            room_bytes=min(s.replay_buffer_bytes, s.conflate_bytes // 2),
            budget=self.budget,
            on_end=self._ended,
        )
        self.running[rid] = replay
        task = replay.start()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return len(syms), "ok"

    def _times_and_speed(self, op: wire.Replay) -> tuple[int, int | None, float | None]:
        speed = parse_speed(op.speed)
        try:
            start_ns = parse_time("start", str(op.start))
            end_ns = None if op.end is None else parse_time("end", str(op.end))
        except ApiError as exc:
            raise ValueError(exc.message) from None
        if op.then_live:
            if end_ns is not None:
                raise ValueError("a then_live replay runs up to now and goes live: leave out end")
        elif end_ns is None:
            raise ValueError("end is required (ISO-8601 or ns), unless then_live is true")
        elif start_ns >= end_ns:
            raise ValueError("start must be before end (start is inclusive, end exclusive)")
        return start_ns, end_ns, speed

    async def _symbols(
        self, op: wire.Replay, start_ns: int, end_ns: int | None
    ) -> tuple[list[str], list[dict[str, str]]]:
        st, key = self.st, self.key
        candidates, rejected = key.screen(
            list(dict.fromkeys(s.strip().upper() for s in op.symbols))
        )
        limit = st.settings.max_symbols_per_conn
        for sym in candidates[limit:]:
            rejected.append({"sym": sym, "code": "limit_exceeded"})
        candidates = candidates[:limit]
        unknown = set(await unknown_symbols(st, candidates))
        accepted = []
        for sym in candidates:
            if sym in unknown:
                rejected.append({"sym": sym, "code": "unknown_symbol"})
            else:
                accepted.append(sym)
        return accepted, rejected

    def _ended(self, replay: Replay) -> None:
        rid = replay.spec.rid
        if self.running.get(rid) is replay:
            del self.running[rid]
        self.finished[rid] = replay.state
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def control(self, op: wire.ReplayControl) -> None:
        """``pause``, ``resume``, ``speed`` or ``stop``; answers ``replay_state`` (``stop`` is
        answered by the ``replay_done`` that follows)."""
        rid = op.id
        replay = self.running.get(rid) if rid is not None else None
        if replay is None:
            if rid is not None and rid in self.finished:
                self._error(
                    "replay_finished",
                    f"replay {rid!r} has already finished ({self.finished[rid]}); "
                    f"{op.op} applies to a running replay",
                    rid,
                )
            else:
                self._error(
                    "unknown_replay",
                    f"no replay with id {rid!r} on this connection; pass the id of a running one",
                    rid,
                )
            return
        if op.op == "pause":
            replay.pause()
        elif op.op == "resume":
            replay.resume()
        elif op.op == "speed":
            try:
                if op.speed is None:
                    raise ValueError('speed needs "speed": a number > 0 or "max"')
                replay.set_speed(parse_speed(op.speed))
            except ValueError as exc:
                self._error("bad_request", str(exc), rid)
                return
        else:
            replay.stop()
            return
        self.sub.send({"type": "replay_state", **replay.describe()})

    async def close(self) -> None:
        """Stop every replay (the connection is gone), also one still starting, and wait until
        each has freed its query."""
        self.closed = True
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
