"""The tickerplant: pulls batches from a source, rejects bad ticks, publishes the rest atomically.
(A live source's batch that its adapter checked as it decoded it comes marked ``screened``.)

A rejected tick is counted with its reason and never stops the feed. When Redis is unreachable
the current batch is retried with backoff and no new ticks are generated meanwhile, so nothing
the source produced is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import signal
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from server.config import Settings
from server.feed.simulator import Simulator
from server.feed.sources.adapter import VenueRefused
from server.feed.sources.continuity import UpstreamGap
from server.live.bus import Bus, Layout, encode_upstream_gap, gaps_before
from server.live.connection import REDIS_DOWN, open_redis
from server.ops.heartbeat import FeedBeat, current_feeds, feed_stopped, publish_feed
from server.ticks import Tick, reject_reason


class Source(Protocol):
    """Where ticks come from: the simulator, or a file replayed as a live feed."""

    symbols: list[str]

    def due(self, start_ns: int, end_ns: int) -> list[Tick]:
        """The ticks to publish for the wall-clock interval ``[start_ns, end_ns)``."""
        ...


@runtime_checkable
class LiveSource(Source, Protocol):
    """A source with a connection of its own (a venue): runs beside the publishing loop, tells
    where upstream gaps fall among its ticks, and has figures for status."""

    async def run(self) -> None:
        """Keep the source connected until cancelled; raises when it cannot start."""
        ...

    # Whether the ticks ``due`` just returned all passed the tick checks at the source already
    # (an adapter's typed decoding): they are not screened again.
    screened: bool

    def take_gaps(self) -> list[tuple[int, UpstreamGap]]:
        """The upstream gaps among the ticks ``due`` just returned (index of the tick after)."""
        ...

    def unpublished(self, rejected: list[tuple[int, Tick]]) -> list[tuple[int, UpstreamGap]]:
        """The upstream gaps that ticks ``due`` just returned and the tick checks rejected
        (each with its index) leave in the venue's numbering: one per numbered trade."""
        ...

    def figures(self) -> dict[str, Any]: ...

    def resume(self, latest: dict[str, tuple[bytes | None, bytes | None]]) -> None:
        """Go on after each symbol's latest trade and quote events an earlier run published."""
        ...


log = logging.getLogger("tickpipe.feed")
T = TypeVar("T")


