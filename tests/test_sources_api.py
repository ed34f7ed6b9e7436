"""A live venue source seen from the outside: an upstream gap in-band to the symbol's subscribers
and in ``/ticks/gaps``, and ``GET /sources`` (its contract and its states)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from jsonschema import Draft202012Validator

from tests.harness import ROOT, TLS, WAIT_S, Stack, eventually, next_event, recv_events, send
from tests.test_sources import COINBASE, _coinbase_expected, running
from tests.venues import FakeVenue

SYMS = ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"]
# The venue drops a source: `reconnecting` for this long before it tries again, so a status
# poll or a page a busy machine slows down still sees it (4-6 s windows were tight).
RECONNECTING_FOR = {"backoff_min_s": 12.0, "backoff_max_s": 12.0}
OPENAPI = ROOT / "specs/001-tick-data-pipeline/contracts/openapi.yaml"
ASYNCAPI = ROOT / "specs/001-tick-data-pipeline/contracts/asyncapi.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("sources-api"), feed=False, feed_name="sim")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _without(messages: list[str], *trade_ids: int) -> list[str]:
    """The capture with these matches left out: the venue's trades that never arrive."""
    return [m for m in messages if not any(f'"match","trade_id":{t},' in m for t in trade_ids)]


async def test_upstream_gap_reaches_subscribers_and_ticks_gaps(stack: Stack) -> None:
    """Coinbase's BAND-BTC trades 1287328 and 1287329 never arrive: subscribers of BAND-BTC
    hear it in-band, after the last seq before the hole; /ticks/gaps lists it as upstream."""
    venue = await FakeVenue("coinbase").start()
    ws, _ = await stack.client(stack.key("gap-watcher", ("realtime", "historical")))
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS) as run:
            await venue.subscribed(1)
            await send(ws, op="subscribe", symbols=["BAND-BTC"])
            await next_event(ws, "subscribed")
            await venue.emit(_without(COINBASE, 1287328, 1287329))
            gap = await next_event(ws, "status", code="upstream_gap")
            assert (gap["sym"], gap["venue"], gap["first_id"], gap["last_id"], gap["missing"]) == (
                "BAND-BTC", "COINBASE", 1287328, 1287329, 2)  # fmt: skip
            after = await next_event(ws, "trade")
            assert after["trade_id"] == 1287330 and after["seq"] == gap["after_seq"] + 1
            f = run.feed.figures()
            assert (f["upstream_gaps"], f["missing_trades"]) == (1, 2)
            async with stack.http() as http:
                r = await http.get(
                    "/ticks/gaps",
                    params={"symbols": "BAND-BTC,BAND-GBP", "start": "2021-01-01",
                            "end": "2100-01-01"},
                    headers={"Authorization": f"Bearer {stack.key('g', ('historical',))}"},
                )  # fmt: skip
            assert r.status_code == 200, r.text
            [up] = r.json()["upstream_gaps"]
            assert up["upstream"] is True and (up["first_id"], up["last_id"]) == (1287328, 1287329)
            assert up["after_seq"] == gap["after_seq"] and up["epoch"] == gap["epoch"]
    finally:
        await ws.close()
        await venue.stop()


async def _published_with_a_hole(stack: Stack, run: Any, venue: FakeVenue) -> int:
    """The capture without BAND-BTC trades 1287328 and 1287329, all of it published; returns
    BAND-BTC's epoch."""
    await venue.subscribed(1)
    await venue.emit(_without(COINBASE, 1287328, 1287329))
    await eventually(lambda: run.plant.upstream_gaps_published == 1, what="the gap published")
    want = len(_coinbase_expected(_without(COINBASE, 1287328, 1287329)))
    await eventually(lambda: run.plant.published >= want, what="every tick published")
    return int(await run.epoch("BAND-BTC"))


