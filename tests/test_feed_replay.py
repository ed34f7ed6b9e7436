"""A tick file replayed as the live feed: same prices, same order, paced by speed, looping."""

from __future__ import annotations

import asyncio

from tests.harness import Proc, Stack, next_event, recv_events, send, wait_port

HEADER = "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount\n"


def tardis_quotes(n: int, step_us: int) -> str:
    t0 = 1_700_000_000_000_000
    rows = [
        f"binance,BTCUSDT,{t0 + i * step_us},{t0 + i * step_us + 5},1.5,{100 + i}.5,{100 + i}.0,2"
        for i in range(n)
    ]
    return HEADER + "\n".join(rows) + "\n"


async def test_file_replayed_as_live_feed_keeps_prices_order_and_loops(tmp_path) -> None:
    src = tmp_path / "quotes.csv"
    src.write_text(tardis_quotes(20, 100_000))  # 20 quotes over 1.9 s of market time
    s = Stack(tmp_path / "s", feed=False)
    s.start()
    feed = Proc(
        ["feed", "--file", str(src), "--format", "tardis-quotes", "--speed", "10"],
        s.env,
        tmp_path / "feed.log",
    )
    try:
        wait_port(s.port)
        feed.start()
        key = s.key("replay")
        ws, _ = await s.client(key)
        for _ in range(50):  # the symbol exists once the feed registered it
            await send(ws, op="subscribe", symbols=["BTCUSDT"])
            sub = await next_event(ws, "subscribed")
            if sub["symbols"]:
                break
            await asyncio.sleep(0.1)
        bids: list[float] = []
        seqs: list[int] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while len(bids) < 30:
            for ev in await recv_events(ws, timeout=10):
                if ev["type"] == "quote":
                    bids.append(ev["bid"])
                    seqs.append(ev["seq"])
                    assert ev["ask"] == ev["bid"] + 0.5 and ev["ask_size"] == 1.5
        elapsed = loop.time() - t0
        await ws.close()
    finally:
        feed.stop()
        s.stop()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "contiguous seq"
    start = bids.index(100.0) if 100.0 in bids else None
    assert (
        start is not None
        and bids[start : start + 20]
        == [100.0 + i for i in range(20)][: len(bids[start : start + 20])]
    ), "file order and prices kept, and the file starts over"
    assert elapsed < 6, "1.9 s of market time at 10x plays in about 0.2 s per pass"
    assert "replayed at 10x" in feed.output()
