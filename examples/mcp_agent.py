"""An agent that reads tickpipe through MCP: bars for context, then live updates to act on.

    python examples/mcp_agent.py --url http://127.0.0.1:8000 --key $KEY --symbol AAPL

It connects to ``/mcp`` with the official MCP client, asks ``tick_summary`` and ``bars`` (1 s)
for the last minutes, takes their VWAP as fair value, then subscribes to
``tick://SYMBOL/latest`` and, on each update, reads the resource and says BUY when the last
trade is below fair value by more than the quoted half-spread, SELL when above, else HOLD.
``--updates N`` stops after N updates. The key needs the realtime and historical scopes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def _data(result) -> dict:  # type: ignore[no-untyped-def]
    if result.is_error:
        raise SystemExit(f"tickpipe said: {result.content[0].text}")
    return result.structured_content


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--symbol", default="AAPL")
    ap.add_argument("--minutes", type=int, default=5, help="history for fair value")
    ap.add_argument("--updates", type=int, default=0, help="stop after this many (0: never)")
    args = ap.parse_args()

    sym, uri = args.symbol.upper(), f"tick://{args.symbol.upper()}/latest"
    end = time.time_ns()
    start = end - args.minutes * 60 * 10**9
    headers = {"Authorization": f"Bearer {args.key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(f"{args.url}/mcp", http_client=http)) as client,
    ):
        summary = await client.call_tool(
            "tick_summary", {"symbol": sym, "start": start, "end": end}
        )
        _data(summary)
        print(summary.content[0].text.splitlines()[0])
        bars = _data(
            await client.call_tool(
                "bars", {"symbols": [sym], "start": start, "end": end, "interval": "1s"}
            )
        )
        col = {name: i for i, name in enumerate(bars["columns"])}
        volume = sum(row[col["volume"]] for row in bars["rows"])
        notional = sum(row[col["vwap"]] * row[col["volume"]] for row in bars["rows"])
        fair = notional / volume if volume else None
        print(f"bars: {bars['count']} x 1s, fair value (VWAP) {fair}")

        seen = 0
        async with client.listen(resource_subscriptions=[uri]) as updates:
            async for _event in updates:
                read = await client.read_resource(uri)
                latest = json.loads(read.contents[0].text)
                trade, quote = latest["trade"], latest["quote"]
                if trade is None or fair is None:
                    action = "HOLD"
                else:
                    # (a one-sided quote, a book with no bid or no ask, gives no spread)
                    both = quote and "bid" in quote and "ask" in quote
                    edge = (quote["ask"] - quote["bid"]) / 2 if both else 0.0
                    action = (
                        "BUY" if trade["price"] < fair - edge
                        else "SELL" if trade["price"] > fair + edge
                        else "HOLD"
                    )  # fmt: skip
                price = trade["price"] if trade else None
                print(f"{action} {sym} at {price} (seq {latest['seq']}, fair {fair})")
                seen += 1
                if args.updates and seen >= args.updates:
                    break
    print(f"done: {seen} updates of {sym}")


if __name__ == "__main__":
    asyncio.run(main())