async def test_a_resuming_subscriber_gets_the_upstream_gap_in_its_backlog(stack: Stack) -> None:
    """A client that was away while the hole was found resumes from seq 1: the upstream gap
    comes in its backlog, right before the tick after the hole, once."""
    venue = await FakeVenue("coinbase").start()
    ws, _ = await stack.client(stack.key("late", ("realtime",)))
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS) as run:
            epoch = await _published_with_a_hole(stack, run, venue)
            await send(ws, op="subscribe", symbols=["BAND-BTC"], from_seq={"BAND-BTC": 1},
                       epoch={"BAND-BTC": epoch})  # fmt: skip
            events: list[dict[str, Any]] = []
            while not any(e.get("trade_id") == 1287330 for e in events):
                events += [e for e in await recv_events(ws) if e.get("sym") == "BAND-BTC"]
            gaps = [e for e in events if e.get("code") == "upstream_gap"]
            assert len(gaps) == 1, events
            gap = gaps[0]
            assert (gap["first_id"], gap["last_id"], gap["epoch"]) == (1287328, 1287329, epoch)
            after = events[events.index(gap) + 1]
            assert after["trade_id"] == 1287330 and after["seq"] == gap["after_seq"] + 1
            upto = events[: events.index(after) + 1]
            assert [e["seq"] for e in upto if "seq" in e] == list(range(2, after["seq"] + 1))
    finally:
        await ws.close()
        await venue.stop()


async def test_the_python_client_reports_upstream_gaps_before_the_tick_after(stack: Stack):
    from tickpipe import Client, UpstreamGap

    venue = await FakeVenue("coinbase").start()
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS) as run:
            epoch = await _published_with_a_hole(stack, run, venue)
            heard: list[tuple[UpstreamGap, int]] = []
            async with Client(stack.base, stack.key("py", ("realtime",))) as c:
                sub = c.subscribe(["BAND-BTC"], on_upstream_gap=lambda g: heard.append((g, n)))
                sub.last, sub.epochs = {"BAND-BTC": 1}, {"BAND-BTC": epoch}  # resume from 1
                n = 0
                async for tick in sub:
                    n += 1
                    if tick.get("trade_id") == 1287330:
                        break
            [(gap, before)] = heard
            assert (gap.venue, gap.first_id, gap.last_id, gap.missing) == (
                "COINBASE", 1287328, 1287329, 2)  # fmt: skip
            assert before == n - 1 and gap.after_seq == tick["seq"] - 1
            assert sub.upstream_gaps == [gap] and not sub.losses
    finally:
        await venue.stop()


async def test_a_hole_across_a_reconnect_is_an_upstream_gap(stack: Stack) -> None:
    """The connection drops; the venue goes on trading; after the resubscription the next
    BAND-GBP trade's id shows what was missed."""
    venue = await FakeVenue("coinbase").start()
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE[:45])  # up to BAND-GBP trade 881615
            await eventually(lambda: run.feed.ticks > 0)
            venue.drop()
            await venue.subscribed(2)
            await venue.emit(COINBASE[50:])  # 881616 traded while disconnected
            await eventually(lambda: run.feed.upstream_gaps == 1, what="the gap")
            assert run.feed.missing_trades == 1 and run.feed.reconnects == 1
    finally:
        await venue.stop()


async def test_sources_lists_each_source_with_its_figures_and_states(stack: Stack) -> None:
    admin = {"Authorization": f"Bearer {stack.key('ops', ('admin',))}"}
    other = {"Authorization": f"Bearer {stack.key('rt', ('realtime',))}"}
    venue = await FakeVenue("coinbase").start()
    async with stack.http() as http:
        assert (await http.get("/sources")).status_code == 401
        assert (await http.get("/sources", headers=other)).status_code == 403
        async with running(stack.redis.url, venue, "coinbase", SYMS, **RECONNECTING_FOR) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE)

            async def source() -> dict | None:
                r = await http.get("/sources", headers=admin)
                assert r.status_code == 200, r.text
                found = [s for s in r.json()["sources"] if s["name"] == "test-coinbase"]
                return found[0] if found else None

            live = await eventually(
                source, lambda s: s is not None and s["ticks"] > 0, what="a live source"
            )
            assert live["kind"] == "coinbase" and live["state"] == "live"
            assert live["symbols"] == SYMS and live["latency_p99_ms"] >= live["latency_p50_ms"]
            for name in ("messages_per_s", "ticks_per_s", "reconnects", "upstream_gaps",
                         "last_error", "latency_ms"):  # fmt: skip
                assert name in live
            venue.drop()
            down = await eventually(source, lambda s: s["state"] == "reconnecting")
            assert down["reconnects"] == 1 and "connection" in down["reason"]
            await eventually(source, lambda s: s["state"] == "live", what="live again")
            run.plant.stop()
            await asyncio.wait_for(run.task, WAIT_S)
            gone = await eventually(source, lambda s: s["state"] == "down")
            assert gone["reason"] == "the feed stopped"  # (a killed one: "no heartbeat ...")
    await venue.stop()