class Tickerplant:
    def __init__(self, settings: Settings, source: Source) -> None:
        self.settings = settings
        self.source = source
        self.redis = open_redis(settings, socket_timeout=5)
        self.layout = Layout.of(settings)
        self.bus = Bus(
            self.redis,
            settings.history_per_symbol,
            settings.log_max_batches,
            self.layout,
            publisher=settings.feed_name,
        )
        # Batch ids: this run's start and a count, so a retried batch is known as the same one.
        self._batch_ids = itertools.count(1)
        self._run_id = f"{os.getpid()}.{time.time_ns()}"
        self.published = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.last_rejects: collections.deque[dict[str, object]] = collections.deque(maxlen=10)
        self.last_tick_ns = 0
        self.state = "starting"
        self.upstream_gaps_published = 0
        # The source when it is a live one (a venue), checked once: the protocol check is slow.
        self.live = source if isinstance(source, LiveSource) else None
        self.source_kind = str(getattr(source, "kind", ""))
        # Upstream gaps whose tick after the hole was rejected, by symbol: before its next one.
        self._gaps_waiting: dict[str, list[bytes]] = {}
        self._stop = asyncio.Event()
        self.failure: BaseException | None = None  # why a live source stopped the feed

    def stop(self) -> None:
        self._stop.set()

    def screen(self, ticks: list[Tick]) -> list[Tick]:
        """Drop and count the ticks that fail validation; returns the good ones in order."""
        good = [tick for tick in ticks if reject_reason(tick) is None]
        if len(good) == len(ticks):  # the usual batch: nothing to count
            return good
        good = []
        for tick in ticks:
            reason = reject_reason(tick)
            if reason is None:
                good.append(tick)
            else:
                self.rejected[reason] += 1
                self.last_rejects.append({"reason": reason, "sym": str(tick.sym)[:40]})
        return good

    def place_gaps(
        self, ticks: list[Tick], good: list[Tick], gaps: list[tuple[int, UpstreamGap]]
    ) -> list[tuple[Tick, bytes]]:
        """Each upstream gap (index in ``ticks`` of the tick after its hole) with the good tick
        it goes before: that tick, or when it was rejected the symbol's next good one (in a
        later batch if none is in this one)."""
        venue = self.source_kind.upper()
        waiting = self._gaps_waiting
        at: dict[int, list[UpstreamGap]] = {}
        for i, gap in gaps:
            at.setdefault(i, []).append(gap)
        kept = {id(t) for t in good}
        placed: list[tuple[Tick, bytes]] = []
        for i, tick in enumerate(ticks):
            for gap in at.pop(i, ()):
                rest = encode_upstream_gap(venue, gap.first, gap.last, gap.detected_ns)
                waiting.setdefault(gap.sym, []).append(rest)
            if waiting and tick.sym in waiting and id(tick) in kept:
                placed.extend((tick, rest) for rest in waiting.pop(tick.sym))
        for late in at.values():  # after the last tick: before the symbol's next one
            for gap in late:
                rest = encode_upstream_gap(venue, gap.first, gap.last, gap.detected_ns)
                waiting.setdefault(gap.sym, []).append(rest)
        return placed

    async def publish(self, ticks: list[Tick], gaps: Sequence[tuple[Tick, bytes]] = ()) -> None:
        """Publish one batch, retrying with backoff until Redis takes it or the feed stops;
        ``gaps``: upstream gaps, each with the tick it goes before (``place_gaps``).

        On a cluster each slot group's part is published (and retried) on its own, so a part
        that a failover held up is never published twice by the retry of another."""
        before = gaps_before(gaps)
        parts = self.bus.split(ticks)
        if len(parts) == 1:
            await self._publish_group(parts[0], before)
        else:
            await asyncio.gather(*(self._publish_group(p, before) for p in parts))
        if self.state != "running" and not self._stop.is_set():
            log.info("publishing to %s", self.settings.redis_url.split("@")[-1])
            self.state = "running"

    async def _publish_group(self, ticks: list[Tick], gaps: dict[int, list[bytes]]) -> None:
        """Publish one slot group's part until Redis takes it. Every try carries the same batch
        id: a try whose reply was lost may have been applied, and the next is then answered
        with its reply instead of publishing the ticks a second time."""
        delay = 0.05
        batch = f"{self._run_id}.{next(self._batch_ids)}"
        while not self._stop.is_set():
            try:
                await self.bus.publish_group(ticks, gaps, batch)
            except REDIS_DOWN as exc:
                if self.state != "redis_down":
                    log.warning("redis unreachable (%s); holding the batch and retrying", exc)
                self.state = "redis_down"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.published += len(ticks)
            if gaps:
                self.upstream_gaps_published += sum(len(gaps.get(id(t), ())) for t in ticks)
            if ticks:
                self.last_tick_ns = max(self.last_tick_ns, ticks[-1].ts)
            return

    async def _report(self) -> None:
        """Every second, leave this feed's figures in Redis (with a TTL) for status pages."""
        prev, prev_t = self.published, time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            rate = (self.published - prev) / (now - prev_t)
            prev, prev_t = self.published, now
            beat = FeedBeat(
                state=self.state,
                pid=os.getpid(),
                rate=rate,
                published=self.published,
                rejected=dict(self.rejected),
                last_rejects=list(self.last_rejects),
                last_tick_ns=self.last_tick_ns,
                updated_ns=time.time_ns(),
                source=self.live.figures() if self.live is not None else {},
            )
            with contextlib.suppress(*REDIS_DOWN):
                await publish_feed(self.redis, self.settings.feed_name, beat)

    async def _source_stopped(self) -> None:
        """List the live source as down, with why (the venue's refusal, or the feed stopped),
        as the process ends: also when it failed within its first second (no heartbeat yet)."""
        assert self.live is not None
        source = self.live.figures()
        if source.get("state") != "down":
            why = str(self.failure)[:200] if self.failure is not None else "the feed stopped"
            source |= {"state": "down", "reason": why, "messages_per_s": 0.0}
        with contextlib.suppress(TimeoutError, *REDIS_DOWN):
            await asyncio.wait_for(feed_stopped(self.redis, self.settings.feed_name, source), 5)

    async def publish_due(self, ticks: list[Tick]) -> None:
        """Publish what the source handed over; a live source's upstream gaps go out in-band,
        in the same atomic publish, just before the first tick after each hole."""
        live = self.live
        good = ticks if live is not None and live.screened else self.screen(ticks)
        gaps = live.take_gaps() if live is not None else []
        if live is not None and len(good) < len(ticks):  # a rejected trade is a hole too
            kept = {id(t) for t in good}
            rejected = [(i, t) for i, t in enumerate(ticks) if id(t) not in kept]
            gaps += live.unpublished(rejected)
        placed = self.place_gaps(ticks, good, gaps) if gaps or self._gaps_waiting else []
        await self.publish(good, placed)

    async def _refuse_symbols_of_other_sources(self) -> None:
        """Raise ``VenueRefused`` when another running live source publishes one of this one's
        symbols: two feeds in one symbol would interleave their ticks in one ``seq``."""
        mine = set(self.source.symbols)
        for name, beat in (await current_feeds(self.redis)).items():
            theirs = mine.intersection(beat.source.get("symbols") or ())
            if name != self.settings.feed_name and theirs:
                sym = sorted(theirs)[0]
                raise VenueRefused(
                    f"{sym} is already published by the feed {name!r} "
                    f"({beat.source.get('kind')}); one symbol comes from one source: publish "
                    f"this one under another name with --map {sym}={sym}-{self.source_kind.upper()}"
                    " (or stop the other feed)"
                )

    async def _run_source(self, source: LiveSource) -> None:
        try:
            await source.run()
        except Exception as exc:  # a source that cannot start stops the feed, saying why
            self.failure = exc
            self.stop()

    async def run(self) -> None:
        s = self.settings
        interval = s.feed_batch_ms / 1000
        reporter = asyncio.create_task(self._report())
        live: asyncio.Task[None] | None = None
        try:
            while not self._stop.is_set():
                try:
                    if self.live is not None:
                        try:
                            await self._refuse_symbols_of_other_sources()
                        except VenueRefused as exc:
                            self.failure = exc
                            raise
                        latest = await self.bus.latest(self.source.symbols)
                        self.live.resume({s: (x.trade, x.quote) for s, x in latest.items()})
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for sym in self.source.symbols:
                            pipe.sadd(self.layout.symbols_key(self.layout.group(sym)), sym)
                        await pipe.execute()
                    break
                except REDIS_DOWN:
                    self.state = "redis_down"
                    await asyncio.sleep(0.2)
            # A live source connects once its symbols are known to be its own.
            if self.live is not None and not self._stop.is_set():
                live = asyncio.create_task(self._run_source(self.live))
            loop = asyncio.get_running_loop()
            next_t = loop.time()
            prev_ns = time.time_ns()
            while not self._stop.is_set():
                now_ns = time.time_ns()
                ticks = self.source.due(prev_ns, now_ns)
                if ticks:
                    await self.publish_due(ticks)
                prev_ns = now_ns
                next_t += interval
                delay = next_t - loop.time()
                if delay < -1.0:  # fell far behind (Redis outage): do not burst to catch up
                    next_t = loop.time()
                    delay = 0
                if delay > 0:  # at most one batch interval (<= 1 s), so a stop is seen soon
                    await asyncio.sleep(delay)
        finally:
            # Every task that uses the Redis client ends before the client is closed: a
            # heartbeat cancelled in the middle of its write and left running could hold the
            # client's connection while ``aclose`` waits for it.
            reporter.cancel()
            if live is not None:
                live.cancel()
            for task in (reporter, live):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.live is not None:
                await self._source_stopped()
            await self.redis.aclose()
        if self.failure is not None:
            raise self.failure


def settle_heap() -> None:
    """Leave what start-up built (modules, settings, clients) out of the garbage collector's
    full passes, and let the youngest generation hold a batch's ticks. A fast feed keeps
    thousands of ticks in flight (the collector counts them as they stay alive): that set off a
    full pass every few hundred thousand ticks, each walking every object of the process, and a
    young pass every 700: 2.2-2.6 µs per Alpaca message at 50,000 messages/s, 0.6 once frozen,
    0.04 with the larger threshold (gc callbacks around the run of ``bench/sources.py``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the feed process's ``main`` on uvloop's event loop where there is one (not on
    Windows), else asyncio's: the feed's reads, writes and callbacks then run in libuv's C."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a platform without uvloop)
        return asyncio.run(main)
    return uvloop.run(main)


async def run_feed(settings: Settings, source: Source | None = None) -> None:
    source = source or Simulator(settings.symbols, settings.feed_seed, settings.feed_rate)
    plant = Tickerplant(settings, source)
    settle_heap()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, plant.stop)
    log.info("publishing %s", source.describe() if hasattr(source, "describe") else source)
    await plant.run()
