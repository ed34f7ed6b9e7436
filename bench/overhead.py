"""Per-request and per-socket cost of tickpipe's web process against a bare Starlette app.

    .venv/bin/python bench/overhead.py            # 3 rounds of 2,000 requests, 500 sockets
    .venv/bin/python bench/overhead.py --quick    # 1 round, 200 sockets

In one run, on the same machine and the same uvicorn:

* ``GET /ticks/realtime`` for 5 symbols (answered from the web process's last-value cache, after
  a simulated feed published them for a few seconds; the feed is stopped before measuring) against
  the bare app's route (``bench/bare_app.py``) that answers the same JSON body, re-encoded per
  request. Requests are sequential on one keep-alive connection (raw HTTP/1.1 over asyncio
  streams, so the client adds little); rounds alternate between the two servers; latency is
  from writing a request to holding its body. Server CPU per request from ``psutil``.
* Idle WebSockets: a separate client process opens ``--sockets`` connections (tickpipe: with a
  key, up to its ``welcome``; bare: accepted) and holds them; the server's RSS is read before
  and after (settled), and the difference divided by the sockets.

Prints a table and writes ``bench/results/overhead-<date>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import stop_process  # noqa: E402
from bench.report import code_version, machine, top_lines, top_section, write_results  # noqa: E402
from tests.harness import RedisProcess, free_port, wait_port  # noqa: E402

PY = sys.executable
SYMBOLS = "SYM00,SYM01,SYM02,SYM03,SYM04"
TARGET_LATENCY = 1.3
TARGET_SOCKET_KB = 30.0


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- the client sides ----------------------------------------------------------------------------


async def sequential(port: int, key: str, n: int) -> list[float]:
    """Latencies (ms) of ``n`` sequential GET /ticks/realtime on one keep-alive connection."""
    request = (
        f"GET /ticks/realtime?symbols={SYMBOLS} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[float] = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"200":
                raise RuntimeError(f"HTTP {head[9:12].decode()}: {head[:200]!r}")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            out.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        writer.close()
    return out


async def hold_sockets(port: int, key: str, n: int) -> None:
    """Open ``n`` WebSockets (with the key; waiting for tickpipe's welcome when it sends one),
    say ``ready`` on stdout, and hold them until stdin closes."""
    import websockets

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    socks = []
    for _ in range(n):
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws", additional_headers=headers, ping_interval=None
        )
        if key:
            await asyncio.wait_for(ws.recv(), 10)  # the welcome: authenticated and set up
        socks.append(ws)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    for ws in socks:
        await ws.close()


# -- the servers ---------------------------------------------------------------------------------


class Servers:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = RedisProcess(workdir)
        self.data = workdir / "data"
        self.tp_port = free_port()
        self.bare_port = free_port()
        self.tp: subprocess.Popen[bytes] | None = None
        self.bare: subprocess.Popen[bytes] | None = None
        self.key = ""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(
            TICKPIPE_REDIS_URL=self.redis.url,
            TICKPIPE_DATA_DIR=str(self.data),
            TICKPIPE_HOST="127.0.0.1",
            TICKPIPE_PORT=str(self.tp_port),
            TICKPIPE_SYMBOLS=SYMBOLS,
            TICKPIPE_FEED_RATE="500",
            TICKPIPE_MAX_CONNS_PER_KEY="5000",
        )
        return env

    def _spawn(self, args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / log).open("ab") as fh:
            return subprocess.Popen(args, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)

    def start(self) -> None:
        self.redis.start()
        made = subprocess.run(
            [PY, "-m", "server.cli", "keys", "create", "--name", "bench-overhead",
             "--scopes", "realtime"],
            env=self.env(), cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.key = made.stdout.strip().splitlines()[0]
        self.tp = self._spawn([PY, "-m", "server.cli", "web"], "web.log", self.env())
        wait_port(self.tp_port, 30)
        feed = self._spawn([PY, "-m", "server.cli", "feed"], "feed.log", self.env())

        try:  # until every symbol has a trade and a quote
            deadline = time.monotonic() + 120
            while True:
                r = httpx.get(
                    f"http://127.0.0.1:{self.tp_port}/ticks/realtime",
                    params={"symbols": SYMBOLS},
                    headers={"Authorization": f"Bearer {self.key}"},
                )
                ticks = r.json().get("ticks", []) if r.status_code == 200 else []
                if ticks and all(t["trade"] and t["quote"] for t in ticks):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the feed published nothing in 120 s: {r.text[:200]}")
                time.sleep(0.5)
        finally:
            stop_process(feed)
        body = self.workdir / "realtime.json"
        body.write_bytes(r.content)
        env = {**os.environ, "BARE_BODY": str(body)}
        self.bare = self._spawn(
            [PY, "-m", "uvicorn", "--factory", "bench.bare_app:create_app", "--host",
             "127.0.0.1", "--port", str(self.bare_port), "--log-level", "warning",
             # as tickpipe runs it (server.cli.uvicorn_options): no per-socket compressor
             "--ws-per-message-deflate", "false"],
            "bare.log", env,
        )  # fmt: skip
        wait_port(self.bare_port, 30)

    def stop(self) -> None:
        stop_process(self.tp)
        stop_process(self.bare)
        self.redis.stop()


def cpu_s(proc: subprocess.Popen[bytes] | None) -> float:
    assert proc is not None
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def rss(proc: subprocess.Popen[bytes] | None) -> int:
    assert proc is not None
    return psutil.Process(proc.pid).memory_info().rss


def idle_cost(
    proc: subprocess.Popen[bytes] | None, port: int, key: str, n: int
) -> tuple[float, int]:
    """(KB of server RSS per idle socket, sockets held) for ``n`` sockets."""
    cmd = [PY, str(Path(__file__)), "--hold", str(n), "--port", str(port)]
    env = {**os.environ, "BENCH_KEY": key}
    warm = subprocess.Popen([*cmd[:3], "20", *cmd[4:]], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)  # fmt: skip
    assert warm.stdout is not None and warm.stdin is not None
    warm.stdout.readline()  # the first sockets load what every socket needs: not counted
    warm.stdin.close()
    warm.wait(30)
    time.sleep(1.0)
    before = rss(proc)
    holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert holder.stdout is not None and holder.stdin is not None
    try:
        line = holder.stdout.readline().strip()
        if line != b"ready":
            raise RuntimeError(f"the socket holder failed: {line!r}")
        time.sleep(2.0)
        after = rss(proc)
    finally:
        holder.stdin.close()
        holder.wait(60)
    return (after - before) / n / 1024, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, 200 sockets")
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sockets", type=int, default=None)
    p.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hold:
        asyncio.run(hold_sockets(args.port, os.environ.get("BENCH_KEY", ""), args.hold))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    sockets = args.sockets or (200 if args.quick else 500)
    command = shlex.join([os.path.relpath(PY, ROOT), "bench/overhead.py", *sys.argv[1:]])
    version = code_version()
    print(f"machine: {machine()}\ncommand: {command}\ntickpipe: {version}", flush=True)
    top = top_lines()
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-bench-overhead-"))
    servers = Servers(workdir)
    lat: dict[str, list[float]] = {"tickpipe": [], "bare": []}
    cpu: dict[str, float] = {"tickpipe": 0.0, "bare": 0.0}
    mem: dict[str, float] = {}
    try:
        servers.start()
        ports = {
            "tickpipe": (servers.tp_port, servers.key, servers.tp),
            "bare": (servers.bare_port, "", servers.bare),
        }
        for port, key, _ in ports.values():
            asyncio.run(sequential(port, key or "x", 200))  # warm (not counted)
        for rnd in range(rounds):
            for name, (port, key, proc) in ports.items():
                c0 = cpu_s(proc)
                got = asyncio.run(sequential(port, key or "x", args.requests))
                cpu[name] += cpu_s(proc) - c0
                lat[name] += got
                print(
                    f"round {rnd + 1} {name}: p50 {quantile(got, 0.5):.3f} ms, "
                    f"p99 {quantile(got, 0.99):.3f} ms",
                    flush=True,
                )
        for name, (port, key, proc) in ports.items():
            kb, n = idle_cost(proc, port, key, sockets)
            mem[name] = kb
            print(f"{name}: {kb:.1f} KB per idle socket ({n} sockets)", flush=True)
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    n_req = rounds * args.requests
    p99 = {k: quantile(v, 0.99) for k, v in lat.items()}
    p50 = {k: quantile(v, 0.5) for k, v in lat.items()}
    ratio = p99["tickpipe"] / p99["bare"]
    lines = [
        f"# Web overhead benchmark, {dt.date.today().isoformat()}",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- tickpipe version: {version}",
        f"- `GET /ticks/realtime?symbols={SYMBOLS}`: {rounds} round(s) of {args.requests:,} "
        "sequential requests on one keep-alive connection per server, rounds alternating; "
        f"idle WebSockets: {sockets} per server, held by a separate client process.",
        "",
        "| server | p50 ms | p99 ms | server CPU µs per request | KB per idle socket |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("tickpipe", "bare"):
        lines.append(
            f"| {name} | {p50[name]:.3f} | {p99[name]:.3f} | {cpu[name] / n_req * 1e6:.0f} | "
            f"{mem[name]:.1f} |"
        )
    lines += [
        "",
        "## Against the targets",
        "",
        f"- `/ticks/realtime` p99 **{ratio:.2f}x** the bare route (target <= {TARGET_LATENCY}x): "
        f"{'met' if ratio <= TARGET_LATENCY else 'NOT met'}",
        f"- Idle authenticated WebSocket **{mem['tickpipe']:.1f} KB** (bare {mem['bare']:.1f} KB; "
        f"target <= {TARGET_SOCKET_KB:g} KB): "
        f"{'met' if mem['tickpipe'] <= TARGET_SOCKET_KB else 'NOT met'}",
        *top_section(top),
    ]
    text = "\n".join(lines)
    print("\n" + text)
    write_results("overhead", text, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
