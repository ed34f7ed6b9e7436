"""Going live after a replay and resuming after a disconnect, against a real feed, recorder,
Redis and server: contiguous seq per symbol, 0 lost and 0 duplicated ticks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.harness import WAIT_S, Stack, eventually, next_event, recv_events, send
from tests.test_recorder import published

SYMS = ["AAPL", "MSFT"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Feed at 400 ticks/s over 10 symbols, a recorder flushing every 0.2 s, and Redis keeping
    only ~200 recent events per symbol (older ones come from the store)."""
    s = Stack(
        tmp_path_factory.mktemp("resume"),
        recorder=True,
        recorder_flush_s=0.2,
        history_per_symbol=200,
        max_msgs_per_s=200,
    ).start()
    time.sleep(1.5)
    try:
        yield s
    finally:
        s.stop()


def assert_contiguous(ticks: list[dict], first: dict[str, int]) -> dict[str, int]:
    """Every tick of a symbol is the one after the previous (first: the seq before the first);
    returns the last seq per symbol."""
    last = dict(first)
    for t in ticks:
        assert t["seq"] == last[t["sym"]] + 1, f"gap or duplicate at {t} after {last[t['sym']]}"
        last[t["sym"]] = t["seq"]
    return last


async def ticks_until(
    ws, done, timeout: float = WAIT_S, resumed: tuple[str, ...] = ()
) -> tuple[list[dict], list[dict]]:
    """(ticks, other events) until ``done(ticks)`` holds and a ``resumed`` event of each symbol
    in ``resumed`` has come (a long backlog can hold more ticks than ``done`` asks for)."""
    ticks: list[dict] = []
    other: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def waiting() -> bool:
        seen = {e.get("sym") for e in other if e["type"] == "resumed"}
        return not done(ticks) or not seen.issuperset(resumed)

    while waiting():
        for ev in await recv_events(ws, deadline - loop.time()):
            (ticks if ev["type"] in ("trade", "quote") else other).append(ev)
    return ticks, other


@pytest.mark.parametrize("speed", ["max", 10])
async def test_then_live_hands_over_with_contiguous_seq_under_a_live_feed(
    live: Stack, speed: Any
) -> None:
    ws, _ = await live.client(live.key(f"tl{speed}", ["replay", "realtime"]))
    start = time.time_ns() - 2 * 10**9
    await send(ws, op="replay", id="h", symbols=SYMS, start=start, speed=speed, then_live=True)
    events: list[dict] = []
    caught = None
    early: list[dict] = []  # live events in the same frame as caught_up, after it
    while caught is None:
        for ev in await recv_events(ws):
            assert ev["type"] != "error", ev
            if caught is not None:
                early.append(ev)
            elif ev["type"] == "caught_up":
                caught = ev
            else:
                events.append(ev)
    more, _ = await ticks_until(ws, lambda t: sum(x["sym"] == "AAPL" for x in t) >= 30)
    after = [e for e in early if e["type"] in ("trade", "quote")] + more
    await ws.close()
    done = next(e for e in events if e["type"] == "replay_done")
    replayed = [e for e in events if e["type"] in ("trade", "quote")]
    assert all(e["replay"] == "h" for e in replayed) and not any("replay" in e for e in after)
    assert done["count"] == len(replayed) > 0 and done["first_ts"] >= start
    firsts = {s: next(e["seq"] for e in replayed if e["sym"] == s) - 1 for s in SYMS}
    last = assert_contiguous(replayed, firsts)
    assert last == {s: caught["seq"][s]["seq"] for s in SYMS}
    assert_contiguous(after, last)  # live goes on exactly after the hand-over


async def test_then_live_leaves_a_symbol_already_subscribed_as_it_was(live: Stack) -> None:
    """A trades-only then_live replay of a symbol the connection already gets live (trades and
    quotes) must not narrow that subscription: its quotes keep coming after the hand-over."""
    ws, _ = await live.client(live.key("tl-already", ["replay", "realtime"]))
    await send(ws, op="subscribe", id="s", symbols=["AAPL"])
    await next_event(ws, "subscribed", id="s")
    start = time.time_ns() - 10**9
    await send(
        ws, op="replay", id="t", symbols=["AAPL"], start=start, speed="max", then_live=True,
        types=["trade"],
    )  # fmt: skip
    await next_event(ws, "caught_up", id="t")
    after, _ = await ticks_until(ws, lambda t: sum(x["type"] == "quote" for x in t) >= 5)
    assert sum(x["type"] == "quote" and "replay" not in x for x in after) >= 5
    await ws.close()