async def test_every_web_process_lists_the_same_sources(stack: Stack) -> None:
    """A web process started after a source's feed stopped lists it as the others do (down,
    with its last figures): /sources is read from Redis, not from what one process saw."""
    admin = {"Authorization": f"Bearer {stack.key('ops-many', ('admin',))}"}
    venue = await FakeVenue("coinbase").start()
    try:
        async with stack.http() as http:
            async with running(stack.redis.url, venue, "coinbase", SYMS) as run:
                await venue.subscribed(1)
                await venue.emit(COINBASE[:20])
                await eventually(  # its feed's heartbeat, with figures
                    lambda: http.get("/sources", headers=admin),
                    lambda r: any(
                        s["name"] == "test-coinbase" and s["ticks"] > 0 and s["state"] == "live"
                        for s in r.json()["sources"]
                    ),
                    what="the source listed",
                )
                run.plant.stop()
                await asyncio.wait_for(run.task, WAIT_S)
            gone = aioredis.Redis.from_url(stack.redis.url)
            try:  # the feed's heartbeat expired: only what stays in Redis tells of the source
                await eventually(lambda: gone.exists("tp:feed:test-coinbase"), lambda n: n == 0)
            finally:
                await gone.aclose()
            proc, port = stack.other_web("web-late")
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S, verify=TLS
                ) as late:
                    r = await eventually(
                        lambda: late.get("/sources", headers=admin),
                        lambda r: r.status_code == 200 and r.json()["sources"],
                        what="the late web process listing sources",
                    )
                    [src] = [s for s in r.json()["sources"] if s["name"] == "test-coinbase"]
                    assert src["kind"] == "coinbase" and src["ticks"] > 0
                    await eventually(
                        lambda: late.get("/sources", headers=admin),
                        lambda r: (
                            [
                                s["state"]
                                for s in r.json()["sources"]
                                if s["name"] == "test-coinbase"
                            ]
                            == ["down"]
                        ),
                        what="down on the late one",
                    )
            finally:
                proc.stop()
    finally:
        await venue.stop()


def test_sources_and_upstream_gap_are_in_the_contracts() -> None:
    openapi = yaml.safe_load(Path(OPENAPI).read_text())
    entry = openapi["paths"]["/sources"]["get"]
    item = entry["responses"]["200"]["content"]["application/json"]["schema"]["properties"][
        "sources"]["items"]  # fmt: skip
    for name in ("kind", "symbols", "state", "messages_per_s", "ticks_per_s", "latency_p50_ms",
                 "latency_p99_ms", "reconnects", "upstream_gaps", "last_error"):  # fmt: skip
        assert name in item["properties"], name
    assert item["properties"]["state"]["enum"] == ["connecting", "live", "reconnecting", "down"]
    gaps = openapi["paths"]["/ticks/gaps"]["get"]["responses"]["200"]["content"]
    assert "upstream_gaps" in gaps["application/json"]["schema"]["properties"]
    assert "upstream_gap" in Path(ASYNCAPI).read_text()


def _schema(contract: Path, name: str) -> Draft202012Validator:
    """A validator for the contract's schema ``name`` (its ``$ref``s resolved in the file)."""
    doc = yaml.safe_load(contract.read_text())
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **doc})


def _valid(validator: Draft202012Validator, instance: object) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


