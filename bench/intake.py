"""What a web process pays for each pub/sub message it takes in, delivered to nobody: the cost
that every web process pays for every symbol it carries, however few of its clients want it.

    flock -x /work/.cpu.lock .venv/bin/python bench/intake.py            # 4,000 and 8,000/s
    .venv/bin/python bench/intake.py --rates 2000 --measure 5

A redis-server, one ``tickpipe web`` and ``bench/publisher.py`` (100 symbols, round robin, 10 ms
batches: one message per symbol per batch, so up to 10,000 messages/s) as in ``bench/fanout.py``;
one WebSocket client subscribed to all 100 symbols with ``throttle_ms`` 60,000, so the hub routes
every message to a listener (the sampler keeps the latest tick) while almost nothing is sent. The
web process's CPU over the window above a baseline run (the first rate, 10/s: its heartbeat,
status and key loops), divided by the messages it took in above the baseline
(``messages_in_per_s`` of its heartbeat), is the intake cost per message, the ``c_msg`` of the
capacity model in plan.md. Prints one line per rate with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import PY, SYMBOLS, Deployment  # noqa: E402
from bench.lines import read_json  # noqa: E402
from bench.report import code_version, machine  # noqa: E402


async def hold_listener(port: int, key: str, seconds: float) -> int:
    """One socket on every symbol, sampled once a minute; returns the ticks it was sent."""
    ticks = 0
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        msg = {"op": "subscribe", "id": "all", "symbols": SYMBOLS, "throttle_ms": 60_000}
        await ws.send(orjson.dumps(msg).decode())
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                break
            ticks += sum(1 for ev in orjson.loads(raw) if ev["type"] in ("trade", "quote"))
    return ticks


def measure(d: Deployment, rate: float, warmup: float, window: float) -> tuple[float, float, str]:
    """(messages/s taken in, web CPU in cores, a line saying both)."""
    d.start_webs("tickpipe")
    web = psutil.Process(d.webs[0].pid)
    start = time.time_ns() + 2_000_000_000
    w0 = start + int(warmup * 1e9)
    w1 = w0 + int(window * 1e9)
    publisher = subprocess.Popen(
        [PY, "-m", "bench.publisher", "--redis-url", d.redis_url,
         "--symbols", ",".join(SYMBOLS), "--rate", str(rate),
         "--start-ns", str(start), "--w0", str(w0), "--w1", str(w1)],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip

    async def run() -> tuple[int, float, list[float]]:
        listener = asyncio.create_task(
            hold_listener(d.web_port, d.key, (w1 - time.time_ns()) / 1e9)
        )
        await asyncio.sleep(max(0.0, (w0 - time.time_ns()) / 1e9))
        t = web.cpu_times()
        cpu0, t0 = t.user + t.system, time.monotonic()
        rates = []
        while time.time_ns() < w1 - 500_000_000:
            await asyncio.sleep(1.0)
            rates += await asyncio.to_thread(d.pubsub_rates)
        t = web.cpu_times()
        cpu = (t.user + t.system - cpu0) / (time.monotonic() - t0)
        return await listener, cpu, rates

    try:
        sent, cpu, rates = asyncio.run(run())
        pub = read_json(publisher, 30, "publisher")
    finally:
        publisher.kill()
        d.stop_webs()
    msgs = sum(rates) / len(rates) if rates else 0.0
    load = os.getloadavg()[0]
    return (
        msgs,
        cpu,
        f"  {pub['in_window'] / window:>7.0f} ticks/s in, {msgs:>7.0f} messages/s taken in, "
        f"{sent} ticks sent: web CPU {100 * cpu:4.1f}% (load average {load:.1f})",
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rates",
        default="10,4000,8000",
        help="ticks/s in, comma-separated; the first is the baseline (the web process's own "
        "heartbeat, status and key loops) the others are measured against",
    )
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--measure", type=float, default=10.0)
    args = p.parse_args()
    print(f"machine: {machine()}\ntickpipe: {code_version()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-intake-"))
    d = Deployment(workdir)
    try:
        d.start_redis()
        base: tuple[float, float] | None = None
        for rate in args.rates.split(","):
            msgs, cpu, line = measure(d, float(rate), args.warmup, args.measure)
            if base is None:
                base = (msgs, cpu)
                print(line + ": the baseline", flush=True)
                continue
            extra = msgs - base[0]
            per_msg = 1e6 * (cpu - base[1]) / extra if extra > 0 else float("nan")
            print(f"{line}: {per_msg:.1f} us per message above the baseline", flush=True)
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
