"""Where a history answer's time goes: each stage of ``/ticks/historical`` run in-process on the
benchmark's data (``bench/history.py``'s store), timed alone, CPU and wall.

    .venv/bin/python bench/history_stages.py            # 10 M ticks
    .venv/bin/python bench/history_stages.py --quick    # 1 M ticks

Stages, for the whole range of 100 symbols and for one symbol: the gap count, the merge of the
sorted files (read, filter, sort per stretch, as ``MergeReader.chunks`` yields it), the Arrow
encoding the Python client asks for (dictionary, lz4) and the plain one, Polars' NDJSON writer,
a replay's events (JSON text and fingerprint line per tick, ``server.history.events``),
and on the client side Polars' decode of the Arrow body and the cast of its dictionary columns
back to strings. What ``bench/history.py`` measures over HTTP minus these is the web server
(Starlette, uvicorn, the worker-thread hand-offs, sending the body) and the HTTP client.
Prints a Markdown table and writes ``bench/results/history-stages-<date>.md``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.history import END_NS, ONE_SYMBOL, START_NS, SYMBOLS, ensure_data  # noqa: E402
from bench.report import code_version, machine, top_lines, top_section, write_results  # noqa: E402
from server.api.encoders import ArrowStream, NdjsonLines  # noqa: E402
from server.history.events import tick_events  # noqa: E402
from server.history.merge import gap_count, open_reader  # noqa: E402
from server.history.query import HistoryQuery, Source  # noqa: E402

CHUNK = 131_072  # server.api.history.CHUNK_ROWS


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(best wall s, best CPU s of this process, last result)."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, out


def chunks(source: Source, syms: list[str], ns_ints: bool) -> Iterator[pl.DataFrame]:
    reader = open_reader(source, HistoryQuery(syms, START_NS, END_NS))
    try:
        yield from reader.chunks(CHUNK, ns_ints=ns_ints)
    finally:
        reader.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 M ticks")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    total = 1_000_000 if args.quick else 10_000_000
    data = ensure_data(total, 24, compacted=True)
    top = top_lines()
    rows = [
        "| stage | rows | wall s | CPU s | CPU s per M rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, syms, cache_mb in (("whole range", SYMBOLS, 0), (ONE_SYMBOL, [ONE_SYMBOL], 256)):
        source = Source.of(data / "history", 1024, cache_mb)
        frames = list(chunks(source, syms, ns_ints=False))  # warm: facts, page cache, slices
        n = sum(f.height for f in frames)
        ints = [f.with_columns(pl.col("ts").dt.epoch("ns")) for f in frames]
        stages: list[tuple[str, Callable[[], Any]]] = [
            ("gap count (file facts)", lambda s=source, y=syms: gap_count(s, y, START_NS, END_NS)),
            (
                "merge: read, filter, sort",
                lambda s=source, y=syms: sum(f.height for f in chunks(s, y, ns_ints=False)),
            ),
            (
                "Arrow encode, dictionary + lz4",
                lambda y=syms, fs=frames: encode(ArrowStream(y, True, "lz4"), fs),
            ),
            ("Arrow encode, plain", lambda y=syms, fs=frames: encode(ArrowStream(y), fs)),
            ("NDJSON encode (Polars write_ndjson)", lambda fs=ints: encode(NdjsonLines(), fs)),
            ("replay events: JSON + fingerprint line", lambda fs=ints: replay_events(fs)),
        ]
        body = encode(ArrowStream(syms, True, "lz4"), frames)
        stages += [
            ("client: decode Arrow (dictionary + lz4)", lambda b=body: decode(b)),
            ("client: dictionary columns back to strings", lambda b=body: strings(decode(b))),
        ]
        for name, fn in stages:
            wall, cpu, _out = timed(fn, args.repeats)
            rows.append(
                f"| {label}: {name} | {n:,} | {wall:.3f} | {cpu:.3f} | {cpu / n * 1e6:.2f} |"
            )
            print(rows[-1], flush=True)
    quick = " --quick" if args.quick else ""
    text = "\n".join(
        [
            f"# History stages, {time.strftime('%Y-%m-%d')}",
            "",
            f"- Machine: {machine()}",
            f"- Command: `.venv/bin/python bench/history_stages.py{quick}`",
            f"- tickpipe version: {code_version()}",
            f"- Data: {data.relative_to(ROOT)}; best of {args.repeats}; CPU is this process's "
            "(every thread); the client rows include the decode itself.",
            "",
            *rows,
            *top_section(top),
        ]
    )
    print("\n" + text)
    write_results("history-stages", text, args.quick)
    return 0


def encode(encoder: Any, frames: list[pl.DataFrame]) -> bytes:
    return b"".join([encoder.encode(f) for f in frames] + [encoder.encode(None)])


def replay_events(frames: list[pl.DataFrame]) -> int:
    """What a replay builds per chunk of 20,000 rows (``server.replay.CHUNK_ROWS``)."""
    n = 0
    for f in frames:
        for lo in range(0, f.height, 20_000):
            n += len(tick_events(f.slice(lo, 20_000), ',"replay":"r"}')[1])
    return n


def decode(body: bytes) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(body))


def strings(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String))


if __name__ == "__main__":
    sys.exit(main())
