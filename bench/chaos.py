"""Fault benchmark: what each fault costs in ticks and time, with resuming clients attached.

    .venv/bin/python bench/chaos.py                  # every fault, then a 30-minute soak
    .venv/bin/python bench/chaos.py --quick          # short faults, a try run (a few minutes)
    .venv/bin/python bench/chaos.py --only redis-empty,web-kill --soak-minutes 0

One stack on this machine over 127.0.0.1, each part its own process as the Procfile runs them:
a redis-server on a free port with the persistence ``tickpipe redis`` uses (append-only file,
fsync always), ``tickpipe web``, ``tickpipe recorder`` and ``tickpipe feed`` (the simulator at
the reference rate, 4,000 ticks/s over 100 symbols). A client process (``bench/chaos_clients.py``)
runs subscribers through ``tickpipe.Client.subscribe`` (resume on), a latency probe on every
symbol and, for its fault, a slow consumer. With root, the data directory is a tmpfs of its own
so the disk can be filled for real. The faults, in turn:

* ``recorder-kill``: SIGKILL the recorder five times, restarting it each time
* ``redis-data``:    SIGKILL Redis and restart it with its data (append-only file)
* ``redis-empty``:   SIGKILL Redis and restart it empty (every sequence starts a new epoch)
* ``web-kill``:      SIGKILL the web process and start it again
* ``disk-full``:     fill the data disk, hold it full, free it (needs root for the tmpfs)
* ``slow-consumer``: a subscriber that stops reading for 60 s, then catches up
* ``hostile-ws``:    10,000 junk WebSocket frames (bad JSON, huge, binary, unknown ops, floods)
* ``rest-fuzz``:     schemathesis cases from the OpenAPI contract against every REST route

Per fault it prints: ticks published (Redis seq per symbol and epoch), stored (DuckDB over the
Parquet store, after the recorder drained), delivered to each client, lost (silently, or reported
in-band by an error the client raised), duplicated, time to recover, and the probe's p99 latency
during the fault. Then a soak: the reference load (4,000 ticks/s in, 200 clients x 5 of 100
symbols, ``bench/clients.py``) for ``--soak-minutes``, with the web process's RSS at start and
end. A whole run (every fault, a soak of at least 30 minutes) writes
``bench/results/chaos-<date>.md``; a quick or partial one ``chaos-<date>-quick.md`` (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import http.client
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import (  # noqa: E402
    N_SYMBOLS,
    REFERENCE_RATE,
    SYMBOLS,
    Deployment,
    all_cpu_seconds,
    client_plan,
    machine_busy,
)
from bench.fanout import percentile as hist_percentile  # noqa: E402
from bench.lines import read_json, tell  # noqa: E402
from bench.report import code_version, machine, top_lines, write_results  # noqa: E402
from server.auth import KeyStore  # noqa: E402
from server.history.store import scan  # noqa: E402
from tests.harness import REDIS_SERVER, Proc, free_port, wait_port  # noqa: E402

PY = sys.executable
OPENAPI = ROOT / "specs" / "001-tick-data-pipeline" / "contracts" / "openapi.yaml"
FAULTS = (
    "baseline",
    "recorder-kill",
    "redis-data",
    "redis-empty",
    "web-kill",
    "disk-full",
    "slow-consumer",
    "hostile-ws",
    "rest-fuzz",
)
SUBSCRIBERS = 6
SYMBOLS_PER_SUBSCRIBER = 10
SLOW_SYMBOLS = SYMBOLS
HOSTILE_CONNS = 4
# How long the slow consumer gets to be back at the head after its stall (a resume of
# minutes of ticks on a busy machine takes a while).
CATCH_UP_S = 300


def wait_for(cond: Callable[[], bool], timeout: float, every: float = 0.1) -> float | None:
    """Seconds until ``cond()`` held, or None if it did not within ``timeout``."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if cond():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(every)


# -- the stack -----------------------------------------------------------------------------------


class ChaosStack:
    """Redis (append-only, fsync always), web, recorder and feed, each killable and restartable."""

    def __init__(self, workdir: Path, tmpfs_mb: int) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True)
        self.mounted = False
        self.mount_error = ""
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mb}m", "tmpfs", str(self.data_dir)],
                capture_output=True,
                text=True,
            )
            self.mounted = r.returncode == 0
            self.mount_error = r.stderr.strip()
        else:
            self.mount_error = "not root: cannot mount a tmpfs"
        self.redis_dir = workdir / "redis"
        self.redis_dir.mkdir()
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(
            TICKPIPE_REDIS_URL=self.redis_url,
            TICKPIPE_DATA_DIR=str(self.data_dir),
            TICKPIPE_HOST="127.0.0.1",
            TICKPIPE_PORT=str(self.port),
            TICKPIPE_SYMBOLS=",".join(SYMBOLS),
            TICKPIPE_FEED_RATE=str(REFERENCE_RATE),
            # The hostile phase reconnects thousands of times with one key.
            TICKPIPE_MAX_CONNS_PER_KEY="10000",
        )
        self.env = env
        self.procs = {
            name: Proc([name], env, workdir / f"{name}.log") for name in ("web", "recorder", "feed")
        }
        store = KeyStore(self.data_dir / "keys.sqlite3")
        try:
            self.key, _ = store.create("chaos", ["realtime", "historical", "replay", "admin"])
        finally:
            store.close()

    # Redis
    def start_redis(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.redis_proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.redis_dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_port(self.redis_port, 20)
        wait_for(lambda: bool(self.redis().ping()), 30)  # loading the append-only file

    def kill_redis(self, keep_data: bool) -> None:
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait(10)
            self.redis_proc = None
        if not keep_data:
            shutil.rmtree(self.redis_dir)
            self.redis_dir.mkdir()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)

    # tickpipe processes
    def start(self, name: str) -> None:
        self.procs[name].start()
        if name == "web":
            wait_port(self.port, 30)

    def kill(self, name: str) -> None:
        proc = self.procs[name].proc
        if proc is not None:
            proc.kill()
            proc.wait(10)
            self.procs[name].proc = None

    def pid(self, name: str) -> int | None:
        proc = self.procs[name].proc
        return proc.pid if proc is not None else None

    def start_all(self) -> None:
        self.start_redis()
        self.start("web")
        self.start("recorder")
        self.start("feed")
        if wait_for(lambda: all(s for _, s in self.seqs().values()), 30) is None:
            raise TimeoutError("the feed did not publish every symbol within 30 s")

    def stop(self, keep: bool = False) -> None:
        """Stop every process; unmount the data tmpfs unless asked to keep it for a look."""
        for name in ("feed", "recorder", "web"):
            self.procs[name].stop()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.redis_proc.wait(10)
            if self.redis_proc.poll() is None:
                self.redis_proc.kill()
        if self.mounted and keep:
            print(f"the data tmpfs stays mounted: umount {self.data_dir} when done")
        elif self.mounted:
            subprocess.run(["umount", "-l", str(self.data_dir)], check=False)

    # What the stack says about itself
    def seqs(self) -> dict[str, tuple[int, int]]:
        """(epoch, last seq) per symbol as Redis has them ((0, 0) before the first tick)."""
        r = self.redis()
        try:
            pipe = r.pipeline(transaction=False)
            for s in SYMBOLS:
                pipe.hmget(f"tp:sym:{s}", "epoch", "seq")
            return {
                s: (int(e or 0), int(q or 0))
                for s, (e, q) in zip(SYMBOLS, pipe.execute(), strict=True)
            }
        finally:
            r.close()

    def log_last_id(self) -> str:
        r = self.redis()
        try:
            return r.xinfo_stream("tp:log")["last-generated-id"].decode()
        finally:
            r.close()

    def stored_through(self, entry_id: str) -> bool:
        """Has the recorder acknowledged every tickerplant-log entry up to ``entry_id``?"""
        r = self.redis()
        try:
            groups = {g["name"].decode(): g for g in r.xinfo_groups("tp:log")}
            g = groups.get("recorder")
            if g is None or _id(g["last-delivered-id"].decode()) < _id(entry_id):
                return False
            pending = r.xpending("tp:log", "recorder")
            return not pending["pending"] or _id(pending["min"].decode()) > _id(entry_id)
        finally:
            r.close()

    def healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
        try:
            conn.request("GET", "/healthz")
            return b'"redis":"up"' in conn.getresponse().read()
        finally:
            conn.close()

    def recorder_state(self) -> dict[str, str]:
        r = self.redis()
        try:
            return {k.decode(): v.decode() for k, v in r.hgetall("tp:recorder").items()}
        finally:
            r.close()

    def web_rss_mb(self) -> float:
        pid = self.pid("web")
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else 0.0


