"""History benchmark: ``/ticks/historical`` over HTTP against DuckDB in-process and ArcticDB.

    .venv/bin/python bench/history.py            # 10 M ticks, 100 symbols, 5 days
    .venv/bin/python bench/history.py --quick    # 1 M ticks, one round

Data: ``--ticks`` ticks of 100 symbols over 5 days (2026-01-05 .. 2026-01-09 UTC), one trade to
three quotes, written once with Polars expressions through ``server.history.store.write_file``
(the recorder's own layout, schema, sort order, zstd and 128k-row groups), ``--files-per-day`` files
per day with synthetic increasing log-id names, cached under ``bench/.data/`` (not committed).

A real redis-server and a real ``tickpipe web`` (uvicorn) are started on free ports with
``TICKPIPE_DATA_DIR`` pointing at that data, a key is made with ``tickpipe keys create``, and in
one run, on the same files and rows in the same order (ts, seq, sym):

* raw DuckDB in-process: the same filter and ORDER BY, handed over as Arrow through DuckDB's
  Arrow C stream (``__arrow_c_stream__``) into a Polars frame: the fastest way out of DuckDB
  into a frame here without pyarrow (``.pl()`` and ``fetch_record_batch`` need pyarrow);
* ``format=arrow`` over HTTP (httpx, streamed), decoded by ``polars.read_ipc_stream`` at the
  end; the rate counts request -> decoded frame, the row count is the frame's;
* ``format=ndjson`` over HTTP, rows counted as newlines while streaming;
* one symbol's whole 5 days as Arrow over HTTP against ArcticDB (LMDB backend) reading the same
  frame with ``date_range`` (only the read is timed); ArcticDB runs in its own venv
  (``.venv-bench``, see ``make bench-history``) so the project's venv stays free of pandas,
  numpy and pyarrow.

Prints a table and writes ``bench/results/history-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import polars as pl
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import stop_process  # noqa: E402
from bench.report import code_version, machine, top_lines, top_section, write_results  # noqa: E402
from server.config import Settings  # noqa: E402
from server.history.compactor import Compactor  # noqa: E402
from server.history.store import scan, write_file  # noqa: E402
from server.ticks import STORED_SCHEMA  # noqa: E402
from tests.harness import RedisProcess, free_port, wait_port  # noqa: E402

PY = sys.executable
N_SYMBOLS = 100
SYMBOLS = [f"SYM{i:02d}" for i in range(N_SYMBOLS)]
DAYS = 5
DAY0 = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
DAY_NS = 86_400 * 10**9
START_NS = int(DAY0.timestamp()) * 10**9
END_NS = START_NS + DAYS * DAY_NS
EPOCH = 1_767_571_200_000  # one sequence epoch for the whole data set
ONE_SYMBOL = "SYM42"
DATA_ROOT = ROOT / "bench" / ".data"
ARCTIC_PY = ROOT / ".venv-bench" / "bin" / "python"
TARGET_ARROW_RATIO = 0.7
TARGET_NDJSON = 1_000_000
TARGET_ARCTIC_FACTOR = 1.0
# What tickpipe.Client.history asks for.
ARROW_OPTIONS = {"dictionary": "true", "compression": "lz4"}


# -- data ----------------------------------------------------------------------------------------


def day_frame(day: int, per_sym: int) -> pl.DataFrame:
    """One day of ticks for every symbol, rows in (sym, ts) order, in ``STORED_SCHEMA``."""
    n = per_sym * N_SYMBOLS
    step = DAY_NS // per_sym
    day_ns = START_NS + day * DAY_NS
    k = pl.int_range(n, dtype=pl.Int64)
    frame = pl.select(k.alias("k")).with_columns(
        (pl.col("k") // per_sym).alias("s"),
        (pl.col("k") % per_sym).alias("j"),
        pl.col("k").hash(seed=day).alias("r"),
    )
    # A random walk per symbol (one cent up, flat or down), one trade in four ticks.
    walk = ((pl.col("r") % 3).cast(pl.Int64) - 1).cum_sum().over("s") * 0.01
    mid = (50.0 + 5 * pl.col("s") + walk).clip(lower_bound=1.0)
    trade = pl.col("j") % 4 == 0
    null_f = pl.lit(None, dtype=pl.Float64)
    frame = frame.with_columns(mid.alias("mid"), trade.alias("trade")).select(
        pl.format("SYM{}", pl.col("s").cast(pl.Utf8).str.zfill(2)).alias("sym"),
        pl.when(pl.col("trade")).then(pl.lit("trade")).otherwise(pl.lit("quote")).alias("type"),
        (day_ns + pl.col("j") * step + (pl.col("r") // 7) % step)
        .cast(pl.Datetime("ns", "UTC"))
        .alias("ts"),
        pl.lit(EPOCH, dtype=pl.Int64).alias("epoch"),
        (day * per_sym + pl.col("j") + 1).alias("seq"),
        pl.when(pl.col("trade")).then(pl.col("mid").round(3)).otherwise(null_f).alias("price"),
        pl.when(pl.col("trade"))
        .then(((pl.col("r") // 3) % 5 + 1).cast(pl.Float64) * 100)
        .otherwise(null_f)
        .alias("size"),
        pl.when(pl.col("trade"))
        .then(pl.when(pl.col("r") % 2 == 0).then(pl.lit("buy")).otherwise(pl.lit("sell")))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
        .alias("side"),
        pl.when(~pl.col("trade"))
        .then((pl.col("mid") - 0.005).round(3))
        .otherwise(null_f)
        .alias("bid"),
        pl.when(~pl.col("trade")).then(pl.lit(300.0)).otherwise(null_f).alias("bid_size"),
        pl.when(~pl.col("trade"))
        .then((pl.col("mid") + 0.005).round(3))
        .otherwise(null_f)
        .alias("ask"),
        pl.when(~pl.col("trade")).then(pl.lit(500.0)).otherwise(null_f).alias("ask_size"),
        pl.lit(None, dtype=pl.Utf8).alias("venue"),
        pl.lit(None, dtype=pl.Boolean).alias("crossed"),
        pl.lit(None, dtype=pl.Utf8).alias("flags"),
    )
    return frame.select([pl.col(c).cast(t) for c, t in STORED_SCHEMA.items()])


def ensure_data(total: int, files_per_day: int, compacted: bool) -> Path:
    """The data dir for this size (generated on first use); returns the TICKPIPE_DATA_DIR.

    ``compacted``: the store as the recorder leaves it once the days are over, its per-flush
    files merged by the product's own compactor (default settings)."""
    per_sym = total // (N_SYMBOLS * DAYS)
    suffix = "-compacted" if compacted else ""
    data_dir = DATA_ROOT / f"history-{total}-{files_per_day}f{suffix}-facts"
    done = data_dir / ".complete"
    if done.exists():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    root = data_dir / "history"
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    span = DAY_NS // files_per_day
    file_no = 0
    for day in range(DAYS):
        frame = day_frame(day, per_sym)
        slot = ((pl.col("ts").dt.epoch("ns") - (START_NS + day * DAY_NS)) // span).alias("slot")
        for (_slot,), part in (
            frame.with_columns(slot).partition_by("slot", as_dict=True, maintain_order=True).items()
        ):
            # Synthetic log ids, increasing file by file: "<ms>-0_<ms>-<n>".
            ms = 1_767_571_200_000 + file_no * 1000
            write_file(root, part.drop("slot"), f"{ms}-0", f"{ms + 999}-{part.height}")
            file_no += 1
        print(f"  day {day + 1}/{DAYS}: {frame.height:,} ticks", flush=True)
    if compacted:
        compactor = Compactor(root, Settings())
        made = compactor.run_once()
        later = time.time_ns() + int(Settings().compact_grace_s * 1e9) + 10**9
        compactor.run_once(now_ns=later)  # the grace period is over: merged-away files go
        print(f"  compacted {compactor.files_merged} files into {len(made)}", flush=True)
    done.write_text(f"{total} ticks, {file_no} files, {time.perf_counter() - t0:.1f} s\n")
    print(f"generated {total:,} ticks in {file_no} files in {time.perf_counter() - t0:.1f} s")
    return data_dir


def parquet_files(data_dir: Path) -> list[str]:
    """The files a history query reads (the store's own view)."""
    return sorted(str(f.path) for f in scan(data_dir / "history").files)


# -- the server ----------------------------------------------------------------------------------


class Server:
    """A redis-server and a ``tickpipe web`` over the benchmark's data dir."""

    def __init__(self, data_dir: Path, workdir: Path) -> None:
        self.data_dir = data_dir
        self.workdir = workdir
        self.redis = RedisProcess(workdir)
        self.port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.key = ""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        env.update(
            TICKPIPE_REDIS_URL=self.redis.url,
            TICKPIPE_DATA_DIR=str(self.data_dir),
            TICKPIPE_HOST="127.0.0.1",
            TICKPIPE_PORT=str(self.port),
        )
        return env

    def start(self) -> None:
        self.redis.start()
        made = subprocess.run(
            [PY, "-m", "server.cli", "keys", "create", "--name", f"bench-{os.getpid()}",
             "--scopes", "historical"],
            env=self.env(), cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.key = made.stdout.strip().splitlines()[0]
        log = (self.workdir / "web.log").open("ab")
        self.web = subprocess.Popen(
            [PY, "-m", "server.cli", "web"],
            env=self.env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, 30)

    def cpu_s(self) -> float:
        if self.web is None:
            return 0.0
        t = psutil.Process(self.web.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        stop_process(self.web)
        self.redis.stop()
        # The key made for this run lives in the data dir's key store: revoke nothing, the
        # data dir is the benchmark's own.


# -- measurements --------------------------------------------------------------------------------


@dataclass
class Measure:
    name: str
    rows: int = 0
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: list[float] = field(default_factory=list)  # server CPU seconds per run

    @property
    def cpu_per_m(self) -> float:
        # Summed over the runs: one run can be below the 10 ms resolution of process CPU time.
        if not self.cpu or not self.rows:
            return float("nan")
        return sum(self.cpu) / (self.rows * len(self.cpu)) * 1e6

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def rate(self) -> float:
        return self.rows / self.best if self.seconds else 0.0


RAW_SQL = """
    SELECT sym, type, ts, epoch, seq, price, size, side, bid, bid_size, ask, ask_size, venue,
           crossed
    FROM read_parquet({files})
    WHERE sym IN (SELECT unnest(?::VARCHAR[])) AND epoch_ns(ts) >= ? AND epoch_ns(ts) < ?
      AND type IN ('trade', 'quote')
    ORDER BY ts, seq, sym"""


def raw_duckdb(files: list[str], syms: list[str]) -> tuple[pl.DataFrame, float]:
    """The same rows, filter and order as the endpoint, read in-process into a Polars frame
    through DuckDB's Arrow C stream; returns (frame, seconds)."""
    t0 = time.perf_counter()
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        names = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        rel = con.sql(RAW_SQL.format(files=f"[{names}]"), params=[syms, START_NS, END_NS])
        frame = pl.DataFrame(rel)
    finally:
        con.close()
    return frame, time.perf_counter() - t0


def http_arrow(
    client: httpx.Client, params: dict[str, str], options: dict[str, str]
) -> tuple[pl.DataFrame, float, float, int]:
    """(frame, seconds to the last byte, seconds to the decoded frame, bytes). The frame is what
    ``tickpipe.Client.history`` returns: dictionary columns back to plain strings."""
    t0 = time.perf_counter()
    parts: list[bytes] = []
    query = {**params, "format": "arrow", **options}
    with client.stream("GET", "/ticks/historical", params=query) as r:
        r.raise_for_status()
        parts.extend(r.iter_raw(1 << 20))
    t_body = time.perf_counter() - t0
    body = b"".join(parts)
    frame = pl.read_ipc_stream(io.BytesIO(body))
    frame = frame.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String))
    return frame, t_body, time.perf_counter() - t0, len(body)


def http_ndjson(client: httpx.Client, params: dict[str, str]) -> tuple[int, float, int]:
    """(rows, seconds, bytes): rows are counted as newlines while the body streams."""
    t0 = time.perf_counter()
    rows = size = 0
    with client.stream("GET", "/ticks/historical", params={**params, "format": "ndjson"}) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(1 << 20):
            rows += chunk.count(b"\n")
            size += len(chunk)
    return rows, time.perf_counter() - t0, size


def third_party_readers(client: httpx.Client, params: dict[str, str], workdir: Path) -> list[str]:
    """Checks that pyarrow and DuckDB (in ``.venv-bench``) read every Arrow variant of an answer
    (plain, dictionary, lz4, zstd) with the rows and values Polars reads."""
    if not ARCTIC_PY.exists():
        return [f"third-party readers not checked: {ARCTIC_PY.relative_to(ROOT)} missing"]
    variants = {
        "plain": {},
        "dictionary+lz4": ARROW_OPTIONS,
        "dictionary+zstd": {"dictionary": "true", "compression": "zstd"},
        "lz4": {"compression": "lz4"},
    }
    paths, frames = [], []
    for name, options in variants.items():
        r = client.get("/ticks/historical", params={**params, "format": "arrow", **options})
        r.raise_for_status()
        path = workdir / f"answer-{name}.arrow"
        path.write_bytes(r.content)
        paths.append(str(path))
        frames.append(pl.read_ipc_stream(io.BytesIO(r.content)))
    done = subprocess.run(
        [str(ARCTIC_PY), str(ROOT / "bench" / "arrow_readers.py"), *paths],
        capture_output=True,
        cwd=ROOT,
        timeout=600,
    )
    if done.returncode != 0:
        return [f"third-party readers failed: {done.stderr.decode().strip()[-300:]}"]
    out = []
    for name, frame, line in zip(variants, frames, done.stdout.splitlines(), strict=True):
        got = orjson.loads(line)
        ok = (
            got["pyarrow_rows"] == got["duckdb_rows"] == frame.height
            and got["duckdb_symbols"] == frame["sym"].n_unique()
            and got["duckdb_seq_sum"] == frame["seq"].sum()
        )
        out.append(
            f"Arrow {name} ({len(frame):,} rows) read by pyarrow (sym as {got['sym_type']}) and "
            f"DuckDB with the same rows, symbols and seq sum as Polars: {ok}"
        )
    return out


def python_client(port: int, key: str, syms: list[str]) -> tuple[pl.DataFrame, float]:
    """``tickpipe.SyncClient.history`` of the range: (frame, seconds)."""
    from tickpipe import SyncClient

    with SyncClient(f"http://127.0.0.1:{port}", key, timeout=600) as c:
        t0 = time.perf_counter()
        frame = c.history(syms, START_NS, END_NS)
        return frame, time.perf_counter() - t0


def arctic(files: list[str], repeats: int) -> dict[str, Any]:
    """ArcticDB (LMDB) reading ONE_SYMBOL's whole range, in its own venv and process."""
    if not ARCTIC_PY.exists():
        return {"error": f"{ARCTIC_PY.relative_to(ROOT)} missing: run 'make bench-history'"}
    spec = {
        "files": files,
        "symbol": ONE_SYMBOL,
        "start_ns": START_NS,
        "end_ns": END_NS,
        "repeats": repeats,
    }
    done = subprocess.run(
        [str(ARCTIC_PY), str(ROOT / "bench" / "arctic_read.py")],
        input=orjson.dumps(spec),
        capture_output=True,
        cwd=ROOT,
        timeout=600,
    )
    if done.returncode != 0:
        return {"error": done.stderr.decode().strip().splitlines()[-1][-500:]}
    return orjson.loads(done.stdout.splitlines()[-1])


def same_rows(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    """Every column and row equal, in the same order."""
    return a.height == b.height and a.equals(b.select(a.columns))


# -- main ----------------------------------------------------------------------------------------


def fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f} M/s" if r >= 1e6 else f"{r / 1e3:.0f} k/s"


def timed(m: Measure, server: Server, fn: Any) -> Any:
    """Run ``fn`` (returning (result, seconds, ...)), keep its time and the server's CPU."""
    cpu0 = server.cpu_s()
    got = fn()
    m.seconds.append(got[1])
    m.cpu.append(server.cpu_s() - cpu0)
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 M ticks, one round")
    p.add_argument("--ticks", type=int, default=None, help="total ticks (default 10 M)")
    p.add_argument("--files-per-day", type=int, default=24)
    p.add_argument(
        "--uncompacted",
        action="store_true",
        help="read the per-flush files as written, before the compactor merged them",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds of the full-range reads")
    p.add_argument("--symbol-repeats", type=int, default=9, help="reads of the one symbol")
    p.add_argument("--no-arctic", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = p.parse_args()
    total = args.ticks or (1_000_000 if args.quick else 10_000_000)
    rounds = args.rounds or (1 if args.quick else 2)
    exe = Path(PY)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else PY
    command = shlex.join([shown, "bench/history.py", *sys.argv[1:]])
    version = code_version()
    print(f"machine: {machine()}\ncommand: {command}\ntickpipe: {version}", flush=True)

    data_dir = ensure_data(total, args.files_per_day, compacted=not args.uncompacted)
    files = parquet_files(data_dir)
    disk_mb = sum(Path(f).stat().st_size for f in files) / 2**20
    print(f"data: {data_dir.relative_to(ROOT)} ({len(files)} files, {disk_mb:.0f} MB)")
    top = top_lines()
    workdir = Path(tempfile.mkdtemp(prefix="tickpipe-bench-history-"))
    server = Server(data_dir, workdir)
    raw = Measure("DuckDB in-process -> Arrow C stream -> Polars")
    arrow = Measure("format=arrow, dictionary, lz4 (the Python client's request), decoded")
    arrow_body = Measure("  ... to the last byte")
    arrow_plain = Measure("format=arrow without options (plain strings, uncompressed), decoded")
    py_client = Measure("tickpipe.SyncClient.history() (the same request), to its frame")
    ndjson = Measure("format=ndjson, rows counted as newlines")
    sym_http = Measure(f"{ONE_SYMBOL} 5 days, format=arrow, dictionary, lz4, decoded")
    sym_raw = Measure(f"{ONE_SYMBOL} 5 days, DuckDB in-process")
    checks: list[str] = []
    arctic_out: dict[str, Any] = {}
    started = time.monotonic()
    try:
        server.start()
        headers = {"Authorization": f"Bearer {server.key}"}
        params = {
            "symbols": ",".join(SYMBOLS),
            "start": str(START_NS),
            "end": str(END_NS),
        }
        with httpx.Client(
            base_url=f"http://127.0.0.1:{server.port}", headers=headers, timeout=600
        ) as client:
            # Warm the page cache and both processes once (not timed).
            raw_duckdb(files, SYMBOLS[:1])
            http_ndjson(client, {**params, "symbols": SYMBOLS[0]})
            for rnd in range(rounds):
                frame, secs = raw_duckdb(files, SYMBOLS)
                raw.rows = frame.height
                raw.seconds.append(secs)
                print(f"round {rnd + 1}: raw DuckDB {frame.height:,} rows in {secs:.2f} s")
                cpu0 = server.cpu_s()
                got, _s, t_all, nbytes = http_arrow(client, params, ARROW_OPTIONS)
                arrow.cpu.append(server.cpu_s() - cpu0)
                arrow.seconds.append(t_all)
                arrow.rows = arrow_body.rows = got.height
                arrow_body.seconds.append(_s)
                arrow.extra["bytes"] = nbytes
                print(
                    f"round {rnd + 1}: arrow {got.height:,} rows, {nbytes / 2**20:.0f} MB, "
                    f"body {_s:.2f} s, decoded {t_all:.2f} s"
                )
                if rnd == 0:
                    checks.append(
                        "Arrow (dictionary, lz4) over HTTP gave every column of every row of raw "
                        f"DuckDB, in the same order: {same_rows(frame, got)}"
                    )
                del got
                n, secs, nbytes = timed(ndjson, server, lambda: http_ndjson(client, params))
                ndjson.rows = n
                ndjson.extra["bytes"] = nbytes
                print(f"round {rnd + 1}: ndjson {n:,} rows, {nbytes / 2**20:.0f} MB, {secs:.2f} s")
                if rnd == 0:
                    cpu0 = server.cpu_s()
                    got, _s, t_all, nbytes = http_arrow(client, params, {})
                    arrow_plain.cpu.append(server.cpu_s() - cpu0)
                    arrow_plain.seconds.append(t_all)
                    arrow_plain.rows = got.height
                    arrow_plain.extra["bytes"] = nbytes
                    checks.append(
                        "Arrow without options gave the same frame as with them: "
                        f"{same_rows(frame, got)}"
                    )
                    del got
                    got, _s = timed(
                        py_client, server, lambda: python_client(server.port, server.key, SYMBOLS)
                    )
                    py_client.rows = got.height
                    checks.append(
                        f"The Python client's frame equals raw DuckDB's: {same_rows(frame, got)}"
                    )
                    del got
                del frame
            one = {**params, "symbols": ONE_SYMBOL}
            for _ in range(args.symbol_repeats):
                cpu0 = server.cpu_s()
                got, _s, t_all, _n = http_arrow(client, one, ARROW_OPTIONS)
                sym_http.cpu.append(server.cpu_s() - cpu0)
                sym_http.rows = got.height
                sym_http.seconds.append(t_all)
                frame, secs = raw_duckdb(files, [ONE_SYMBOL])
                sym_raw.rows = frame.height
                sym_raw.seconds.append(secs)
            checks.append(f"{ONE_SYMBOL} over HTTP equals raw DuckDB: {same_rows(frame, got)}")
            day = {"symbols": ",".join(SYMBOLS[:10]), "start": str(START_NS),
                   "end": str(START_NS + DAY_NS)}  # fmt: skip
            checks += third_party_readers(client, day, workdir)
        if not args.no_arctic:
            arctic_out = arctic(files, args.symbol_repeats)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    text = report(
        args, command, version, total, files, disk_mb, rounds, elapsed, top, checks, arctic_out,
        raw, arrow, arrow_body, arrow_plain, py_client, ndjson, sym_http, sym_raw,
    )  # fmt: skip
    print("\n" + text)
    write_results("history", text, args.quick)
    return 0


def report(
    args: argparse.Namespace,
    command: str,
    version: str,
    total: int,
    files: list[str],
    disk_mb: float,
    rounds: int,
    elapsed: float,
    top: list[str],
    checks: list[str],
    arctic_out: dict[str, Any],
    raw: Measure,
    arrow: Measure,
    arrow_body: Measure,
    arrow_plain: Measure,
    py_client: Measure,
    ndjson: Measure,
    sym_http: Measure,
    sym_raw: Measure,
) -> str:
    ratio = arrow.rate / raw.rate if raw.rate else 0.0
    arctic_read = arctic_out.get("read_s")
    arctic_s = statistics.median(arctic_read) if arctic_read else float("nan")
    lines = [
        f"# History benchmark, {dt.date.today().isoformat()}",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- tickpipe version: {version}",
        f"- Data: {total:,} ticks, {N_SYMBOLS} symbols, {DAYS} days "
        f"({DAY0.date()} .. {(DAY0 + dt.timedelta(days=DAYS - 1)).date()}), 1 trade : 3 quotes, "
        f"{len(files)} Parquet files ({disk_mb:.0f} MB): {args.files_per_day} per day written by "
        "`server.history.store.write_file` (zstd, 128k-row groups, sorted by sym, ts, seq)"
        + (
            ", as written"
            if args.uncompacted
            else ", then merged by `server.history.compactor` "
            "(default settings) as the recorder does once a day is over"
        )
        + ".",
        "- Everything on this machine over 127.0.0.1: redis-server, `tickpipe web` (uvicorn, one "
        "process), and this client process (httpx). Full-range reads: "
        f"{rounds} round(s), best shown; one-symbol reads: {args.symbol_repeats}, median shown. "
        "Server CPU is the web process's user + system time during the request.",
        f"- Wall time of the measurements: {elapsed:.0f} s.",
        "",
        "## Against the targets",
        "",
        "| read | tickpipe over HTTP | server CPU per M ticks | reference in the same run "
        "| ratio | target |",
        "|---|---:|---:|---:|---:|---|",
        f"| whole range as Arrow, to a decoded frame | {arrow.best:.2f} s ({fmt_rate(arrow.rate)}; "
        f"{arrow.extra.get('bytes', 0) / 2**20:.0f} MB, "
        f"{arrow.extra.get('bytes', 0) / max(arrow.rows, 1):.0f} bytes/tick) "
        f"| {arrow.cpu_per_m:.2f} s | DuckDB in-process -> Arrow -> Polars {raw.best:.2f} s "
        f"({fmt_rate(raw.rate)}) | **{ratio:.2f}x** | >= {TARGET_ARROW_RATIO}x: "
        f"{'met' if ratio >= TARGET_ARROW_RATIO else 'NOT met'} |",
        f"| whole range as NDJSON | {ndjson.best:.2f} s (**{fmt_rate(ndjson.rate)}**; "
        f"{ndjson.extra.get('bytes', 0) / 2**20:.0f} MB) | {ndjson.cpu_per_m:.2f} s | - | - "
        f"| >= 1 M/s: {'met' if ndjson.rate >= TARGET_NDJSON else 'NOT met'} |",
    ]
    if arctic_read:
        factor = sym_http.median / arctic_s
        lines.append(
            f"| one symbol, 5 days ({sym_http.rows:,} rows) as Arrow | "
            f"{sym_http.median * 1000:.1f} ms | {sym_http.cpu_per_m:.2f} s | ArcticDB "
            f"{arctic_out.get('version', '?')} (LMDB) {arctic_s * 1000:.1f} ms; DuckDB in-process "
            f"{sym_raw.median * 1000:.1f} ms | **{factor:.2f}x** ArcticDB | <= "
            f"{TARGET_ARCTIC_FACTOR:g}x: {'met' if factor <= TARGET_ARCTIC_FACTOR else 'NOT met'} |"
        )
        if arctic_out.get("rows") != sym_http.rows:
            checks.append(f"ArcticDB returned {arctic_out.get('rows')} rows, HTTP {sym_http.rows}")
    elif not args.no_arctic:
        lines.append(
            f"| one symbol: ArcticDB not measured ({arctic_out.get('error', '?')[:300]}) |"
        )
    lines += [
        "",
        "## Every measurement",
        "",
        "| what | rows | seconds | rows/s | server CPU s | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def row(m: Measure, note: str = "", use_median: bool = False) -> str:
        secs = m.median if use_median else m.best
        rate = m.rows / secs if secs and secs == secs else 0.0
        cpu = f"{min(m.cpu):.2f}" if m.cpu else "-"
        runs = ", ".join(f"{s:.3f}" for s in m.seconds)
        cells = [m.name, f"{m.rows:,}", f"{secs:.3f}", fmt_rate(rate), cpu, f"{note} runs: {runs}"]
        return "| " + " | ".join(cells) + " |"

    def mb(m: Measure) -> str:
        return f"{m.extra.get('bytes', 0) / 2**20:.0f} MB;" if m.extra.get("bytes") else ""

    lines += [
        row(raw),
        row(arrow, mb(arrow)),
        row(arrow_body),
        row(arrow_plain, mb(arrow_plain)),
        row(py_client),
        row(ndjson, mb(ndjson)),
        row(sym_http, "median;", use_median=True),
        row(sym_raw, "median;", use_median=True),
    ]
    if arctic_read:
        lines.append(
            f"| {ONE_SYMBOL} 5 days, ArcticDB {arctic_out.get('version', '?')} LMDB "
            f"`read(date_range=...)` -> pandas | {arctic_out['rows']:,} | {arctic_s:.4f} | "
            f"{fmt_rate(arctic_out['rows'] / arctic_s)} | - | median; runs: "
            + ", ".join(f"{s:.4f}" for s in arctic_read)
            + " |"
        )
    lines += ["", "## Checks", "", *[f"- {c}" for c in checks]]
    lines += top_section(top)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
