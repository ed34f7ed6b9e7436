"""A tick file replayed as the live feed: same prices, same order, paced by speed, looping."""

from __future__ import annotations

import asyncio

from tests.harness import WAIT_S, Proc, Stack, next_event, recv_events, send, wait_port

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
        loop = asyncio.get_running_loop()
        # the symbol exists once the feed registered it: the feed's start (Polars) can take
        # tens of seconds on a busy machine
        deadline = loop.time() + WAIT_S
        while True:
            await send(ws, op="subscribe", symbols=["BTCUSDT"])
            sub = await next_event(ws, "subscribed")
            if sub["symbols"]:
                break
            assert loop.time() < deadline, "the feed never registered BTCUSDT"
            await asyncio.sleep(0.1)
        bids: list[float] = []
        seqs: list[int] = []
        stamps: list[int] = []  # each quote's ts: the wall time the feed sent it out
        while len(bids) < 70:  # three whole passes of the file, whatever the first was
            for ev in await recv_events(ws):
                if ev["type"] == "quote":
                    bids.append(ev["bid"])
                    seqs.append(ev["seq"])
                    stamps.append(ev["ts"])
                    assert ev["ask"] == ev["bid"] + 0.5 and ev["ask_size"] == 1.5
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
    # 1.9 s of market time at 10x: a pass (first quote to last) takes about 0.19 s by the feed's
    # own stamps (the wall time each quote went out), 1.9 s at 1x, 0 if not paced at all. Judged
    # on the whole passes received, not on the test's clock: a busy machine can stall the feed
    # (a longer pass) or its first quote of a pass (a shorter one) in one pass, hardly in all.
    passes = [
        (stamps[i + 19] - stamps[i]) / 1e9
        for i in range(len(bids) - 19)
        if bids[i] == 100.0 and bids[i + 19] == 119.0
    ]
    assert len(passes) >= 2, bids
    assert min(passes) < 1.0 and max(passes) > 0.1, f"not played at 10x: passes of {passes} s"
    assert "replayed at 10x" in feed.output()