def machine_use(every0: dict[int, tuple[str, float]], busy0: float, w0: float) -> dict[str, float]:
    """CPU used since the readings (% of one core): the whole machine's, and the part used by
    processes that are not this benchmark's (other work sharing the two cores)."""
    wall = time.monotonic() - w0
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.children(recursive=True))}
    every1 = all_cpu_seconds()
    others = sum(
        t - every0.get(pid, (cmd, 0.0))[1] for pid, (cmd, t) in every1.items() if pid not in mine
    )
    return {"machine": 100 * (machine_busy() - busy0) / wall, "others": 100 * others / wall}


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


class Sampler(threading.Thread):
    """Reads every symbol's (epoch, seq) ten times a second: the epochs in the order they began,
    and the last reading before a fault (what was published, when Redis is about to lose it)."""

    def __init__(self, stack: ChaosStack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.epochs: dict[str, list[int]] = {s: [] for s in SYMBOLS}
        self.last: dict[str, tuple[int, int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            with contextlib.suppress(Exception):
                self.note(self.stack.seqs())

    def note(self, seqs: dict[str, tuple[int, int]]) -> None:
        for s, (epoch, seq) in seqs.items():
            if epoch and (not self.epochs[s] or self.epochs[s][-1] != epoch):
                self.epochs[s].append(epoch)
            if epoch:
                self.last[s] = (epoch, seq)


# -- the clients ---------------------------------------------------------------------------------


class Clients:
    """The process of ``bench/chaos_clients.py``: subscribers, probe, slow consumer."""

    def __init__(self, stack: ChaosStack) -> None:
        # Interleaved over the busiest symbols (the simulator ticks earlier symbols more).
        self.plan = [
            [SYMBOLS[c + SUBSCRIBERS * k] for k in range(SYMBOLS_PER_SUBSCRIBER)]
            for c in range(SUBSCRIBERS)
        ]
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.chaos_clients"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        tell(
            [self.proc],
            {
                "url": stack.base,
                "key": stack.key,
                "subscribers": self.plan,
                "probe_symbols": SYMBOLS,
            },
        )
        ready = read_json(self.proc, 60, "chaos clients")
        if ready["ready"] != ready["of"]:
            raise RuntimeError(f"only {ready['ready']} of {ready['of']} subscribers got ticks")

    def ask(self, cmd: str, timeout: float = 30, **fields: Any) -> Any:
        tell([self.proc], {"cmd": cmd, **fields})
        return read_json(self.proc, timeout, f"chaos clients ({cmd})")

    def wait_recovered(self, t0: float, timeout: float) -> tuple[float | None, float | None]:
        """Seconds from ``t0`` (monotonic, the fault) until every subscriber, and the probe,
        received a tick published after the watch began (None: not within ``timeout``)."""
        live: float | None = None
        probe: float | None = None
        while time.monotonic() - t0 < timeout:
            got = self.ask("recovered")
            if probe is None and got["probe"]:
                probe = time.monotonic() - t0
            if live is None and all(got["clients"].values()):
                live = time.monotonic() - t0
            if live is not None and probe is not None:
                break
            time.sleep(0.1)
        return live, probe

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- phases --------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    what: str
    s0: dict[str, tuple[int, int]] = field(default_factory=dict)
    s1: dict[str, tuple[int, int]] = field(default_factory=dict)
    t0_ns: int = 0  # the fault window (for latency)
    t1_ns: int = 0
    end_ns: int = 0  # when s1 was read
    recover_live_s: float | None = None
    recover_store_s: float | None = None
    recover_note: str = ""
    latency: dict[str, Any] = field(default_factory=dict)
    pre_kill: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    slow: dict[str, Any] | None = None  # the slow consumer's deliveries
    slow_target: dict[str, tuple[int, int]] = field(default_factory=dict)  # the head it chased
    skipped: str = ""
    failure: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core: machine, others
    figures: dict[str, Any] = field(default_factory=dict)


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


class Chaos:
    def __init__(self, args: argparse.Namespace, stack: ChaosStack) -> None:
        self.args = args
        self.stack = stack
        self.sampler = Sampler(stack)
        self.clients: Clients | None = None
        self.phases: list[Phase] = []
        self.rng = random.Random(9)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def settle(self) -> None:
        time.sleep(2 if self.quick else 5)

    def phase(self, name: str, what: str, body: Callable[[Phase], None]) -> Phase:
        ph = Phase(name, what)
        print(f"{name}: {what}", flush=True)
        assert self.clients is not None
        try:
            self.ensure_healthy()
            ph.s0 = self.stack.seqs()
            # Everything published before the fault is stored before it starts, so a tick the
            # fault costs the store is counted against this fault, not the one before.
            last = self.stack.log_last_id()
            if wait_for(lambda: self.stack.stored_through(last), 60, 0.2) is None:
                ph.notes.append("the store had not caught up when the fault began")
            every0, busy0, w0 = all_cpu_seconds(), machine_busy(), time.monotonic()
            ph.t0_ns = time.time_ns()
            body(ph)
            ph.t1_ns = ph.t1_ns or time.time_ns()
            ph.cpu = machine_use(every0, busy0, w0)
            self.settle()
        except Exception as exc:
            ph.failure = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  phase failed: {ph.failure}", file=sys.stderr, flush=True)
            ph.t1_ns = ph.t1_ns or time.time_ns()
        with contextlib.suppress(Exception):
            self.ensure_healthy()
        with contextlib.suppress(Exception):
            ph.latency = self.clients.ask("latency", t0=ph.t0_ns, t1=ph.t1_ns)
        with contextlib.suppress(Exception):
            ph.s1 = self.stack.seqs()
        ph.end_ns = time.time_ns()
        probe = ph.latency.get("probe", {})
        print(
            f"  recover live {fmt_s(ph.recover_live_s)} s, store {fmt_s(ph.recover_store_s)} s; "
            f"probe p99 {probe.get('p99', float('nan')):.1f} ms over {probe.get('ticks', 0)} "
            f"ticks; {'; '.join(ph.notes)}",
            flush=True,
        )
        self.phases.append(ph)
        return ph

    def ensure_healthy(self) -> None:
        """Every process running, Redis answering, the web process reporting Redis up."""
        s = self.stack
        if s.redis_proc is None or s.redis_proc.poll() is not None:
            print("  (restarting redis)", flush=True)
            s.redis_proc = None
            s.start_redis()
        for name in ("web", "recorder", "feed"):
            proc = s.procs[name].proc
            if proc is None or proc.poll() is not None:
                print(f"  (restarting {name})", flush=True)
                s.procs[name].proc = None
                s.start(name)
        if wait_for(s.healthy, 30) is None:
            raise RuntimeError("the web process did not report healthy within 30 s")

    def store_recovery(self, since: float, timeout: float = 90) -> float | None:
        """Seconds from ``since`` (monotonic) until the recorder stored the log up to now."""
        with contextlib.suppress(Exception):
            last = self.stack.log_last_id()
            if wait_for(lambda: self.stack.stored_through(last), timeout, 0.2) is not None:
                return time.monotonic() - since
        return None

    # The faults ----------------------------------------------------------------------------

    def baseline(self, ph: Phase) -> None:
        time.sleep(5 if self.quick else 15)

    def recorder_kill(self, ph: Phase) -> None:
        times = []
        for i in range(5):
            time.sleep(self.rng.uniform(1.0, 2.0) if self.quick else self.rng.uniform(2.0, 5.0))
            t = time.monotonic()
            self.stack.kill("recorder")
            time.sleep(0.5)
            self.stack.start("recorder")
            rec = self.store_recovery(t)
            times.append(rec)
            print(f"  kill {i + 1}: stored again after {fmt_s(rec)} s", flush=True)
        ok = [x for x in times if x is not None]
        ph.recover_store_s = max(ok) if len(ok) == len(times) else None
        ph.recover_note = "store: the slowest of 5 (kill, restart 0.5 s later, log acknowledged)"
        ph.notes.append("store recovery per kill: " + ", ".join(fmt_s(x) for x in times) + " s")

    def redis_kill(self, ph: Phase, keep_data: bool) -> None:
        assert self.clients is not None
        down = 1.0 if self.quick else 3.0
        ph.pre_kill = self.stack.seqs()
        t = time.monotonic()
        t_ns = time.time_ns()
        self.clients.ask("watch", after_ns=t_ns)
        self.stack.kill_redis(keep_data)
        time.sleep(down)
        self.stack.start_redis()
        ph.recover_live_s, probe = self.clients.wait_recovered(t, 90)
        ph.t1_ns = time.time_ns()
        ph.recover_store_s = self.store_recovery(t)
        ph.recover_note = "live: every subscriber has a tick published after the kill"
        ph.notes.append(f"Redis down {down:g} s; probe recovered after {fmt_s(probe)} s")
        if not keep_data:
            after = self.stack.seqs()
            renewed = sum(1 for s in SYMBOLS if after[s][0] != ph.pre_kill[s][0])
            ph.notes.append(f"{renewed} of {N_SYMBOLS} symbols in a new epoch")

    def web_kill(self, ph: Phase) -> None:
        assert self.clients is not None
        t = time.monotonic()
        self.clients.ask("watch", after_ns=time.time_ns())
        self.stack.kill("web")
        time.sleep(0.5)
        self.stack.start("web")
        restarted = time.monotonic() - t
        ph.recover_live_s, probe = self.clients.wait_recovered(t, 90)
        ph.t1_ns = time.time_ns()
        ph.recover_note = "live: every subscriber has a tick published after the kill"
        ph.notes.append(
            f"web restarted 0.5 s after the kill, listening after {restarted:.1f} s; probe "
            f"recovered after {fmt_s(probe)} s"
        )

    def disk_full(self, ph: Phase) -> None:
        if not self.stack.mounted:
            ph.skipped = f"no tmpfs for the data directory ({self.stack.mount_error})"
            return
        hold = 5.0 if self.quick else 20.0
        ballast = self.stack.data_dir / "ballast"
        try:
            written = fill(ballast)
            ph.notes.append(f"ballast {written >> 20} MiB filled the tmpfs")
            time.sleep(hold)
            state = self.stack.recorder_state()
            ph.notes.append(
                f"recorder while full: state {state.get('state', '?')!r}, error "
                f"{state.get('error', '')[:80]!r}"
            )
            with contextlib.suppress(Exception):
                ok = self.stack.healthy()
                ph.notes.append(f"/healthz while full: {'ok' if ok else 'NOT ok'}")
        finally:
            t_free = time.monotonic()
            ballast.unlink(missing_ok=True)
        ph.t1_ns = time.time_ns()
        ph.recover_store_s = self.store_recovery(t_free)
        ph.recover_note = "store: from freeing the disk to the log acknowledged"
        ph.notes.append(f"disk full for {hold:g} s")

    def slow_consumer(self, ph: Phase) -> None:
        assert self.clients is not None
        stall = 10.0 if self.quick else 60.0
        self.clients.ask("slow", symbols=SLOW_SYMBOLS, stall_s=stall)
        metric0 = self.slow_closes()
        time.sleep(stall + 0.5)
        ph.t1_ns = time.time_ns()
        target = self.stack.seqs()
        t = time.monotonic()

        def caught_up() -> bool:
            last = self.clients.ask("slow_state")["last"]  # type: ignore[union-attr]
            return all(last.get(s, 0) >= target[s][1] for s in SLOW_SYMBOLS)

        took = wait_for(caught_up, CATCH_UP_S, 0.2)
        ph.recover_live_s = None if took is None else time.monotonic() - t
        ph.recover_note = "live: the slow consumer back at the head after its stall"
        if took is None:
            ph.notes.append(
                f"the slow consumer was not back at the head {CATCH_UP_S} s after its stall: "
                "the ticks it had not received yet count as lost"
            )
        ph.slow = self.clients.ask("slow_stop")["slow"]
        ph.slow_target = {s: target[s] for s in SLOW_SYMBOLS}
        metric1 = self.slow_closes()  # None when /metrics did not answer in time
        closes = metric1 - metric0 if metric0 is not None and metric1 is not None else None
        raised = [f"{r['code']}: {r['message'][:120]}" for r in (ph.slow or {}).get("reports", [])]
        ph.notes.append(
            f"stalled {stall:g} s on {len(SLOW_SYMBOLS)} symbols; server's slow-consumer "
            f"closes {closes if closes is not None else '?'}; the consumer's subscribe raised "
            f"{len(raised)} errors" + (f" ({'; '.join(raised[:3])})" if raised else "")
        )

    def slow_closes(self) -> int | None:
        with contextlib.suppress(Exception):
            conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=5)
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.stack.key}"})
            body = conn.getresponse().read().decode()
            conn.close()
            for line in body.splitlines():
                if line.startswith("tickpipe_ws_slow_consumer_closes"):
                    return int(float(line.split()[-1]))
        return None

    def hostile_ws(self, ph: Phase) -> None:
        frames = 2000 if self.quick else 10_000
        res = asyncio.run(hostile(self.stack, frames, 60 if self.quick else 180))
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(res["closes"].items()))
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(res["errors"].items()))
        ph.notes.append(
            f"{res['sent']} frames over {res['connections']} connections in {res['s']:.1f} s; "
            f"closes by attack and code {{{codes}}}; error events {{{errs}}}"
        )
        ph.figures["hostile"] = res

    def rest_fuzz(self, ph: Phase) -> None:
        res = fuzz(self.stack, 15 if self.quick else 60, 90 if self.quick else 300)
        ph.figures["fuzz"] = res
        by = ", ".join(f"{k}: {v}" for k, v in sorted(res["status"].items()))
        ph.notes.append(
            f"{res['cases']} cases over {res['operations']} operations in {res['s']:.0f} s; "
            f"5xx: {res['5xx']}; by status {{{by}}}; transport errors {res['errors']}"
        )
        if res["5xx_examples"]:
            ph.notes.append("5xx e.g. " + " | ".join(res["5xx_examples"][:3]))

    # The run -------------------------------------------------------------------------------

    def run(self, only: list[str]) -> None:
        self.stack.start_all()
        self.sampler.note(self.stack.seqs())
        self.sampler.start()
        self.clients = Clients(self.stack)
        print(f"  subscribers up: {SUBSCRIBERS} x {SYMBOLS_PER_SUBSCRIBER} symbols", flush=True)
        table: dict[str, tuple[str, Callable[[Phase], None]]] = {
            "baseline": ("no fault (for comparison)", self.baseline),
            "recorder-kill": ("SIGKILL the recorder x5", self.recorder_kill),
            "redis-data": (
                "SIGKILL Redis, restart with its data",
                lambda ph: self.redis_kill(ph, keep_data=True),
            ),
            "redis-empty": (
                "SIGKILL Redis, restart empty",
                lambda ph: self.redis_kill(ph, keep_data=False),
            ),
            "web-kill": ("SIGKILL the web process, restart it", self.web_kill),
            "disk-full": ("fill the data disk, hold, free it", self.disk_full),
            "slow-consumer": (
                f"a subscriber stops reading for {10 if self.quick else 60} s",
                self.slow_consumer,
            ),
            "hostile-ws": (
                f"{2000 if self.quick else 10_000:,} hostile WebSocket frames",
                self.hostile_ws,
            ),
            "rest-fuzz": ("REST fuzz from the OpenAPI contract", self.rest_fuzz),
        }
        for name in FAULTS:
            if name in only:
                what, body = table[name]
                self.phase(name, what, body)

    def finish(self) -> dict[str, Any]:
        """Stop the feed, let clients and recorder drain, and collect what each saw."""
        assert self.clients is not None
        self.stack.procs["feed"].stop()
        time.sleep(0.5)
        final = self.stack.seqs()
        self.sampler.note(final)

        def drained() -> bool:
            lasts = self.clients.ask("lasts")["clients"]  # type: ignore[union-attr]
            return all(
                last.get(s, 0) >= final[s][1]
                for syms, last in zip(self.clients.plan, lasts, strict=True)  # type: ignore[union-attr]
                for s in syms
            )

        drain = wait_for(drained, 30, 0.2)
        last_id = self.stack.log_last_id()
        store = wait_for(lambda: self.stack.stored_through(last_id), 120, 0.3)
        self.sampler.halt.set()
        figures = self.clients.ask("finish", timeout=60)
        figures["drain_s"] = drain
        figures["store_drain_s"] = store
        figures["final"] = final
        return figures


