"""A live source's cost per venue message in CPU instructions: what a shared host's speed does
not move (issue 12; `bench/sources.py` measures the same path in messages per second).

    .venv/bin/python bench/instructions.py                       # alpaca-paired, every path
    .venv/bin/python bench/instructions.py --source kraken --path parse

Runs the feed path of ``bench/sources.py`` under valgrind (``cachegrind``, cache simulation
off: it counts instructions only) in a child process, over the first 2,000 and the first
12,000 messages of a captured stream, after a warm-up run that leaves every module compiled;
the difference per message is the cost of one message, start-up and set-up cancelled. Three
paths: ``parse`` (the adapter and the session's checks, as ``bench/sources.py``'s parse-only
run), ``feed`` (that, and the tickerplant's loop screening, encoding and publishing into a
real redis-server; under valgrind the process runs some 30 times slower, so its batch interval
is 300 ms, which keeps a batch about as large as at full speed) and ``read`` (that, with the
stream read from a local venue's WebSocket as ``bench/sources.py``'s run with the read: the
feed process only, the venue runs in a process of its own, not counted). Deterministic to a
few hundred instructions a message across runs; an A/B of a change is two runs of this, one
per checkout.
Needs valgrind (Debian: ``apt-get install -y valgrind``). Known limit: Kraken's ``feed`` path
is slow under valgrind beyond its instructions (2026-12-01: over 100 messages, 2.5 minutes of
wall clock for 1 of CPU, all 150 ticks published; not investigated) and runs past the child's
time limit at 2,000 messages; its ``parse`` path and both of Alpaca's measure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sources as S  # noqa: E402
from bench.report import code_version, machine  # noqa: E402
from server.feed.sources import VenueFeed  # noqa: E402
from server.feed.tickerplant import run_loop  # noqa: E402
from tests.harness import RedisProcess  # noqa: E402

FEW, MANY = 2_000, 12_000
VALGRIND_BATCH_MS = 300
CHILD_S = 600  # one measured process at most (about 60 s for 12,000 Alpaca messages)


def _child(kind: str, stream: Path, n: int, path: str, url: str) -> None:
    """The measured process: ``n`` messages of ``stream`` through ``path``."""
    messages = stream.read_text().split("\n")[:n]
    names = S.STREAMS[kind](10)[1]
    if path == "parse":
        run_loop(S.parse_only(kind, messages, names))
        return
    ticks = sum(int(x) for x in stream.with_suffix(".counts").read_text().split()[:n])
    if path == "read":
        frames = S.frames(messages)
        run_loop(S.measure_read(kind, frames, names, url, n, ticks, VALGRIND_BATCH_MS))
        return
    run_loop(S.measure(kind, messages, names, url, ticks, batch_ms=VALGRIND_BATCH_MS))


def _build(kind: str, stream: Path) -> None:
    """The stream's first ``MANY`` messages and each one's tick count, written once."""
    messages, names = S.STREAMS[kind](MANY)
    stream.write_text("\n".join(messages))
    feed = VenueFeed(S._adapter(kind), names, secrets={"key_id": "", "secret_key": ""})
    counts = []
    for raw in messages:
        before = len(feed._pending)
        feed.adapter.on_message(raw, time.time_ns())
        counts.append(len(feed._pending) - before)
    stream.with_suffix(".counts").write_text(" ".join(map(str, counts)))


def _instructions(kind: str, stream: Path, n: int, path: str, url: str) -> int:
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           sys.executable, __file__, "--child", kind, str(stream), str(n), path, url]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=CHILD_S).stderr
    match = re.search(r"I\s+refs:\s+([\d,]+)", out)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, stream, n, path, url = sys.argv[2:7]
        _child(kind, Path(stream), int(n), path, url)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="alpaca-paired", choices=list(S.STREAMS))
    ap.add_argument("--path", choices=["parse", "feed", "read"], action="append")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is needed: apt-get install -y valgrind", file=sys.stderr)
        return 2
    print(f"machine: {machine()}\ncode: {code_version()}\nsource: {args.source}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / f"{args.source}.txt"
        _build(args.source, stream)
        redis = RedisProcess(Path(tmp))
        redis.start()
        try:
            for path in args.path or ["parse", "feed", "read"]:
                try:
                    _instructions(args.source, stream, 100, path, redis.url)  # warm-up
                    few = _instructions(args.source, stream, FEW, path, redis.url)
                    many = _instructions(args.source, stream, MANY, path, redis.url)
                except subprocess.TimeoutExpired:
                    print(f"{path:6} did not finish within {CHILD_S} s under valgrind", flush=True)
                    continue
                per = (many - few) / (MANY - FEW)
                print(f"{path:6} {per:>9,.0f} instructions a message "
                      f"({few:,} for {FEW:,}, {many:,} for {MANY:,})", flush=True)  # fmt: skip
        finally:
            redis.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
