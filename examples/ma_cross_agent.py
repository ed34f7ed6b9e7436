"""An agent that trades on a moving-average cross of live trades.

    python examples/ma_cross_agent.py --url http://127.0.0.1:8000 --key $KEY --symbol AAPL

It subscribes through the client (which reconnects and resumes by seq on its own), keeps a
fast and a slow simple moving average of trade prices, and prints BUY when the fast one
crosses above the slow one and SELL when it crosses below. ``--trades N`` stops after N trades.
If trades were lost for good (Redis restarted empty, say), the client reports a ``Loss`` and
goes on; the averages then span a hole, so the agent starts them again (said on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque

from tickpipe import Client, Loss


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--symbol", default="AAPL")
    ap.add_argument("--fast", type=int, default=5)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--trades", type=int, default=0, help="stop after this many (0: never)")
    args = ap.parse_args()

    fast: deque[float] = deque(maxlen=args.fast)
    slow: deque[float] = deque(maxlen=args.slow)
    above: bool | None = None
    seen = 0

    def start_over(loss: Loss) -> None:
        nonlocal above
        print(f"lost {loss.reason}: {loss}; averages start again", file=sys.stderr)
        fast.clear()
        slow.clear()
        above = None

    async with Client(args.url, args.key) as client:
        async for tick in client.subscribe([args.symbol], types=["trade"], on_loss=start_over):
            seen += 1
            fast.append(tick["price"])
            slow.append(tick["price"])
            if len(slow) == slow.maxlen:
                now_above = sum(fast) / len(fast) > sum(slow) / len(slow)
                if above is not None and now_above != above:
                    side = "BUY" if now_above else "SELL"
                    print(f"{side} {args.symbol} at {tick['price']} (seq {tick['seq']})")
                above = now_above
            if args.trades and seen >= args.trades:
                break
    print(f"done: {seen} trades of {args.symbol}")


if __name__ == "__main__":
    asyncio.run(main())
