"""Heartbeats: every second each process leaves its figures in Redis as a typed record, and the
status board reads them back.

Where they live (``server.live.bus``): a hash with a short TTL per process (``tp:feed:<name>``,
``tp:recorder``, ``tp:{ops}:web:<host>:<pid>``), and for feed and web processes a stamp in
``tp:procs``, so a process that died is still named, as down, after its hash expired. A record
reads what is there: a field that is missing or not a number reads as its default, so a
half-written or older hash never breaks the board.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis.typing import EncodableT, FieldT

from server.live.bus import (
    FEED_KEY_PREFIX,
    FIGURES_TTL_S,
    PROCS_KEY,
    RECORDER_KEY,
    SOURCES_KEY,
    WEB_KEY_PREFIX,
)
from server.live.connection import RedisClient

FORGET_AFTER_S = 600.0  # a process silent this long is no longer listed in tp:procs
Hash = dict[bytes, bytes]


def _text(raw: Hash, name: str, default: str = "") -> str:
    v = raw.get(name.encode())
    return v.decode() if v is not None else default


def _num(raw: Hash, name: str, default: float = 0.0) -> float:
    try:
        return float(raw[name.encode()])
    except (KeyError, ValueError):
        return default


@dataclass(frozen=True, slots=True)
class FeedBeat:
    """A feed's figures: its state (``running``, ``redis_down``, ...), rate and rejects."""

    state: str
    pid: int
    rate: float  # ticks/s over the last second
    published: int
    rejected: dict[str, int]  # reason -> count, since the feed started
    last_rejects: list[dict[str, Any]]
    last_tick_ns: int  # 0: none yet
    updated_ns: int
    # A live venue source's figures (``VenueFeed.figures``); empty for the simulator or a file.
    source: dict[str, Any] = field(default_factory=dict)

    def mapping(self) -> dict[FieldT, EncodableT]:
        return {
            "source": orjson.dumps(self.source),
            "state": self.state,
            "pid": self.pid,
            "rate": round(self.rate, 1),
            "published": self.published,
            "rejected": orjson.dumps(self.rejected),
            "last_rejects": orjson.dumps(self.last_rejects),
            "last_tick_ns": self.last_tick_ns,
            "updated_ns": self.updated_ns,
        }

    @classmethod
    def parse(cls, raw: Hash) -> FeedBeat | None:
        if not raw:
            return None
        return cls(
            state=_text(raw, "state"),
            pid=int(_num(raw, "pid")),
            rate=_num(raw, "rate"),
            published=int(_num(raw, "published")),
            rejected=orjson.loads(raw.get(b"rejected") or b"{}"),
            last_rejects=orjson.loads(raw.get(b"last_rejects") or b"[]"),
            last_tick_ns=int(_num(raw, "last_tick_ns")),
            updated_ns=int(_num(raw, "updated_ns")),
            source=orjson.loads(raw.get(b"source") or b"{}"),
        )


@dataclass(frozen=True, slots=True)
class RecorderBeat:
    """The recorder's figures: what it stored, how far behind the log it is, write errors.
    Counts it could not read from Redis are -1."""

    pid: int
    state: str  # "ok" or "write_failed"
    error: str
    write_errors: int
    rows_stored: int
    lag_batches: int  # log entries not delivered to the recorder yet
    lag_ticks: int
    pending_batches: int  # delivered, not acknowledged (being written)
    lag_s: float  # from the last stored tick to now
    last_flush_ns: int
    files_compacted: int
    updated_ns: int
    repeats_dropped: int = 0  # ticks of a retried publish whose seqs were stored already

    def mapping(self) -> dict[FieldT, EncodableT]:
        return {
            "pid": self.pid,
            "state": self.state,
            "error": self.error,
            "write_errors": self.write_errors,
            "rows_stored": self.rows_stored,
            "lag_batches": self.lag_batches,
            "lag_ticks": self.lag_ticks,
            "pending_batches": self.pending_batches,
            "lag_s": self.lag_s,
            "last_flush_ns": self.last_flush_ns,
            "files_compacted": self.files_compacted,
            "updated_ns": self.updated_ns,
            "repeats_dropped": self.repeats_dropped,
        }

    @classmethod
    def parse(cls, raw: Hash) -> RecorderBeat | None:
        if not raw:
            return None
        return cls(
            pid=int(_num(raw, "pid")),
            state=_text(raw, "state"),
            error=_text(raw, "error"),
            write_errors=int(_num(raw, "write_errors")),
            rows_stored=int(_num(raw, "rows_stored")),
            lag_batches=int(_num(raw, "lag_batches", -1)),
            lag_ticks=int(_num(raw, "lag_ticks", -1)),
            pending_batches=int(_num(raw, "pending_batches", -1)),
            lag_s=_num(raw, "lag_s", -1),
            last_flush_ns=int(_num(raw, "last_flush_ns")),
            files_compacted=int(_num(raw, "files_compacted")),
            updated_ns=int(_num(raw, "updated_ns")),
            repeats_dropped=int(_num(raw, "repeats_dropped")),
        )