# -- hostile frames ------------------------------------------------------------------------------


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem is full; returns the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        with contextlib.suppress(OSError):  # the last partial pages
            while os.write(fd, b"\0" * 4096):
                written += 4096
    finally:
        os.close(fd)
    return written


def hostile_frames(attack: str, rng: random.Random) -> list[str | bytes]:
    """The frames of one hostile connection."""
    huge = "x" * (1 << 20)
    if attack == "junk":  # unusable messages in a row
        return [
            "{not json",
            "[" * 5000,
            bytes(rng.getrandbits(8) for _ in range(512)),
            '{"op": "launch_missiles"}',
            '{"op": "subscribe", "symbols": 7}',
            "null",
            '"\\ud800"',
            '{"op": "replay", "symbols": ["SYM00"], "start": "yesterday", "speed": -1}',
            '{"op": "subscribe", "symbols": ["SYM00"], "from_seq": {"SYM00": 1e400}}',
            '{"op": "ping", "id": ' + "1" * 4000 + "}",
        ] * 5
    if attack == "huge":  # over the inbound limit, text and binary
        return [huge, '{"op":"subscribe","symbols":["' + huge + '"]}', b"\0" * (1 << 20)]
    if attack == "symbols":  # far more symbols than allowed, and unknown ones
        many = '","'.join(f"S{i}" for i in range(5000))
        return ['{"op": "subscribe", "id": 1, "symbols": ["' + many + '"]}'] * 3
    return [f'{{"op": "ping", "id": {i}}}' for i in range(400)]  # flood


