"""The tickerplant: pulls batches from a source, rejects bad ticks, publishes the rest atomically.

A rejected tick is counted with its reason and never stops the feed. When Redis is unreachable
the current batch is retried with backoff and no new ticks are generated meanwhile, so nothing
the source produced is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from typing import Protocol

import orjson
from redis import exceptions as rx
from redis.asyncio import Redis

from server.bus import FEED_KEY_PREFIX, FIGURES_TTL_S, PROCS_KEY, SYMBOLS_KEY, Bus
from server.config import Settings
from server.feed.simulator import Simulator
from server.ticks import Tick, reject_reason


class Source(Protocol):
    """Where ticks come from: the simulator, or a file replayed as a live feed."""

    symbols: list[str]

    def due(self, start_ns: int, end_ns: int) -> list[Tick]:
        """The ticks to publish for the wall-clock interval ``[start_ns, end_ns)``."""
        ...


log = logging.getLogger("tickpipe.feed")
REDIS_DOWN = (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, OSError)


class Tickerplant:
    def __init__(self, settings: Settings, source: Source) -> None:
        self.settings = settings
        self.source = source
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.bus = Bus(self.redis, settings.history_per_symbol, settings.log_max_batches)
        self.published = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.last_rejects: collections.deque[dict[str, object]] = collections.deque(maxlen=10)
        self.last_tick_ns = 0
        self.state = "starting"
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def screen(self, ticks: list[Tick]) -> list[Tick]:
        """Drop and count the ticks that fail validation; returns the good ones in order."""
        good = []
        for tick in ticks:
            reason = reject_reason(tick)
            if reason is None:
                good.append(tick)
            else:
                self.rejected[reason] += 1
                self.last_rejects.append({"reason": reason, "sym": str(tick.sym)[:40]})
        return good

    async def publish(self, ticks: list[Tick]) -> None:
        """Publish one batch, retrying with backoff until Redis takes it or the feed stops."""
        delay = 0.05
        while not self._stop.is_set():
            try:
                await self.bus.publish(ticks)
            except REDIS_DOWN as exc:
                if self.state != "redis_down":
                    log.warning("redis unreachable (%s); holding the batch and retrying", exc)
                self.state = "redis_down"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self.state != "running":
                log.info("publishing to %s", self.settings.redis_url.split("@")[-1])
            self.state = "running"
            self.published += len(ticks)
            if ticks:
                self.last_tick_ns = ticks[-1].ts
            return

    async def _report(self) -> None:
        """Every second, leave this feed's figures in Redis (with a TTL) for status pages."""
        key = FEED_KEY_PREFIX + self.settings.feed_name
        prev, prev_t = self.published, time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            rate = (self.published - prev) / (now - prev_t)
            prev, prev_t = self.published, now
            try:
                await self.redis.hset(
                    key,
                    mapping={
                        "state": self.state,
                        "pid": os.getpid(),
                        "rate": round(rate, 1),
                        "published": self.published,
                        "rejected": orjson.dumps(dict(self.rejected)),
                        "last_rejects": orjson.dumps(list(self.last_rejects)),
                        "last_tick_ns": self.last_tick_ns,
                        "updated_ns": time.time_ns(),
                    },
                )
                await self.redis.expire(key, FIGURES_TTL_S)
                await self.redis.zadd(PROCS_KEY, {"feed:" + self.settings.feed_name: time.time()})
            except REDIS_DOWN:
                pass

    async def run(self) -> None:
        s = self.settings
        interval = s.feed_batch_ms / 1000
        reporter = asyncio.create_task(self._report())
        try:
            while not self._stop.is_set():
                try:
                    await self.redis.sadd(SYMBOLS_KEY, *self.source.symbols)
                    break
                except REDIS_DOWN:
                    self.state = "redis_down"
                    await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            next_t = loop.time()
            prev_ns = time.time_ns()
            while not self._stop.is_set():
                now_ns = time.time_ns()
                ticks = self.source.due(prev_ns, now_ns)
                if ticks:
                    await self.publish(self.screen(ticks))
                prev_ns = now_ns
                next_t += interval
                delay = next_t - loop.time()
                if delay < -1.0:  # fell far behind (Redis outage): do not burst to catch up
                    next_t = loop.time()
                    delay = 0
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            reporter.cancel()
            await self.redis.aclose()


async def run_feed(settings: Settings, source: Source | None = None) -> None:
    source = source or Simulator(settings.symbols, settings.feed_seed, settings.feed_rate)
    plant = Tickerplant(settings, source)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, plant.stop)
    log.info("publishing %s", source.describe() if hasattr(source, "describe") else source)
    await plant.run()
