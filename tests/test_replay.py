"""Replay over the WebSocket against a real server and hand-written Parquet history: order,
pacing, controls, gaps, fingerprints equal to the REST export, bad inputs, many replays at once,
a client that goes away, a client that cannot keep up."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import polars as pl
import pytest

from server.history.store import write_file
from server.ticks import STORED_SCHEMA
from tests.harness import Stack, eventually, next_event, recv_events, send, write_history
from tickpipe.fingerprint import Fingerprint

T0 = int(dt.datetime(2026, 3, 2, 14, 30, tzinfo=dt.UTC).timestamp()) * 10**9
MS = 10**6
SYMS = ["AAA", "BBB", "CCC"]
SPAN_MS = 20_000  # market time covered by the hand-written history
GAP = (50, 54)  # CCC seqs never recorded


def _rows() -> list[tuple]:
    """Trades and quotes of three symbols at random times over 20 s; ties in ts on purpose."""
    rng = random.Random(4)
    rows = []
    for sym in SYMS:
        times = sorted(rng.randrange(0, SPAN_MS) for _ in range(400))
        seq = 0
        for i, ms in enumerate(times):
            seq += 1
            if sym == "CCC" and GAP[0] <= seq <= GAP[1]:
                seq = GAP[1] + 1
            row = dict.fromkeys(STORED_SCHEMA)
            row.update(sym=sym, ts=T0 + ms * MS, epoch=7, seq=seq, venue="X")
            if i % 3 == 0:
                row.update(type="trade", price=100.0 + i / 100, size=float(1 + i % 5))
                row["side"] = "buy" if i % 2 else None
            else:
                row.update(type="quote", bid=99.5 + i / 100, ask=100.5 + i / 100, crossed=False)
                row.update(bid_size=2.0, ask_size=3.0 if i % 7 else None)
            rows.append(tuple(row[k] for k in STORED_SCHEMA))
    return rows


ROWS = _rows()
END = T0 + SPAN_MS * MS


@pytest.fixture(scope="module")
def hist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server without a feed over two hand-written history files."""
    s = Stack(tmp_path_factory.mktemp("replay"), feed=False, max_msgs_per_s=200)
    root = s.data_dir / "history"
    half = len(ROWS) // 2
    write_history(root, ROWS[:half], "1-0", "1-9")
    write_history(root, ROWS[half:], "2-0", "2-9")
    s.start()
    try:
        yield s
    finally:
        s.stop()


async def replay_all(ws, rid: Any, timeout: float = 20.0) -> tuple[list[dict], dict]:
    """Every event of replay ``rid`` (ticks and gaps) until its ``replay_done``."""
    events: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for ev in await recv_events(ws, deadline - loop.time()):
            if ev["type"] == "replay_done" and ev["id"] == rid:
                return events, ev
            if ev.get("replay") == rid or (ev["type"] == "gap" and ev["id"] == rid):
                events.append(ev)
            assert ev["type"] != "error", ev


def write_dense_quotes(stack: Stack, n_rows: int) -> None:
    """``n_rows`` quotes of S0 and S1 in turn, 1 ms apart from ``T0``, as one stored file."""
    k = pl.col("k")
    quotes = {
        "sym": pl.format("S{}", k % 2),
        "type": pl.lit("quote"),
        "ts": (pl.lit(T0, pl.Int64) + k * MS).cast(pl.Datetime("ns", "UTC")),
        "epoch": pl.lit(1, pl.Int64),
        "seq": k // 2 + 1,
        "bid": pl.lit(1.0),
        "bid_size": pl.lit(1.0),
        "ask": pl.lit(2.0),
        "ask_size": pl.lit(1.0),
        "crossed": pl.lit(False),
    }
    frame = pl.DataFrame({"k": pl.int_range(0, n_rows, eager=True)}).select(
        quotes.get(c, pl.lit(None)).cast(t).alias(c) for c, t in STORED_SCHEMA.items()
    )
    write_file(stack.data_dir / "history", frame, "1-0", "1-9")


