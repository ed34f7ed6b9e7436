"""Judging each part of the deployment from its figures: pure functions ``(figures, now) ->
Part``, so every verdict and its reason can be tested without a process or a clock.

Each part is ``up``, ``degraded`` or ``down`` with the reason in words and the figures it was
judged on. A process whose heartbeat is older than ``DOWN_AFTER_S`` is ``down``: with one-second
heartbeats a process that died shows as down within about three seconds. A symbol is judged
against its own usual rate (``SymbolTrack``), so a quiet symbol is not called dead and a dead
one is not called quiet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from server.ops.heartbeat import FeedBeat, RecorderBeat, WebBeat

UP, DEGRADED, DOWN = "up", "degraded", "down"
RANK = {UP: 0, DEGRADED: 1, DOWN: 2}
DOWN_AFTER_S = 3.0  # a heartbeat older than this: the process is down
FEED_IDLE_S = 5.0  # a running feed that published nothing for this long is degraded
RECORDER_LAG_S = 10.0  # recorder behind by more than this (with entries waiting): degraded
RECORDER_IDLE_S = 2.0  # nothing waiting and no new tick for this long: idle (the feed is quiet)
REDIS_SLOW_MS = 100.0
REDIS_MEMORY_HIGH = 0.9  # of maxmemory
# A symbol is stale when its last tick is older than STALE_FACTOR times its usual interval
# (and at least STALE_MIN_S); before its usual interval is known, after UNKNOWN_RATE_STALE_S.
STALE_FACTOR = 10.0
STALE_MIN_S = 2.0
UNKNOWN_RATE_STALE_S = 60.0


@dataclass(frozen=True, slots=True)
class Part:
    """One part's verdict, as ``/status`` and the ``service_status`` frames list it."""

    id: str
    kind: str
    state: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "reason": self.reason,
            "figures": self.figures,
        }


def ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _age(now: float, ns: int) -> float:
    return round(max(0.0, now - ns / 1e9), 3)


def judge_redis(info: dict[str, Any], latency_ms: float) -> Part:
    """Redis from its INFO and this process's PING: memory nearly full or slow is degraded."""
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
    mem = f"{used / 2**20:.1f} MiB used"
    if limit and used > REDIS_MEMORY_HIGH * limit:
        reason = f"memory nearly full: {mem} of {limit / 2**20:.0f} MiB"
        return Part("redis", "redis", DEGRADED, reason, figures)
    if latency_ms > REDIS_SLOW_MS:
        return Part("redis", "redis", DEGRADED, f"slow: PING took {latency_ms:.0f} ms", figures)
    return Part("redis", "redis", UP, f"PING {latency_ms:.1f} ms; {mem}", figures)


def redis_unreachable(error: str, figures: dict[str, Any]) -> Part:
    return Part(
        "redis", "redis", DOWN, f"unreachable ({error[:120]}); live data is interrupted", figures
    )


def judge_feed(name: str, beat: FeedBeat | None, seen: float, now: float) -> Part:
    """A feed from its heartbeat (``seen``: when ``tp:procs`` last had it, 0 if never)."""
    pid = "feed:" + name
    if beat is None:
        since = f"for {ago(now - seen)}" if seen else "yet"
        reason = f"no heartbeat {since}: the feed process is not running (start it: tickpipe feed)"
        return Part(pid, "feed", DOWN, reason)
    updated = beat.updated_ns / 1e9
    last_tick = beat.last_tick_ns / 1e9
    figures = {
        "state": beat.state,
        "pid": beat.pid,
        "rate": beat.rate,
        "published": beat.published,
        "rejected": beat.rejected,
        "last_rejects": beat.last_rejects,
        "last_tick_age_s": _age(now, beat.last_tick_ns) if last_tick else None,
        "heartbeat_age_s": _age(now, beat.updated_ns),
    }
    if beat.source:
        figures["source"] = beat.source
    if now - updated > DOWN_AFTER_S:
        reason = f"no heartbeat for {ago(now - updated)}: the feed process stopped or hangs"
        return Part(pid, "feed", DOWN, reason, figures)
    source_state = beat.source.get("state") if beat.source else None
    if source_state in ("connecting", "reconnecting", "down"):
        kind = beat.source.get("kind")
        why = beat.source.get("reason") or "no connection yet"
        reason = f"{kind} {source_state}: {why}"
        return Part(pid, "feed", DOWN if source_state == "down" else DEGRADED, reason, figures)
    if beat.state == "redis_down":
        reason = "cannot publish: Redis unreachable; holding its batch and retrying"
        return Part(pid, "feed", DEGRADED, reason, figures)
    if beat.state != "running":
        reason = f"{beat.state or 'starting'}: not publishing yet"
        return Part(pid, "feed", DEGRADED, reason, figures)
    if not last_tick or now - last_tick > FEED_IDLE_S:
        idle = ago(now - last_tick) if last_tick else "its start"
        return Part(pid, "feed", DEGRADED, f"running but no tick published for {idle}", figures)
    nrej = sum(beat.rejected.values())
    rej = f"; {nrej} rejected so far" if nrej else ""
    return Part(pid, "feed", UP, f"publishing {beat.rate:.0f} ticks/s{rej}", figures)