HOSTILE_ATTACKS = ("junk", "flood", "huge", "symbols", "no-key")


async def hostile(stack: ChaosStack, total: int, budget_s: float) -> dict[str, Any]:
    """Send ``total`` hostile frames over a few connections at a time, each connection one kind
    of attack, reconnecting after each close; count the close codes the server chose."""
    import websockets

    rng = random.Random(4)
    sent = 0
    conns = 0
    closes: dict[str, int] = {}
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    url = f"ws://127.0.0.1:{stack.port}/ws"

    async def one() -> None:
        nonlocal sent, conns
        while sent < total and time.monotonic() - t0 < budget_s:
            attack = HOSTILE_ATTACKS[conns % len(HOSTILE_ATTACKS)]
            conns += 1
            key = "tp_nonsense" if attack == "no-key" else stack.key
            code = "still open after 3 s"
            try:
                async with websockets.connect(
                    url, additional_headers={"Authorization": f"Bearer {key}"},
                    open_timeout=10, max_size=None, close_timeout=2,
                ) as ws:  # fmt: skip
                    for frame in hostile_frames(attack, rng) if attack != "no-key" else ["{}"]:
                        if sent >= total:
                            break
                        await ws.send(frame)
                        sent += 1
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(3):
                            async for raw in ws:
                                for ev in orjson.loads(raw):
                                    if ev.get("type") == "error":
                                        errors[ev["code"]] = errors.get(ev["code"], 0) + 1
                    if ws.close_code is not None:
                        code = str(ws.close_code)
            except websockets.ConnectionClosed as exc:
                code = str(exc.rcvd.code if exc.rcvd else "no close frame")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                code = type(exc).__name__
            closes[f"{attack}: {code}"] = closes.get(f"{attack}: {code}", 0) + 1

    await asyncio.gather(*(one() for _ in range(HOSTILE_CONNS)))
    return {
        "sent": sent,
        "connections": conns,
        "closes": closes,
        "errors": errors,
        "s": time.monotonic() - t0,
    }