async def rest_get(stack: Stack, key: str, **params: Any) -> httpx.Response:
    async with stack.http() as http:
        r = await http.get(
            "/ticks/historical", params=params, headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == 200, r.text
    return r


async def rest_fingerprint(stack: Stack, key: str, **params: Any) -> dict:
    return (await rest_get(stack, key, fingerprint="true", **params)).json()


async def test_replay_merges_symbols_in_ts_seq_order_marked_as_replay(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("order", ["replay"]))
    await send(ws, op="replay", id="r1", symbols=SYMS, start=T0, end=END, speed="max")
    started = await next_event(ws, "replay_started", id="r1")
    events, done = await replay_all(ws, "r1")
    await ws.close()
    assert started["symbols"] == SYMS and started["speed"] == "max"
    ticks = [e for e in events if e["type"] in ("trade", "quote")]
    assert len(ticks) == len(ROWS) == done["count"]
    keys = [(e["ts"], e["seq"], e["sym"]) for e in ticks]
    assert keys == sorted(keys)
    assert {e["sym"] for e in ticks} == set(SYMS)
    assert all(e["epoch"] == 7 for e in ticks)
    assert done["first_ts"] == keys[0][0] and done["last_ts"] == keys[-1][0]
    # the live format: a quote without ask_size has none; a trade's side only when known
    q = next(e for e in ticks if e["type"] == "quote" and "ask_size" not in e)
    assert set(q) >= {"bid", "ask", "bid_size", "ts", "seq", "sym", "venue"}
    assert any(e["type"] == "trade" and "side" not in e for e in ticks)


async def test_two_replays_and_the_rest_export_have_one_fingerprint(hist: Stack) -> None:
    key = hist.key("fp", ["replay", "historical"])
    ws, _ = await hist.client(key)
    prints = []
    for rid in ("a", "b"):
        await send(ws, op="replay", id=rid, symbols=SYMS, start=T0, end=END, speed="max")
        events, done = await replay_all(ws, rid)
        mine = Fingerprint()
        for e in events:
            if e["type"] != "gap":
                mine.add_event(e)
        assert mine.hexdigest() == done["fingerprint"], "client and server agree"
        prints.append(done)
    # a subset of types has a fingerprint of its own, again equal to REST's
    await send(ws, op="replay", id="t", symbols=["AAA"], start=T0, end=END, types=["trade"])
    await send(ws, op="speed", id="t", speed="max")
    _trades, trades_done = await replay_all(ws, "t")
    await ws.close()
    rest = await rest_fingerprint(hist, key, symbols=",".join(SYMS), start=T0, end=END)
    assert prints[0]["fingerprint"] == prints[1]["fingerprint"] == rest["fingerprint"]
    assert rest["count"] == len(ROWS) and rest["gaps"] == 1
    assert (rest["first_ts"], rest["last_ts"]) == (prints[0]["first_ts"], prints[0]["last_ts"])
    only = await rest_fingerprint(hist, key, symbols="AAA", start=T0, end=END, types="trade")
    assert only["fingerprint"] == trades_done["fingerprint"] != rest["fingerprint"]
    # anyone can check it from the NDJSON export with the client's encoding
    r = await rest_get(hist, key, symbols=",".join(SYMS), start=T0, end=END, format="ndjson")
    export = Fingerprint()
    for row in pl.read_ndjson(io.BytesIO(r.content)).iter_rows(named=True):
        export.add_event(row)
    assert export.hexdigest() == rest["fingerprint"]


async def test_a_range_reaching_far_before_and_after_the_data_replays_the_same(
    hist: Stack,
) -> None:
    ws, _ = await hist.client(hist.key("wide", ["replay"]))
    month = 30 * 86_400 * 10**9
    await send(ws, op="replay", id="w", symbols=SYMS, start=T0 - month, end=END + month,
               speed="max")  # fmt: skip
    _wide, wide_done = await replay_all(ws, "w")
    await send(ws, op="replay", id="n", symbols=SYMS, start=T0, end=END, speed="max")
    _narrow, narrow_done = await replay_all(ws, "n")
    await ws.close()
    assert wide_done["count"] == len(ROWS) == narrow_done["count"]
    assert wide_done["fingerprint"] == narrow_done["fingerprint"]


async def test_an_enriched_replay_carries_derived_fields_and_the_rest_fingerprint(
    hist: Stack,
) -> None:
    key = hist.key("enriched", ["replay", "historical"])
    ws, _ = await hist.client(key)
    await send(ws, op="replay", id="e", symbols=["AAA"], start=T0, end=END, speed="max",
               enriched=True)  # fmt: skip
    events, done = await replay_all(ws, "e")
    await ws.close()
    quote = next(e for e in events if e["type"] == "quote")
    assert quote["mid"] == (quote["bid"] + quote["ask"]) / 2 and "spread_bps" in quote
    trades = [e for e in events if e["type"] == "trade"]
    assert all(t["notional"] == t["price"] * t["size"] for t in trades)
    assert all(t["aggressor"] in ("buy", "sell") for t in trades[1:])
    rest = await rest_fingerprint(hist, key, symbols="AAA", start=T0, end=END, enriched="true")
    assert rest["fingerprint"] == done["fingerprint"] and rest["count"] == len(events)
    # The replay reads window by window; each trade's aggressor is the one-query export's.
    r = await rest_get(hist, key, symbols="AAA", start=T0, end=END, enriched="true",
                       format="ndjson")  # fmt: skip
    exported = [orjson.loads(line) for line in r.content.splitlines()]
    assert [t.get("aggressor") for t in trades] == [
        e.get("aggressor") for e in exported if e["type"] == "trade"
    ]


async def test_replay_paces_events_on_a_virtual_clock(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("pace", ["replay"]))
    start, end, speed = T0 + 2000 * MS, T0 + 5000 * MS, 2  # 3 s of market time -> 1.5 s
    await send(ws, op="replay", id="p", symbols=SYMS, start=start, end=end, speed=speed)
    await next_event(ws, "replay_started")
    arrivals = []
    loop = asyncio.get_running_loop()
    while True:
        evs = await recv_events(ws)
        now = loop.time()
        arrivals.extend((now, e) for e in evs if e["type"] in ("trade", "quote"))
        if any(e["type"] == "replay_done" for e in evs):
            break
    await ws.close()
    wall0, first = arrivals[0]
    lateness = [(wall - wall0) - (e["ts"] - first["ts"]) / 1e9 / speed for wall, e in arrivals]
    assert min(lateness) > -0.05, "no event is sent before its time on the virtual clock"
    wall_span = arrivals[-1][0] - wall0
    market_span = (arrivals[-1][1]["ts"] - first["ts"]) / 1e9
    assert wall_span >= market_span / speed - 0.05
    assert max(lateness) < 1.0, "and none falls far behind it"


async def test_pause_resume_speed_and_stop_control_a_running_replay(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("ctl", ["replay"]))
    await send(ws, op="replay", id=5, symbols=SYMS, start=T0, end=END, speed=1)
    await next_event(ws, "replay_started")
    await next_event(ws, "quote", replay=5)
    await send(ws, op="pause", id=5)
    paused = await next_event(ws, "replay_state", id=5)
    assert paused["state"] == "paused" and paused["speed"] == 1
    # Drain what was in flight before the pause: everything up to the pong of a ping sent after
    # it (however slowly a busy machine delivers it), then until 0.3 s pass without any.
    await send(ws, op="ping", id="after-pause")
    await next_event(ws, "pong", id="after-pause")
    seen_at = time.monotonic()
    while time.monotonic() - seen_at < 0.3:
        with contextlib.suppress(TimeoutError):
            if any("replay" in e for e in await recv_events(ws, 0.3)):
                seen_at = time.monotonic()
    quiet_until = time.monotonic() + 1.5
    while (left := quiet_until - time.monotonic()) > 0:  # nothing while paused
        with contextlib.suppress(TimeoutError):
            for e in await recv_events(ws, left):
                assert e["type"] == "heartbeat", e
    await send(ws, op="resume", id=5)
    assert (await next_event(ws, "replay_state", id=5))["state"] == "running"
    await send(ws, op="speed", id=5, speed=10)
    assert (await next_event(ws, "replay_state", id=5))["speed"] == 10
    got = 0
    while got <= 20:  # 10x: about 600 events per second now; any stop fails on the wait
        got += sum(e.get("replay") == 5 for e in await recv_events(ws))
    await send(ws, op="stop", id=5)
    done = await next_event(ws, "replay_done", id=5)
    assert done["stopped"] is True and 0 < done["count"] < len(ROWS)
    await send(ws, op="pause", id=5)
    err = await next_event(ws, "error", id=5)
    assert err["code"] == "replay_finished" and not err["fatal"]
    await send(ws, op="resume", id="nope")
    assert (await next_event(ws, "error", id="nope"))["code"] == "unknown_replay"
    await ws.close()


async def test_a_recorded_gap_is_announced_in_band(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("gap", ["replay"]))
    await send(ws, op="replay", id="g", symbols=["CCC"], start=T0, end=END, speed="max")
    events, _done = await replay_all(ws, "g")
    await ws.close()
    i = next(i for i, e in enumerate(events) if e["type"] == "gap")
    gap = events[i]
    assert (gap["sym"], gap["epoch"], gap["from_seq"], gap["to_seq"]) == ("CCC", 7, *GAP)
    assert gap["missing"] == GAP[1] - GAP[0] + 1
    assert events[i - 1]["seq"] == GAP[0] - 1 and events[i + 1]["seq"] == GAP[1] + 1


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"start": END, "end": T0}, "bad_request", "start must be before end"),
        ({"speed": 0}, "bad_request", "speed"),
        ({"speed": -10}, "bad_request", "speed"),
        ({"speed": "fast"}, "bad_request", '"max"'),
        ({"start": "yesterday"}, "bad_request", "ISO-8601"),
        ({"start": "0001-01-01T00:00:00Z"}, "bad_request", "out of range"),
        ({"end": None}, "bad_request", "end is required"),
        ({"then_live": True}, "bad_request", "leave out end"),
        ({"symbols": ["ZZZ"]}, "no_symbols", "none of the symbols"),
        ({"symbols": ["BBB"]}, "no_symbols", "none of the symbols"),
    ],
)
async def test_bad_replay_requests_get_a_clear_error_and_the_socket_keeps_working(
    hist: Stack, fields: dict, code: str, words: str
) -> None:
    key = hist.key(f"bad{time.monotonic_ns()}", ["replay", "realtime"], ["AAA", "CCC", "ZZZ"])
    ws, _ = await hist.client(key)
    msg = {"op": "replay", "id": "x", "symbols": ["AAA"], "start": T0, "end": END, **fields}
    await ws.send(orjson.dumps(msg).decode())
    err = await next_event(ws, "error", id="x")
    assert err["code"] == code and words in err["message"] and not err["fatal"]
    if code == "no_symbols":
        expected = "unknown_symbol" if fields["symbols"] == ["ZZZ"] else "not_entitled"
        assert err["rejected"] == [{"sym": fields["symbols"][0], "code": expected}]
    await send(ws, op="ping", id="still")
    assert (await next_event(ws, "pong"))["id"] == "still"
    await ws.close()


