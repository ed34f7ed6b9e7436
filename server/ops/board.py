"""Service status: every moving part of the deployment, as one web process sees it, every second.

The board publishes this process's heartbeat (``server.ops.heartbeat``), reads everyone
else's and Redis' own figures, judges each part (``server.ops.judges``), keeps the recent state
changes in an ``ErrorJournal``, and builds the status: ``report`` for ``GET /status`` and the
same encoded once as a ``service_status`` frame for WebSocket subscribers of the ``status``
channel. The parts:

* ``redis``: this process PINGs it and reads INFO (reachable, latency, memory);
* ``feed:<name>``: the feed's heartbeat (state, ticks/s, rejects, last tick);
* ``recorder``: the recorder's heartbeat (lag, last flush, rows stored);
* ``web:<host>:<pid>``: every web process's heartbeat, this one's own figures straight from its
  hub;
* each symbol: its latest trade and quote in ``tp:sym:<S>``, judged against its own usual rate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from server import wire
from server.config import Settings
from server.live.bus import (
    FEED_KEY_PREFIX,
    PROCS_KEY,
    RECORDER_KEY,
    SOURCES_KEY,
    WEB_KEY_PREFIX,
    Layout,
)
from server.live.connection import RedisClient, server_info
from server.live.hub import Hub
from server.ops.heartbeat import FeedBeat, RecorderBeat, WebBeat, forget_web, publish_web
from server.ops.judges import (
    DEGRADED,
    DOWN,
    UP,
    Part,
    SymbolTrack,
    judge_feed,
    judge_recorder,
    judge_redis,
    judge_symbol,
    judge_web,
    overall,
    redis_unreachable,
    unknown_without_redis,
)

log = logging.getLogger("tickpipe.status")

MAX_STATUS_SYMBOLS = 1000
MAX_ERRORS = 50
STARTUP_GRACE_S = 3.0  # state changes seen while this web process starts are not errors


class ErrorJournal:
    """The recent troubles: a part that changed to degraded or down, its recovery, and ticks a
    feed rejected; the newest ``MAX_ERRORS``."""

    def __init__(self, started_ns: int) -> None:
        self.started_ns = started_ns
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_ERRORS)
        self._states: dict[str, str] = {}
        self._logged: set[str] = set()  # parts whose trouble is noted: note their recovery
        self._rejected: dict[str, float] = {}

    def note(self, part: Part) -> None:
        """A part's verdict this round: noted if its state changed (not while starting up, and
        a recovery only of a trouble that was noted)."""
        pid, state = part.id, part.state
        before = self._states.get(pid)
        self._states[pid] = state
        starting = time.time_ns() - self.started_ns < STARTUP_GRACE_S * 1e9
        if state == before or starting or (state == UP and pid not in self._logged):
            return
        if state == UP:
            self._logged.discard(pid)
        else:
            self._logged.add(pid)
        message = part.reason if state != UP else "back up"
        self._add(pid, state, message)

    def note_rejects(self, pid: str, rejected: dict[str, int], last: list[Any]) -> None:
        """A feed's reject counts: the ticks rejected since the last round, with their reasons."""
        total = float(sum(rejected.values()))
        before = self._rejected.get(pid)
        self._rejected[pid] = total
        if before is not None and total > before:
            reasons = ", ".join(sorted({str(r.get("reason")) for r in last[-5:]}))
            self._add(pid, "rejected", f"{total - before:.0f} tick(s) rejected ({reasons})")

    def _add(self, pid: str, state: str, message: str) -> None:
        self.entries.append({"ts": time.time_ns(), "part": pid, "state": state, "message": message})

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The newest ``n``, newest first."""
        return list(self.entries)[::-1][:n]


class StatusBoard:
    """Builds the deployment's status every second and publishes this process's heartbeat.

    ``report`` is the latest full status (``GET /status``), ``frame`` the same encoded once as
    a ``service_status`` event for WebSocket subscribers of the ``status`` channel.
    """

    def __init__(self, settings: Settings, redis: RedisClient, hub: Hub, started_ns: int) -> None:
        self.settings = settings
        self.redis = redis
        self.layout = Layout.of(settings)
        self.hub = hub
        self.started_ns = started_ns
        self.web_id = f"{socket.gethostname()}:{os.getpid()}"
        self.report: dict[str, Any] | None = None
        self.frame: str | None = None
        self.journal = ErrorJournal(started_ns)
        self._symbols: dict[str, SymbolTrack] = {}
        self._last_parts: dict[str, Part] = {}
        self._prev_counts: tuple[float, int, int, int] | None = None
        self.own: dict[str, Any] = {}
        self.redis_figures: dict[str, Any] = {}
        self.sources: list[dict[str, Any]] = []  # ``GET /sources``
        self._stored_sources: dict[str, dict[str, Any]] = {}  # tp:sources, of known feeds

    # -- this process --

    def own_figures(self) -> dict[str, Any]:
        """This web process's figures, with rates over the time since the last call."""
        hub, c = self.hub, self.hub.counters
        now = time.monotonic()
        prev = self._prev_counts
        self._prev_counts = (now, c.frames_out, c.ticks_out, hub.messages_in)
        if prev is None or now <= prev[0]:
            rates = (0.0, 0.0, 0.0)
        else:
            dt = now - prev[0]
            rates = (
                (c.frames_out - prev[1]) / dt,
                (c.ticks_out - prev[2]) / dt,
                (hub.messages_in - prev[3]) / dt,
            )
        subs = hub.subscribers
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "port": self.settings.port,
            "started_ns": self.started_ns,
            "redis_pubsub": UP if hub.redis_up else DOWN,
            "connections": len(subs),
            "subscriptions": sum(len(s.symbols) for s in subs),
            "status_watchers": sum(1 for s in subs if "status" in s.channels),
            "frames_per_s": round(rates[0], 1),
            "ticks_out_per_s": round(rates[1], 1),
            "messages_in_per_s": round(rates[2], 1),
            "frames_out": c.frames_out,
            "ticks_out": c.ticks_out,
            "conflations": c.conflations,
            "conflated_quotes": c.conflated,
            "slow_consumer_closes": c.slow_closes,
            "pubsub_reconnects": hub.reconnects,
        }

    async def beat(self) -> None:
        """Publish this process's heartbeat now (the status loop does so every second)."""
        with contextlib.suppress(RedisError, OSError):
            await publish_web(self.redis, self.web_id, WebBeat(self.own_figures(), time.time_ns()))

    # -- the whole deployment --

    async def refresh(self) -> dict[str, Any]:
        """Publish this process's heartbeat, read everyone else's, and judge every part."""
        self.own = own = self.own_figures()
        now_wall = time.time()
        parts: list[Part]
        try:
            parts = await asyncio.wait_for(self._read_deployment(own, now_wall), 2.5)
        except (RedisError, OSError, TimeoutError) as exc:
            parts = self._without_redis(own, str(exc) or type(exc).__name__)
        symbols = [judge_symbol(t, now_wall) for t in self._symbols.values()]
        for p in parts:
            self._last_parts[p.id] = p
            self.journal.note(p)
        state, reason = overall(parts, symbols)
        services = [p.json() for p in parts]
        feeds = [p for p in services if p["kind"] == "feed"]
        webs = [p for p in services if p["kind"] == "web"]
        report = {
            "status": state,
            "reason": reason,
            "server_time": time.time_ns(),
            "web_process": "web:" + self.web_id,
            "rates": {
                "ticks_in_per_s": round(sum(p["figures"].get("rate", 0.0) for p in feeds), 1),
                "ticks_out_per_s": round(
                    sum(p["figures"].get("ticks_out_per_s", 0.0) for p in webs), 1
                ),
            },
            "services": services,
            "symbols": symbols,
            "errors": self.journal.recent(),
        }
        self.report = report
        self.frame = wire.event_json({"type": "service_status", **report})
        self.sources = self._sources(parts)
        return report

    def _sources(self, parts: list[Part]) -> list[dict[str, Any]]:
        """Every live venue source a feed runs or ran (in the last 10 minutes): its figures as
        last published (``tp:sources``, the same for every web process), and ``down`` when its
        feed stopped."""
        out = []
        feeds = {p.id.partition(":")[2]: p for p in parts if p.kind == "feed"}
        for name in sorted(self._stored_sources):
            p = feeds.get(name)
            if p is None:
                continue
            live = "source" in p.figures and p.state != DOWN
            entry = {"name": name, **(p.figures["source"] if live else self._stored_sources[name])}
            entry["ticks_per_s"] = p.figures.get("rate", 0.0) if live else 0.0
            if p.state == DOWN:  # the source's own reason when it went down (a refusal)
                why = entry.get("reason") if entry.get("state") == "down" else None
                entry |= {"state": "down", "reason": why or p.reason, "messages_per_s": 0.0}
            out.append(entry)
        return out

    def summary(self) -> dict[str, Any]:
        """The public liveness form: the overall state only."""
        r = self.report
        return {
            "status": r["status"] if r else DEGRADED,
            "server_time": time.time_ns(),
            "detail": "send a key with the 'admin' scope for every part's state and figures",
        }

    def _own_beat(self, own: dict[str, Any], now: float) -> WebBeat:
        return WebBeat(own, int(now * 1e9))

    async def _read_deployment(self, own: dict[str, Any], now: float) -> list[Part]:
        r = self.redis
        t0 = time.perf_counter()
        await r.ping()
        latency_ms = (time.perf_counter() - t0) * 1000
        await publish_web(r, self.web_id, WebBeat(own, time.time_ns()))
        info = await server_info(r)
        async with r.pipeline(transaction=False) as pipe:
            pipe.zrange(PROCS_KEY, 0, -1, withscores=True)
            pipe.hgetall(RECORDER_KEY)
            pipe.hgetall(SOURCES_KEY)
            for key in self.layout.symbols_keys:
                pipe.smembers(key)
            procs, recorder, sources, *known_sets = await pipe.execute()
        self._stored_sources = {k.decode(): orjson.loads(v) for k, v in sources.items()}
        known = {s for members in known_sets for s in members}
        seen = {m.decode(): float(score) for m, score in procs}
        seen.setdefault("feed:" + self.settings.feed_name, 0.0)
        seen["web:" + self.web_id] = now
        names = sorted(seen)
        syms = sorted(s.decode() for s in known)[:MAX_STATUS_SYMBOLS]
        async with r.pipeline(transaction=False) as pipe:
            for name in names:
                kind, _, ident = name.partition(":")
                pipe.hgetall((FEED_KEY_PREFIX if kind == "feed" else WEB_KEY_PREFIX) + ident)
            for sym in syms:
                pipe.hmget(self.layout.sym_key(sym), "epoch", "seq", "trade", "quote")
            replies = await pipe.execute()
        beats = dict(zip(names, replies[: len(names)], strict=True))
        parts = [judge_redis(info, latency_ms)]
        self.redis_figures = parts[0].figures
        for name in names:
            kind, _, ident = name.partition(":")
            if kind == "feed":
                feed = FeedBeat.parse(beats[name])
                if feed is not None:
                    self.journal.note_rejects(name, feed.rejected, feed.last_rejects)
                parts.append(judge_feed(ident, feed, seen[name], now))
        parts.append(judge_recorder(RecorderBeat.parse(recorder), now))
        for name in names:
            kind, _, ident = name.partition(":")
            if kind == "web":
                mine = ident == self.web_id
                web = self._own_beat(own, now) if mine else WebBeat.parse(beats[name])
                parts.append(judge_web(ident, web, seen[name], now))
        self._track_symbols(syms, replies[len(names) :])
        return parts

    def _without_redis(self, own: dict[str, Any], error: str) -> list[Part]:
        """Redis is unreachable: say so, and mark what can only be known through it."""
        parts = [redis_unreachable(error, self.redis_figures)]
        for pid, last in self._last_parts.items():
            if pid not in ("redis", "web:" + self.web_id):
                parts.append(unknown_without_redis(last))
        now = time.time()
        parts.append(judge_web(self.web_id, self._own_beat(own, now), now, now))
        return parts

    def _track_symbols(self, syms: list[str], rows: list[list[bytes | None]]) -> None:
        mono = time.monotonic()
        tracks = self._symbols
        for sym in [s for s in tracks if s not in syms]:
            del tracks[sym]
        for sym, (epoch, seq, trade, quote) in zip(syms, rows, strict=True):
            seq_n = int(seq) if seq else 0
            epoch_n = int(epoch) if epoch else None
            t = tracks.get(sym)
            if t is None:
                t = tracks[sym] = SymbolTrack(seq=seq_n, epoch=epoch_n, changed=mono)
            t.observe(sym, epoch_n, seq_n, [e for e in (trade, quote) if e is not None], mono)

    # -- the loop --

    async def run(self) -> None:
        """Every second: refresh, then push the status frame to ``status`` subscribers."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug in one round must not end status reporting
                log.exception("status round failed")
            else:
                frame = self.frame
                assert frame is not None
                for sub in list(self.hub.subscribers):
                    if "status" in sub.channels:
                        sub.send_raw(frame)
            await asyncio.sleep(1.0)

    async def forget(self) -> None:
        """On a clean shutdown: take this process out of the list at once (one that dies
        without this shows as down until ``heartbeat.FORGET_AFTER_S``)."""
        with contextlib.suppress(RedisError, OSError):
            await forget_web(self.redis, self.web_id)