async def test_live_source_answers_keep_to_the_contracts(stack: Stack) -> None:
    """While a venue source runs (trade ids, receive times, quotes without sizes), what
    /ticks/realtime, /sources and the WebSocket send is what openapi.yaml and asyncapi.yaml
    describe, field by field."""
    realtime = _schema(OPENAPI, "RealtimeResponse")
    events = {t: _schema(ASYNCAPI, n) for t, n in (("trade", "Trade"), ("quote", "Quote"))}
    upstream_gap = _schema(ASYNCAPI, "StatusUpstreamGap")
    openapi = yaml.safe_load(OPENAPI.read_text())
    answer = openapi["paths"]["/sources"]["get"]["responses"]["200"]["content"]
    sources = Draft202012Validator({**openapi, **answer["application/json"]["schema"]})
    venue = await FakeVenue("coinbase").start()
    key = stack.key("contract", ("realtime", "admin"))
    ws, _ = await stack.client(key)
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS):
            await venue.subscribed(1)
            await send(ws, op="subscribe", symbols=SYMS)
            await next_event(ws, "subscribed")
            await venue.emit(_without(COINBASE, 1287328))
            seen: dict[str, int] = {"trade": 0, "quote": 0, "status": 0}
            while seen["trade"] < 5 or seen["quote"] < 5 or seen["status"] < 1:
                for ev in await recv_events(ws):
                    if ev["type"] in events:
                        assert not _valid(events[ev["type"]], ev), ev
                    elif ev.get("code") == "upstream_gap":
                        assert not _valid(upstream_gap, ev), ev
                    seen[ev["type"]] = seen.get(ev["type"], 0) + 1
            auth = {"Authorization": f"Bearer {key}"}
            async with stack.http() as http:
                r = await http.get("/ticks/realtime", params={"symbols": ",".join(SYMS)},
                                   headers=auth)  # fmt: skip
                assert r.status_code == 200, r.text
                body = r.json()
                assert any(t["trade"] and "trade_id" in t["trade"] for t in body["ticks"])
                assert any(t["quote"] and "recv_ts" in t["quote"] for t in body["ticks"])
                assert not _valid(realtime, body), body
                listed = await eventually(
                    lambda: http.get("/sources", headers=auth),
                    lambda r: any(s["name"] == "test-coinbase" for s in r.json()["sources"]),
                    what="the source listed",
                )
                assert not _valid(sources, listed.json()), listed.json()
    finally:
        await ws.close()
        await venue.stop()


async def test_dashboard_source_tile_goes_reconnecting_and_back(stack: Stack) -> None:
    """The dashboard's tile of a live source shows its state, figures and latency sparkline,
    says `reconnecting` with the reason when the venue drops it, and `live` once resubscribed."""
    from playwright.async_api import async_playwright

    from tests.test_dashboard import ARGS, ARTIFACTS, CHROMIUM, open_dashboard

    venue = await FakeVenue("coinbase").start()
    pw = await async_playwright().start()
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = await open_dashboard(browser, stack, stack.key("ops-sources", ("admin", "realtime")))
    tile = ".tile[data-id='feed:test-coinbase']"
    try:
        async with running(stack.redis.url, venue, "coinbase", SYMS, **RECONNECTING_FOR):
            await venue.subscribed(1)
            await venue.emit(COINBASE[:40])
            await asyncio.sleep(1.1)  # the rest a second later: two points of latency
            await venue.emit(COINBASE[40:])
            await page.wait_for_selector(f"{tile}[data-source='live']")
            await page.wait_for_selector(f"{tile} .spark[data-points='2']")
            text = await page.text_content(tile)
            assert text is not None and "latency p50" in text and "BAND-BTC" in text
            assert await page.text_content(f"{tile} .state") == "live"
            venue.drop()
            await page.wait_for_selector(
                f"{tile}[data-source='reconnecting'][data-state='degraded']"
            )
            assert await page.text_content(f"{tile} .state") == "reconnecting"
            reason = await page.text_content(f"{tile} .reason")
            assert reason is not None and "connection dropped" in reason
            await page.screenshot(path=ARTIFACTS / "dashboard-source-reconnecting.png")
            await page.wait_for_selector(f"{tile}[data-source='live']")
            assert not page.errors  # type: ignore[attr-defined]
    finally:
        await page.close()
        await browser.close()
        await pw.stop()
        await venue.stop()