async def test_numbers_too_big_for_64_bits_are_refused_and_the_socket_keeps_working(
    hist: Stack,
) -> None:
    ws, _ = await hist.client(hist.key(f"big{time.monotonic_ns()}", ["replay", "realtime"]))
    huge = 10**50
    await ws.send(
        f'{{"op":"replay","id":"a","symbols":["AAA"],"start":{T0},"end":{END},'
        f'"after":[0,{huge},"AAA"]}}'
    )
    err = await next_event(ws, "error", id="a")
    assert err["code"] == "bad_request" and "after" in err["message"] and not err["fatal"]
    await ws.send(f'{{"op":"subscribe","id":"b","symbols":["AAA"],"from_seq":{{"AAA":{huge}}}}}')
    err = await next_event(ws, "error", id="b")
    assert err["code"] == "bad_request" and "from_seq" in err["message"]
    await send(ws, op="ping", id="still")
    assert (await next_event(ws, "pong"))["id"] == "still"
    await ws.close()


async def test_replay_needs_the_replay_or_historical_scope(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("live-only", ["realtime"]))
    await send(ws, op="replay", id="s", symbols=["AAA"], start=T0, end=END)
    assert (await next_event(ws, "error", id="s"))["code"] == "forbidden"
    await ws.close()


async def test_fifty_replays_share_one_connection(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("fifty", ["replay"]))
    for i in range(50):
        sym = SYMS[i % 3]
        await send(ws, op="replay", id=i, symbols=[sym], start=T0, end=END, speed="max")
        await asyncio.sleep(0.01)
    dones: dict[int, dict] = {}
    counts: dict[int, int] = dict.fromkeys(range(50), 0)
    while len(dones) < 50:
        for e in await recv_events(ws):
            assert e["type"] != "error", e
            if e["type"] == "replay_done":
                dones[e["id"]] = e
            elif "replay" in e:
                counts[e["replay"]] += 1
    await ws.close()
    for i, done in dones.items():
        assert done["count"] == counts[i] == sum(r[0] == SYMS[i % 3] for r in ROWS)
        assert done["fingerprint"] == dones[i % 3]["fingerprint"]


