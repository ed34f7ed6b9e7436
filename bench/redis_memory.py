"""Redis memory per published tick: what the recent-events streams (``tp:hist:<SYM>``) and the
tickerplant log (``tp:log``) hold for each tick, the figure that sizes Redis in the capacity model
(plan.md).

    .venv/bin/python bench/redis_memory.py            # 100,000 ticks, batches of 200, 100 symbols

A throwaway redis-server; ticks go through ``Bus.publish`` (the publish script), 1 trade : 3
quotes, round robin over the symbols; nothing is trimmed. ``MEMORY USAGE`` of each key and
``used_memory`` before and after, divided by the ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import code_version, machine  # noqa: E402
from server.live.bus import LOG_KEY, Bus, hist_key  # noqa: E402
from server.ticks import Quote, Tick, Trade  # noqa: E402
from tests.harness import RedisProcess  # noqa: E402


async def measure(url: str, ticks: int, batch: int, n_symbols: int) -> str:
    r = Redis.from_url(url)
    bus = Bus(r, history_per_symbol=ticks)
    symbols = [f"SYM{i:04d}" for i in range(n_symbols)]
    before = (await r.info("memory"))["used_memory"]
    sent = 0
    while sent < ticks:
        ts = time.time_ns()
        out: list[Tick] = []
        for i in range(sent, sent + batch):
            sym = symbols[i % n_symbols]
            out.append(
                Trade(sym, ts, 101.25, 300.0, "buy")
                if i % 4 == 0
                else Quote(sym, ts, 101.24, 300.0, 101.26, 500.0)
            )
        await bus.publish(out)
        sent += batch
    used = (await r.info("memory"))["used_memory"] - before
    hist = sum([await r.memory_usage(hist_key(s)) or 0 for s in symbols])
    log = await r.memory_usage(LOG_KEY) or 0
    await r.aclose()
    return (
        f"{sent:,} ticks in batches of {batch} over {n_symbols} symbols: Redis used_memory "
        f"+{used / sent:.0f} B per tick; tp:hist:<SYM> {hist / sent:.0f} B per event, tp:log "
        f"{log / sent:.0f} B per tick ({log / (sent / batch) / 1024:.1f} KiB per batch)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ticks", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--symbols", type=int, default=100)
    args = p.parse_args()
    print(f"machine: {machine()}\ntickpipe: {code_version()}", flush=True)
    redis = RedisProcess(Path(tempfile.mkdtemp(prefix="tickpipe-redis-memory-")))
    redis.start()
    try:
        print(asyncio.run(measure(redis.url, args.ticks, args.batch, args.symbols)), flush=True)
    finally:
        redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
