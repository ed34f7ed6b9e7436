"""A backtest that replays recorded ticks at full speed and proves what it saw.

    python examples/backtest_replay.py --key $KEY --symbols AAPL,MSFT        # last 5 minutes
    python examples/backtest_replay.py --key $KEY --symbols AAPL --day 2026-01-02

It replays every recorded tick of the range at ``max`` speed (merged across symbols in (ts, seq)
order), computes each symbol's VWAP as a stand-in for a strategy, and prints the count and the
fingerprint of what it saw next to the server's fingerprint of the same range from
``/ticks/historical``: equal fingerprints prove two runs saw exactly the same data. It prints
``MATCH`` and exits 0, or ``MISMATCH`` with the reason and exits 1.

By default the range is the last ``--minutes`` (5) up to ``SETTLE_S`` seconds ago, which the
recorder (storing every second) has already written; ``--day`` takes a whole UTC day, up to
the same point if the day is today.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from tickpipe import Client, TickpipeError

SETTLE_S = 10  # a tick this old is recorded on a running system (the recorder flushes every 1 s)


def replay_range(day: str | None, minutes: float) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) to replay: only time that is already recorded."""
    settled = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=SETTLE_S)
    if day is None:
        return settled - dt.timedelta(minutes=minutes), settled
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    return start, min(start + dt.timedelta(days=1), settled)


def why_not(replayed: int, server: int) -> str:
    """Why the replay's fingerprint differs from the server's, in words."""
    if replayed < server:
        return (
            f"the server counts {server - replayed} ticks more than the replay saw: part of the "
            "range was not recorded yet when the replay read it (the recorder is behind or "
            "stopped; see GET /status). Run again later, or replay an earlier range."
        )
    if replayed > server:
        return (
            f"the replay saw {replayed - server} ticks more than the server counts now: stored "
            "history changed between the two reads (an import, or files removed)."
        )
    return "the same number of ticks but not the same ones: stored history changed in between."


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--symbols", default="AAPL,MSFT")
    ap.add_argument("--day", help="a whole UTC day, YYYY-MM-DD (default: the last minutes)")
    ap.add_argument("--minutes", type=float, default=5.0, help="without --day: how far back")
    args = ap.parse_args()

    try:
        start, end = replay_range(args.day, args.minutes)
    except ValueError:
        print(f"error: --day {args.day!r} is not a date like 2026-01-02", file=sys.stderr)
        return 2
    symbols = args.symbols.split(",")
    notional: dict[str, float] = dict.fromkeys(symbols, 0.0)
    volume: dict[str, float] = dict.fromkeys(symbols, 0.0)
    print(f"replaying {','.join(symbols)} from {start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC")
    try:
        async with Client(args.url, args.key) as client:
            replay = client.replay(symbols, start, end, speed="max")
            async for tick in replay:
                if tick["type"] == "trade":
                    notional[tick["sym"]] += tick["price"] * tick["size"]
                    volume[tick["sym"]] += tick["size"]
            server = await client.fingerprint(symbols, start, end)
    except TickpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sym in symbols:
        vwap = notional[sym] / volume[sym] if volume[sym] else float("nan")
        print(f"{sym}: vwap {vwap:.4f} over {volume[sym]:g} shares")
    print(f"gaps announced: {len(replay.gaps)}")
    print(f"replayed {replay.count} ticks, fingerprint {replay.fingerprint}")
    print(f"server   {server['count']} ticks, fingerprint {server['fingerprint']}")
    if server["fingerprint"] != replay.fingerprint:
        print(f"MISMATCH: {why_not(replay.count, server['count'])}")
        return 1
    if replay.count == 0:
        print("NO DATA: nothing is recorded for these symbols in the range; pick a range with "
              "ticks (a --day the system ran, or wait a few minutes after make run)")  # fmt: skip
        return 1
    print("MATCH")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
