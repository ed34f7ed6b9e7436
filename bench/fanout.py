"""Fan-out benchmark: tickpipe against a naive baseline, same publisher, same clients, one run.

    .venv/bin/python bench/fanout.py            # full: ~10 s windows, sweep, /ticks/realtime
    .venv/bin/python bench/fanout.py --quick    # shorter windows, no refinement step

Everything runs on this machine over 127.0.0.1, each part in its own process: a redis-server on
a free port, the web process under test (``tickpipe web``, or ``bench/naive_server.py``), one
publisher (``bench/publisher.py``: ``Bus.publish`` in 10 ms batches) and client processes
(``bench/clients.py``: 100 WebSocket clients each, 5 of the 100 symbols per client). Each run
starts a fresh web process, connects and subscribes every client, publishes for ``warmup +
measure`` seconds, then drains. A run passes when every event arrived (no seq gap, nothing
missing after the drain), p99 publish -> receive latency is at most 50 ms, the publisher kept
its rate and no client was disconnected. The sweep walks a ladder of rates from the reference
load up (or down) to the highest rate that passes.

Besides the sweeps, tickpipe is measured at the reference load with 1,000 req/s on
``GET /ticks/realtime`` (``bench/realtime_load.py``; server-side time from the
``Server-Timing`` header that ``bench/timed_web.py`` adds), with that REST load alone, with
clients that negotiate permessage-deflate, and once at 16,000 ticks/s to show how its cost
per tick scales. The machine may be shared: each run records how much CPU other processes
used, and a failed run that was disturbed is measured again (``--retries``).

``--web 1,2`` measures tickpipe with one web process and then with two on their own ports (the
client processes spread over them, as behind a load balancer), each at the reference load and
swept, in the same run; server CPU and RSS are those of all web processes together, and each web
process's pub/sub intake (messages/s, from its heartbeat) and Redis' CPU per published tick are
reported, the unit costs of the capacity model in plan.md.

Prints one line per run and a summary, and writes the summary to
``bench/results/fanout-<date>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.clients import bucket_ns  # noqa: E402
from bench.lines import read_json, tell  # noqa: E402
from bench.report import code_version, machine, write_results  # noqa: E402
from server.auth import KeyStore  # noqa: E402
from server.config import Settings  # noqa: E402
from server.live.bus import WEB_KEY_PREFIX, Layout  # noqa: E402
from server.live.connection import open_redis, open_sync_redis  # noqa: E402
from tests.harness import free_port, wait_port  # noqa: E402

PY = sys.executable
N_SYMBOLS = 100
SYMBOLS = [f"SYM{i:02d}" for i in range(N_SYMBOLS)]
REALTIME_SYMBOLS = "SYM00,SYM01"
REFERENCE_RATE = 4000
PROBE_RATE = 16000
LADDER = [250, 500, 1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 48000, 64000]
P99_LIMIT_MS = 50.0
REF_P99_TARGET_MS = 20.0
REALTIME_P99_TARGET_MS = 2.0


# -- processes -----------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Deployment:
    """The Redis shared by every run (one redis-server, or ``--redis cluster``: 3 masters and 3
    replicas as the cluster tests start them), and the web processes of the current run (one,
    or ``--web N`` on N ports: the clients are spread over them)."""

    def __init__(self, workdir: Path, mode: str = "standalone") -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.mode = mode
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.cluster: Any = None  # tests.cluster.RedisCluster in cluster mode
        self.webs: list[subprocess.Popen[bytes]] = []
        self.web_ports: list[int] = []
        self.key = ""

    def start_redis(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.mode == "cluster":
            from tests.cluster import RedisCluster

            self.cluster = RedisCluster(self.workdir / "cluster").start()
            self.redis_url = self.cluster.url
        else:
            exe = shutil.which("redis-server") or "/usr/bin/redis-server"
            self.redis_proc = subprocess.Popen(
                [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir),
                 "--logfile", str(self.workdir / "redis.log")],
            )  # fmt: skip
            wait_port(self.redis_port, 10)
        self.key = self._create_key()
        self._prime()

    @property
    def settings(self) -> Settings:
        """What every process of the run is told about Redis."""
        return Settings(redis_url=self.redis_url, redis_mode=self.mode, data_dir=self.data_dir)

    def redis_pids(self) -> tuple[list[int], list[int]]:
        """The redis-server processes: (masters, replicas); one master and no replica on one
        Redis."""
        if self.cluster is not None:
            masters = [n.proc.pid for n in self.cluster.masters() if n.proc is not None]
            every = [n.proc.pid for n in self.cluster.nodes if n.proc is not None]
            return masters, [pid for pid in every if pid not in masters]
        return ([] if self.redis_proc is None else [self.redis_proc.pid]), []

    def _create_key(self) -> str:
        store = KeyStore(self.data_dir / "keys.sqlite3")
        try:
            secret, _ = store.create("bench", ["realtime"])
        finally:
            store.close()
        return secret

    def _prime(self) -> None:
        """Publish one quote per symbol so every symbol is known and has an epoch."""
        import asyncio

        from redis.asyncio import RedisCluster

        from server.live.bus import Bus
        from server.ticks import Quote

        settings = self.settings

        async def prime() -> None:
            for attempt in range(5):
                r = open_redis(settings, socket_timeout=10)
                try:
                    if isinstance(r, RedisCluster):
                        await r.initialize()  # the slot map, before concurrent commands
                    ts = time.time_ns()
                    quotes = [Quote(s, ts, 10.0, 100.0, 10.01, 100.0) for s in SYMBOLS]
                    await Bus(r, layout=Layout.of(settings)).publish(quotes)
                    return
                except Exception as exc:  # a cluster just formed may still be settling
                    if attempt == 4:
                        raise
                    print(f"  priming failed ({type(exc).__name__}: {exc}); again", flush=True)
                    await asyncio.sleep(1)
                finally:
                    await r.aclose()

        asyncio.run(prime())

    def seqs(self) -> dict[str, int]:
        layout = Layout.of(self.settings)
        r = open_sync_redis(self.settings)
        try:
            got = [r.hget(layout.sym_key(s), "seq") for s in SYMBOLS]
            return {s: int(v or 0) for s, v in zip(SYMBOLS, got, strict=True)}  # type: ignore[arg-type]
        finally:
            r.close()

    @property
    def web_port(self) -> int:
        return self.web_ports[0]

    def start_webs(self, kind: str, n: int = 1) -> None:
        for _ in range(n):
            self._start_web(kind)

    def _start_web(self, kind: str) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(
            TICKPIPE_REDIS_URL=self.redis_url,
            TICKPIPE_REDIS_MODE=self.mode,
            TICKPIPE_DATA_DIR=str(self.data_dir),
            TICKPIPE_HOST="127.0.0.1",
            TICKPIPE_PORT=str(port),
            TICKPIPE_MAX_CONNS_PER_KEY="10000",
            TICKPIPE_MAX_SYMBOLS_PER_CONN="1000",
            NAIVE_REDIS_URL=self.redis_url,
        )
        if kind == "tickpipe":
            args = [PY, "-m", "server.cli", "web"]
        elif kind == "tickpipe+timing":
            args = [PY, "-m", "bench.timed_web"]
        else:
            args = [PY, "-m", "uvicorn", "bench.naive_server:create_app", "--factory",
                    "--host", "127.0.0.1", "--port", str(port),
                    "--ws-max-size", str(16 * 1024 * 1024), "--ws-ping-interval", "20",
                    "--ws-ping-timeout", "20", "--no-access-log",
                    "--log-level", "warning"]  # fmt: skip
        log = (self.workdir / "web.log").open("ab")
        web = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.webs.append(web)
        self.web_ports.append(port)
        wait_port(port, 30)
        if kind.startswith("tickpipe"):
            self._wait_healthy(port)

    def _wait_healthy(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if b'"redis":"up"' in conn.getresponse().read():
                    return
            time.sleep(0.1)
        raise TimeoutError("tickpipe web did not report Redis up")

    def pubsub_rates(self) -> list[float]:
        """Pub/sub messages per second each tickpipe web process took in over its last second
        (``messages_in_per_s`` of its heartbeat ``tp:web:<host>:<pid>``)."""
        r = open_sync_redis(self.settings)
        try:
            keys = list(r.scan_iter(match=WEB_KEY_PREFIX + "*"))
            return [float(r.hget(k, "messages_in_per_s") or 0.0) for k in keys]  # type: ignore[arg-type]
        finally:
            r.close()

    def stop_webs(self) -> None:
        for web in self.webs:
            stop_process(web)
        self.webs, self.web_ports = [], []

    def stop(self) -> None:
        self.stop_webs()
        stop_process(self.redis_proc)
        if self.cluster is not None:
            self.cluster.stop()


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    rate: float
    note: str = ""
    webs: int = 1  # web processes, the clients spread over them
    redis: str = "standalone"  # or "cluster" (3 masters + 3 replicas)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # load average at the window's end
    ticks_in: float = 0.0
    out: float = 0.0
    expected: int = 0
    received: int = 0
    gaps: int = 0
    lost: int = 0
    dups: int = 0
    p50: float = 0.0
    p99: float = 0.0
    max_ms: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    busiest_others: list[tuple[str, float]] = field(default_factory=list)
    attempts: int = 1
    websockets: bool = True
    undelivered: int = 0  # events still missing when the drain ended (a backlog, or lost)
    rss_mb: float = 0.0
    rss0_mb: float = 0.0  # the web processes before any client connected
    msgs_in: float = 0.0  # pub/sub messages per second into each web process (their heartbeats)
    frames: int = 0  # WebSocket messages received by all clients (whole run)
    frames_per_s: float = 0.0  # ... during the window
    closed: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    publisher: dict[str, Any] = field(default_factory=dict)
    realtime: dict[str, Any] | None = None
    failure: str = ""

    @property
    def label(self) -> str:
        """The server, and how many web processes served the clients when more than one."""
        return (
            self.server
            + (f" x{self.webs} web" if self.webs > 1 else "")
            + (", cluster" if self.redis == "cluster" else "")
        )

    @property
    def rate_kept(self) -> bool:
        return self.ticks_in >= 0.97 * self.rate

    @property
    def passed(self) -> bool:
        return (
            not self.failure
            and self.gaps == 0
            and self.lost == 0
            and self.p99 <= P99_LIMIT_MS
            and self.rate_kept
            and not self.closed
        )

    def why_not(self) -> str:
        if self.failure:
            return self.failure
        if not self.websockets:
            return "REST only"
        reasons = []
        if self.gaps:
            reasons.append(f"{self.gaps} seq gaps")
        if self.undelivered:
            reasons.append(f"{self.undelivered} not delivered within the drain")
        if self.p99 > P99_LIMIT_MS:
            reasons.append(f"p99 {self.p99:.1f} ms")
        if not self.rate_kept:
            reasons.append(f"publisher reached {self.ticks_in:.0f}/s")
        if self.closed:
            reasons.append(f"disconnects {self.closed}")
        return ", ".join(reasons)


def client_plan(n_clients: int, per_client: int) -> list[list[str]]:
    """Client ``c`` takes ``per_client`` consecutive symbols from ``c * per_client``: with 200
    clients x 5 of 100 symbols every symbol has exactly 10 subscribers."""
    return [
        [SYMBOLS[(c * per_client + k) % N_SYMBOLS] for k in range(per_client)]
        for c in range(n_clients)
    ]


def percentile(hist: dict[int, int], p: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = p * total
    seen = 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= rank:
            return bucket_ns(k) / 1e6
    return bucket_ns(max(hist)) / 1e6


def cpu_seconds(procs: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for name, pids in procs.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


def machine_busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def all_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid -> (short command line, CPU seconds so far)."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        info = proc.info
        if info["cpu_times"] is None:
            continue
        cmd = " ".join(info["cmdline"] or [info["name"] or "?"])
        out[proc.pid] = (cmd[-60:], info["cpu_times"].user + info["cpu_times"].system)
    return out


def others_busiest(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    mine: set[int],
    wall: float,
) -> list[tuple[str, float]]:
    """The processes outside this benchmark that used the most CPU in the window (% of a core)."""
    used = [
        (cmd, 100 * (t - before.get(pid, (cmd, 0.0))[1]) / wall)
        for pid, (cmd, t) in after.items()
        if pid not in mine and pid != os.getpid()
    ]
    return sorted((u for u in used if u[1] >= 3), key=lambda u: -u[1])[:4]


def wait_quiet(limit_pct: float, max_wait_s: float) -> float:
    """Wait (bounded) until the machine's CPU use is under ``limit_pct`` (100 = one core);
    returns the last reading. Other work on a shared box competes with the run."""
    deadline = time.monotonic() + max_wait_s
    while True:
        pct = psutil.cpu_percent(interval=1.0) * (os.cpu_count() or 1)
        if pct <= limit_pct or time.monotonic() >= deadline:
            return pct


class Bench:
    def __init__(self, args: argparse.Namespace, deployment: Deployment) -> None:
        self.args = args
        self.deployment = deployment
        self.runs: list[Run] = []
        self.version = code_version()
        self.started = time.monotonic()

    def elapsed_min(self) -> float:
        return (time.monotonic() - self.started) / 60

    def run(
        self,
        server: str,
        rate: float,
        realtime: bool = False,
        deflate: bool = False,
        websockets: bool = True,
        probe: bool = False,
        webs: int = 1,
    ) -> Run:
        """Measure one load; if it fails while other work was using the machine, try again
        (bounded) and keep the least disturbed attempt."""
        attempts: list[Run] = []
        while True:
            run = self.attempt(
                server, rate, realtime, deflate or self.args.deflate, websockets, webs
            )
            if probe:
                run.note = "(scaling probe)"
            attempts.append(run)
            disturbed = run.cpu.get("others", 0.0) > self.args.contended
            if (
                run.passed
                or probe
                or not websockets
                or not disturbed
                or len(attempts) > self.args.retries
            ):
                break
            print(f"    other work used {run.cpu['others']:.0f}% CPU: measuring again", flush=True)
        best = next((r for r in attempts if r.passed), None) or min(
            attempts, key=lambda r: (bool(r.failure), r.cpu.get("others", 0.0))
        )
        best.attempts = len(attempts)
        self.runs.append(best)
        return best

    def attempt(
        self,
        server: str,
        rate: float,
        realtime: bool,
        deflate: bool,
        websockets: bool,
        webs: int = 1,
    ) -> Run:
        a = self.args
        c = self.deployment
        run = Run(
            server=server.replace("+timing", ""),
            rate=rate,
            websockets=websockets,
            webs=webs,
            redis=c.mode,
        )
        if realtime:
            run.note = "+ /ticks/realtime 1000 req/s"
        if deflate:
            run.note = (run.note + " + clients offer permessage-deflate").strip()
        if not websockets:
            run.note = (run.note + ", no WebSocket clients").strip()
        clients: list[subprocess.Popen[bytes]] = []
        publisher: subprocess.Popen[bytes] | None = None
        loader: subprocess.Popen[bytes] | None = None
        try:
            wait_quiet(a.quiet, a.quiet_wait)
            c.start_webs(server, webs)
            run.rss0_mb = sum(psutil.Process(w.pid).memory_info().rss for w in c.webs) / 2**20
            pids = ", ".join(
                f"{w.pid} on :{port}" for w, port in zip(c.webs, c.web_ports, strict=True)
            )
            print(f"  ({server} web process pid {pids})", flush=True)
            base = c.seqs()
            plan = client_plan(a.procs * a.clients, a.per_client)
            per = a.clients
            for i in range(a.procs if websockets else 0):
                p = subprocess.Popen(
                    [PY, "-m", "bench.clients"],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                clients.append(p)
                chunk = plan[i * per : (i + 1) * per]
                tell(
                    [p],
                    {
                        "url": f"ws://127.0.0.1:{c.web_ports[i % webs]}/ws",
                        "key": c.key,
                        "clients": chunk,
                        "base": base,
                        "drain_s": a.drain,
                        "deflate": deflate,
                    },
                )
            for p in clients:
                ready = read_json(p, 90, "clients")
                if ready["failed"]:
                    raise RuntimeError(f"clients could not subscribe: {ready['failed']}")
            start = time.time_ns() + 1_000_000_000
            w0 = start + int(a.warmup * 1e9)
            w1 = w0 + int(a.measure * 1e9)
            publisher = subprocess.Popen(
                [PY, "-m", "bench.publisher", "--redis-url", c.redis_url, "--redis-mode", c.mode,
                 "--symbols", ",".join(SYMBOLS), "--rate", str(rate),
                 "--start-ns", str(start), "--w0", str(w0), "--w1", str(w1)],
                cwd=ROOT, stdout=subprocess.PIPE,
            )  # fmt: skip
            tell(clients, {"w0": w0, "w1": w1})
            if realtime:
                loader = subprocess.Popen(
                    [PY, "-m", "bench.realtime_load", "--port", str(c.web_port),
                     "--symbols", REALTIME_SYMBOLS, "--rate", "1000",
                     "--duration", str(a.measure), "--start-ns", str(w0)],
                    cwd=ROOT, stdout=subprocess.PIPE,
                    env={**os.environ, "BENCH_KEY": c.key},
                )  # fmt: skip
            masters, replicas = c.redis_pids()
            procs = {
                "server": [w.pid for w in c.webs],
                "redis": masters,
                "replicas": replicas,
                "publisher": [publisher.pid],
                "clients": [p.pid for p in clients],
                "orchestrator": [os.getpid()],
            }
            if loader is not None:
                procs["http load"] = [loader.pid]
            # Walking every process costs a burst of CPU: do it in the warm-up, not at w0.
            time.sleep(max(0.0, (w0 - time.time_ns()) / 1e9 - 0.7))
            every0, every_t0 = all_cpu_seconds(), time.monotonic()
            time.sleep(max(0.0, (w0 - time.time_ns()) / 1e9))
            cpu0, busy0, t0 = cpu_seconds(procs), machine_busy(), time.monotonic()
            rss = 0
            servers = [psutil.Process(w.pid) for w in c.webs]
            rates: list[list[float]] = []
            while time.time_ns() < w1:
                with contextlib.suppress(psutil.Error):
                    rss = max(rss, sum(w.memory_info().rss for w in servers))
                if server.startswith("tickpipe"):
                    rates.append(c.pubsub_rates())
                time.sleep(min(0.5, max(0.0, (w1 - time.time_ns()) / 1e9)))
            cpu1, busy1, t1 = cpu_seconds(procs), machine_busy(), time.monotonic()
            wall = t1 - t0
            mine = {pid for pids in procs.values() for pid in pids}
            every1 = all_cpu_seconds()
            span = time.monotonic() - every_t0
            run.busiest_others = others_busiest(every0, every1, mine, span)
            run.cpu = {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in procs}
            run.cpu["machine"] = 100 * (busy1 - busy0) / wall
            run.load = os.getloadavg()
            run.cpu["others"] = run.cpu["machine"] - sum(run.cpu[k] for k in procs)
            run.rss_mb = rss / 2**20
            per_web = [sum(r) / len(r) for r in rates if r]
            run.msgs_in = sum(per_web) / len(per_web) if per_web else 0.0
            run.publisher = read_json(publisher, 30, "publisher")
            run.ticks_in = run.publisher["in_window"] / a.measure
            if loader is not None:
                run.realtime = read_json(loader, 30, "realtime load")
            final = c.seqs()
            tell(clients, {"final": final})
            hist: dict[int, int] = {}
            for p in clients:
                r = read_json(p, a.drain + 30, "clients")
                run.expected += r["expected"]
                run.received += r["received"]
                run.gaps += r["gaps"]
                run.lost += r["gap_events"] + r["tail_missing"]
                run.undelivered += r["tail_missing"]
                run.dups += r["dups"]
                run.frames += r["frames"]
                run.frames_per_s += r["frames_in_window"] / a.measure
                run.out += r["recv_in_window"] / a.measure
                run.max_ms = max(run.max_ms, r["max_lat_ns"] / 1e6)
                for k, n in r["hist"]:
                    hist[k] = hist.get(k, 0) + n
                for d, src in ((run.closed, r["closed"]), (run.status, r["status"])):
                    for k, n in src.items():
                        d[k] = d.get(k, 0) + n
            run.p50 = percentile(hist, 0.50)
            run.p99 = percentile(hist, 0.99)
        except Exception as exc:
            run.failure = f"{type(exc).__name__}: {exc}"[:300]
            tail = (c.workdir / "web.log").read_text(errors="replace")[-1500:]
            print(f"  run failed: {run.failure}\n  web.log tail:\n{tail}", file=sys.stderr)
        finally:
            for p in [*clients, publisher, loader]:
                if p is not None:
                    with contextlib.suppress(Exception):
                        p.kill()
                        p.wait(5)
            c.stop_webs()
        print(format_run(run), flush=True)
        if run.realtime:
            print("    " + format_realtime(run.realtime), flush=True)
        extra = {"status": run.status, "closed": run.closed, "publisher": run.publisher}
        print(f"    {orjson.dumps(extra).decode()}", flush=True)
        if run.busiest_others:
            busiest = ", ".join(f"{cmd} {pct:.0f}%" for cmd, pct in run.busiest_others)
            print(f"    busiest other processes: {busiest}", flush=True)
        return run

    def sweep(self, server: str, first: Run, webs: int = 1) -> float:
        """Highest ladder rate that passes, starting from the reference run."""
        best = first.rate if first.passed else 0.0
        i = LADDER.index(int(first.rate))
        step = 1 if first.passed else -1
        failed_at: float | None = None if first.passed else first.rate
        deadline = time.monotonic() + self.args.sweep_budget
        while 0 <= i + step < len(LADDER) and time.monotonic() < deadline:
            i += step
            r = self.run(server, LADDER[i], webs=webs)
            if step == 1 and not r.passed:
                failed_at = r.rate
                break
            if step == 1:
                best = r.rate
            elif r.passed:
                best = r.rate
                break
            else:
                failed_at = r.rate
        if self.args.refine and best and failed_at and failed_at > best:
            mid = float(round((best + failed_at) / 2 / 250) * 250)
            if best < mid < failed_at and time.monotonic() < deadline:
                r = self.run(server, mid, webs=webs)
                if r.passed:
                    best = mid
        return best


# -- report --------------------------------------------------------------------------------------


def format_run(r: Run) -> str:
    if r.failure and not r.ticks_in:
        return f"  {r.label:<8} {r.rate:>7.0f}/s  FAILED: {r.failure}"
    cpu = r.cpu
    return (
        f"  {r.label:<8} target {r.rate:>6.0f}/s  in {r.ticks_in:>7.0f}/s  "
        f"out {r.out:>8.0f}/s in {r.frames_per_s:>6.0f} frames/s  "
        f"loss {r.lost} (gaps {r.gaps}, recv {r.received}/{r.expected})  "
        f"p50 {r.p50:6.2f} ms  p99 {r.p99:7.2f} ms  max {r.max_ms:7.1f} ms  "
        f"server {cpu.get('server', 0):3.0f}% CPU {r.rss_mb:4.0f} MB  "
        f"[clients {cpu.get('clients', 0):.0f}% redis {cpu.get('redis', 0):.0f}% "
        f"replicas {cpu.get('replicas', 0):.0f}% pub {cpu.get('publisher', 0):.0f}% "
        f"others {cpu.get('others', 0):.0f}% "
        f"machine {cpu.get('machine', 0):.0f}%/200% load {r.load[0]:.1f}]  "
        f"{'PASS' if r.passed else 'FAIL: ' + r.why_not() if r.websockets else 'REST only'}"
        + (f"  {r.note}" if r.note else "")
    )


def format_realtime(rt: dict[str, Any]) -> str:
    c, s = rt.get("client_ms", {}), rt.get("server_ms", {})
    return (
        f"/ticks/realtime: {rt['ok']} ok, {rt['errors']} errors, {rt['rate']:.0f} req/s; "
        f"client-side p50 {c.get('p50', float('nan')):.3f} ms p99 {c.get('p99', float('nan')):.3f}"
        f" ms; server-side p50 {s.get('p50', float('nan')):.3f} ms "
        f"p99 {s.get('p99', float('nan')):.3f} ms"
    )


def ms(value: float) -> str:
    return "-" if not value or math.isnan(value) else f"{value:.2f}"


def summary(bench: Bench, best: dict[str, float], command: str, args: argparse.Namespace) -> str:
    runs = bench.runs
    ref = {
        r.server: r
        for r in runs
        if r.rate == REFERENCE_RATE and not r.note and r.webs == 1 and r.redis == "standalone"
    }
    rt_runs = [r for r in runs if r.realtime]
    lines = [
        f"# Fan-out benchmark, {dt.date.today().isoformat()}",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- tickpipe version: {bench.version}"
        + (
            f" (CHANGED during the run, now {now})"
            if (now := code_version()) != bench.version
            else ""
        ),
        f"- Load: {args.procs * args.clients} WebSocket clients in {args.procs} processes, "
        f"{args.per_client} of {N_SYMBOLS} symbols each (10 subscribers per symbol); one "
        "publisher process, `Bus.publish` every 10 ms, 1 trade : 3 quotes; warm-up "
        f"{args.warmup:g} s, measured {args.measure:g} s per run; fresh web process per run. "
        "Clients: websockets' sans-I/O protocol on asyncio (uvloop), orjson, no compression "
        "unless noted. Redis, publisher, clients and server share the machine.",
        "- Latency: publish (`ts` = `time_ns()` just before `Bus.publish`) to the client having "
        "the frame, for ticks published in the window. Loss: seq gaps plus events still "
        f"missing {args.drain:g} s after publishing stopped.",
        f"- Pass: 0 loss, p99 <= {P99_LIMIT_MS:g} ms, publisher kept >= 97% of the rate, no "
        "disconnects.",
        "- CPU figures are % of one core over the measured window (psutil). \"Other sessions' "
        "CPU\" is the machine's busy time minus this benchmark's processes: work that was not "
        "ours but competed with it for the 2 cores.",
        "",
        "| server | target in/s | in/s | out/s | frames/s | loss | p50 ms | p99 ms | max ms "
        "| server CPU | server RSS MB (before clients) | server CPU us / tick out "
        "| Redis (masters) CPU us / tick in | pub/sub msgs/s into each web | clients CPU "
        "| other sessions' CPU | load avg | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        res = "PASS" if r.passed else "FAIL: " + r.why_not()
        if not r.websockets:
            res = "REST only: see below"
        if r.attempts > 1:
            res += f" (attempt {r.attempts})" if r.passed else f" ({r.attempts} attempts)"
        server_cpu = r.cpu.get("server", 0.0)
        per_tick = f"{1e4 * server_cpu / r.out:.1f}" if r.out else "-"
        redis_tick = f"{1e4 * r.cpu.get('redis', 0.0) / r.ticks_in:.1f}" if r.ticks_in else "-"
        loss = f"{r.lost} ({r.gaps} gaps)" if r.gaps else str(r.lost)
        lines.append(
            f"| {r.label}{' ' + r.note if r.note else ''} | {r.rate:.0f} | {r.ticks_in:.0f} | "
            f"{r.out:.0f} | {r.frames_per_s:.0f} | {loss} | {ms(r.p50)} | {ms(r.p99)} | "
            f"{ms(r.max_ms)} | "
            f"{server_cpu:.0f}% | {r.rss_mb:.0f} ({r.rss0_mb:.0f}) | {per_tick} | {redis_tick} | "
            f"{r.msgs_in:.0f} | "
            f"{r.cpu.get('clients', 0):.0f}% | {r.cpu.get('others', 0):.0f}% | "
            f"{r.load[0]:.1f} | {res} |"
        )
    others = sorted(r.cpu["others"] for r in runs if "others" in r.cpu)
    if others:
        lines += [
            "",
            f"Other processes on the machine used {others[0]:.0f}-{others[-1]:.0f}% CPU "
            f"(median {others[len(others) // 2]:.0f}%) during the measured windows, out of "
            f"{100 * (os.cpu_count() or 1)}%. Total time: {bench.elapsed_min():.1f} min.",
        ]
    lines += ["", "## Against the targets", ""]
    tp, nv = ref.get("tickpipe"), ref.get("naive")
    if tp:
        ok = tp.lost == 0 and tp.gaps == 0 and tp.p99 <= REF_P99_TARGET_MS and not tp.failure
        lines.append(
            f"- Reference load ({REFERENCE_RATE}/s in): tickpipe loss {tp.lost}, p99 "
            f"{tp.p99:.2f} ms (target 0 and <= {REF_P99_TARGET_MS:g} ms): "
            f"{'met' if ok else 'NOT met'}" + (f"; naive: {nv.why_not() or 'PASS'}" if nv else "")
        )
    if tp and nv and tp.out and nv.out:
        tp_us = 1e4 * tp.cpu.get("server", 0.0) / tp.out
        nv_us = 1e4 * nv.cpu.get("server", 0.0) / nv.out
        lines.append(
            f"- Server CPU per delivered tick at the reference load: tickpipe {tp_us:.1f} us, "
            f"naive {nv_us:.1f} us ({nv_us / tp_us:.1f}x)"
        )
    lowest: dict[str, tuple[float, float]] = {}
    for name in ("tickpipe", "naive"):
        costs = [
            (r.rate, 1e4 * r.cpu.get("server", 0.0) / r.out)
            for r in runs
            if r.server == name
            and r.webs == 1
            and r.redis == "standalone"
            and r.out
            and "realtime" not in r.note
            and "deflate" not in r.note
        ]
        if costs:
            costs.sort()
            lines.append(
                f"- {name}: server CPU per delivered tick by input rate: "
                + ", ".join(f"{rate:.0f}/s {us:.1f} us" for rate, us in costs)
            )
            lowest[name] = min(costs, key=lambda c: c[1])
    if len(lowest) == 2:
        (tr, tu), (nr, nu) = lowest["tickpipe"], lowest["naive"]
        lines.append(
            f"- Lowest server CPU per delivered tick measured: tickpipe {tu:.1f} us (at {tr:.0f}/s "
            f"in), naive {nu:.1f} us (at {nr:.0f}/s in): {nu / tu:.1f}x less CPU per tick. "
            "tickpipe's cost falls as the rate rises (more ticks per frame); the naive one "
            "cannot fall below one frame per tick per client."
        )
    tb, nb = best.get("tickpipe", 0.0), best.get("naive", 0.0)
    if "tickpipe" in best and "naive" in best:
        ratio = tb / nb if nb else float("inf")
        lines.append(
            f"- Highest sustained rate at p99 <= {P99_LIMIT_MS:g} ms and 0 loss: tickpipe "
            f"{tb:.0f} ticks/s in ({tb * 10:.0f}/s out), naive {nb:.0f} ticks/s in: "
            f"{ratio:.1f}x (target >= 10x): {'met' if ratio >= 10 else 'NOT met'}"
            + (" (tickpipe passed the top of the ladder)" if tb == LADDER[-1] else "")
        )
    lines += web_processes(runs, best)
    for r in rt_runs:
        assert r.realtime is not None
        srv = r.realtime.get("server_ms", {})
        met = "met" if srv and srv["p99"] <= REALTIME_P99_TARGET_MS else "NOT met"
        during = (
            f"while the reference load runs (WebSocket loss {r.lost}, p50 {r.p50:.2f} ms, "
            f"p99 {r.p99:.2f} ms)"
            if "no WebSocket" not in r.note
            else "with the same feed but no WebSocket clients (the floor)"
        )
        lines.append(
            f"- {format_realtime(r.realtime)}, 1000 req/s {during}: target p99 <= "
            f"{REALTIME_P99_TARGET_MS:g} ms server-side {met}."
        )
    if rt_runs:
        lines.append(
            "  Server-side = `Server-Timing` header added by bench/timed_web.py around the "
            "unchanged app (from the app being called to the response head: auth, the Redis "
            "round trip, encoding, and any wait for the event loop meanwhile); client-side = "
            "raw HTTP/1.1 keep-alive requests over loopback, from write to full body."
        )
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def best_key(webs: int, redis: str = "standalone") -> str:
    """Where the highest sustained rate of tickpipe with ``webs`` web processes on ``redis`` is
    kept (the same as ``Run.label``)."""
    return Run("tickpipe", 0.0, webs=webs, redis=redis).label


def web_processes(runs: list[Run], best: dict[str, float]) -> list[str]:
    """tickpipe with 1 and with N web processes, on one Redis and on a cluster: the reference
    load and the highest sustained rate of each (only when more than one setup was measured)."""
    setups = sorted({(r.redis != "standalone", r.webs) for r in runs if r.server == "tickpipe"})
    if len(setups) < 2:
        return []
    lines = []
    for clustered, n in setups:
        mode = "cluster" if clustered else "standalone"
        ref = next(
            (
                r
                for r in runs
                if r.server == "tickpipe" and r.webs == n and r.redis == mode
                and r.rate == REFERENCE_RATE and not r.note
            ),
            None,
        )  # fmt: skip
        what = "- tickpipe, " + (
            f"{n} web processes (the clients spread over them)" if n > 1 else "1 web process"
        )
        what += ", Redis Cluster (3 masters + 3 replicas)" if clustered else ", one Redis"
        if ref is not None and ref.out:
            us = 1e4 * ref.cpu.get("server", 0.0) / ref.out
            redis_us = 1e4 * ref.cpu.get("redis", 0.0) / ref.ticks_in if ref.ticks_in else 0.0
            replicas = ref.cpu.get("replicas", 0.0)
            what += (
                f": reference load in {ref.ticks_in:.0f}/s, out {ref.out:.0f}/s, loss "
                f"{ref.lost}, p99 {ms(ref.p99)} ms, server CPU {ref.cpu.get('server', 0):.0f}% "
                f"(all web processes), {us:.1f} us per delivered tick, Redis CPU "
                f"{ref.cpu.get('redis', 0):.0f}% ({redis_us:.1f} us per tick in"
                + (f"; replicas {replicas:.0f}% more" if clustered else "")
                + "), RSS "
                f"{ref.rss_mb:.0f} MB, load average {ref.load[0]:.1f}"
            )
        key = best_key(n, mode)
        if key in best:
            what += (
                f"; highest sustained rate {best[key]:.0f} ticks/s in"
                if best[key]
                else "; no rate of the ladder passed"
            )
        lines.append(what)
    return lines


def measure_one(
    bench: Bench, server: str, args: argparse.Namespace, best: dict[str, float]
) -> None:
    """One web process of ``server``: the reference load, the REST and compression variants
    (tickpipe), the sweep, and a scaling probe."""
    if args.rates:
        for rate in args.rates.split(","):
            bench.run(server, float(rate))
        return
    ref = bench.run(server, REFERENCE_RATE)
    if server == "tickpipe" and not args.no_realtime:
        bench.run("tickpipe+timing", REFERENCE_RATE, realtime=True)
        # The same REST load with the same feed but no fan-out: the floor.
        bench.run("tickpipe+timing", REFERENCE_RATE, realtime=True, websockets=False)
    if server == "tickpipe" and not args.quick and not args.deflate:
        # Browsers and the websockets library offer compression by default.
        bench.run("tickpipe", REFERENCE_RATE, deflate=True)
    if not args.no_sweep:
        best[server] = bench.sweep(server, ref)
    tried = max((r.rate for r in bench.runs if r.server == server), default=0.0)
    if server == "tickpipe" and not args.quick and not args.no_sweep and tried < PROBE_RATE:
        # How the server's cost per tick scales, even past what this box sustains.
        bench.run(server, PROBE_RATE, probe=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows, no refinement")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--clients", type=int, default=100, help="clients per process")
    p.add_argument("--per-client", type=int, default=5, help="symbols per client")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--measure", type=float, default=None)
    p.add_argument("--drain", type=float, default=5.0, help="max seconds to wait for stragglers")
    p.add_argument("--servers", default="tickpipe,naive")
    p.add_argument(
        "--redis",
        default="standalone",
        help="standalone, cluster (3 masters + 3 replicas, TICKPIPE_REDIS_MODE=cluster) or "
        "standalone,cluster: tickpipe on each, in one run",
    )
    p.add_argument(
        "--web",
        default="1",
        help="tickpipe web processes on their own ports, the clients spread over them; a list "
        "(1,2) measures each count (reference load and sweep) in one run",
    )
    p.add_argument("--sweep-budget", type=float, default=300.0, help="seconds per server")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-realtime", action="store_true")
    p.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    p.add_argument("--rates", default="", help="run just these rates (comma-separated)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    p.add_argument(
        "--quiet", type=float, default=110.0, help="before a run, wait for machine CPU %% below"
    )
    p.add_argument("--quiet-wait", type=float, default=20.0, help="wait at most this long")
    p.add_argument(
        "--contended",
        type=float,
        default=25.0,
        help="a failed run is repeated if other processes used more CPU %% than this",
    )
    p.add_argument("--retries", type=int, default=1, help="repeats of a disturbed failed run")
    args = p.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.measure = args.measure if args.measure is not None else (4.0 if args.quick else 10.0)
    args.refine = not args.quick
    exe = Path(PY)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else PY
    command = shlex.join([shown, "bench/fanout.py", *sys.argv[1:]])

    try:
        web_counts = [int(n) for n in args.web.split(",")]
        assert web_counts and all(n >= 1 for n in web_counts)
    except (ValueError, AssertionError):
        p.error(f"--web takes counts of web processes, like 2 or 1,2 (not {args.web!r})")
    modes = args.redis.split(",")
    if not modes or any(m not in ("standalone", "cluster") for m in modes):
        p.error(f"--redis takes standalone, cluster or both (not {args.redis!r})")
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-bench-"))
    bench = Bench(args, Deployment(workdir / modes[0], modes[0]))
    best: dict[str, float] = {}
    print(
        f"machine: {machine()}\ncommand: {command}\ntickpipe: {bench.version}\nwork dir: {workdir}",
        flush=True,
    )
    try:
        for mode in modes:
            deployment = bench.deployment = Deployment(workdir / mode, mode)
            try:
                deployment.start_redis()
                for server in args.servers.split(","):
                    if server != "tickpipe" and mode != "standalone":
                        continue  # the naive server speaks to one Redis only
                    for webs in web_counts if server == "tickpipe" else [1]:
                        name = best_key(webs, mode) if server == "tickpipe" else server
                        print(f"{name}:", flush=True)
                        if webs == 1 and mode == "standalone":
                            measure_one(bench, server, args, best)
                        elif args.rates:
                            for rate in args.rates.split(","):
                                bench.run(server, float(rate), webs=webs)
                        else:
                            ref = bench.run(server, REFERENCE_RATE, webs=webs)
                            if not args.no_sweep:
                                best[name] = bench.sweep(server, ref, webs)
            finally:
                deployment.stop()
    except KeyboardInterrupt:
        print("interrupted; writing what was measured", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = summary(bench, best, command, args)
    print("\n" + text)
    write_results("fanout", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
