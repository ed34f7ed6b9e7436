"""Service status: every moving part of the deployment, as one web process sees it.

Each part is ``up``, ``degraded`` or ``down`` with the reason in words. The parts and where their
figures come from (see ``server.bus`` for the heartbeat keys):

* ``redis``: this process PINGs it and reads INFO (reachable, latency, memory);
* ``feed:<name>``: the feed's hash ``tp:feed:<name>`` (state, ticks/s, rejects, last tick);
* ``recorder``: ``tp:recorder`` (lag, last flush, rows stored);
* ``web:<host>:<pid>``: every web process's hash, this one's own figures straight from its hub;
* each symbol: its latest trade and quote in ``tp:sym:<S>``, judged against its own usual rate,
  so a quiet symbol is not called dead and a dead one is not called quiet.

A process whose heartbeat is older than ``DOWN_AFTER_S`` is ``down``: with one-second heartbeats
a process that died shows as down within about three seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import protocol
from server.bus import (
    FEED_KEY_PREFIX,
    FIGURES_TTL_S,
    PROCS_KEY,
    SYMBOLS_KEY,
    WEB_KEY_PREFIX,
    sym_key,
)
from server.config import Settings
from server.hub import Hub

log = logging.getLogger("tickpipe.status")

UP, DEGRADED, DOWN = "up", "degraded", "down"
RECORDER_KEY = "tp:recorder"  # written by server.recorder
DOWN_AFTER_S = 3.0  # a heartbeat older than this: the process is down
FORGET_AFTER_S = 600.0  # a process silent this long is no longer listed
FEED_IDLE_S = 5.0  # a running feed that published nothing for this long is degraded
RECORDER_LAG_S = 10.0  # recorder behind by more than this (with entries waiting): degraded
REDIS_SLOW_MS = 100.0
REDIS_MEMORY_HIGH = 0.9  # of maxmemory
# A symbol is stale when its last tick is older than STALE_FACTOR times its usual interval
# (and at least STALE_MIN_S); before its usual interval is known, after UNKNOWN_RATE_STALE_S.
STALE_FACTOR = 10.0
STALE_MIN_S = 2.0
UNKNOWN_RATE_STALE_S = 60.0
MAX_STATUS_SYMBOLS = 1000
MAX_ERRORS = 50
STARTUP_GRACE_S = 3.0  # state changes seen while this web process starts are not errors


@dataclass(slots=True)
class _SymbolTrack:
    """What the board remembers about a symbol between rounds, to learn its usual rate."""

    seq: int = 0
    epoch: int | None = None
    changed: float = 0.0  # monotonic time the seq was last seen to move
    usual_s: float | None = None  # usual interval between ticks (EWMA over moves)
    rate: float = 0.0  # ticks/s over the last round
    last_ts: int = 0
    row: dict[str, Any] = field(default_factory=dict)


def _part(
    pid: str, kind: str, state: str, reason: str, figures: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"id": pid, "kind": kind, "state": state, "reason": reason, "figures": figures or {}}


def _s(raw: dict[bytes, bytes], name: str, default: str = "") -> str:
    v = raw.get(name.encode())
    return v.decode() if v is not None else default


def _num(raw: dict[bytes, bytes], name: str, default: float = 0.0) -> float:
    try:
        return float(raw[name.encode()])
    except (KeyError, ValueError):
        return default


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


class StatusBoard:
    """Builds the deployment's status every second and publishes this process's heartbeat.

    ``report`` is the latest full status (``GET /status``), ``frame`` the same encoded once as
    a ``service_status`` event for WebSocket subscribers of the ``status`` channel.
    """

    def __init__(self, settings: Settings, redis: Redis, hub: Hub, started_ns: int) -> None:
        self.settings = settings
        self.redis = redis
        self.hub = hub
        self.started_ns = started_ns
        self.web_id = f"{socket.gethostname()}:{os.getpid()}"
        self.report: dict[str, Any] | None = None
        self.frame: str | None = None
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_ERRORS)
        self._symbols: dict[str, _SymbolTrack] = {}
        self._states: dict[str, str] = {}
        self._logged: set[str] = set()  # parts whose trouble is in ``errors``: log their recovery
        self._rejected: dict[str, float] = {}
        self._last_parts: dict[str, dict[str, Any]] = {}
        self._prev_counts: tuple[float, int, int, int] | None = None
        self.own: dict[str, Any] = {}
        self.redis_figures: dict[str, Any] = {}

    # -- this process --

    def _own_figures(self) -> dict[str, Any]:
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

    async def _heartbeat(self, own: dict[str, Any]) -> None:
        key = WEB_KEY_PREFIX + self.web_id
        async with self.redis.pipeline(transaction=False) as pipe:
            figures = {k: str(v) for k, v in own.items()}
            pipe.hset(key, mapping=figures | {"updated_ns": str(time.time_ns())})
            pipe.expire(key, FIGURES_TTL_S)
            pipe.zadd(PROCS_KEY, {"web:" + self.web_id: time.time()})
            pipe.zremrangebyscore(PROCS_KEY, 0, time.time() - FORGET_AFTER_S)
            await pipe.execute()

    # -- the whole deployment --

    async def refresh(self) -> dict[str, Any]:
        """Publish this process's heartbeat, read everyone else's, and judge every part."""
        self.own = own = self._own_figures()
        now_wall = time.time()
        parts: list[dict[str, Any]]
        try:
            parts = await asyncio.wait_for(self._read_deployment(own, now_wall), 2.5)
        except (RedisError, OSError, TimeoutError) as exc:
            parts = self._without_redis(own, str(exc) or type(exc).__name__)
        symbols = self._judge_symbols(now_wall)
        for p in parts:
            self._note(p)
        rank = {UP: 0, DEGRADED: 1, DOWN: 2}
        worst = max(parts, key=lambda p: rank[p["state"]])
        # Down only with Redis (nothing live works); any other part down degrades the service.
        overall = DOWN if parts[0]["state"] == DOWN else UP if worst["state"] == UP else DEGRADED
        stale = [s["sym"] for s in symbols if s["state"] != UP]
        if overall == UP and stale:
            overall = DEGRADED
        if overall == UP:
            reason = "every part is up"
        elif worst["state"] != UP:
            reason = f"{worst['id']} {worst['state']}: {worst['reason']}"
        else:
            reason = f"{len(stale)} stale symbol(s): {', '.join(stale[:5])}"
        feeds = [p for p in parts if p["kind"] == "feed"]
        webs = [p for p in parts if p["kind"] == "web"]
        report = {
            "status": overall,
            "reason": reason,
            "server_time": time.time_ns(),
            "web_process": "web:" + self.web_id,
            "rates": {
                "ticks_in_per_s": round(sum(p["figures"].get("rate", 0.0) for p in feeds), 1),
                "ticks_out_per_s": round(
                    sum(p["figures"].get("ticks_out_per_s", 0.0) for p in webs), 1
                ),
            },
            "services": parts,
            "symbols": symbols,
            "errors": list(self.errors)[::-1][:20],
        }
        self.report = report
        self.frame = protocol.event_json({"type": "service_status", **report})
        return report

    def summary(self) -> dict[str, Any]:
        """The public liveness form: the overall state only."""
        r = self.report
        return {
            "status": r["status"] if r else DEGRADED,
            "server_time": time.time_ns(),
            "detail": "send a key with the 'admin' scope for every part's state and figures",
        }

    async def _read_deployment(self, own: dict[str, Any], now: float) -> list[dict[str, Any]]:
        r = self.redis
        t0 = time.perf_counter()
        await r.ping()
        latency_ms = (time.perf_counter() - t0) * 1000
        await self._heartbeat(own)
        async with r.pipeline(transaction=False) as pipe:
            pipe.info()
            pipe.zrange(PROCS_KEY, 0, -1, withscores=True)
            pipe.hgetall(RECORDER_KEY)
            pipe.smembers(SYMBOLS_KEY)
            info, procs, recorder, known = await pipe.execute()
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
                pipe.hmget(sym_key(sym), "epoch", "seq", "trade", "quote")
            replies = await pipe.execute()
        parts = [self._judge_redis(info, latency_ms)]
        for name, raw in zip(names, replies[: len(names)], strict=True):
            kind, _, ident = name.partition(":")
            if kind == "feed":
                parts.append(self._judge_feed(ident, raw, seen[name], now))
        parts.append(self._judge_recorder(recorder, now))
        for name in names:
            kind, _, ident = name.partition(":")
            if kind == "web":
                raw = replies[names.index(name)]
                parts.append(self._judge_web(ident, raw, seen[name], now, own))
        self._track_symbols(syms, replies[len(names) :])
        return parts

    def _without_redis(self, own: dict[str, Any], error: str) -> list[dict[str, Any]]:
        """Redis is unreachable: say so, and mark what can only be known through it."""
        parts = [
            _part(
                "redis",
                "redis",
                DOWN,
                f"unreachable ({error[:120]}); live data is interrupted",
                self.redis_figures,
            )
        ]
        for pid, last in self._last_parts.items():
            if pid == "redis" or pid == "web:" + self.web_id:
                continue
            parts.append(
                _part(
                    pid,
                    last["kind"],
                    DEGRADED,
                    "unknown while Redis is unreachable (its figures are read from Redis)",
                    last["figures"],
                )
            )
        parts.append(self._judge_web(self.web_id, {}, time.time(), time.time(), own))
        return parts

    # -- judging each part --

    def _judge_redis(self, info: dict[str, Any], latency_ms: float) -> dict[str, Any]:
        used = int(info.get("used_memory", 0))
        limit = int(info.get("maxmemory", 0))
        figures = {
            "latency_ms": round(latency_ms, 2),
            "used_memory_bytes": used,
            "maxmemory_bytes": limit,
            "connected_clients": int(info.get("connected_clients", 0)),
            "version": str(info.get("redis_version", "")),
            "uptime_s": int(info.get("uptime_in_seconds", 0)),
        }
        self.redis_figures = figures
        mem = f"{used / 2**20:.1f} MiB used"
        if limit and used > REDIS_MEMORY_HIGH * limit:
            return _part(
                "redis",
                "redis",
                DEGRADED,
                f"memory nearly full: {mem} of {limit / 2**20:.0f} MiB",
                figures,
            )
        if latency_ms > REDIS_SLOW_MS:
            return _part(
                "redis", "redis", DEGRADED, f"slow: PING took {latency_ms:.0f} ms", figures
            )
        return _part("redis", "redis", UP, f"PING {latency_ms:.1f} ms; {mem}", figures)

    def _judge_feed(
        self, name: str, raw: dict[bytes, bytes], seen: float, now: float
    ) -> dict[str, Any]:
        pid = "feed:" + name
        if not raw:
            since = f"for {_ago(now - seen)}" if seen else "yet"
            return _part(
                pid,
                "feed",
                DOWN,
                f"no heartbeat {since}: the feed process is not running (start it: tickpipe feed)",
            )
        updated = _num(raw, "updated_ns") / 1e9
        last_tick = _num(raw, "last_tick_ns") / 1e9
        figures = {
            "state": _s(raw, "state"),
            "pid": int(_num(raw, "pid")),
            "rate": _num(raw, "rate"),
            "published": int(_num(raw, "published")),
            "rejected": orjson.loads(raw.get(b"rejected") or b"{}"),
            "last_rejects": orjson.loads(raw.get(b"last_rejects") or b"[]"),
            "last_tick_age_s": round(max(0.0, now - last_tick), 3) if last_tick else None,
            "heartbeat_age_s": round(max(0.0, now - updated), 3),
        }
        self._note_rejects(pid, figures["rejected"], figures["last_rejects"])
        if now - updated > DOWN_AFTER_S:
            return _part(
                pid,
                "feed",
                DOWN,
                f"no heartbeat for {_ago(now - updated)}: the feed process stopped or hangs",
                figures,
            )
        state = figures["state"]
        if state == "redis_down":
            return _part(
                pid,
                "feed",
                DEGRADED,
                "cannot publish: Redis unreachable; holding its batch and retrying",
                figures,
            )
        if state != "running":
            return _part(
                pid, "feed", DEGRADED, f"{state or 'starting'}: not publishing yet", figures
            )
        if not last_tick or now - last_tick > FEED_IDLE_S:
            idle = _ago(now - last_tick) if last_tick else "its start"
            return _part(
                pid, "feed", DEGRADED, f"running but no tick published for {idle}", figures
            )
        nrej = sum(figures["rejected"].values())
        rej = f"; {nrej} rejected so far" if nrej else ""
        return _part(pid, "feed", UP, f"publishing {figures['rate']:.0f} ticks/s{rej}", figures)

    def _judge_recorder(self, raw: dict[bytes, bytes], now: float) -> dict[str, Any]:
        if not raw:
            return _part(
                "recorder",
                "recorder",
                DOWN,
                "no heartbeat: the recorder is not "
                "running, so ticks are not stored (start it: tickpipe recorder)",
            )
        updated = _num(raw, "updated_ns") / 1e9
        last_flush = _num(raw, "last_flush_ns") / 1e9
        lag_s = _num(raw, "lag_s", -1)
        lag_batches = int(_num(raw, "lag_batches", -1))
        figures = {
            "pid": int(_num(raw, "pid")),
            "rows_stored": int(_num(raw, "rows_stored")),
            "lag_s": lag_s,
            "lag_batches": lag_batches,
            "lag_ticks": int(_num(raw, "lag_ticks", -1)),
            "write_errors": int(_num(raw, "write_errors")),
            "files_compacted": int(_num(raw, "files_compacted")),
            "last_flush_age_s": round(max(0.0, now - last_flush), 3) if last_flush else None,
            "heartbeat_age_s": round(max(0.0, now - updated), 3),
        }
        if now - updated > DOWN_AFTER_S:
            return _part(
                "recorder",
                "recorder",
                DOWN,
                f"no heartbeat for {_ago(now - updated)}: the recorder stopped or hangs",
                figures,
            )
        if _s(raw, "state") == "write_failed":
            return _part(
                "recorder",
                "recorder",
                DOWN,
                f"cannot write history ({_s(raw, 'error')[:200]}); nothing is lost while the "
                f"{max(lag_batches, 0)} waiting batches stay in the Redis log: free disk space",
                figures,
            )
        if lag_batches > 0 and lag_s > RECORDER_LAG_S:
            return _part(
                "recorder",
                "recorder",
                DEGRADED,
                f"behind by {lag_s:.0f} s ({lag_batches} batches waiting)",
                figures,
            )
        return _part(
            "recorder",
            "recorder",
            UP,
            f"{figures['rows_stored']} rows stored; {max(lag_batches, 0)} batches waiting",
            figures,
        )

    def _judge_web(
        self,
        ident: str,
        raw: dict[bytes, bytes],
        seen: float,
        now: float,
        own: dict[str, Any],
    ) -> dict[str, Any]:
        pid = "web:" + ident
        if ident == self.web_id:
            figures = dict(own)
            heartbeat_age = 0.0
        elif not raw:
            return _part(
                pid, "web", DOWN, f"no heartbeat for {_ago(now - seen)}: the web process stopped"
            )
        else:
            figures = {k.decode(): _web_value(v.decode()) for k, v in raw.items()}
            heartbeat_age = now - float(figures.pop("updated_ns", 0)) / 1e9
        figures["heartbeat_age_s"] = round(max(0.0, heartbeat_age), 3)
        if heartbeat_age > DOWN_AFTER_S:
            return _part(
                pid,
                "web",
                DOWN,
                f"no heartbeat for {_ago(heartbeat_age)}: the web process stopped or hangs",
                figures,
            )
        if figures.get("redis_pubsub") != UP:
            return _part(
                pid, "web", DEGRADED, "Redis pub/sub connection lost; reconnecting", figures
            )
        return _part(
            pid,
            "web",
            UP,
            f"{figures.get('connections', 0)} connections, "
            f"{figures.get('ticks_out_per_s', 0):.0f} ticks/s out",
            figures,
        )

    # -- symbols --

    def _track_symbols(self, syms: list[str], rows: list[list[bytes | None]]) -> None:
        mono = time.monotonic()
        tracks = self._symbols
        for sym in [s for s in tracks if s not in syms]:
            del tracks[sym]
        for sym, (epoch, seq, trade, quote) in zip(syms, rows, strict=True):
            t = tracks.get(sym)
            seq_n = int(seq) if seq else 0
            epoch_n = int(epoch) if epoch else None
            if t is None:
                t = tracks[sym] = _SymbolTrack(seq=seq_n, epoch=epoch_n, changed=mono)
            elif epoch_n != t.epoch or seq_n < t.seq:  # a new epoch: the count starts over
                t.seq, t.epoch, t.changed, t.rate = seq_n, epoch_n, mono, 0.0
            elif seq_n > t.seq:
                n = seq_n - t.seq
                span = mono - t.changed
                t.rate = n / max(span, 1e-3)
                one = span / n
                t.usual_s = one if t.usual_s is None else 0.8 * t.usual_s + 0.2 * one
                t.seq, t.changed = seq_n, mono
            else:
                t.rate = 0.0
            # "last_seq", not "seq": ticks out are counted by '"seq":' in each frame sent.
            row: dict[str, Any] = {"sym": sym, "last_seq": seq_n}
            for raw in (trade, quote):
                if raw is None:
                    continue
                ev = orjson.loads(raw)
                t.last_ts = max(t.last_ts, int(ev.get("ts", 0)))
                if ev.get("type") == "trade":
                    row["last"] = ev.get("price")
                    row["size"] = ev.get("size")
                else:
                    row["bid"], row["ask"] = ev.get("bid"), ev.get("ask")
            if row.get("bid") is not None and row.get("ask") is not None:
                row["spread"] = round(row["ask"] - row["bid"], 10)
            t.row = row

    def _judge_symbols(self, now: float) -> list[dict[str, Any]]:
        out = []
        for t in self._symbols.values():
            age = max(0.0, now - t.last_ts / 1e9) if t.last_ts else None
            row = dict(t.row)
            usual = t.usual_s
            limit = (
                UNKNOWN_RATE_STALE_S if usual is None else max(STALE_MIN_S, STALE_FACTOR * usual)
            )
            row["ticks_per_s"] = round(t.rate, 1)
            row["usual_interval_s"] = None if usual is None else round(usual, 4)
            row["age_s"] = None if age is None else round(age, 3)
            habit = "rate not known yet" if usual is None else f"usually every {usual:.3g} s"
            if age is None:
                row["state"], row["reason"] = DEGRADED, "no tick published yet"
            elif age > limit:
                row["state"], row["reason"] = DEGRADED, f"stale: no tick for {_ago(age)}; {habit}"
            else:
                row["state"], row["reason"] = UP, f"last tick {_ago(age)} ago; {habit}"
            row["stale"] = row["state"] != UP
            out.append(row)
        return out

    # -- recent errors --

    def _note(self, part: dict[str, Any]) -> None:
        pid, state = part["id"], part["state"]
        self._last_parts[pid] = part
        before = self._states.get(pid)
        self._states[pid] = state
        starting = time.time_ns() - self.started_ns < STARTUP_GRACE_S * 1e9
        if state == before or starting or (state == UP and pid not in self._logged):
            return
        if state == UP:
            self._logged.discard(pid)
        else:
            self._logged.add(pid)
        self.errors.append(
            {
                "ts": time.time_ns(),
                "part": pid,
                "state": state,
                "message": part["reason"] if state != UP else "back up",
            }
        )

    def _note_rejects(self, pid: str, rejected: dict[str, int], last: list[Any]) -> None:
        total = float(sum(rejected.values()))
        before = self._rejected.get(pid)
        self._rejected[pid] = total
        if before is not None and total > before:
            reasons = ", ".join(sorted({str(r.get("reason")) for r in last[-5:]}))
            self.errors.append(
                {
                    "ts": time.time_ns(),
                    "part": pid,
                    "state": "rejected",
                    "message": f"{total - before:.0f} tick(s) rejected ({reasons})",
                }
            )

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
        without this shows as down until ``FORGET_AFTER_S``)."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(WEB_KEY_PREFIX + self.web_id)
            await self.redis.zrem(PROCS_KEY, "web:" + self.web_id)


def _web_value(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