async def subscribe_and_read(stack: Stack, key: str, n: int) -> tuple[dict, dict[str, int]]:
    ws, _ = await stack.client(key)
    await send(ws, op="subscribe", symbols=SYMS)
    sub = await next_event(ws, "subscribed")
    first = {s: sub["seq"][s]["seq"] for s in SYMS}
    ticks, _ = await ticks_until(ws, lambda t: len(t) >= n)
    last = assert_contiguous(ticks, first)
    ws.transport.abort()  # a forced disconnect: no close handshake
    return {s: sub["seq"][s]["epoch"] for s in SYMS}, last


async def resume_after(
    stack: Stack, key: str, epochs: dict[str, int], last: dict[str, int], more: int = 40
) -> tuple[list[dict], list[dict]]:
    ws, _ = await stack.client(key)
    await send(ws, op="subscribe", id="re", symbols=SYMS, from_seq=last, epoch=epochs)
    ticks, other = await ticks_until(
        ws, lambda t: all(sum(x["sym"] == s for x in t) >= more for s in SYMS), resumed=SYMS
    )
    await ws.close()
    assert_contiguous(ticks, last)
    return ticks, other


async def test_resume_after_a_forced_disconnect_loses_and_repeats_nothing(live: Stack) -> None:
    key = live.key("drop", ["realtime"])
    epochs, last = await subscribe_and_read(live, key, 60)
    # ticks published meanwhile are in Redis' recent history: a second of them, 10 or more of
    # each symbol (however slowly a busy machine's feed publishes them)
    await asyncio.sleep(1.0)
    await eventually(
        lambda: asyncio.to_thread(published, live),
        lambda pub: all(pub[s][1] - last[s] >= 10 for s in SYMS),
        what="10 ticks of each symbol published meanwhile",
    )
    _ticks, other = await resume_after(live, key, epochs, last)
    resumed = {e["sym"]: e for e in other if e["type"] == "resumed"}
    assert set(resumed) == set(SYMS)
    for s in SYMS:
        assert resumed[s]["source"] == "redis" and resumed[s]["from_seq"] == last[s]
        assert resumed[s]["to_seq"] - last[s] >= 10  # a second of missed ticks came back


async def test_resume_reads_the_store_when_redis_no_longer_has_the_seq(live: Stack) -> None:
    key = live.key("old", ["realtime"])
    r = redis.Redis.from_url(live.redis.url)
    try:
        # Both symbols: on a busy machine one may be trimmed well before the other.
        def first() -> int:
            return min(int(r.xrange(f"tp:hist:{s}", count=1)[0][0].split(b"-")[0]) for s in SYMS)

        await eventually(first, lambda seq: seq >= 30, 30, 0.2, "Redis history trimmed")
    finally:
        r.close()
    epochs = {s: e for s, (e, _seq) in published(live).items()}
    from_seq = {"AAPL": 5, "MSFT": 5}
    _ticks, other = await resume_after(live, key, epochs, from_seq, more=300)
    resumed = {e["sym"]: e for e in other if e["type"] == "resumed"}
    assert {e["source"] for e in resumed.values()} == {"store"}
    assert not [e for e in other if e["type"] in ("error", "gap")]


async def test_bad_resume_requests_say_what_is_available_and_stay_live(live: Stack) -> None:
    key = live.key("badresume", ["realtime"])
    state = published(live)
    ws, _ = await live.client(key)
    await send(
        ws,
        op="subscribe",
        id="b",
        symbols=["AAPL", "MSFT", "NVDA"],
        from_seq={"AAPL": state["AAPL"][1] + 100_000, "MSFT": 3, "NVDA": 3},
        epoch={"AAPL": state["AAPL"][0], "MSFT": 12345, "NVDA": state["NVDA"][0] + 1},
    )
    errors: dict[str, dict] = {}
    ticks: list[dict] = []
    while len(errors) < 3 or not {t["sym"] for t in ticks} >= {"AAPL", "MSFT", "NVDA"}:
        for ev in await recv_events(ws):
            if ev["type"] == "error":
                errors[ev["sym"]] = ev
            elif ev["type"] in ("trade", "quote"):
                ticks.append(ev)
    await send(ws, op="subscribe", id="again", symbols=["AAPL"], from_seq={"AAPL": 1})
    again = await next_event(ws, "error", id="again")
    await ws.close()
    assert errors["AAPL"]["reason"] == "seq_from_future"
    assert errors["MSFT"]["reason"] == errors["NVDA"]["reason"] == "epoch_changed"
    assert errors["MSFT"]["epoch"] == state["MSFT"][0]
    assert errors["MSFT"]["available_from_seq"] == 1  # the recorder kept everything
    assert all(e["code"] == "resume_unavailable" and not e["fatal"] for e in errors.values())
    assert again["reason"] == "already_subscribed"
    assert not any(t.get("replay") for t in ticks)


