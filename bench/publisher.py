"""The benchmark's publisher: trades and quotes through ``Bus.publish`` at a fixed total rate.

Every ``batch_ms`` it publishes the ticks owed so far as one atomic batch, spread evenly over
the symbols (round robin) so every subscriber sees the same share; one tick in four is a trade.
Each tick's ``ts`` is ``time_ns()`` taken just before the batch goes to Redis, so a client's
``recv - ts`` is the publish -> receive latency. Prints its own figures as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import orjson
from redis.asyncio import RedisCluster

from server.config import Settings
from server.live.bus import Bus, Layout
from server.live.connection import open_redis
from server.ticks import Quote, Tick, Trade


class Market:
    """Cheap plausible ticks: a random-walk mid per symbol, a one-cent spread."""

    def __init__(self, symbols: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.symbols = symbols
        self.mid = {s: 50.0 + 5 * i for i, s in enumerate(symbols)}
        self.next = 0

    def batch(self, n: int) -> list[Tick]:
        rng, syms, out = self.rng, self.symbols, []
        for _ in range(n):
            sym = syms[self.next]
            self.next = (self.next + 1) % len(syms)
            mid = self.mid[sym] = max(1.0, self.mid[sym] + rng.choice((-0.01, 0.0, 0.01)))
            bid, ask = round(mid - 0.005, 3), round(mid + 0.005, 3)
            if rng.random() < 0.25:
                out.append(Trade(sym, 0, round(mid, 3), float(rng.randint(1, 5) * 100), "buy"))
            else:
                out.append(Quote(sym, 0, bid, 300.0, ask, 500.0))
        return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings(redis_url=args.redis_url, redis_mode=args.redis_mode)
    redis = open_redis(settings, socket_timeout=10)
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # the slot map, before the first batch's concurrent scripts
    bus = Bus(redis, history_per_symbol=args.history, layout=Layout.of(settings))
    market = Market(args.symbols.split(","), args.seed)
    interval = args.batch_ms / 1000
    per_batch = args.rate * interval
    # Wait for the agreed start so the window the clients use lines up with ours.
    await asyncio.sleep(max(0.0, (args.start_ns - time.time_ns()) / 1e9))
    loop = asyncio.get_running_loop()
    next_t = loop.time()
    owed = 0.0
    published = in_window = batches = late = 0
    max_late_s = 0.0
    call_ns: list[int] = []
    try:
        while True:
            now_ns = time.time_ns()
            if now_ns >= args.w1:
                break
            owed += per_batch
            n = int(owed)
            owed -= n
            if n:
                ticks = market.batch(n)
                ts = time.time_ns()
                for t in ticks:
                    t.ts = ts
                await bus.publish(ticks)
                done = time.time_ns()
                published += n
                batches += 1
                if args.w0 <= ts < args.w1:
                    in_window += n
                    call_ns.append(done - ts)
            next_t += interval
            delay = next_t - loop.time()
            if delay < 0:
                late += 1
                max_late_s = max(max_late_s, -delay)
            else:
                await asyncio.sleep(delay)
    finally:
        await redis.aclose()
    call_ns.sort()

    def q(p: float) -> float:
        return round(call_ns[int(p * (len(call_ns) - 1))] / 1e6, 3) if call_ns else 0.0

    return {
        "published": published,
        "in_window": in_window,
        "batches": batches,
        "late_batches": late,
        "max_late_ms": round(max_late_s * 1000, 1),
        "publish_call_ms_p50": q(0.5),
        "publish_call_ms_p99": q(0.99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True, help="one node, or the seeds of a cluster")
    p.add_argument("--redis-mode", choices=("standalone", "cluster"), default="standalone")
    p.add_argument("--symbols", required=True, help="comma-separated")
    p.add_argument("--rate", type=float, required=True, help="ticks/s, all symbols together")
    p.add_argument("--batch-ms", type=float, default=10.0)
    p.add_argument("--start-ns", type=int, required=True)
    p.add_argument("--w0", type=int, required=True, help="measurement window start (ns)")
    p.add_argument("--w1", type=int, required=True, help="window end (ns); publishing stops")
    p.add_argument("--history", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    import uvloop

    print(orjson.dumps(uvloop.run(run(args))).decode(), flush=True)


if __name__ == "__main__":
    main()
