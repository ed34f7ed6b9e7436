"""Import benchmark: ``tickpipe import`` of one large Tardis-style trades CSV against DuckDB.

    flock -x /work/.cpu.lock .venv/bin/python bench/import.py   # 10 M rows (0.8 GB of CSV)
    .venv/bin/python bench/import.py --quick                     # 1 M rows

Data: ``--rows`` rows in the exact layout of a Tardis.dev ``trades`` download (header
``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``, microsecond timestamps), one
symbol over one day as Tardis publishes them (one file per exchange, data type, day and symbol),
written once with Polars and cached under ``bench/.data/`` (not committed).

Measured in one run, on the same file:

* ``tickpipe import FILE --format tardis-trades`` as a subprocess into an empty data dir: the
  whole command (start-up, parsing, checks, the overlap check and the Parquet store write),
  wall clock; rows/s = rows stored / seconds;
* DuckDB in-process: ``COPY (SELECT * FROM read_csv(FILE)) TO 'x.parquet' (zstd)``, the plain
  CSV-to-Parquet conversion with no checks, as the reference;
* start-up: ``tickpipe import`` of a one-row file (process start to exit), the median of 5.

Wall and CPU seconds are both reported (CPU: the child's user + system time; DuckDB's: this
process's), since on a shared machine the wall clock depends on what else runs; before each
measurement the run waits (up to a minute) for the machine to be quiet, and says how busy it was.

Prints a table and writes ``bench/results/import-<date>.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import wait_quiet  # noqa: E402
from bench.report import code_version, machine, top_lines, write_results  # noqa: E402

DATA_ROOT = ROOT / "bench" / ".data"
HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
DAY0_US = 1_704_153_600_000_000  # 2024-01-02 00:00 UTC in microseconds
DAY_US = 86_400 * 10**6
TARGET_ROWS_S = 1_000_000
TARGET_STARTUP_S = 0.3
# Before each measurement, wait (at most this long) for the machine's other work to use less
# than this much CPU (100 = one core); the reading is reported.
QUIET_PCT = 40.0
QUIET_WAIT_S = 60.0


def tardis_trades(path: Path, rows: int) -> Path:
    """A Tardis ``trades`` file of ``rows`` rows of BTCUSDT on Binance over one day."""
    if path.exists():
        return path
    i = pl.int_range(0, rows, eager=True, dtype=pl.Int64)
    step = DAY_US // max(rows, 1)
    frame = pl.DataFrame({"i": i}).select(
        exchange=pl.lit("binance"),
        symbol=pl.lit("BTCUSDT"),
        # Several trades share a microsecond now and then, as in real files.
        timestamp=DAY0_US + (pl.col("i") // 3) * 3 * step + (pl.col("i") % 3 == 2) * step,
        local_timestamp=DAY0_US + pl.col("i") * step + 1_234,
        id=pl.col("i") + 3_300_000_000,
        side=pl.when(pl.col("i") % 7 < 4).then(pl.lit("buy")).otherwise(pl.lit("sell")),
        price=(42_000 + (pl.col("i") % 5_000) * 0.1).round(1),
        amount=((pl.col("i") % 97 + 1) * 0.001).round(3),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.write_csv(tmp)
    assert tmp.read_bytes()[: len(HEADER)].decode() == HEADER
    tmp.rename(path)
    return path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_import(data_dir: Path, path: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of ``tickpipe import`` of ``path`` into ``data_dir``, and its
    output."""
    env = {**os.environ, "TICKPIPE_DATA_DIR": str(data_dir)}
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "tickpipe"), "import", str(path), "--format",
         "tardis-trades"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"tickpipe import failed ({out.returncode}): {out.stderr.strip()}")
    return seconds, children_cpu() - cpu0, out.stdout


def stored_rows(data_dir: Path) -> int:
    files = sorted((data_dir / "history").glob("date=*/*.parquet"))
    return sum(pl.scan_parquet(f).select(pl.len()).collect().item() for f in files)