# -- REST fuzz -----------------------------------------------------------------------------------


def fuzz(stack: ChaosStack, per_op: int, budget_s: float) -> dict[str, Any]:
    """Schemathesis cases (valid and invalid) for every operation of the OpenAPI contract."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import Phase as HPhase

    schema = schemathesis.openapi.from_path(str(OPENAPI))
    session = requests.Session()
    headers = {"Authorization": f"Bearer {stack.key}"}
    status: dict[str, int] = {}
    five: list[str] = []
    errors = 0
    cases = 0
    ops = 0
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        ops += 1
        for mode in schemathesis.GenerationMode:
            if time.monotonic() - t0 > budget_s:
                break

            @settings(
                max_examples=per_op,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[HPhase.generate],
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                nonlocal errors, cases
                if time.monotonic() - t0 > budget_s:
                    return
                cases += 1
                try:
                    r = case.call(base_url=stack.base, session=session, headers=headers,
                                  timeout=30)  # fmt: skip
                except Exception:
                    errors += 1
                    return
                k = str(r.status_code)
                status[k] = status.get(k, 0) + 1
                if r.status_code >= 500 and len(five) < 10:
                    five.append(f"{r.status_code} {case.method} {r.request.url[:160]}")

            with contextlib.suppress(Exception):
                call()
    n5 = sum(n for k, n in status.items() if k.startswith("5"))
    return {
        "cases": cases,
        "operations": ops,
        "status": status,
        "5xx": n5,
        "5xx_examples": five,
        "errors": errors,
        "s": time.monotonic() - t0,
    }


# -- accounting ----------------------------------------------------------------------------------

Runs = list[list[int]]


def count_in(runs: Runs, lo: int, hi: int) -> int:
    """How many seqs of ``runs`` lie in [lo, hi]."""
    return sum(max(0, min(b, hi) - max(a, lo) + 1) for a, b in runs)


def missing(runs: Runs, lo: int, hi: int) -> Runs:
    """The seqs of [lo, hi] that ``runs`` lacks, as runs."""
    out: Runs = []
    at = lo
    for a, b in runs:
        if b < at:
            continue
        if a > hi:
            break
        if a > at:
            out.append([at, min(a - 1, hi)])
        at = max(at, b + 1)
    if at <= hi:
        out.append([at, hi])
    return out


def overlap(x: Runs, y: Runs) -> int:
    return sum(count_in(y, a, b) for a, b in x)


def stored_runs(data_dir: Path) -> tuple[dict[tuple[str, int], Runs], dict[tuple[str, int], list]]:
    """Stored seqs as runs per (sym, epoch), and the (seq, copies) stored more than once."""
    files = [str(f.path) for f in scan(data_dir / "history").files]
    if not files:
        return {}, {}
    con = duckdb.connect()
    try:
        src = f"read_parquet({files!r})"
        rows = con.execute(
            f"""SELECT sym, epoch, min(seq), max(seq) FROM (
                  SELECT sym, epoch, seq,
                         seq - row_number() OVER (PARTITION BY sym, epoch ORDER BY seq) AS g
                  FROM (SELECT DISTINCT sym, epoch, seq FROM {src}))
                GROUP BY sym, epoch, g ORDER BY sym, epoch, 3"""
        ).fetchall()
        dups = con.execute(
            f"SELECT sym, epoch, seq, count(*) FROM {src} GROUP BY ALL HAVING count(*) > 1"
        ).fetchall()
    finally:
        con.close()
    runs: dict[tuple[str, int], Runs] = {}
    for sym, epoch, a, b in rows:
        runs.setdefault((sym, epoch), []).append([a, b])
    dup: dict[tuple[str, int], list] = {}
    for sym, epoch, seq, n in dups:
        dup.setdefault((sym, epoch), []).append((seq, n))
    return runs, dup


@dataclass
class Account:
    published: int = 0
    stored: int = 0
    stored_dups: int = 0
    delivered: dict[str, tuple[int, int]] = field(default_factory=dict)  # client -> (got, of)
    lost_silent: int = 0
    lost_reported: int = 0
    lost_reported_stored: int = 0  # of those, in the store: a resume from store could have
    dups: int = 0
    reports: dict[str, int] = field(default_factory=dict)
    # A few of the seq ranges missing, as "who SYM epoch lo-hi", to start an investigation.
    examples: list[str] = field(default_factory=list)

    def example(self, who: str, sym: str, epoch: int, gone: Runs) -> None:
        for a, b in gone:
            if len(self.examples) < 6:
                self.examples.append(f"{who} {sym} epoch {epoch} seq {a}-{b}")


def account(chaos: Chaos, figures: dict[str, Any]) -> None:
    """Fill each phase's figures: published, stored, delivered, lost, duplicated."""
    stack = chaos.stack
    epochs = chaos.sampler.epochs
    stored, stored_dup = stored_runs(stack.data_dir)
    probe_top = {(s, e): n for s, e, n in figures["probe"]["top"]}
    clients = figures["clients"]
    runs_by_client = []
    for c in clients:
        by: dict[tuple[str, int], Runs] = {}
        for s, idx, runs in c["runs"]:
            ep = epochs[s][idx] if idx < len(epochs[s]) else -1 - idx
            by[(s, ep)] = runs
        dups: dict[tuple[str, int], list[int]] = {}
        for s, idx, seqs in c["dups"]:
            ep = epochs[s][idx] if idx < len(epochs[s]) else -1 - idx
            dups[(s, ep)] = seqs
        runs_by_client.append((c["name"], by, dups, c["reports"]))

    def top_of(sym: str, epoch: int, ph: Phase) -> int:
        """The last seq of an epoch that ended in ``ph``: the highest any witness saw."""
        seen = [probe_top.get((sym, epoch), 0)]
        before = ph.pre_kill.get(sym)
        if before and before[0] == epoch:
            seen.append(before[1])
        if stored.get((sym, epoch)):
            seen.append(stored[(sym, epoch)][-1][1])
        seen += [by[(sym, epoch)][-1][1] for _, by, _, _ in runs_by_client if (sym, epoch) in by]
        return max(seen)

    for ph in chaos.phases:
        if ph.skipped or not ph.s0 or not ph.s1:
            continue
        ranges: dict[str, list[tuple[int, int, int]]] = {}
        for s in SYMBOLS:
            (e0, q0), (e1, q1) = ph.s0[s], ph.s1[s]
            if e0 == e1:
                ranges[s] = [(e0, q0 + 1, q1)]
            else:
                ranges[s] = [(e0, q0 + 1, top_of(s, e0, ph)), (e1, 1, q1)]
        acc = Account()
        for s, rs in ranges.items():
            for ep, lo, hi in rs:
                if hi < lo:
                    continue
                acc.published += hi - lo + 1
                acc.stored += count_in(stored.get((s, ep), []), lo, hi)
                acc.example("store", s, ep, missing(stored.get((s, ep), []), lo, hi))
                acc.stored_dups += sum(
                    n - 1 for q, n in stored_dup.get((s, ep), []) if lo <= q <= hi
                )
        plan = chaos.clients.plan if chaos.clients else []
        t_end = ph.end_ns
        for (name, by, dups, reports), syms in zip(runs_by_client, plan, strict=False):
            got = of = 0
            mine = [r for r in reports if ph.t0_ns <= r["t_ns"] <= t_end]
            for r in mine:
                acc.reports[r["code"]] = acc.reports.get(r["code"], 0) + 1
            for s in syms:
                for ep, lo, hi in ranges[s]:
                    if hi < lo:
                        continue
                    runs = by.get((s, ep), [])
                    of += hi - lo + 1
                    got += count_in(runs, lo, hi)
                    gone = missing(runs, lo, hi)
                    acc.example(name, s, ep, gone)
                    n_gone = sum(b - a + 1 for a, b in gone)
                    if mine:
                        acc.lost_reported += n_gone
                        acc.lost_reported_stored += overlap(gone, stored.get((s, ep), []))
                    else:
                        acc.lost_silent += n_gone
                    acc.dups += sum(1 for q in dups.get((s, ep), []) if lo <= q <= hi)
            acc.delivered[name] = (got, of)
        if ph.slow:
            acc.delivered["slow"] = slow_account(ph, acc, stored)
        ph.figures["account"] = acc


