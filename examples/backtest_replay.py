"""A backtest that replays a day at full speed and prints its fingerprint.

    python examples/backtest_replay.py --url http://127.0.0.1:8000 --key $KEY \
        --symbols AAPL,MSFT --day 2026-01-02

It replays every stored tick of the day at ``max`` speed (merged across symbols in (ts, seq)
order), computes each symbol's VWAP as a stand-in for a strategy, and prints the count and the
fingerprint of what it saw, next to the server's fingerprint of the same range from
``/ticks/historical``: equal fingerprints prove two runs saw exactly the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from tickpipe import Client


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--symbols", default="AAPL,MSFT")
    ap.add_argument("--day", default=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    args = ap.parse_args()

    start = dt.datetime.fromisoformat(args.day).replace(tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    symbols = args.symbols.split(",")
    notional: dict[str, float] = dict.fromkeys(symbols, 0.0)
    volume: dict[str, float] = dict.fromkeys(symbols, 0.0)
    async with Client(args.url, args.key) as client:
        replay = client.replay(symbols, start, end, speed="max")
        async for tick in replay:
            if tick["type"] == "trade":
                notional[tick["sym"]] += tick["price"] * tick["size"]
                volume[tick["sym"]] += tick["size"]
        server = await client.fingerprint(symbols, start, end)
    for sym in symbols:
        vwap = notional[sym] / volume[sym] if volume[sym] else float("nan")
        print(f"{sym}: vwap {vwap:.4f} over {volume[sym]:g} shares")
    print(f"gaps announced: {len(replay.gaps)}")
    print(f"replayed {replay.count} ticks, fingerprint {replay.fingerprint}")
    print(f"server   {server['count']} ticks, fingerprint {server['fingerprint']}")
    print("MATCH" if server["fingerprint"] == replay.fingerprint else "MISMATCH")


if __name__ == "__main__":
    asyncio.run(main())