def duckdb_copy(path: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (all of this process's threads) of DuckDB's CSV -> Parquet."""
    con = duckdb.connect()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    con.execute(
        f"COPY (SELECT * FROM read_csv('{path}')) TO '{out}' (FORMAT parquet, COMPRESSION zstd)"
    )
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    con.close()
    return seconds, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--quick", action="store_true", help="1 M rows")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side (best is reported)")
    args = p.parse_args()
    rows = 1_000_000 if args.quick else args.rows

    src = tardis_trades(DATA_ROOT / f"binance_trades_2024-01-02_BTCUSDT-{rows}.csv", rows)
    size_mb = src.stat().st_size / 2**20
    before = top_lines()
    work = Path(tempfile.mkdtemp(prefix="tickpipe-bench-import-"))
    try:
        tiny = work / "one.csv"
        tiny.write_text(src.read_text()[:200].rsplit("\n", 2)[0] + "\n")
        startups = []
        startup_cpu = []
        for n in range(5):
            seconds, cpu, _ = run_import(work / f"tiny{n}", tiny)
            startups.append(seconds)
            startup_cpu.append(cpu)
        ours, duck, ours_cpu, duck_cpu, busy = [], [], [], [], []
        for n in range(args.rounds):
            data_dir = work / f"data{n}"
            busy.append(wait_quiet(QUIET_PCT, QUIET_WAIT_S))
            seconds, cpu, output = run_import(data_dir, src)
            stored = stored_rows(data_dir)
            assert stored == rows, f"stored {stored} of {rows} rows: {output}"
            ours.append(seconds)
            ours_cpu.append(cpu)
            shutil.rmtree(data_dir)
            busy.append(wait_quiet(QUIET_PCT, QUIET_WAIT_S))
            seconds, cpu = duckdb_copy(src, work / "duck.parquet")
            duck.append(seconds)
            duck_cpu.append(cpu)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best, best_duck = min(ours), min(duck)
    cpu, cpu_duck = min(ours_cpu), min(duck_cpu)
    startup, startup_cpu_s = statistics.median(startups), statistics.median(startup_cpu)
    load = os.getloadavg()[0]
    table = [
        f"| what | wall s (best of {args.rounds}) | rows/s (wall) | CPU s | rows per CPU s |",
        "|---|---|---|---|---|",
        f"| `tickpipe import` (whole command, stored) | {best:.2f} | {rows / best:,.0f} | "
        f"{cpu:.2f} | {rows / cpu:,.0f} |",
        f"| DuckDB `read_csv` -> Parquet (zstd) | {best_duck:.2f} | {rows / best_duck:,.0f} | "
        f"{cpu_duck:.2f} | {rows / cpu_duck:,.0f} |",
        f"| `tickpipe import` start-up (one-row file, median of 5) | {startup:.3f} | | "
        f"{startup_cpu_s:.3f} | |",
    ]
    verdict = [
        f"rows/s target {TARGET_ROWS_S:,}: {'met' if rows / best >= TARGET_ROWS_S else 'MISSED'}",
        f"start-up target {TARGET_STARTUP_S} s: "
        f"{'met' if startup < TARGET_STARTUP_S else 'MISSED'}",
        f"tickpipe / DuckDB time: {best / best_duck:.2f}x (CPU: {cpu / cpu_duck:.2f}x)",
        f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs; CPU used by "
        f"the machine just before each measurement: {', '.join(f'{b:.0f}%' for b in busy)} "
        "(100% = one core)",
    ]
    report = "\n".join(
        [
            f"# Import benchmark ({dt_today()})",
            "",
            f"Machine: {machine()}. Code: {code_version()}.",
            f"File: {rows:,} rows of a Tardis `trades` CSV, {size_mb:,.0f} MiB, page-cached.",
            "All runs: "
            + ", ".join(f"{s:.2f}" for s in ours)
            + " s (tickpipe); "
            + ", ".join(f"{s:.2f}" for s in duck)
            + " s (DuckDB).",
            "",
            *table,
            "",
            *verdict,
            "",
            "What else was running (top, just before):",
            "",
            "```",
            *before,
            "```",
            "",
        ]
    )
    print("\n".join([*table, "", *verdict]))
    write_results("import", report, quick=args.quick or rows != 10_000_000)
    return 0


def dt_today() -> str:
    return time.strftime("%Y-%m-%d")


if __name__ == "__main__":
    sys.exit(main())
