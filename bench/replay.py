"""Replay benchmark: one day of 100 symbols replayed at ``max`` to one WebSocket client, against
reading the same range from ``/ticks/historical`` as NDJSON in the same run; and the pacing
accuracy of replays at speed 1 and 100 over a minute of wall time.

    flock -x /work/.cpu.lock .venv/bin/python bench/replay.py            # 10 M ticks, 60 s pacing
    .venv/bin/python bench/replay.py --ticks 1000000 --pacing-s 10        # a quick look

The day is generated straight into the recorder's layout (Polars; one sorted Parquet file per
10 minutes of ticks, like a recorder flushing), a redis-server and ``tickpipe web`` are started on
free ports (``tests.harness.Stack``, no feed), and one client in this process reads everything.
Time to first event is from sending the request to holding the first tick. Drift is wall time
elapsed minus market time elapsed / speed, per received tick, from the first tick on.
Prints a summary and writes it to ``bench/results/replay-<date>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl
import psutil
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import code_version, machine, write_results  # noqa: E402
from server.history.store import write_file  # noqa: E402
from server.ticks import STORED_SCHEMA  # noqa: E402
from tests.harness import Stack  # noqa: E402

DAY = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
DAY_NS = int(DAY.timestamp()) * 10**9
FILE_NS = 600 * 10**9
SYMBOLS = [f"SYM{i:02d}" for i in range(100)]


def generate(root: Path, n: int, seed: int = 5) -> float:
    """``n`` ticks of 100 symbols over one day, in the recorder's layout; returns seconds."""
    t0 = time.perf_counter()
    step = 86_400 * 10**9 // n  # ticks evenly spread over the day, with jitter within a step
    k = pl.col("k")
    trade = (k % 3) == 0
    px = 100.0 + (k % 1000) / 100
    frame = (
        pl.DataFrame({"k": pl.int_range(0, n, eager=True)})
        .with_columns(
            ts=DAY_NS + k * step + (k.hash(seed) % step).cast(pl.Int64),
            s=(k.hash(seed + 1) % 100).cast(pl.Int64),
        )
        .with_columns(
            sym=pl.format("SYM{}", pl.col("s").cast(pl.Utf8).str.zfill(2)),
            seq=pl.int_range(1, pl.len() + 1).over("s"),
            type=pl.when(trade).then(pl.lit("trade")).otherwise(pl.lit("quote")),
            epoch=pl.lit(1, pl.Int64),
            price=pl.when(trade).then(px),
            size=pl.when(trade).then(pl.lit(100.0)),
            bid=pl.when(~trade).then(px - 0.01),
            bid_size=pl.when(~trade).then(pl.lit(300.0)),
            ask=pl.when(~trade).then(px + 0.01),
            ask_size=pl.when(~trade).then(pl.lit(200.0)),
            venue=pl.lit("XNAS"),
            crossed=pl.when(~trade).then(pl.lit(False)),
            side=pl.lit(None, pl.Utf8),
            bucket=(pl.col("ts") - DAY_NS) // FILE_NS,
        )
        .with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC")))
    )
    for i, part in enumerate(frame.partition_by("bucket", maintain_order=True)):
        rows = part.select([pl.col(c).cast(t) for c, t in STORED_SCHEMA.items()])
        write_file(root, rows, f"{i}-0", f"{i}-1")
    return time.perf_counter() - t0


