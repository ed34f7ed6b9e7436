"""The wire module is the one source of what the server, the client and the dashboard share.

The client (``tickpipe/wire.py``) and the dashboard (``web/wire.js``) get the constants as files
generated from ``server/wire.py``; these tests fail when one is stale, when a constant is typed
again by hand, or when an event leaves the field order the wire module gives. The helpers that
cut and mark encoded events (``split_events``, ``event_seq``, ``event_type``, ``with_fields``)
are pure and tested here without a network.
"""

from __future__ import annotations

import random
import re

import msgspec
import orjson
import pytest

import tickpipe.client
import tickpipe.wire
from server import wire
from server.live.bus import encode_events, tick_event, wire_event
from server.ticks import Quote, Trade
from tests.harness import ROOT, Stack, next_event, send


def test_the_generated_client_and_dashboard_files_are_up_to_date() -> None:
    """If this fails: run `.venv/bin/python -m server.wire` and commit both files."""
    assert (ROOT / wire.CLIENT_MODULE).read_text() == wire.client_module()
    assert (ROOT / wire.DASHBOARD_MODULE).read_text() == wire.dashboard_module()


def test_the_client_takes_its_close_codes_and_retried_errors_from_the_wire() -> None:
    assert tickpipe.client.FINAL_CLOSE_CODES is tickpipe.wire.FINAL_CLOSE_CODES
    assert tickpipe.client.RETRIED_ERRORS is tickpipe.wire.RETRIED_ERRORS
    assert {int(c) for c in wire.FINAL_CLOSE_CODES} == tickpipe.wire.FINAL_CLOSE_CODES
    assert tickpipe.wire.RETRIED_ERRORS == wire.RETRIED_ERRORS
    assert {c.name: int(c) for c in wire.CloseCode} == tickpipe.wire.CLOSE_CODES


def test_no_close_code_is_typed_again_in_the_client_or_the_dashboard() -> None:
    codes = "|".join(str(int(c)) for c in wire.CloseCode)
    for rel in ("tickpipe/client.py", "web/dashboard.js"):
        found = re.findall(rf"\b({codes})\b", (ROOT / rel).read_text())
        assert not found, f"{rel} names close codes {found}: take them from the wire module"
    assert 'from "./wire.js"' in (ROOT / "web/dashboard.js").read_text()


def test_every_key_refusal_is_a_final_close() -> None:
    assert set(wire.KEY_REFUSED) <= wire.FINAL_CLOSE_CODES
    assert wire.CloseCode.SLOW_CONSUMER not in wire.FINAL_CLOSE_CODES