def slow_account(ph: Phase, acc: Account, stored: dict[tuple[str, int], Runs]) -> tuple[int, int]:
    """The slow consumer, from its first tick to the head it had to catch up to."""
    assert ph.slow is not None
    got = of = 0
    target = ph.slow_target
    epoch_runs = {(s, idx): runs for s, idx, runs in ph.slow["runs"]}
    for s in SLOW_SYMBOLS:
        runs = epoch_runs.get((s, 0), [])
        if not runs:
            continue
        lo, hi = runs[0][0], target[s][1]
        of += hi - lo + 1
        got += count_in(runs, lo, hi)
        epoch = target[s][0]
        gone = missing(runs, lo, hi)
        n_gone = sum(b - a + 1 for a, b in gone)
        acc.example("slow", s, epoch, gone)
        if ph.slow["reports"]:
            acc.lost_reported += n_gone
            acc.lost_reported_stored += overlap(gone, stored.get((s, epoch), []))
        else:
            acc.lost_silent += n_gone
    acc.dups += sum(len(seqs) for _, _, seqs in ph.slow["dups"])
    for r in ph.slow["reports"]:
        acc.reports[f"slow: {r['code']}"] = acc.reports.get(f"slow: {r['code']}", 0) + 1
    return got, of


# -- soak ----------------------------------------------------------------------------------------