def judge_recorder(beat: RecorderBeat | None, now: float) -> Part:
    """The recorder from its heartbeat: down when it stopped or cannot write, degraded when far
    behind, idle (up, no lag) when every published tick is stored."""
    if beat is None:
        reason = (
            "no heartbeat: the recorder is not running, so ticks are not stored "
            "(start it: tickpipe recorder)"
        )
        return Part("recorder", "recorder", DOWN, reason)
    updated = beat.updated_ns / 1e9
    lag_s, lag_batches = beat.lag_s, beat.lag_batches
    # Nothing undelivered and nothing unacknowledged: every published tick is stored, so there
    # is no lag, however old the last tick is ("lag_s" is measured from that tick).
    caught_up = lag_batches == 0 and beat.pending_batches == 0
    idle_s = lag_s if caught_up and lag_s > RECORDER_IDLE_S else None
    figures = {
        "pid": beat.pid,
        "rows_stored": beat.rows_stored,
        "lag_s": 0.0 if caught_up else lag_s,
        "lag_batches": lag_batches,
        "pending_batches": beat.pending_batches,
        "idle_s": idle_s,
        "lag_ticks": beat.lag_ticks,
        "write_errors": beat.write_errors,
        "files_compacted": beat.files_compacted,
        "repeats_dropped": beat.repeats_dropped,
        "last_flush_age_s": _age(now, beat.last_flush_ns) if beat.last_flush_ns else None,
        "heartbeat_age_s": _age(now, beat.updated_ns),
    }
    if now - updated > DOWN_AFTER_S:
        reason = f"no heartbeat for {ago(now - updated)}: the recorder stopped or hangs"
        return Part("recorder", "recorder", DOWN, reason, figures)
    if beat.state == "write_failed":
        reason = (
            f"cannot write history ({beat.error[:200]}); nothing is lost while the "
            f"{max(lag_batches, 0)} waiting batches stay in the Redis log: free disk space"
        )
        return Part("recorder", "recorder", DOWN, reason, figures)
    if lag_batches > 0 and lag_s > RECORDER_LAG_S:
        reason = f"behind by {lag_s:.0f} s ({lag_batches} batches waiting)"
        return Part("recorder", "recorder", DEGRADED, reason, figures)
    if idle_s is not None:
        reason = (
            f"idle: every published tick is stored, nothing new for {ago(idle_s)} "
            f"({beat.rows_stored} rows stored)"
        )
    else:
        reason = f"{beat.rows_stored} rows stored; {max(lag_batches, 0)} batches waiting"
    return Part("recorder", "recorder", UP, reason, figures)


def judge_web(ident: str, beat: WebBeat | None, seen: float, now: float) -> Part:
    """A web process from its heartbeat (this process's own: ``updated_ns`` of now)."""
    pid = "web:" + ident
    if beat is None:
        reason = f"no heartbeat for {ago(now - seen)}: the web process stopped"
        return Part(pid, "web", DOWN, reason)
    figures = dict(beat.figures)
    heartbeat_age = now - beat.updated_ns / 1e9
    figures["heartbeat_age_s"] = round(max(0.0, heartbeat_age), 3)
    if heartbeat_age > DOWN_AFTER_S:
        reason = f"no heartbeat for {ago(heartbeat_age)}: the web process stopped or hangs"
        return Part(pid, "web", DOWN, reason, figures)
    if figures.get("redis_pubsub") != UP:
        return Part(pid, "web", DEGRADED, "Redis pub/sub connection lost; reconnecting", figures)
    reason = (
        f"{figures.get('connections', 0)} connections, "
        f"{figures.get('ticks_out_per_s', 0):.0f} ticks/s out"
    )
    return Part(pid, "web", UP, reason, figures)