async def _health(stack: Stack) -> dict:
    async with stack.http() as http:
        return (await http.get("/healthz")).json()


async def replay_figures(stack: Stack) -> dict:
    return (await _health(stack))["replays"]


IDLE = {"active": 0, "open_readers": 0, "rows_held": 0}


async def test_a_client_that_leaves_mid_replay_frees_everything(hist: Stack) -> None:
    ws, _ = await hist.client(hist.key("leaver", ["replay"]), close_timeout=0.5)
    for rid in ("x1", "x2", "x3"):
        await send(ws, op="replay", id=rid, symbols=SYMS, start=T0, end=END, speed=1)
    await next_event(ws, "trade", replay="x3")
    during = await _health(hist)
    assert during["replays"]["active"] >= 3
    await ws.close()
    await eventually(lambda: replay_figures(hist), IDLE.__eq__)


async def test_a_client_that_cannot_keep_up_slows_the_replay_and_is_told(
    tmp_path, hist: Stack
) -> None:
    """A big, fast replay to a client that stops reading for a while: the server slows the
    replay (and says so) rather than buffering; nothing is lost and the socket stays open."""
    s = Stack(tmp_path, feed=False, replay_buffer_bytes=4096)
    n_rows = 300_000  # quotes of 2 symbols, 1 ms apart: 300 s of market time, 6 s at speed 50
    write_dense_quotes(s, n_rows)
    s.start()
    try:
        ws, _ = await s.client(s.key("slow", ["replay"]), max_size=None, max_queue=1)
        end = T0 + n_rows * MS
        await send(ws, op="replay", id="f", symbols=["S0", "S1"], start=T0, end=end, speed=50)
        await next_event(ws, "quote", replay="f")
        await asyncio.sleep(3)  # not reading: TCP buffers fill, then the server must wait
        slowed, n = [], 0
        while True:
            evs = await recv_events(ws, 30)
            slowed += [e for e in evs if e.get("code") == "replay_slowed"]
            n += sum(e.get("replay") == "f" for e in evs)
            done = [e for e in evs if e["type"] == "replay_done"]
            if done:
                break
        await ws.close()
        assert slowed and slowed[0]["id"] == "f" and slowed[0]["behind_ms"] >= 1000
        assert done[0]["count"] == n_rows == n + 1  # the first quote was read above
    finally:
        s.stop()