@dataclass(frozen=True, slots=True)
class WebBeat:
    """A web process's figures (connections, rates, fan-out counters: see
    ``StatusBoard.own_figures``), as it published them."""

    figures: dict[str, Any] = field(default_factory=dict)
    updated_ns: int = 0

    def mapping(self) -> dict[FieldT, EncodableT]:
        figures: dict[FieldT, EncodableT] = {k: str(v) for k, v in self.figures.items()}
        return figures | {"updated_ns": str(self.updated_ns)}

    @classmethod
    def parse(cls, raw: Hash) -> WebBeat | None:
        if not raw:
            return None
        figures = {k.decode(): _web_value(v.decode()) for k, v in raw.items()}
        return cls(figures, int(float(figures.pop("updated_ns", 0))))


def _web_value(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


# Writing: each process its own, every second -------------------------------------------------


async def _write_figures(redis: RedisClient, key: str, mapping: dict[FieldT, EncodableT]) -> None:
    """A heartbeat hash and its expiry in one transaction: never seen, nor left behind by a
    process that died between the two, without its TTL."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, FIGURES_TTL_S)
        await pipe.execute()


async def publish_feed(redis: RedisClient, name: str, beat: FeedBeat) -> None:
    await _write_figures(redis, FEED_KEY_PREFIX + name, beat.mapping())
    await redis.zadd(PROCS_KEY, {"feed:" + name: time.time()})
    if beat.source:  # kept after the feed stops: every web process lists the same sources
        await redis.hset(SOURCES_KEY, name, orjson.dumps(beat.source))


async def feed_stopped(redis: RedisClient, name: str, source: dict[str, Any]) -> None:
    """A live source's feed process ends: its source is listed as it ended (``down``, with the
    reason) and its heartbeat goes at once, so no page shows it live for the seconds its
    heartbeat had left and its symbols are free for another feed."""
    await redis.hset(SOURCES_KEY, name, orjson.dumps(source))
    await redis.delete(FEED_KEY_PREFIX + name)
    await redis.zadd(PROCS_KEY, {"feed:" + name: time.time()})


async def current_feeds(redis: RedisClient) -> dict[str, FeedBeat]:
    """The feeds whose heartbeat is current (name -> its record)."""
    members = cast(list[bytes], await redis.zrange(PROCS_KEY, 0, -1))
    names = [m.decode()[5:] for m in members if m.startswith(b"feed:")]
    if not names:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(FEED_KEY_PREFIX + name)
        raws = await pipe.execute()
    beats = {name: FeedBeat.parse(raw) for name, raw in zip(names, raws, strict=True)}
    return {name: beat for name, beat in beats.items() if beat is not None}


async def publish_recorder(redis: RedisClient, beat: RecorderBeat) -> None:
    await _write_figures(redis, RECORDER_KEY, beat.mapping())


async def publish_web(redis: RedisClient, web_id: str, beat: WebBeat) -> None:
    await _write_figures(redis, WEB_KEY_PREFIX + web_id, beat.mapping())
    async with redis.pipeline(transaction=False) as pipe:  # another slot than the hash's
        pipe.zadd(PROCS_KEY, {"web:" + web_id: time.time()})
        pipe.zremrangebyscore(PROCS_KEY, 0, time.time() - FORGET_AFTER_S)
        await pipe.execute()


async def forget_web(redis: RedisClient, web_id: str) -> None:
    """Take a web process out of the list at once (on a clean shutdown)."""
    await redis.delete(WEB_KEY_PREFIX + web_id)
    await redis.zrem(PROCS_KEY, "web:" + web_id)