async def test_a_seq_from_the_future_is_refused_with_where_data_starts(live: Stack) -> None:
    state = published(live)
    ws, _ = await live.client(live.key("future", ["realtime"]))
    await send(ws, op="subscribe", id="f", symbols=["AAPL"],
               from_seq={"AAPL": state["AAPL"][1] + 100_000}, epoch=state["AAPL"][0])  # fmt: skip
    err = await next_event(ws, "error", id="f")
    tick = await next_event(ws, "trade")
    await ws.close()
    assert err["code"] == "resume_unavailable" and err["reason"] == "seq_from_future"
    assert err["epoch"] == state["AAPL"][0] and err["seq"] >= state["AAPL"][1]
    assert err["available_from_seq"] == 1  # the recorder kept everything
    assert "data from seq 1" in err["message"]
    assert tick["sym"] == "AAPL"  # and the subscription went on live


async def test_from_seq_for_a_symbol_the_key_may_not_see_is_rejected_not_ignored(
    live: Stack,
) -> None:
    """Answered like a subscribe of that symbol (``not_entitled``), whether or not ``symbols``
    names it; the symbols the key may see resume as usual."""
    state = published(live)
    ws, _ = await live.client(live.key("narrow", ["realtime"], symbols=["AAPL"]))
    last = state["AAPL"][1]
    await send(ws, op="subscribe", id="n", symbols=["AAPL"], from_seq={"AAPL": last, "MSFT": 3},
               epoch={"AAPL": state["AAPL"][0], "MSFT": state["MSFT"][0]})  # fmt: skip
    first = await next_event(ws, "subscribed", id="n")
    resumed = await next_event(ws, "resumed", id="n")
    await send(ws, op="unsubscribe", symbols=["AAPL"])
    await send(ws, op="subscribe", id="both", symbols=["AAPL", "MSFT"], from_seq={"MSFT": 3})
    both = await next_event(ws, "subscribed", id="both")
    await ws.close()
    assert first["symbols"] == ["AAPL"]
    assert first["rejected"] == [{"sym": "MSFT", "code": "not_entitled"}]
    assert resumed["sym"] == "AAPL" and resumed["from_seq"] == last
    assert both["rejected"] == [{"sym": "MSFT", "code": "not_entitled"}]  # named once


async def test_from_seq_for_a_symbol_not_subscribed_or_not_a_symbol_is_rejected(
    live: Stack,
) -> None:
    ws, _ = await live.client(live.key("wide", ["realtime"]))
    await send(ws, op="subscribe", id="w", symbols=["AAPL"],
               from_seq={"NVDA": 3, "not a symbol": 3, "AAPL": 0})  # fmt: skip
    sub = await next_event(ws, "subscribed", id="w")
    await ws.close()
    assert sub["symbols"] == ["AAPL"]
    assert sorted(sub["rejected"], key=lambda r: r["sym"]) == [
        {"sym": "NOT A SYMBOL", "code": "invalid_symbol"},
        {"sym": "NVDA", "code": "not_in_symbols"},
    ]


async def test_resume_older_than_any_kept_data_is_refused_with_where_data_starts(
    live: Stack,
) -> None:
    """Last in the module: it deletes the oldest stored files, as a retention job would."""
    files = sorted((live.data_dir / "history").glob("date=*/*.parquet"))
    for f in files[:3]:
        f.unlink()
    key = live.key("gone", ["realtime"])
    state = published(live)
    ws, _ = await live.client(key)
    await send(ws, op="subscribe", id="g", symbols=["AAPL"], from_seq={"AAPL": 0},
               epoch=state["AAPL"][0])  # fmt: skip
    err = await next_event(ws, "error", id="g")
    tick = await next_event(ws, "trade")
    await ws.close()
    assert err["code"] == "resume_unavailable" and err["reason"] == "too_old"
    assert err["available_from_seq"] > 1
    assert f"from seq {err['available_from_seq']}" in err["message"]
    assert tick["sym"] == "AAPL"  # and the subscription went on live


@pytest.mark.slow
async def test_resume_across_a_web_process_restart(tmp_path) -> None:
    s = Stack(tmp_path).start()
    try:
        key = s.key("restart", ["realtime"])
        epochs, last = await subscribe_and_read(s, key, 40)
        s.web.stop()
        s.start_web()
        _ticks, other = await resume_after(s, key, epochs, last)
        assert {e["sym"] for e in other if e["type"] == "resumed"} == set(SYMS)
    finally:
        s.stop()