class RssPeak:
    """Samples a process' RSS every 0.2 s in a thread; ``peak`` in MB."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


async def replay_max(stack: Stack, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(stack.ws_url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()  # welcome
        t0 = time.perf_counter()
        first = None
        n = 0
        await ws.send(
            orjson.dumps(
                {
                    "op": "replay",
                    "id": "b",
                    "symbols": SYMBOLS,
                    "start": DAY_NS,
                    "end": DAY_NS + 86_400 * 10**9,
                    "speed": "max",
                }
            ).decode()
        )
        marker = b'"replay":"b"}'
        while True:
            # Count, do not parse: a client that only counts what it is sent.
            frame = await ws.recv(decode=False)
            ticks = frame.count(marker)
            if ticks and first is None:
                first = time.perf_counter() - t0
            n += ticks
            if b'"replay_done"' in frame:
                done = [e for e in orjson.loads(frame) if e["type"] == "replay_done"]
                break
    total = time.perf_counter() - t0
    return {"events": n, "first_s": first, "total_s": total, "rate": n / total, "done": done[0]}


def day_params(**extra: str) -> dict[str, Any]:
    """/ticks/historical parameters for the whole generated day."""
    return {"symbols": ",".join(SYMBOLS), "start": DAY_NS, "end": DAY_NS + 86_400 * 10**9, **extra}


async def rest_ndjson(stack: Stack, key: str) -> dict[str, Any]:
    params = day_params(format="ndjson")
    headers = {"Authorization": f"Bearer {key}"}
    n = 0
    first = None
    t0 = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=stack.base, timeout=600) as http,
        http.stream("GET", "/ticks/historical", params=params, headers=headers) as r,
    ):
        async for chunk in r.aiter_bytes():
            if first is None and chunk:
                first = time.perf_counter() - t0
            n += chunk.count(b"\n")
    total = time.perf_counter() - t0
    return {"events": n, "first_s": first, "total_s": total, "rate": n / total}


async def rest_fingerprint(stack: Stack, key: str) -> dict[str, Any]:
    params = day_params(fingerprint="true")
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=stack.base, timeout=600) as http:
        r = await http.get(
            "/ticks/historical", params=params, headers={"Authorization": f"Bearer {key}"}
        )
    return {**r.json(), "total_s": time.perf_counter() - t0}


async def pacing(stack: Stack, key: str, speed: float, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    start = DAY_NS + 9 * 3600 * 10**9
    drifts: list[float] = []
    async with websockets.connect(stack.ws_url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()
        await ws.send(
            orjson.dumps(
                {
                    "op": "replay",
                    "id": "p",
                    "symbols": SYMBOLS,
                    "start": start,
                    "end": start + int(seconds * speed * 2 * 10**9),
                    "speed": speed,
                }
            ).decode()
        )
        wall0 = ts0 = None
        while True:
            raw = await ws.recv()
            now = time.perf_counter()
            for e in orjson.loads(raw):
                if e.get("replay") != "p":
                    continue
                if wall0 is None:
                    wall0, ts0 = now, e["ts"]
                drifts.append((now - wall0) - (e["ts"] - ts0) / 1e9 / speed)
            if wall0 is not None and now - wall0 >= seconds:
                break
    absd = sorted(abs(d) for d in drifts)
    return {
        "speed": speed,
        "events": len(drifts),
        "final_ms": drifts[-1] * 1000,
        "p50_ms": absd[len(absd) // 2] * 1000,
        "p99_ms": absd[int(len(absd) * 0.99)] * 1000,
        "max_ms": absd[-1] * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="replay benchmark")
    ap.add_argument("--ticks", type=int, default=10_000_000)
    ap.add_argument("--pacing-s", type=float, default=60.0)
    args = ap.parse_args()
    commit = code_version()
    with tempfile.TemporaryDirectory(prefix="tickpipe-bench-replay-") as tmp:
        stack = Stack(Path(tmp), feed=False)
        gen_s = generate(stack.data_dir / "history", args.ticks)
        size = sum(f.stat().st_size for f in (stack.data_dir / "history").rglob("*.parquet"))
        print(f"generated {args.ticks:,} ticks in {gen_s:.1f} s ({size / 2**20:.0f} MB Parquet)")
        stack.start()
        try:
            key = stack.key("bench", ["replay", "historical"])
            assert stack.web.proc is not None
            rss = RssPeak(stack.web.proc.pid)
            cpu0 = sum(psutil.Process(stack.web.proc.pid).cpu_times()[:2])
            ws = asyncio.run(replay_max(stack, key))
            ws_cpu = sum(psutil.Process(stack.web.proc.pid).cpu_times()[:2]) - cpu0
            ws_rss = rss.stop()
            print(
                f"replay max: {ws['events']:,} events, first after {ws['first_s']:.3f} s, "
                f"{ws['rate']:,.0f} events/s, server CPU {ws_cpu:.1f} s, peak RSS {ws_rss:.0f} MB"
            )
            rss = RssPeak(stack.web.proc.pid)
            nd = asyncio.run(rest_ndjson(stack, key))
            nd_rss = rss.stop()
            print(
                f"ndjson: {nd['events']:,} rows, first byte after {nd['first_s']:.3f} s, "
                f"{nd['rate']:,.0f} rows/s, peak RSS {nd_rss:.0f} MB"
            )
            fp = asyncio.run(rest_fingerprint(stack, key))
            same = fp["fingerprint"] == ws["done"]["fingerprint"]
            print(f"REST fingerprint in {fp['total_s']:.1f} s, equal to the replay's: {same}")
            paced = [asyncio.run(pacing(stack, key, sp, args.pacing_s)) for sp in (1.0, 100.0)]
            for p in paced:
                print(
                    f"speed {p['speed']:g}: {p['events']:,} events in {args.pacing_s:g} s, "
                    f"drift at the end {p['final_ms']:+.1f} ms, |drift| p50 {p['p50_ms']:.1f} "
                    f"p99 {p['p99_ms']:.1f} max {p['max_ms']:.1f} ms"
                )
        finally:
            stack.stop()
    today = dt.date.today().isoformat()
    lines = [
        f"# Replay benchmark, {today}",
        "",
        f"Machine: {machine()}. Commit {commit}. Command: `flock -x /work/.cpu.lock "
        f".venv/bin/python bench/replay.py --ticks {args.ticks} --pacing-s {args.pacing_s:g}`.",
        f"Data: {args.ticks:,} ticks of 100 symbols over one day, {size / 2**20:.0f} MB of Parquet "
        f"in 144 files (generated in {gen_s:.1f} s).",
        "",
        "The replay's client only counts the events of each frame (no JSON parsing).",
        "",
        "| read of the whole day by one client | events | time to first event | "
        "events/s | total s | server CPU s per M | web peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| WebSocket replay, speed max | {ws['events']:,} | {ws['first_s']:.3f} s | "
        f"{ws['rate']:,.0f} | {ws['total_s']:.1f} | {ws_cpu / ws['events'] * 1e6:.2f} | "
        f"{ws_rss:.0f} |",
        f"| /ticks/historical NDJSON | {nd['events']:,} | {nd['first_s']:.3f} s | "
        f"{nd['rate']:,.0f} | {nd['total_s']:.1f} | - | {nd_rss:.0f} |",
        "",
        f"Replay at max against the target of 500,000 events/s: "
        f"{'met' if ws['rate'] >= 500_000 else 'NOT met'}.",
        "",
        f"`/ticks/historical?fingerprint=true` over the same day: {fp['total_s']:.1f} s, "
        f"fingerprint equal to the replay's: {same}.",
        "",
        f"| pacing over {args.pacing_s:g} s of wall time | events | drift at the end | "
        "abs drift p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| speed {p['speed']:g} | {p['events']:,} | {p['final_ms']:+.1f} ms | "
            f"{p['p50_ms']:.1f} ms | {p['p99_ms']:.1f} ms | {p['max_ms']:.1f} ms |"
            for p in paced
        ),
    ]
    print("\n".join(lines))
    write_results("replay", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