def soak(minutes: float, workdir: Path) -> dict[str, Any]:
    """The reference load (the feed at 4,000 ticks/s, 200 clients x 5 of 100 symbols) for
    ``minutes``: the web process's RSS at start and end, deliveries, p99."""
    deployment = Deployment(workdir)
    feed: Proc | None = None
    recorder: Proc | None = None
    clients: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"minutes": minutes}
    try:
        deployment.start_redis()
        deployment.start_webs("tickpipe")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(
            TICKPIPE_REDIS_URL=deployment.redis_url,
            TICKPIPE_DATA_DIR=str(deployment.data_dir),
            TICKPIPE_SYMBOLS=",".join(SYMBOLS),
            TICKPIPE_FEED_RATE=str(REFERENCE_RATE),
        )
        recorder = Proc(["recorder"], env, workdir / "recorder.log")
        feed = Proc(["feed"], env, workdir / "feed.log")
        recorder.start()
        base = deployment.seqs()
        plan = client_plan(200, 5)
        for i in range(2):
            p = subprocess.Popen(
                [PY, "-m", "bench.clients"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            clients.append(p)
            tell(
                [p],
                {
                    "url": f"ws://127.0.0.1:{deployment.web_port}/ws",
                    "key": deployment.key,
                    "clients": plan[i * 100 : (i + 1) * 100],
                    "base": base,
                    "drain_s": 15,
                },
            )
        for p in clients:
            ready = read_json(p, 90, "soak clients")
            if ready["failed"]:
                raise RuntimeError(f"soak clients could not subscribe: {ready['failed']}")
        feed.start()
        warm = 15
        w0 = time.time_ns() + warm * 10**9
        w1 = w0 + int(minutes * 60e9)
        for p in clients:
            tell([p], {"w0": w0, "w1": w1})
        web = psutil.Process(deployment.webs[0].pid)
        assert recorder.proc is not None
        rec = psutil.Process(recorder.proc.pid)
        time.sleep(warm)
        out["rss_start_mb"] = web.memory_info().rss / 2**20
        out["recorder_rss_start_mb"] = rec.memory_info().rss / 2**20
        curve = [(0.0, out["rss_start_mb"])]
        print(f"  soak: web RSS at start {out['rss_start_mb']:.1f} MB", flush=True)
        t0 = time.monotonic()
        cpu0 = web.cpu_times()
        every0, busy0 = all_cpu_seconds(), machine_busy()
        while time.time_ns() < w1:
            time.sleep(min(60.0, max(0.0, (w1 - time.time_ns()) / 1e9)))
            m = (time.monotonic() - t0) / 60
            rss = web.memory_info().rss / 2**20
            curve.append((m, rss))
            print(f"  soak: {m:.1f} min, web RSS {rss:.1f} MB", flush=True)
        cpu1 = web.cpu_times()
        out["recorder_rss_end_mb"] = rec.memory_info().rss / 2**20
        out["cpu"] = machine_use(every0, busy0, t0)
        out["rss_end_mb"] = curve[-1][1]
        out["curve"] = curve
        out["web_cpu_pct"] = (
            100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (time.monotonic() - t0)
        )
        out["growth_pct"] = 100 * (out["rss_end_mb"] / out["rss_start_mb"] - 1)
        feed.stop()
        time.sleep(0.5)
        final = deployment.seqs()
        out["published"] = sum(final[s] - base[s] for s in SYMBOLS)
        for p in clients:
            tell([p], {"final": final})
        hist: dict[int, int] = {}
        totals = {"expected": 0, "received": 0, "lost": 0, "dups": 0}
        closed: dict[str, int] = {}
        for p in clients:
            r = read_json(p, 60, "soak clients")
            totals["expected"] += r["expected"]
            totals["received"] += r["received"]
            totals["lost"] += r["gap_events"] + r["tail_missing"]
            totals["dups"] += r["dups"]
            for k, n in r["hist"]:
                hist[k] = hist.get(k, 0) + n
            for k, n in r["closed"].items():
                closed[k] = closed.get(k, 0) + n
        out.update(totals)
        out["closed"] = closed
        out["p50"] = hist_percentile(hist, 0.5)
        out["p99"] = hist_percentile(hist, 0.99)
    finally:
        for p in clients:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)
        for proc in (feed, recorder):
            if proc is not None:
                proc.stop()
        deployment.stop()
    return out


# -- report --------------------------------------------------------------------------------------


def delivered_text(acc: Account) -> str:
    if acc.delivered and all(got == of for got, of in acc.delivered.values()):
        return f"all {len(acc.delivered)} clients: every tick"
    return ", ".join(
        f"{name} {got}/{of}" if got != of else f"{name} all"
        for name, (got, of) in acc.delivered.items()
    )


def lost_text(acc: Account) -> str:
    parts = []
    if acc.lost_silent:
        parts.append(f"**{acc.lost_silent} SILENT**")
    if acc.lost_reported:
        parts.append(
            f"{acc.lost_reported} reported in-band ({acc.lost_reported_stored} of them stored)"
        )
    return ", ".join(parts) or "0"


def report(
    chaos: Chaos,
    figures: dict[str, Any] | None,
    soak_out: dict[str, Any] | None,
    command: str,
    version: str,
    top: list[str],
) -> str:
    a = chaos.args
    lines = [
        f"# Fault benchmark, {dt.date.today().isoformat()}" + (" (quick)" if a.quick else ""),
        "",
        "Faults run: " + ", ".join(ph.name for ph in chaos.phases) + ".",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- tickpipe version: {version}"
        + (f" (CHANGED during the run, now {now})" if (now := code_version()) != version else ""),
        f"- Stack: redis-server (append-only file, fsync always, as `tickpipe redis`), "
        f"`tickpipe web`, `tickpipe recorder`, `tickpipe feed` (simulator, {REFERENCE_RATE} "
        f"ticks/s over {N_SYMBOLS} symbols). Data directory on a tmpfs: "
        f"{'yes' if chaos.stack.mounted else 'no (' + chaos.stack.mount_error + ')'}.",
        f"- Clients: {SUBSCRIBERS} subscribers through `tickpipe.Client.subscribe` (resume on), "
        f"{SYMBOLS_PER_SUBSCRIBER} symbols each; a probe (plain WebSocket, all {N_SYMBOLS} "
        "symbols, no resume) whose latency (tick `ts` to receipt; the simulator's `ts` lie in "
        "the 10 ms batch before publishing) is the 'others' p99' column.",
        "- Published: Redis seq per (symbol, epoch) from the phase's start to its end; where "
        "Redis lost an epoch, its last seq is the highest that Redis showed before the kill, the "
        "probe, a subscriber or the store saw. Stored: rows of the Parquet store in those ranges "
        "after the recorder drained. Lost: published but never delivered to a subscriber; "
        "'reported in-band' when the client's `subscribe` reported a `Loss` (`on_loss`) or "
        "raised an error in that phase (epoch changed, gap, too old), SILENT otherwise. "
        "Duplicated: a seq a client got twice, or stored rows beyond the first.",
        "- CPU: % of one core (200% = both) used during the fault by the whole machine, and by "
        "processes that are not this benchmark's (other work sharing the two cores).",
        "",
        "| fault | published | stored | delivered (of published) | lost | duplicated "
        "| recover live s | recover store s | others' p99 ms (ticks) | CPU machine / not ours "
        "| notes |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for ph in chaos.phases:
        acc: Account | None = ph.figures.get("account")
        probe = ph.latency.get("probe", {})
        p99 = f"{probe['p99']:.1f} ({probe['ticks']})" if probe.get("ticks") else "-"
        notes = "; ".join(ph.notes)
        cpu = f"{ph.cpu['machine']:.0f}% / {ph.cpu['others']:.0f}%" if ph.cpu else "-"
        if ph.failure:
            notes = f"FAILED: {ph.failure}; " + notes
        if ph.skipped:
            lines.append(
                f"| {ph.name} | - | - | - | - | - | - | - | - | - | skipped: {ph.skipped} |"
            )
            continue
        if acc is None:
            lines.append(f"| {ph.name} | ? | ? | ? | ? | ? | - | - | {p99} | {cpu} | {notes} |")
            continue
        missing_store = acc.published - acc.stored
        stored = f"{acc.stored}" + (f" (**{missing_store} missing**)" if missing_store else "")
        dups = acc.dups + acc.stored_dups
        dup_text = f"{acc.dups} + {acc.stored_dups} stored" if dups else "0"
        if acc.reports:
            notes += "; subscribe raised " + ", ".join(f"{k} x{v}" for k, v in acc.reports.items())
        lines.append(
            f"| {ph.name} | {acc.published} | {stored} | {delivered_text(acc)} | "
            f"{lost_text(acc)} | {dup_text} | {fmt_s(ph.recover_live_s)} | "
            f"{fmt_s(ph.recover_store_s)} | {p99} | {cpu} | {notes} |"
        )
    examples = [
        f"- {ph.name}: " + "; ".join(ph.figures["account"].examples)
        for ph in chaos.phases
        if "account" in ph.figures and ph.figures["account"].examples
    ]
    if examples:
        lines += ["", "Where ticks went missing (first ranges per fault):", "", *examples]
    lines += ["", "What 'recover' means per fault:", ""]
    lines += [f"- {ph.name}: {ph.recover_note}" for ph in chaos.phases if ph.recover_note]
    if figures:
        lines += [
            "",
            f"After the last fault the feed stopped; subscribers caught up in "
            f"{fmt_s(figures.get('drain_s'))} s, the recorder stored the whole log in "
            f"{fmt_s(figures.get('store_drain_s'))} s. Probe: {figures['probe']['connects']} "
            f"connections, closes {figures['probe']['closes']}.",
        ]
    if soak_out:
        s = soak_out
        if "rss_end_mb" in s:
            verdict = "met" if s["growth_pct"] < 10 else "NOT met"
            lines += [
                "",
                "## Soak",
                "",
                f"The reference load ({REFERENCE_RATE} ticks/s in from the feed, 200 clients x 5 "
                f"of {N_SYMBOLS} symbols, recorder on) for {s['minutes']:g} min: web RSS "
                f"{s['rss_start_mb']:.1f} MB at start, {s['rss_end_mb']:.1f} MB at end: "
                f"{s['growth_pct']:+.1f}% (target < 10%: {verdict}); recorder RSS "
                f"{s['recorder_rss_start_mb']:.1f} MB -> {s['recorder_rss_end_mb']:.1f} MB. Web "
                f"CPU {s['web_cpu_pct']:.0f}% of a core. Published {s['published']}; clients "
                f"received {s['received']} of {s['expected']}, lost {s['lost']}, duplicated "
                f"{s['dups']}, disconnected {s['closed'] or 0}; p50 {s['p50']:.2f} ms, p99 "
                f"{s['p99']:.2f} ms. Machine CPU {s['cpu']['machine']:.0f}% of 200%, of which "
                f"{s['cpu']['others']:.0f}% by processes not this benchmark's.",
                "",
                "RSS by minute: " + ", ".join(f"{m:.0f}: {r:.0f} MB" for m, r in s["curve"]),
            ]
        else:
            lines += ["", "## Soak", "", f"FAILED: {s.get('failure', 'unknown')}"]
    lines += ["", "What else ran on the machine at the start (top):", "", "```", *top, "```"]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short faults: a try run")
    p.add_argument("--soak-minutes", type=float, default=30.0, help="0 skips the soak")
    p.add_argument("--only", default="", help=f"comma-separated, from: {','.join(FAULTS)}")
    p.add_argument("--tmpfs-mb", type=int, default=1024, help="size of the data tmpfs")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()] or list(FAULTS)
    unknown = set(only) - set(FAULTS)
    if unknown:
        p.error(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    exe = Path(PY)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else PY
    command = shlex.join([shown, "bench/chaos.py", *sys.argv[1:]])
    version = code_version()
    top = top_lines()
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-chaos-"))
    print(f"machine: {machine()}\ncommand: {command}\ntickpipe: {version}\nwork dir: {workdir}")

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    stack = ChaosStack(workdir, args.tmpfs_mb)
    chaos = Chaos(args, stack)
    figures: dict[str, Any] | None = None
    soak_out: dict[str, Any] | None = None
    interrupted = False
    try:
        chaos.run(only)
        print("draining and counting", flush=True)
        figures = chaos.finish()
        account(chaos, figures)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; writing what was measured", file=sys.stderr)
    except Exception as exc:
        print(f"chaos run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name in ("web", "recorder", "feed"):
            tail = stack.procs[name].output()[-800:]
            print(f"--- {name}.log tail:\n{tail}", file=sys.stderr)
    finally:
        if chaos.clients is not None:
            chaos.clients.stop()
        chaos.sampler.halt.set()
        stack.stop(keep=args.keep)
    if args.soak_minutes > 0 and not interrupted:
        print(f"soak: {args.soak_minutes:g} min at the reference load", flush=True)
        soak_dir = workdir / "soak"
        soak_dir.mkdir()
        try:
            soak_out = soak(args.soak_minutes, soak_dir)
        except KeyboardInterrupt:
            soak_out = {"failure": "interrupted"}
        except Exception as exc:
            soak_out = {"failure": f"{type(exc).__name__}: {exc}"[:300]}
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(chaos, figures, soak_out, command, version, top)
    print("\n" + text)
    # Only a whole run (every fault and the soak) is the day's report; parts are kept apart.
    partial = args.quick or len(only) < len(FAULTS) or args.soak_minutes < 30
    write_results("chaos", text, quick=partial)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