def _history(stack: Stack) -> Stack:
    root = stack.data_dir / "history"
    half = len(ROWS) // 2
    write_history(root, ROWS[:half], "1-0", "1-9")
    write_history(root, ROWS[half:], "2-0", "2-9")
    return stack


async def test_sockets_closed_without_reading_leave_no_replay_running(tmp_path) -> None:
    """Cycles of: open a socket, ask for 10 slow replays, close it without reading. Every
    replay stops and frees its reader, also those still starting when the socket closed, and
    the server shuts down with no task left pending."""
    s = _history(Stack(tmp_path, feed=False, max_msgs_per_s=200)).start()
    try:
        key = s.key("hit-and-run", ["replay"])
        for _ in range(6):
            ws, _ = await s.client(key)
            for rid in range(10):
                await send(ws, op="replay", id=rid, symbols=SYMS, start=T0, end=END,
                           speed=0.0001)  # fmt: skip
            await ws.close()

        await eventually(lambda: replay_figures(s), IDLE.__eq__)
    finally:
        s.stop()
    assert "Task was destroyed" not in s.web.output()


async def test_the_replays_of_one_socket_hold_one_shared_row_budget(tmp_path) -> None:
    """Twenty paced replays of dense history on one socket: their open history queries hold
    about ``replay_conn_rows`` rows together, not twenty windows' worth."""
    budget = 40_000
    s = Stack(tmp_path, feed=False, max_msgs_per_s=200, replay_conn_rows=budget,
              replay_window_rows=20_000)  # fmt: skip
    write_dense_quotes(s, 200_000)  # 1,000 rows per second of market time
    s.start()
    try:
        ws, _ = await s.client(s.key("many", ["replay"]), close_timeout=0.5)
        for rid in range(20):
            await send(ws, op="replay", id=rid, symbols=["S0", "S1"], start=T0,
                       end=T0 + 200_000 * MS, speed=1)  # fmt: skip
        await eventually(lambda: replay_figures(s), lambda r: r["active"] == 20)
        held = []
        for _ in range(30):  # three seconds of samples while all twenty read
            held.append((await replay_figures(s))["rows_held"])
            await asyncio.sleep(0.1)
        await ws.close()
        await eventually(lambda: replay_figures(s), IDLE.__eq__)
    finally:
        s.stop()
    assert 0 < max(held) <= 2 * budget, held
