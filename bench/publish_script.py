"""What the publish script's batch id costs Redis: the same batches published with and without
one (issue 13: a retried batch is answered from ``tp:applied`` instead of being applied twice).

    flock -x /work/.cpu.lock .venv/bin/python bench/publish_script.py          # 5,000 batches
    .venv/bin/python bench/publish_script.py --quick                            # 1,000

One redis-server (as the tests start it, no persistence) on a free port; ``--batches`` batches
of ``--ticks`` ticks spread over ``--symbols`` symbols (the reference load's 10 ms batch of 4,000
ticks/s over 100 symbols is 40 ticks), published back to back through ``Bus.publish_group``,
once without a batch id and once with the feed's (``Tickerplant``), alternating, ``--repeat``
times each. Reported: Redis' CPU (user + system of the redis-server process) per batch and per
tick, and the publisher's wall time per batch; the lowest of the runs of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import code_version, machine, top_lines, top_section, write_results  # noqa: E402
from server.live.bus import Bus  # noqa: E402
from server.ticks import Quote, Tick, Trade  # noqa: E402
from tests.harness import RedisProcess  # noqa: E402

T0 = 1_790_000_000_000_000_000


def batches(n: int, ticks: int, symbols: int) -> list[list[Tick]]:
    out: list[list[Tick]] = []
    k = 0
    for _ in range(n):
        batch: list[Tick] = []
        for _ in range(ticks):
            sym = f"SYM{k % symbols:02d}"
            if k % 4 == 0:
                batch.append(Trade(sym, T0 + k, 100.0, 100.0, "buy"))
            else:
                batch.append(Quote(sym, T0 + k, 99.99, 300.0, 100.01, 500.0))
            k += 1
        out.append(batch)
    return out


async def one_run(url: str, server: psutil.Process, work: list[list[Tick]], ids: bool) -> tuple:
    redis = Redis.from_url(url)
    bus = Bus(redis, history_per_symbol=10_000, publisher="bench")
    await bus.publish_group(work[0])  # the script is loaded
    run = f"{time.time_ns()}"
    cpu0 = sum(server.cpu_times()[:2])
    t0 = time.perf_counter()
    for i, batch in enumerate(work):
        await bus.publish_group(batch, batch=f"{run}.{i}" if ids else "")
    wall = time.perf_counter() - t0
    cpu = sum(server.cpu_times()[:2]) - cpu0
    await redis.flushall()
    await redis.aclose()
    return cpu, wall


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=5_000)
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--symbols", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1,000 batches")
    args = p.parse_args()
    n = 1_000 if args.quick else args.batches
    work = batches(n, args.ticks, args.symbols)
    top = top_lines()
    with tempfile.TemporaryDirectory() as tmp:
        proc = RedisProcess(Path(tmp))
        proc.start()
        try:
            assert proc.proc is not None
            server = psutil.Process(proc.proc.pid)
            best: dict[bool, tuple[float, float]] = {}
            for _ in range(args.repeat):
                for ids in (False, True):
                    cpu, wall = await one_run(proc.url, server, work, ids)
                    old = best.get(ids)
                    best[ids] = (min(cpu, old[0]), min(wall, old[1])) if old else (cpu, wall)
        finally:
            proc.kill()
    rows = []
    for ids, (cpu, wall) in best.items():
        rows.append(
            f"| {'yes' if ids else 'no'} | {cpu / n * 1e6:.1f} | {cpu / (n * args.ticks) * 1e6:.2f}"
            f" | {wall / n * 1e6:.0f} |"
        )
    extra = (best[True][0] - best[False][0]) / n * 1e6
    text = "\n".join(
        [
            "# The publish script's batch id: what it costs Redis",
            "",
            f"- Machine: {machine()}",
            f"- Code: {code_version()}",
            f"- {n:,} batches of {args.ticks} ticks over {args.symbols} symbols, back to back "
            f"into one redis-server; lowest of {args.repeat} runs each",
            "",
            "| batch id | Redis CPU µs per batch | Redis CPU µs per tick "
            "| publisher wall µs per batch |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"With the batch id, Redis CPU per batch differs by {extra:+.1f} µs "
            f"({extra / args.ticks:+.2f} µs per tick).",
            *top_section(top),
        ]
    )
    print(text)
    write_results("publish-script", text, quick=args.quick)


if __name__ == "__main__":
    asyncio.run(main())