def unknown_without_redis(last: Part) -> Part:
    """A part whose figures are read from Redis, while Redis is unreachable."""
    reason = "unknown while Redis is unreachable (its figures are read from Redis)"
    return Part(last.id, last.kind, DEGRADED, reason, last.figures)


# Symbols ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class SymbolTrack:
    """What the board remembers about a symbol between rounds, to learn its usual rate."""

    seq: int = 0
    epoch: int | None = None
    changed: float = 0.0  # monotonic time the seq was last seen to move
    usual_s: float | None = None  # usual interval between ticks (EWMA over moves)
    rate: float = 0.0  # ticks/s over the last round
    last_ts: int = 0
    row: dict[str, Any] = field(default_factory=dict)

    def observe(
        self, sym: str, epoch: int | None, seq: int, latest: list[bytes], mono: float
    ) -> None:
        """One round's look at the symbol: its sequence state and latest events (as published),
        at monotonic time ``mono``."""
        if epoch != self.epoch or seq < self.seq:  # a new epoch: the count starts over
            self.seq, self.epoch, self.changed, self.rate = seq, epoch, mono, 0.0
        elif seq > self.seq:
            n = seq - self.seq
            span = mono - self.changed
            self.rate = n / max(span, 1e-3)
            one = span / n
            self.usual_s = one if self.usual_s is None else 0.8 * self.usual_s + 0.2 * one
            self.seq, self.changed = seq, mono
        else:
            self.rate = 0.0
        # "last_seq", not "seq": ticks out are counted by '"seq":' in each frame sent.
        row: dict[str, Any] = {"sym": sym, "last_seq": seq}
        for raw in latest:
            ev = orjson.loads(raw)
            self.last_ts = max(self.last_ts, int(ev.get("ts", 0)))
            if ev.get("type") == "trade":
                row["last"] = ev.get("price")
                row["size"] = ev.get("size")
            else:  # a one-sided quote has no bid (or no ask): the row has none either
                for side in ("bid", "ask"):
                    if ev.get(side) is not None:
                        row[side] = ev[side]
        if row.get("bid") is not None and row.get("ask") is not None:
            row["spread"] = round(row["ask"] - row["bid"], 10)
        self.row = row


def judge_symbol(track: SymbolTrack, now: float) -> dict[str, Any]:
    """A symbol's row: stale (degraded) when its last tick is far older than its usual
    interval, or when it never ticked."""
    age = max(0.0, now - track.last_ts / 1e9) if track.last_ts else None
    row = dict(track.row)
    usual = track.usual_s
    limit = UNKNOWN_RATE_STALE_S if usual is None else max(STALE_MIN_S, STALE_FACTOR * usual)
    row["ticks_per_s"] = round(track.rate, 1)
    row["usual_interval_s"] = None if usual is None else round(usual, 4)
    row["age_s"] = None if age is None else round(age, 3)
    habit = "rate not known yet" if usual is None else f"usually every {usual:.3g} s"
    if age is None:
        row["state"], row["reason"] = DEGRADED, "no tick published yet"
    elif age > limit:
        row["state"], row["reason"] = DEGRADED, f"stale: no tick for {ago(age)}; {habit}"
    else:
        row["state"], row["reason"] = UP, f"last tick {ago(age)} ago; {habit}"
    row["stale"] = row["state"] != UP
    return row


def overall(parts: list[Part], symbols: list[dict[str, Any]]) -> tuple[str, str]:
    """The service's state and why: down only with Redis (nothing live works); any other part
    down, or a stale symbol, degrades it."""
    worst = max(parts, key=lambda p: RANK[p.state])
    state = DOWN if parts[0].state == DOWN else UP if worst.state == UP else DEGRADED
    stale = [s["sym"] for s in symbols if s["state"] != UP]
    if state == UP and stale:
        state = DEGRADED
    if state == UP:
        return state, "every part is up"
    if worst.state != UP:
        return state, f"{worst.id} {worst.state}: {worst.reason}"
    return state, f"{len(stale)} stale symbol(s): {', '.join(stale[:5])}"