async def test_the_server_serves_the_dashboard_its_wire_constants(stack: Stack) -> None:
    async with stack.http() as http:
        r = await http.get("/wire.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert r.text == wire.dashboard_module()


def _in_order(event: dict[str, object], fields: tuple[str, ...]) -> bool:
    names = [k for k in event if k in fields]
    return names == [f for f in fields if f in event]


def test_published_tick_fields_follow_the_wire_order() -> None:
    trade = Trade("AAPL", 1_790_000_000_000_000_000, 101.5, 3.0, "buy", "XNAS")
    quote = Quote("AAPL", 1_790_000_000_000_000_000, 101.0, None, 102.0, 5.0, "XNAS")
    for kind, tick in (("trade", trade), ("quote", quote)):
        event = orjson.loads(orjson.dumps(tick_event(tick, 1)))
        assert list(event)[:3] == ["type", "sym", "seq"] and event["type"] == kind
        assert _in_order(event, wire.TICK_FIELDS[kind]), list(event)
        assert set(event) <= set(wire.TICK_FIELDS[kind])


def _general(tick: Trade | Quote, seq: int) -> dict[str, object]:
    """The event of ``tick``, built one field at a time from TICK_FIELDS."""
    kind = "trade" if isinstance(tick, Trade) else "quote"
    out: dict[str, object] = {"type": kind, "sym": tick.sym, "seq": seq}
    for name in wire.TICK_FIELDS[kind][3:]:
        value = getattr(tick, name)
        if value is not None and value is not False:
            out[name] = value
    return out


@pytest.mark.parametrize(
    "tick",
    [
        Trade("BTCUSDT", 1_790_000_000_000_000_000, 37123.45, 0.0123, "buy", "BINANCE", 7, 8),
        Trade("AAPL", 1_790_000_000_000_000_000, 126.55, 1.0, None, "ALPACA", 96921, 9),
        Trade("AAPL", 1_790_000_000_000_000_000, 1e-7, 1e22, "sell", None, None, None),
        Quote("BTCUSDT", 1_790_000_000_000_000_000, 37123.45, 1.5, 37123.46, 2.25, "BINANCE", 3),
        Quote("EURUSD", 1_790_000_000_000_000_000, 1.1, 1e6, 1.0999, 1e6, "FX", 3),  # crossed
        Quote("BAND-BTC", 1_790_000_000_000_000_000, 0.00033422, None, 0.00033467, 4.0, "X", 5),
        Quote("AAPL", 1_790_000_000_000_000_000, 101.0, 5.0, 102.0, 5.0, None, None),
        Quote("AAPL", 1_790_000_000_000_000_000, None, None, 102.0, 5.0, "ALPACA", 6),  # no bid
        Quote("AAPL", 1_790_000_000_000_000_000, 101.0, 5.0, None, None, "ALPACA", 6),  # no ask
    ],
)
def test_every_tick_is_encoded_once_in_the_wire_order_whatever_path(tick: Trade | Quote) -> None:
    """``tick_event`` (with a shortcut for a venue's usual tick) gives the fields the wire module
    lists, in its order, and orjson writes them so."""
    assert list(tick_event(tick, 42).items()) == list(_general(tick, 42).items())
    encoded = orjson.loads(orjson.dumps(tick_event(tick, 42)))
    assert list(encoded.items()) == list(_general(tick, 42).items())


def _random_tick(rng: random.Random, seen: int) -> Trade | Quote:
    """A tick of any shape the feed can publish: symbols of every character a symbol may have,
    every optional field set or not, a quote crossed or not or one-sided, prices and sizes from
    1e-9 to 1e22, ids and times up to 2**63."""

    def number() -> float | int:
        r = rng.random()
        if r < 0.05:
            return rng.randint(1, 10**6)  # a source that gives a whole number as an int
        if r < 0.5:
            return round(rng.uniform(0, 10 ** rng.randint(0, 8)), rng.randint(0, 9)) or 1.0
        return rng.uniform(0.1, 1) * 10.0 ** rng.randint(-9, 22)

    def maybe(value: object) -> object:
        return value if rng.random() < 0.8 else None

    ts = rng.randint(946_684_800 * 10**9, 4_102_444_799 * 10**9)
    sym = ["AAPL", "BTC/USD", "BRK.B", "ETH-USD", "X_1", "0700"][seen % 6]
    if rng.random() < 0.5:
        return Trade(sym, ts, number(), number(), maybe(rng.choice(["buy", "sell"])),
                     maybe("BINANCE"), maybe(rng.randint(0, 2**63 - 1)), maybe(ts + 1))  # fmt: skip
    bid, ask = number(), number()
    bid_size, ask_size = maybe(number()), maybe(number())
    if rng.random() < 0.1:  # a one-sided quote: no bid, or no ask
        if rng.random() < 0.5:
            bid = bid_size = None
        else:
            ask = ask_size = None
    return Quote(sym, ts, bid, bid_size, ask, ask_size, maybe("KRAKEN"), maybe(ts + 2))


def test_a_feeds_events_are_the_bytes_orjson_writes_for_their_dicts() -> None:
    """What a feed publishes (``encode_events`` of ``wire_event``s: a venue's usual tick as a
    msgspec Struct, no dict) is byte for byte what orjson writes for the ``tick_event`` dicts,
    one event or a batch: 20,000 random ticks of every shape, numbers to 1e22 (from 1e16
    msgspec writes ``1e16`` where orjson writes ``1e+16``: such a tick takes orjson's path)."""
    rng = random.Random(5)
    ticks = [_random_tick(rng, i) for i in range(20_000)]
    for n, tick in enumerate(ticks, 1):
        assert encode_events([wire_event(tick, n)]) == orjson.dumps([tick_event(tick, n)]), tick
    events = [wire_event(t, n) for n, t in enumerate(ticks, 1)]
    assert encode_events(events) == orjson.dumps([tick_event(t, n) for n, t in enumerate(ticks, 1)])
    usual = sum(not isinstance(e, msgspec.Raw) for e in events)
    assert 2_000 < usual < 18_000, usual  # both paths taken


def test_stored_rows_replay_in_the_wire_order_with_epoch_after_the_tick_fields() -> None:
    trade = ("AAPL", "trade", 5, 77, 9, 1.5, 2.0, "sell", None, None, None, None, "X", None)
    quote = ("AAPL", "quote", 6, 77, 10, None, None, None, 1.0, 4.0, 1.2, None, None, True)
    no_bid = ("AAPL", "quote", 6, 77, 11, None, None, None, None, None, 1.2, 3.0, None, None)
    assert "bid" not in orjson.loads(wire.row_event(no_bid, "}"))  # absent, as live, not null
    for row in (trade, quote, no_bid):
        event = orjson.loads(wire.row_event(row, wire.event_end(replay="r1")))
        fields = wire.TICK_FIELDS[str(row[1])]
        assert _in_order(event, fields), list(event)
        assert list(event)[-2:] == ["epoch", "replay"]


async def test_live_ticks_arrive_in_the_wire_order(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("wire-order", ["realtime"]))
    await send(ws, op="subscribe", symbols=["AAPL"])
    for kind in wire.TICK_TYPES:
        event = await next_event(ws, kind)
        assert _in_order(event, wire.TICK_FIELDS[kind]), list(event)
    await ws.close()


# Fragments and encoded events ----------------------------------------------------------------

TRADE = '{"type":"trade","sym":"AAPL","seq":41,"ts":1790000000000000000,"price":1.5,"size":2.0}'
QUOTE = '{"type":"quote","sym":"AAPL","seq":42,"ts":1790000000000000001,"bid":1.0,"ask":1.1}'
STATUS = '{"type":"status","code":"epoch_changed","sym":"AAPL","epoch":7,"message":"m"}'


@pytest.mark.parametrize("events", [[TRADE], [TRADE, QUOTE], [STATUS, TRADE, QUOTE]])
def test_split_events_gives_back_each_event_of_a_fragment(events: list[str]) -> None:
    assert wire.split_events(",".join(events)) == events


def test_event_seq_and_type_read_an_encoded_event() -> None:
    assert wire.event_seq(TRADE) == 41 and wire.event_type(TRADE) == "trade"
    assert wire.event_seq(QUOTE) == 42 and wire.event_type(QUOTE) == "quote"
    assert wire.event_seq(STATUS) is None and wire.event_type(STATUS) == "status"


def test_with_fields_adds_fields_at_the_end_of_an_encoded_event() -> None:
    marked = wire.with_fields(TRADE.encode(), snapshot=True)
    assert marked == TRADE[:-1] + ',"snapshot":true}'
    assert orjson.loads(marked) == {**orjson.loads(TRADE), "snapshot": True}
    assert wire.event_end() == "}"
    assert wire.event_end(replay="r1") == ',"replay":"r1"}'
    assert wire.event_end(replay=7) == ',"replay":7}'
