"""Recorder benchmark: how fast ``tickpipe recorder`` stores the tickerplant log, and its lag.

    .venv/bin/python bench/recorder.py            # 3 M-tick drain, 20 s at each rate
    .venv/bin/python bench/recorder.py --quick    # 500 k-tick drain, 8 s at 100 k ticks/s

A real redis-server on a free port and the real recorder process (``python -m server.cli
recorder``, default settings: ``recorder_batch`` 2000 entries, ``recorder_flush_s`` 1 s) over a
fresh data dir. Log entries are written directly with XADD in the exact format of the publish
script in ``server/live/bus.py`` (``e`` = ``SYM=epoch,...``, ``d`` = comma-joined event JSON),
``--entry-ticks`` ticks per entry (10 symbols x 10 ticks, 1 trade : 3 quotes), because a feed
publishing 250,000 ticks/s through the Lua script and the web fan-out cannot run on this
machine's two cores next to the recorder. Two parts:

* drain: ``--drain-ticks`` ticks are put in ``tp:log`` first (pipelined XADD), then the
  recorder starts; the rate is ticks / (last entry acknowledged - consumer group created), so
  Python start-up is not counted. Stored rows are then counted with DuckDB.
* lag: the recorder runs, then a publisher process (this file, ``--publish``) XADDs entries at a
  fixed rate for ``--seconds``. Each entry's lag is from its XADD (the entry id's milliseconds,
  Redis' clock) to the moment the file holding it (named ``<first id>_<last id>.parquet``) was
  seen renamed into place, polled every 20 ms by this process; p50 / p99 / max over entries.

Prints a table and writes ``bench/results/recorder-<date>.md``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import stop_process  # noqa: E402
from bench.report import code_version, machine, top_lines, top_section, write_results  # noqa: E402
from tests.harness import RedisProcess  # noqa: E402

PY = sys.executable
LOG_KEY = "tp:log"  # server.live.bus.LOG_KEY, spelled out so the publisher starts fast
GROUP = "recorder"
N_SYMBOLS = 100
SYMBOLS = [f"SYM{i:02d}" for i in range(N_SYMBOLS)]
SYMS_PER_ENTRY = 10
TARGET_RATE = 250_000
TARGET_P99_S = 2.0


# -- the log entries -----------------------------------------------------------------------------


class LogWriter:
    """Builds tickerplant log entries as the publish script does, with per-symbol seqs."""

    def __init__(self, entry_ticks: int) -> None:
        self.per_sym = max(1, entry_ticks // SYMS_PER_ENTRY)
        self.seq = dict.fromkeys(SYMBOLS, 0)
        self.epoch = dict.fromkeys(SYMBOLS, int(time.time() * 1000))
        self.next = 0

    def entry(self, ts: int) -> tuple[int, dict[str, str]]:
        """(ticks, fields) of the next entry; every tick carries ``ts``."""
        syms = [SYMBOLS[(self.next + i) % N_SYMBOLS] for i in range(SYMS_PER_ENTRY)]
        self.next = (self.next + SYMS_PER_ENTRY) % N_SYMBOLS
        frags: list[str] = []
        for i, sym in enumerate(syms):
            first = self.seq[sym] + 1
            self.seq[sym] += self.per_sym
            px = 50.0 + 5 * ((self.next + i) % N_SYMBOLS)
            for seq in range(first, first + self.per_sym):
                if seq % 4 == 0:
                    frags.append(
                        f'{{"type":"trade","sym":"{sym}","seq":{seq},"ts":{ts},'
                        f'"price":{px},"size":100.0,"side":"buy"}}'
                    )
                else:
                    frags.append(
                        f'{{"type":"quote","sym":"{sym}","seq":{seq},"ts":{ts},'
                        f'"bid":{px - 0.005},"bid_size":300.0,"ask":{px + 0.005},"ask_size":500.0}}'
                    )
        e = ",".join(f"{s}={self.epoch[s]}" for s in syms)
        return len(frags), {"e": e, "d": ",".join(frags)}


def prefill(r: redis.Redis, ticks: int, entry_ticks: int) -> tuple[int, int]:
    """Put ``ticks`` ticks into the log; returns (ticks, entries)."""
    w = LogWriter(entry_ticks)
    done = entries = 0
    pipe = r.pipeline(transaction=False)
    while done < ticks:
        n, fields = w.entry(time.time_ns())
        pipe.xadd(LOG_KEY, fields)  # type: ignore[arg-type]
        done += n
        entries += 1
        if entries % 500 == 0:
            pipe.execute()
    pipe.execute()
    return done, entries


def publish(args: argparse.Namespace) -> int:
    """The publisher process: XADD entries at ``--rate`` ticks/s for ``--seconds``; prints one
    JSON report (ticks, seconds, entry ids' milliseconds) to ``--report``."""
    r = redis.Redis.from_url(args.redis_url)
    w = LogWriter(args.entry_ticks)
    per_entry = w.per_sym * SYMS_PER_ENTRY
    t0 = time.monotonic()
    sent_ticks = 0
    id_ms: list[int] = []
    late = 0
    while True:
        now = time.monotonic() - t0
        if now >= args.seconds:
            break
        owed = int(args.rate * now) - sent_ticks
        if owed >= per_entry:
            pipe = r.pipeline(transaction=False)
            ts = time.time_ns()
            for _ in range(owed // per_entry):
                n, fields = w.entry(ts)
                pipe.xadd(LOG_KEY, fields)  # type: ignore[arg-type]
                sent_ticks += n
            id_ms.extend(int(i.split(b"-")[0]) for i in pipe.execute())
            if owed > args.rate * 0.05:  # more than 50 ms behind
                late += 1
        time.sleep(0.005)
    wall = time.monotonic() - t0
    report = {"ticks": sent_ticks, "seconds": wall, "id_ms": id_ms, "late": late}
    Path(args.report).write_bytes(orjson.dumps(report))
    return 0


# -- processes -----------------------------------------------------------------------------------


class Rig:
    """A redis-server, and a recorder over a data dir of its own."""

    def __init__(self, workdir: Path, profile: Path | None = None) -> None:
        self.workdir = workdir
        self.profile = profile
        self.redis_proc = RedisProcess(workdir)
        self.url = self.redis_proc.url
        self.recorder: subprocess.Popen[bytes] | None = None
        self.r: redis.Redis | None = None
        self.data_dir = workdir / "data"

    def start_redis(self) -> None:
        self.redis_proc.start()
        self.r = redis.Redis.from_url(self.url)

    def reset(self, name: str) -> None:
        assert self.r is not None
        self.r.flushall()
        self.data_dir = self.workdir / name
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def start_recorder(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(TICKPIPE_REDIS_URL=self.url, TICKPIPE_DATA_DIR=str(self.data_dir))
        log = (self.workdir / "recorder.log").open("ab")
        cmd = [PY, "-m", "server.cli", "recorder"]
        if self.profile is not None:  # py-spy's collapsed stacks, one file per recorder run
            out = self.profile / f"recorder-{self.data_dir.name}.txt"
            cmd = [str(Path(PY).parent / "py-spy"), "record", "--format", "raw", "--idle",
                   "-r", "200", "-o", str(out), "--", *cmd]  # fmt: skip
        self.recorder = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        log.close()

    def group(self) -> dict[str, Any] | None:
        assert self.r is not None
        with contextlib.suppress(redis.ResponseError):
            for g in self.r.xinfo_groups(LOG_KEY):
                if g["name"] == GROUP.encode():
                    return g
        return None

    def wait_group(self, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.group() is not None:
                return time.monotonic()
            if self.recorder is not None and self.recorder.poll() is not None:
                raise RuntimeError("the recorder exited: see recorder.log")
            time.sleep(0.01)
        raise TimeoutError("the recorder did not create its consumer group")

    def all_acked(self) -> bool:
        assert self.r is not None
        g = self.group()
        if g is None:
            return False
        last = self.r.xinfo_stream(LOG_KEY)["last-generated-id"]
        return g["last-delivered-id"] == last and g["pending"] == 0

    def recorder_cpu(self) -> float:
        if self.recorder is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.recorder.pid)
            if self.profile is not None:  # the recorder is py-spy's child
                proc = proc.children()[0]
            t = proc.cpu_times()
            return t.user + t.system
        return 0.0

    def stored_rows(self) -> int:
        files = [str(f) for f in (self.data_dir / "history").glob("date=*/*.parquet")]
        if not files:
            return 0
        con = duckdb.connect()
        try:
            return con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]  # type: ignore[index]
        finally:
            con.close()

    def stop_recorder(self) -> None:
        if self.profile is not None and self.recorder is not None:
            # Stop the recorder itself; py-spy then writes its stacks and exits.
            for child in psutil.Process(self.recorder.pid).children():
                child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.recorder.wait(30)
        stop_process(self.recorder)
        self.recorder = None

    def stop(self) -> None:
        self.stop_recorder()
        if self.r is not None:
            self.r.close()
        self.redis_proc.stop()


# -- the two parts -------------------------------------------------------------------------------


def drain(rig: Rig, ticks: int, entry_ticks: int) -> dict[str, Any]:
    rig.reset("drain")
    assert rig.r is not None
    t0 = time.monotonic()
    ticks, entries = prefill(rig.r, ticks, entry_ticks)
    fill_s = time.monotonic() - t0
    print(f"drain: {ticks:,} ticks in {entries:,} entries written in {fill_s:.1f} s", flush=True)
    spawned = time.monotonic()
    rig.start_recorder()
    started = rig.wait_group()
    cpu0 = rig.recorder_cpu()
    while not rig.all_acked():
        if rig.recorder is not None and rig.recorder.poll() is not None:
            raise RuntimeError("the recorder exited: see recorder.log")
        time.sleep(0.02)
    done = time.monotonic()
    cpu = rig.recorder_cpu() - cpu0
    rig.stop_recorder()
    stored = rig.stored_rows()
    secs = done - started
    out = {
        "ticks": ticks,
        "entries": entries,
        "stored": stored,
        "seconds": secs,
        "rate": ticks / secs,
        "startup_s": started - spawned,
        "cpu_pct": 100 * cpu / secs,
        "files": len(list((rig.data_dir / "history").glob("date=*/*.parquet"))),
    }
    print(
        f"drain: stored {stored:,} rows in {secs:.2f} s = {out['rate']:,.0f} ticks/s "
        f"(recorder CPU {out['cpu_pct']:.0f}%, start-up {out['startup_s']:.2f} s)",
        flush=True,
    )
    return out


def _id_ms(name: str) -> tuple[int, int]:
    first, _, last = name.removesuffix(".parquet").partition("_")
    return int(first.split("-")[0]), int(last.split("-")[0])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def sustained(rig: Rig, rate: int, seconds: float, entry_ticks: int) -> dict[str, Any]:
    rig.reset(f"lag-{rate}")
    rig.start_recorder()
    rig.wait_group()
    time.sleep(0.5)
    report_path = rig.workdir / f"publisher-{rate}.json"
    pub = subprocess.Popen(
        [PY, str(Path(__file__).resolve()), "--publish", "--redis-url", rig.url,
         "--rate", str(rate), "--seconds", str(seconds), "--entry-ticks", str(entry_ticks),
         "--report", str(report_path)],
        cwd=ROOT,
    )  # fmt: skip
    seen: dict[str, int] = {}
    root = rig.data_dir / "history"
    cpu0 = rig.recorder_cpu()
    t0 = time.monotonic()
    busy0 = psutil.cpu_times()

    def poll() -> None:
        now = time.time_ns()
        for f in root.glob("date=*/*.parquet"):
            if f.name not in seen:
                seen[f.name] = now

    while pub.poll() is None:
        poll()
        time.sleep(0.02)
    pub_wall = time.monotonic() - t0
    cpu = rig.recorder_cpu() - cpu0
    busy1 = psutil.cpu_times()
    if pub.returncode != 0:
        raise RuntimeError(f"the publisher failed (exit {pub.returncode})")
    report = orjson.loads(report_path.read_bytes())
    deadline = time.monotonic() + 60
    while not rig.all_acked() and time.monotonic() < deadline:
        poll()
        time.sleep(0.02)
    poll()
    rig.stop_recorder()
    ranges = sorted((*_id_ms(name), at) for name, at in seen.items())
    firsts = [r[0] for r in ranges]
    lags: list[float] = []
    unseen = 0
    for ms in report["id_ms"]:
        i = bisect.bisect_right(firsts, ms) - 1
        if i < 0 or ms > ranges[i][1]:
            unseen += 1
            continue
        lags.append(ranges[i][2] / 1e9 - ms / 1e3)
    busy = sum(busy1) - sum(busy0) - (busy1.idle - busy0.idle)
    out = {
        "rate": rate,
        "achieved": report["ticks"] / report["seconds"],
        "ticks": report["ticks"],
        "stored": rig.stored_rows(),
        "entries": len(report["id_ms"]),
        "unseen": unseen,
        "p50": percentile(lags, 0.5),
        "p99": percentile(lags, 0.99),
        "max": max(lags) if lags else float("nan"),
        "cpu_pct": 100 * cpu / pub_wall,
        "machine_pct": 100 * busy / pub_wall,
        "files": len(seen),
    }
    print(
        f"lag at {rate:,}/s: published {out['achieved']:,.0f} ticks/s, stored "
        f"{out['stored']:,}/{out['ticks']:,}, lag p50 {out['p50']:.2f} s p99 {out['p99']:.2f} s "
        f"max {out['max']:.2f} s, recorder CPU {out['cpu_pct']:.0f}%, machine "
        f"{out['machine_pct']:.0f}%/200%, {out['files']} files",
        flush=True,
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 k-tick drain, one 8 s rate")
    p.add_argument("--drain-ticks", type=int, default=None)
    p.add_argument("--rates", default=None, help="ticks/s, comma-separated")
    p.add_argument("--seconds", type=float, default=None, help="publishing time per rate")
    p.add_argument("--entry-ticks", type=int, default=100, help="ticks per log entry")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, files)")
    p.add_argument("--profile", type=Path, help="run the recorder under py-spy, stacks here")
    # The publisher process (internal).
    p.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.publish:
        return publish(args)
    drain_ticks = args.drain_ticks or (500_000 if args.quick else 3_000_000)
    rates = [
        int(x)
        for x in (args.rates or ("100000" if args.quick else "50000,100000,250000")).split(",")
    ]
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    exe = Path(PY)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else PY
    command = shlex.join([shown, "bench/recorder.py", *sys.argv[1:]])
    version = code_version()
    print(f"machine: {machine()}\ncommand: {command}\ntickpipe: {version}", flush=True)
    top = top_lines()
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-bench-recorder-"))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rig = Rig(workdir, args.profile)
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    try:
        rig.start_redis()
        d = drain(rig, drain_ticks, args.entry_ticks)
        for rate in rates:
            runs.append(sustained(rig, rate, seconds, args.entry_ticks))
    finally:
        rig.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    lines = [
        f"# Recorder benchmark, {dt.date.today().isoformat()}",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- tickpipe version: {version}",
        f"- A redis-server and `tickpipe recorder` (default settings: 2000 entries per read and "
        f"flush, flush at least every 1 s) on this machine; log entries of {args.entry_ticks} "
        f"ticks ({SYMS_PER_ENTRY} symbols x {args.entry_ticks // SYMS_PER_ENTRY}), in the publish "
        "script's format, written straight to `tp:log` with XADD (no Lua, no web process).",
        f"- Wall time: {elapsed:.0f} s.",
        "",
        "## Drain: the log filled first, then the recorder started",
        "",
        "| ticks | entries | stored rows | files | seconds | ticks/s | recorder CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {d['ticks']:,} | {d['entries']:,} | {d['stored']:,} | {d['files']} | "
        f"{d['seconds']:.2f} | {d['rate']:,.0f} | {d['cpu_pct']:.0f}% |",
        "",
        "Seconds: from the consumer group's creation (the recorder's first loop) to the last entry "
        f"acknowledged (start-up before that: {d['startup_s']:.2f} s, not counted).",
        "",
        f"## Lag under a sustained publish rate ({seconds:g} s each)",
        "",
        "| target ticks/s | published ticks/s | stored / published | files | lag p50 s | "
        "lag p99 s | lag max s | recorder CPU | machine CPU (of 200%) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rate']:,} | {r['achieved']:,.0f} | {r['stored']:,} / {r['ticks']:,} | "
            f"{r['files']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | "
            f"{r['cpu_pct']:.0f}% | {r['machine_pct']:.0f}% |"
        )
    lines += [
        "",
        "Lag of an entry: from its XADD (the id's ms, Redis' clock) to its file seen in place "
        "(polled every 20 ms).",
        "",
        "## Against the target",
        "",
        f"- Drain rate **{d['rate']:,.0f} ticks/s** (target >= {TARGET_RATE:,}): "
        f"{'met' if d['rate'] >= TARGET_RATE else 'NOT met'}",
    ]
    for r in runs:
        ok = r["p99"] <= TARGET_P99_S and r["stored"] == r["ticks"]
        lines.append(
            f"- At {r['achieved']:,.0f} ticks/s published: lag p99 **{r['p99']:.2f} s** "
            f"(target <= {TARGET_P99_S:g} s): {'met' if ok else 'NOT met'}"
            + (f"; {r['unseen']} entries never seen stored" if r["unseen"] else "")
        )
    lines += top_section(top)
    text = "\n".join(lines)
    print("\n" + text)
    write_results("recorder", text, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
