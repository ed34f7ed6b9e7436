"""Redis killed and restarted under live subscribers: nothing crashes, gaps are announced."""

from __future__ import annotations

import asyncio
import time

from tests.harness import WAIT_S, Stack, next_event, recv_events, send


async def test_subscribers_learn_of_the_outage_and_resume_on_the_new_epoch(own_stack) -> None:
    s: Stack = own_stack()
    key = s.key("outage")
    bearer = {"Authorization": f"Bearer {key}"}
    ws, _ = await s.client(key)
    await send(ws, op="subscribe", symbols=["AAPL", "MSFT"])
    sub = await next_event(ws, "subscribed")
    old_epoch = sub["seq"]["AAPL"]["epoch"]
    await next_event(ws, "trade")

    s.redis.kill()
    down = await next_event(ws, "status", code="redis_unavailable")
    assert down["symbols"] == ["AAPL", "MSFT"]
    async with s.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL", headers=bearer)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert (await http.get("/healthz")).json()["redis"] == "down"
    await asyncio.sleep(1.5)  # the feed holds its batch and retries meanwhile

    s.redis.start()  # comes back empty: the sequence restarts under a new epoch
    gap = await next_event(ws, "status", code="gap")
    assert gap["symbols"] == ["AAPL", "MSFT"]
    assert set(gap["seq"]) == {"AAPL", "MSFT"}
    # Each symbol's new epoch is announced: by the gap status if the feed published before the
    # hub was back (the in-band epoch_changed went by then), else by an epoch_changed event.
    new_epoch = {
        sym: st["epoch"] for sym, st in gap["seq"].items() if st["epoch"] not in (None, old_epoch)
    }
    seen: dict[str, list[int]] = {}
    while min((len(v) for v in seen.values()), default=0) < 20 or len(seen) < 2:
        for ev in await recv_events(ws):
            if ev["type"] == "status" and ev["code"] == "epoch_changed":
                assert ev["epoch"] != old_epoch
                new_epoch[ev["sym"]] = ev["epoch"]
                seen[ev["sym"]] = []  # the sequence restarts here
            elif ev["type"] in ("trade", "quote"):
                seen.setdefault(ev["sym"], []).append(ev["seq"])
    assert set(new_epoch) == {"AAPL", "MSFT"}
    # Live ticks flow again, contiguous within the new epoch, for both symbols.
    for sym, seqs in seen.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), sym
    # The web process never died, and new connections and REST work again.
    assert s.web.proc.poll() is None and s.feed.proc.poll() is None
    ws2, _ = await s.client(key)
    await send(ws2, op="subscribe", symbols=["NVDA"])
    assert (await next_event(ws2, "subscribed"))["symbols"] == ["NVDA"]
    async with s.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL", headers=bearer)
        assert r.status_code == 200
    await ws.close()
    await ws2.close()


async def test_subscribe_during_outage_gets_unavailable_then_works(own_stack) -> None:
    s: Stack = own_stack()
    key = s.key("during")
    ws, _ = await s.client(key)
    s.redis.kill()
    await asyncio.sleep(0.5)
    await send(ws, op="subscribe", id="early", symbols=["AAPL"])
    err = await next_event(ws, "error")
    assert err["code"] == "unavailable" and err["id"] == "early" and err["fatal"] is False
    s.redis.start()
    await asyncio.sleep(1.0)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # the feed re-registers its symbols once it publishes
        await send(ws, op="subscribe", id="later", symbols=["AAPL"])
        ev = await next_event(ws, "subscribed", id="later")
        if ev["symbols"] == ["AAPL"]:
            break
        await asyncio.sleep(0.25)
    assert ev["symbols"] == ["AAPL"]
    await next_event(ws, "quote")
    await ws.close()


async def test_a_resume_after_redis_restarts_with_its_data_is_served(own_stack) -> None:
    """The web process's pooled Redis connections die with the old server: a resume right
    after the restart must be served from the new one, not refused as resume_unavailable."""
    s: Stack = own_stack(redis_persist=True)
    key = s.key("restart")
    ws, _ = await s.client(key)
    await send(ws, op="subscribe", symbols=["AAPL"])
    sub = await next_event(ws, "subscribed")
    epoch = sub["seq"]["AAPL"]["epoch"]
    last = (await next_event(ws, "trade"))["seq"]
    async with s.http() as http:  # REST calls leave connections in the web process's pool
        for _ in range(5):
            await http.get(
                "/ticks/realtime?symbols=AAPL", headers={"Authorization": f"Bearer {key}"}
            )
    await ws.close()

    s.redis.kill()
    s.redis.start()  # with its data: same epoch, seq goes on
    ws, _ = await s.client(key)
    await send(ws, op="subscribe", id="re", symbols=["AAPL"], from_seq={"AAPL": last}, epoch=epoch)
    resumed = None
    while resumed is None:
        for ev in await recv_events(ws):
            assert ev["type"] != "error", ev
            if ev["type"] == "resumed":
                resumed = ev
    assert resumed["epoch"] == epoch and resumed["from_seq"] == last
    await ws.close()
