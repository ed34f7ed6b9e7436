"""Live venue sources against a local server speaking each venue's protocol with real captured
messages (tests/venues.py): what is published equals what the venue sent, through drops,
replays, holes, bad messages and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from server.config import Settings
from server.feed.sources import (
    ADAPTERS,
    SessionOptions,
    VenueFeed,
    VenueRefused,
    adapter,
    symbol_map,
)
from server.feed.sources.adapter import ns_from_iso
from server.feed.sources.continuity import Continuity
from server.feed.tickerplant import Tickerplant
from server.ticks import Quote, Trade, reject_reason
from server.wire import split_events
from tests.harness import WAIT_S, RedisProcess, eventually
from tests.venues import FakeVenue, lines, received

CLI_S = 90.0  # a `tickpipe feed` process to its exit: its imports alone are slow on a busy machine

SECRET = ("AKFAKEKEYID0123456789", "fakesecret-9f8e7d6c5b4a39281706f5e4d3c2b1a0")

# Per source: the captured messages the market sends, and the symbols subscribed.
BINANCE_FUTURES = lines("binance/usdm_futures_combined_trade.jsonl") + lines(
    "binance/usdm_futures_combined_bookticker_aggtrade.jsonl"
)
BINANCE_SPOT = lines("binance/spot_combined_capture.jsonl")
COINBASE = lines("coinbase/exchange_feed_capture.jsonl")
KRAKEN = lines("kraken/v2_trade_docs.jsonl") + lines("kraken/v2_ticker_docs.jsonl")
ALPACA = ["[" + ",".join(lines("alpaca/stocks_v2_data_points_docs.jsonl")) + "]"]


def _payloads(messages: list[str]) -> list[dict[str, Any]]:
    out = []
    for text in messages:
        msg = orjson.loads(text)
        msg = msg.get("data", msg) if isinstance(msg, dict) else msg
        out.extend(msg if isinstance(msg, list) else [msg])
    return out


def _binance_expected(messages: list[str], streams: set[str]) -> list[dict[str, Any]]:
    """The ticks a Binance combined stream's messages for ``streams`` must become."""
    out = []
    for text in messages:
        msg = orjson.loads(text)
        if msg["stream"] not in streams:
            continue
        d = msg["data"]
        if d.get("e") in ("trade", "aggTrade"):
            out.append({"type": "trade", "sym": d["s"], "ts": d["T"] * 10**6, "price": d["p"],
                        "size": d["q"], "side": "sell" if d["m"] else "buy",
                        "trade_id": d["t" if d["e"] == "trade" else "a"]})  # fmt: skip
        else:
            ts = d["T"] * 10**6 if "T" in d else None
            out.append({"type": "quote", "sym": d["s"], "ts": ts, "bid": d["b"],
                        "bid_size": d["B"], "ask": d["a"], "ask_size": d["A"]})  # fmt: skip
    return out


def _coinbase_expected(messages: list[str]) -> list[dict[str, Any]]:
    out = []
    for msg in _payloads(messages):
        if msg["type"] == "match":
            out.append({"type": "trade", "sym": msg["product_id"], "ts": ns_from_iso(msg["time"]),
                        "price": msg["price"], "size": msg["size"],
                        "side": {"buy": "sell", "sell": "buy"}[msg["side"]],
                        "trade_id": msg["trade_id"]})  # fmt: skip
        elif msg["type"] == "ticker":
            out.append({"type": "quote", "sym": msg["product_id"], "ts": ns_from_iso(msg["time"]),
                        "bid": msg["best_bid"], "ask": msg["best_ask"]})  # fmt: skip
    return out


def _same(event: dict[str, Any], want: dict[str, Any]) -> bool:
    """An event equals the venue's message: decimals compared as decimals, every field."""
    for k, v in want.items():
        if v is None:  # no venue time: the receive time is the event time
            if event[k] != event["recv_ts"]:
                return False
        elif k in ("price", "size", "bid", "bid_size", "ask", "ask_size"):
            if Decimal(repr(event[k])) != Decimal(str(v)):
                return False
        elif event.get(k) != v:
            return False
    return True


def _assert_each_symbol_same(
    got: list[dict[str, Any]], want: list[dict[str, Any]], syms: list[str]
) -> None:
    """Per symbol, the published events are the venue's messages in order, seq 1, 2, 3, ..."""
    for sym in syms:
        mine = [e for e in got if e["sym"] == sym]
        theirs = [w for w in want if w["sym"] == sym]
        assert all(_same(e, w) for e, w in zip(mine, theirs, strict=True)), sym
        assert [e["seq"] for e in mine] == list(range(1, len(mine) + 1)), sym


# -- pure parts ----------------------------------------------------------------------------------


def test_iso_times_parse_to_the_nanosecond() -> None:
    assert ns_from_iso("2021-04-17T16:44:05.529257Z") == 1618677845529257000
    assert ns_from_iso("2021-02-22T15:51:45.335689322Z") == 1614009105335689322
    assert ns_from_iso("2021-09-17T02:02:00Z") == 1631844120000000000
    for bad in ("yesterday", "2021-04-17 16:44:05Z", "2021-04-17T16:44:05.12x4Z"):
        with pytest.raises(ValueError):
            ns_from_iso(bad)


@pytest.mark.parametrize(
    ("fraction", "ns"),
    [("", 0), (".2", 200_000_000), (".208", 208_000_000), (".208123", 208_123_000),
     (".208123456", 208_123_456), (".000000001", 1), (".000", 0), (".999999999", 999_999_999)],
)  # fmt: skip
def test_iso_time_fractions_of_any_length_up_to_nanoseconds(fraction, ns) -> None:
    second = 1614009104_000_000_000  # 2021-02-22T15:51:44Z
    assert ns_from_iso(f"2021-02-22T15:51:44{fraction}Z") == second + ns
    assert ns_from_iso(f"2021-02-22T15:51:44{fraction}Z") == second + ns  # the second known now


def test_iso_times_across_a_change_of_second_day_month_and_year() -> None:
    """Each second is worked out once: the next message's may be another day."""
    pairs = [
        ("2021-02-22T23:59:59.999999999Z", "2021-02-23T00:00:00.000000001Z"),
        ("2021-02-28T23:59:59.999999999Z", "2021-03-01T00:00:00.000000001Z"),
        ("2024-02-28T23:59:59.999999999Z", "2024-02-29T00:00:00.000000001Z"),  # a leap year
        ("2024-02-29T23:59:59.999999999Z", "2024-03-01T00:00:00.000000001Z"),
        ("2020-12-31T23:59:59.999999999Z", "2021-01-01T00:00:00.000000001Z"),
    ]
    for before, after in pairs:
        assert ns_from_iso(after) - ns_from_iso(before) == 2, (before, after)
    assert ns_from_iso("2021-01-01T00:00:00Z") == 1609459200 * 10**9


def test_iso_times_agree_with_the_calendar() -> None:
    """Against ``datetime`` over 2000-2099, microsecond fractions (what datetime holds),
    also after the cache of seconds was emptied."""
    rng = random.Random(12)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for i in range(3000):
        us = rng.randrange(946684800 * 10**6, 4102444800 * 10**6)
        when = epoch + dt.timedelta(microseconds=us)
        text = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        want = us * 1000
        assert ns_from_iso(text) == want, text
        if i == 1500:
            adapter._second_ns.clear()


def test_a_leap_second_is_the_next_minutes_first_as_in_posix_time() -> None:
    assert ns_from_iso("2016-12-31T23:59:60Z") == ns_from_iso("2017-01-01T00:00:00Z")
    assert ns_from_iso("2016-12-31T23:59:60.5Z") == ns_from_iso("2017-01-01T00:00:00.5Z")


@pytest.mark.parametrize(
    "bad",
    [
        "2021-02-22T15:51:44.208+00:00",  # Alpaca, Coinbase and Kraken write UTC as Z
        "2021-02-22T15:51:44+00:00", "2021-02-22T15:51:44.208z", "2021-02-22t15:51:44.208Z",
        "2021-02-22T15:51:44.Z", "2021-02-22T15:51:44..208Z", "2021-02-22T15:51:44.2081234567Z",
        "2021-02-22T15:51:44.208ZZ", "2021-02-22T15:51:44.-20Z", "2021-02-22T15:51:44. 20Z",
        "2021-02-22T15:51:44.2_0Z", "2021-02-22T15:51:44.²Z", "2021-02-22T15:51:4",
        "2021-02-22T15:51:4Z", "+021-02-22T15:51:44Z", "2021-0２-22T15:51:44Z", "",
        "2021-02-29T00:00:00Z", "2021-02-30T00:00:00Z", "2021-04-31T00:00:00Z",
        "2021-02-00T00:00:00Z", "2021-00-01T00:00:00Z", "2021-13-01T00:00:00Z",
        "2021-02-22T24:00:00Z", "2021-02-22T12:60:00Z", "2021-02-22T12:00:61Z",
        "0000-01-01T00:00:00Z",
    ],
)  # fmt: skip
def test_odd_or_impossible_iso_times_are_refused(bad) -> None:
    ns_from_iso("2021-02-22T15:51:44.208Z")  # the second is known: its odd forms still fail
    with pytest.raises(ValueError):
        ns_from_iso(bad)


@pytest.mark.parametrize("bad", [None, 1614009104, 1.5, b"2021-02-22T15:51:44Z", ["x"], {}])
def test_an_iso_time_that_is_not_a_string_is_refused(bad) -> None:
    with pytest.raises(TypeError):
        ns_from_iso(bad)


class _Collect:
    """A sink that keeps what an adapter gave it."""

    def __init__(self) -> None:
        self.ticks: list[Trade | Quote] = []
        self.calls: list[tuple[str, str]] = []
        self.snapshots: list[bool] = []
        self.keys: list[object] = []  # each trade's key for the duplicate check
        self.vouched = True  # no ``unscreened`` call

    def trade(self, tick: Trade, key: object = None, snapshot: bool = False) -> None:
        self.ticks.append(tick)
        self.snapshots.append(snapshot)
        self.keys.append(key)

    def quote(self, tick: Quote, update_id: int | None = None, snapshot: bool = False) -> None:
        self.ticks.append(tick)
        self.snapshots.append(snapshot)

    def unscreened(self) -> None:
        self.vouched = False

    def __getattr__(self, name: str) -> Any:  # (``refused`` also gets the symbol: "" or one)
        return lambda *args: self.calls.append((name, args[-1]))


def _decimal_fields(kind: str, p: dict[str, Any]) -> tuple[str, ...]:
    """The fields of a venue payload that become a tick's prices and sizes."""
    if kind.startswith("binance"):
        if p.get("e") in ("trade", "aggTrade"):
            return ("p", "q")
        return ("b", "B", "a", "A") if p.get("e", "bookTicker") == "bookTicker" else ()
    if kind == "coinbase":
        return {"match": ("price", "size"), "ticker": ("best_bid", "best_ask")}.get(p["type"], ())
    if kind == "kraken":
        return ("price", "qty") if "trade_id" in p else ("bid", "bid_qty", "ask", "ask_qty")
    return {"t": ("p", "s"), "q": ("bp", "bs", "ap", "as")}.get(p["T"], ())


@pytest.mark.parametrize(
    ("kind", "messages"),
    [("binance", BINANCE_SPOT), ("binance-futures", BINANCE_FUTURES), ("coinbase", COINBASE),
     ("kraken", KRAKEN), ("alpaca", ALPACA)],
)  # fmt: skip
def test_every_captured_decimal_is_published_with_the_venues_digits(kind, messages) -> None:
    """A price or size goes out (orjson's shortest text of the double) with the venue's own
    digits: no float round-trip surprise in any captured message."""
    payloads = [p for p in _payloads(messages) if "data" not in p or "channel" not in p]
    payloads = [q for p in payloads for q in (p["data"] if "channel" in p else [p])]
    syms = {p.get("s") or p.get("product_id") or p.get("symbol") or p.get("S") for p in payloads}
    sink = _Collect()
    names = {s: s for s in syms if isinstance(s, str)}
    adapter = ADAPTERS[kind](names, sink, {"key_id": "", "secret_key": ""})
    for text in messages:
        adapter.on_message(text, 1_700_000_000_000_000_000)
    published = sorted(
        Decimal(orjson.dumps(getattr(t, f)).decode())
        for t in sink.ticks
        for f in ("price", "size", "bid", "bid_size", "ask", "ask_size")
        if getattr(t, f, None) is not None
    )
    given = sorted(Decimal(str(p[f])) for p in payloads for f in _decimal_fields(kind, p))
    assert published and published == given


@pytest.mark.parametrize(
    ("kind", "message", "field"),
    [("coinbase", COINBASE[0], "trade_id"), ("coinbase", COINBASE[1], "sequence"),
     ("kraken", lines("kraken/v2_trade_docs.jsonl")[0], "trade_id"),
     ("alpaca", ALPACA[0], "i")],
)  # fmt: skip
def test_an_id_that_is_not_a_json_integer_is_malformed(kind, message, field) -> None:
    """Trade and update ids must be JSON integers: one sent as a string is a malformed message,
    not a tick whose id later compares with integers."""
    bad = message.replace(f'"{field}":', f'"{field}":"', 1)
    head, _, tail = bad.partition(f'"{field}":"')
    digits = len(tail) - len(tail.lstrip("0123456789"))
    bad = head + f'"{field}":"' + tail[:digits] + '"' + tail[digits:]
    sink = _Collect()
    ADAPTERS[kind]({s: s for s in ("BAND-BTC", "MATIC/USD", "AAPL")}, sink, {}).on_message(
        bad, 1_700_000_000_000_000_000
    )
    assert not any(getattr(t, "trade_id", 0) == tail[:digits] for t in sink.ticks)
    assert ("malformed", f"TypeError: expected an integer, got str '{tail[:digits]}'") in sink.calls


def test_alpaca_data_points_become_ticks_and_the_rest_is_counted() -> None:
    """One frame of several points: trades and quotes as ticks (a stock trade's replay key is
    exchange and id, a crypto trade's its id with the taker's side), each other point counted
    on its own without harming the rest of the frame."""
    points = lines("alpaca/stocks_v2_data_points_docs.jsonl")
    trade, quote, bar, status = (orjson.loads(p) for p in points)
    no_price = {k: v for k, v in trade.items() if k != "p"}
    frame = [trade, {**trade, "S": "MSFT"}, {**trade, "S": 7}, no_price,
             [], quote, bar, status, {**quote, "t": "2021-02-22T15:51:45.335689322+00:00"},
             {**trade, "t": "2021-02-22T15:51:45Z", "x": "V", "i": 96922}]  # fmt: skip
    sink = _Collect()
    ADAPTERS["alpaca"]({"AAPL": "AAPL", "AMD": "AMD"}, sink, {}).on_message(orjson.dumps(frame), 5)
    assert sink.ticks == [
        Trade("AAPL", 1614009104208000000, 126.55, 1.0, None, "ALPACA", 96921, 5),
        Quote("AMD", 1614009105335689322, 87.66, 1.0, 87.68, 4.0, "ALPACA", 5),
        Trade("AAPL", 1614009105000000000, 126.55, 1.0, None, "ALPACA", 96922, 5),
    ]
    assert sink.keys == [("D", 96921), ("V", 96922)]
    assert [name for name, _ in sink.calls] == ["unexpected", "unexpected", "malformed",
                                                "malformed", "unexpected", "unexpected",
                                                "malformed"]  # fmt: skip
    assert sink.calls[2] == ("malformed", "KeyError: 'p'")
    crypto = {"T": "t", "S": "BTC/USD", "p": 47000.5, "s": 0.0123, "i": 5, "tks": "S",
              "t": "2022-05-01T00:00:00.123456789Z"}  # fmt: skip
    sink = _Collect()
    crypto_adapter = ADAPTERS["alpaca-crypto"]({"BTC/USD": "BTC/USD"}, sink, {})
    crypto_adapter.on_message(orjson.dumps([crypto]), 5)
    assert sink.ticks == [Trade("BTC/USD", 1651363200123456789, 47000.5, 0.0123, "sell",
                                "ALPACA-CRYPTO", 5, 5)]  # fmt: skip
    assert sink.keys == [None]
    for frame_text in ('{"T":"t"}', "[{", b"\x00"):
        sink = _Collect()
        ADAPTERS["alpaca"]({"AAPL": "AAPL"}, sink, {}).on_message(frame_text, 5)
        assert [name for name, _ in sink.calls] == ["malformed"] and not sink.ticks


def test_alpacas_documented_sip_session_becomes_its_ticks() -> None:
    """The frames of Alpaca's documented SIP session, as the venue framed them (one quote; three
    trades of three exchanges; one quote): every point a tick with the venue's values, times to
    the nanosecond (one has 8 fraction digits), each stock trade told apart by exchange and id."""
    frames = received("alpaca/stocks_v2_sip_wscat_docs.txt")
    assert [orjson.loads(f)[0]["T"] for f in frames[:3]] == ["success", "success", "subscription"]
    sink = _Collect()
    adapter = ADAPTERS["alpaca"]({"AAPL": "AAPL", "AMD": "AMD", "CLDR": "CLDR"}, sink, {})
    for frame in frames[3:]:  # after connecting, signing in and subscribing
        adapter.on_message(frame.encode(), 5)

    def ns(text: str) -> int:  # the time as given, from its second and its fraction's digits
        second, _, fraction = text.rstrip("Z").partition(".")
        epoch = dt.datetime.fromisoformat(second).replace(tzinfo=dt.UTC).timestamp()
        return int(epoch) * 10**9 + int(fraction.ljust(9, "0"))

    assert sink.ticks == [
        Quote("AMD", ns("2023-04-06T11:54:21.670905508Z"), 91.95, 2.0, 91.98, 1.0, "ALPACA", 5),
        Trade("AAPL", ns("2023-04-06T11:54:26.838232225Z"), 162.92, 3.0, None, "ALPACA", 628, 5),
        Trade("AAPL", ns("2023-04-06T11:54:26.838562809Z"), 162.92, 3.0, None, "ALPACA", 75, 5),
        Trade("AAPL", ns("2023-04-06T11:54:26.83915973Z"), 162.91, 71.0, None, "ALPACA", 1465, 5),
        Quote("AMD", ns("2023-04-06T11:54:27.924933876Z"), 91.9, 1.0, 91.98, 1.0, "ALPACA", 5),
    ]
    assert sink.ticks[3].ts % 10**9 == 839_159_730
    assert sink.keys == [("K", 628), ("Z", 75), ("P", 1465)]
    assert not sink.calls  # nothing counted as unexpected or malformed


def test_alpacas_typed_reading_gives_what_reading_point_by_point_gives() -> None:
    """A frame of trades and quotes only is decoded typed (``on_message``); any other frame
    point by point (``_frame``). Both give the same ticks, keys and counts for the frames the
    typed decoding takes, and a frame it refuses (a price as a string, another kind of point)
    still gives its trades and quotes."""
    trade, quote = (orjson.loads(p) for p in lines("alpaca/stocks_v2_data_points_docs.jsonl")[:2])
    crypto = {"T": "t", "S": "BTC/USD", "p": 47000.5, "s": 0.0123, "i": 5, "tks": "B",
              "t": "2022-05-01T00:00:00.123456789Z", "x": "CBSE"}  # fmt: skip
    frames = [
        [trade, quote],
        [quote, {**trade, "i": 96922, "x": "V", "t": "2021-02-22T15:51:45Z"}, {**quote, "bs": 3}],
        [{**trade, "S": "MSFT"}, trade],  # a symbol not subscribed: counted, the rest published
        [{**trade, "t": "not a time"}, quote],  # a bad time: that point malformed
        [{**quote, "t": "2021-02-22T15:51:45.335689322+00:00"}, trade],
        [{**trade, "p": 126, "s": 100}],  # JSON integers
        [{k: v for k, v in trade.items() if k != "x"}],  # no exchange
        [crypto, {**crypto, "i": 6, "tks": "S"}, {**crypto, "i": 7, "tks": "?"}],
        [],
    ]
    for kind, names in (("alpaca", {"AAPL": "AAPL", "AMD": "AMD"}),
                        ("alpaca-crypto", {"BTC/USD": "BTC/USD"})):  # fmt: skip
        for frame in frames:
            typed, by_point = _Collect(), _Collect()
            ADAPTERS[kind](names, typed, {}).on_message(orjson.dumps(frame), 5)
            ADAPTERS[kind](names, by_point, {})._frame(orjson.dumps(frame), 5)
            seen = (typed.ticks, typed.keys, typed.calls)
            assert seen == (by_point.ticks, by_point.keys, by_point.calls), (kind, frame)
    sink = _Collect()
    frame = [{**trade, "p": "126.55"}, quote, {"T": "b", "S": "AAPL"}]  # refused by the typing
    ADAPTERS["alpaca"]({"AAPL": "AAPL", "AMD": "AMD"}, sink, {}).on_message(orjson.dumps(frame), 5)
    assert [t.price if isinstance(t, Trade) else t.bid for t in sink.ticks] == [126.55, 87.66]
    assert sink.calls == [("unexpected", "data point 'b'")]


def test_typed_decoding_reads_every_decimal_as_float_does() -> None:
    """msgspec's number parser (Alpaca's and Kraken's data messages) gives the double that
    ``float()`` gives for the same text: the venue's decimal, nearest double, for 20,000
    random decimals of 1 to 17 significant digits and exponents -12..12 and a few hard ones."""
    rng = random.Random(12)
    texts = ["0.1", "0.3", "126.55", "8.745e-05", "0.00000001", "1e-7", "99999999999999.99",
             "2.2250738585072014e-308", "9007199254740993",
             "0.1000000000000000055511151231257827"]  # fmt: skip
    for _ in range(20_000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 17)))
        digits = str(rng.randint(1, 9)) + digits[1:]
        point = rng.randint(0, len(digits))
        text = (digits[:point] or "0") + ("." + digits[point:] if point < len(digits) else "")
        texts.append(text + (f"e{rng.randint(-12, 12)}" if rng.random() < 0.3 else ""))
    quote = lines("alpaca/stocks_v2_data_points_docs.jsonl")[1]
    frame = "[" + ",".join(quote.replace('"bp":87.66', f'"bp":{t}') for t in texts) + "]"
    sink = _Collect()
    ADAPTERS["alpaca"]({"AMD": "AMD"}, sink, {}).on_message(frame, 5)
    assert not sink.calls and [q.bid for q in sink.ticks] == [float(t) for t in texts]


def test_krakens_typed_reading_gives_what_reading_the_message_gives() -> None:
    """A trade, ticker or heartbeat message is decoded typed (``on_message``); any other one
    read whole (``_message``). Both give the same ticks, snapshot flags and counts for the
    messages the typed decoding takes."""
    trades = orjson.loads(lines("kraken/v2_trade_docs.jsonl")[0])
    ticker = orjson.loads(lines("kraken/v2_ticker_docs.jsonl")[0])
    t0, q0 = trades["data"][0], ticker["data"][0]
    messages = [
        trades,
        ticker,
        {**trades, "type": "update"},
        {**ticker, "type": "update", "data": [{k: v for k, v in q0.items() if k != "timestamp"}]},
        {**trades, "data": [{**t0, "symbol": "XBT/USD"}, {**t0, "side": "sell"}]},
        {**trades, "data": [{**t0, "side": "?", "price": 1, "qty": 2}]},  # JSON integers
        {**trades, "data": [t0, {**t0, "timestamp": "not a time"}, t0]},  # the message fails
        {"channel": "heartbeat"},
        {**trades, "data": []},
    ]
    names = {"MATIC/USD": "MATIC/USD", "ALGO/USD": "ALGO/USD"}
    for msg in messages:
        typed, whole = _Collect(), _Collect()
        ADAPTERS["kraken"](names, typed, {}).on_message(orjson.dumps(msg), 5)
        ADAPTERS["kraken"](names, whole, {})._message(orjson.dumps(msg), 5)
        seen = (typed.ticks, typed.snapshots, typed.calls)
        assert seen == (whole.ticks, whole.snapshots, whole.calls), msg
    sink = _Collect()
    refused = {**trades, "data": [{**t0, "price": "0.5147"}]}  # refused by the typing
    ADAPTERS["kraken"](names, sink, {}).on_message(orjson.dumps(refused), 5)
    assert [t.price for t in sink.ticks] == [0.5147] and not sink.calls


def _hostile_frames(kind: str, rng: random.Random, n: int) -> list[str]:
    """``n`` trade and quote messages of ``kind`` (Alpaca's points, Kraken's trade and ticker
    messages) whose prices, sizes and times are drawn from what the tick checks admit and what
    they reject, as JSON text (numbers beyond a double's range and below its smallest)."""
    numbers = ["126.55", "1", "0.00000001", "5e-324", "1e308", "0", "0.0", "-1", "-0.5",
               "1e-400", "1e309", '"126.55"', "null", "true"]  # fmt: skip
    good_numbers = numbers[:5]
    times = ["2021-02-22T15:51:44.208Z", "2000-01-01T00:00:00Z",
             "2099-12-31T23:59:59.999999999Z", "1999-12-31T23:59:59.999999999Z",
             "2100-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "not a time"]  # fmt: skip
    counter = iter(range(1, 10**9))

    def next_id() -> int:  # now and then one past what 64 bits hold (signed, unsigned)
        # (in the last tenth only: after an id of 2**63 and more Kraken's consecutive ids are
        # all replays of it, dropped)
        k = next(counter)
        return k if len(out) < n * 0.9 or rng.random() < 0.9 else rng.choice([2**63, 2**64]) + k

    def unread() -> str:  # a field the adapter never reads: now and then beyond a double
        return rng.choice(["0.5", "0.5", "0.5", "1e400"])

    def num() -> str:  # mostly good ones, so that whole messages pass the typing too
        return rng.choice(good_numbers if rng.random() < 0.85 else numbers)

    def ts() -> str:
        return rng.choice(times[:3] if rng.random() < 0.85 else times)

    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        if kind == "kraken":
            if rng.random() < 0.5:
                data = ",".join(f'{{"symbol":"MATIC/USD","side":"buy","price":{num()},'
                                f'"qty":{num()},"ord_type":"market","trade_id":{next_id()},'
                                f'"timestamp":"{ts()}"}}' for _ in range(k))  # fmt: skip
                out.append(f'{{"channel":"trade","type":"update","data":[{data}]}}')
            else:
                data = ",".join(f'{{"symbol":"MATIC/USD","bid":{num()},"bid_qty":{num()},'
                                f'"ask":{num()},"ask_qty":{num()},"last":{unread()},'
                                f'"timestamp":"{ts()}"}}' for _ in range(k))  # fmt: skip
                out.append(f'{{"channel":"ticker","type":"update","data":[{data}]}}')
            continue
        points = [
            f'{{"T":"t","S":"AAPL","i":{next_id()},"x":"V","p":{num()},"s":{num()},'
            f'"t":"{ts()}","c":[{unread()}],"z":"C"}}'
            if rng.random() < 0.5
            else f'{{"T":"q","S":"AAPL","bx":"U","bp":{num()},"bs":{num()},"ax":"Q",'
            f'"ap":{num()},"as":{num()},"c":["R"],"t":"{ts()}","z":"C"}}'
            for _ in range(k)
        ]
        out.append("[" + ",".join(points) + "]")
    return out


def _outcome(kind: str, frames: list[tuple[str, int]], trust: bool) -> tuple[list[Any], ...]:
    """What a feed of ``kind`` publishes of each frame (``trust``: a vouched batch as it is, any
    other screened; else every batch screened), the reasons of what the screen rejected, and
    the feed's counts."""
    names = {"AAPL": "AAPL"} if kind == "alpaca" else {"MATIC/USD": "MATIC/USD"}
    feed = VenueFeed(ADAPTERS[kind], names, secrets={"key_id": "", "secret_key": ""})
    published: list[Any] = []
    rejected: list[Any] = []
    vouched: list[Any] = []
    for raw, recv_ns in frames:
        feed.adapter.on_message(raw, recv_ns)
        batch = feed.due(0, 0)
        reasons = [reject_reason(t) for t in batch]
        good = [t for t, why in zip(batch, reasons, strict=True) if why is None]
        if trust:
            assert (batch if feed.screened else good) == good, raw  # a vouched batch is all good
        published.append(batch if trust and feed.screened else good)
        rejected.append([why for why in reasons if why is not None])
        vouched.append(feed.screened and bool(batch))
    counts = [feed.malformed_count, feed.unexpected_count, feed.continuity.duplicates]
    return published, rejected, counts, vouched


@pytest.mark.parametrize("kind", ["alpaca", "kraken"])
def test_what_a_typed_adapter_vouches_for_passes_the_tick_checks(kind, monkeypatch) -> None:
    """Alpaca's and Kraken's typed decoding holds prices, sizes and times to the tick checks, so
    the tickerplant does not screen a batch its adapter vouched for (``screened``). Over 3,000
    messages of good and bad numbers and times (zero, negative, below and beyond a double's
    range, strings; before 2000, from 2100; ids past 64 bits; fields never read beyond a
    double), each handed over alone: a vouched batch passes the checks, and what is published,
    rejected (by reason) and counted is what reading every message as its documented types
    and screening every tick gives (the checked decoding replaced by the plain one)."""
    frames = []
    rng = random.Random(7)
    for raw in _hostile_frames(kind, rng, 3000):
        frames.append((raw, time.time_ns() if rng.random() < 0.97 else 5))  # (a clock before 2000)
    published, rejected, counts, vouched = _outcome(kind, frames, trust=True)
    module = sys.modules[ADAPTERS[kind].__module__]
    checked, plain = (
        ("_CHECKED_POINTS", "_DATA_POINTS") if kind == "alpaca" else ("_CHECKED", "_DATA")
    )
    monkeypatch.setattr(module, checked, getattr(module, plain))
    as_read = _outcome(kind, frames, trust=False)
    assert (published, rejected, counts) == as_read[:3]
    # Both kinds of batch were seen: vouched ones, and ticks the screen had to reject.
    assert sum(vouched) > 1000 and sum(map(len, rejected)) > 100, (sum(vouched), counts)
    assert counts[0] > 10, counts  # and messages that neither typed decoding takes


def test_a_price_the_checks_reject_costs_only_its_own_tick() -> None:
    """A message whose price the tick checks reject (-1; 0 for a trade, where a quote's 0 is an
    empty side) is still read typed, so the good
    ticks beside it are published and the bad one is counted as ``bad_price``, whatever else
    the message carries (a field never read beyond a double, which orjson would refuse); an id
    past 64 bits is malformed, counted, never handed over."""
    trade = ('{"T":"t","S":"AAPL","i":%d,"x":"V","p":%s,"s":1,"t":"2021-02-22T15:51:44.208Z",'
             '"c":[%s],"z":"C"}')  # fmt: skip
    kraken_trade = ('{"symbol":"MATIC/USD","side":"buy","price":%s,"qty":1,"ord_type":"market",'
                    '"trade_id":%d,"timestamp":"2023-09-25T07:49:37.708706Z"}')  # fmt: skip
    cases = [
        ("alpaca", "[" + trade % (1, "126.5", "1e400") + "," + trade % (2, "0", '"@"') + "]",
         [("AAPL", 1)], ["bad_price"], 0),
        ("alpaca", "[" + trade % (2**64, "126.5", '"@"') + "," + trade % (2, "0", '"@"') + "]",
         [], ["bad_price"], 1),
        ("kraken", '{"channel":"ticker","type":"update","data":[{"symbol":"MATIC/USD","bid":0.5,'
         '"bid_qty":1,"ask":0.6,"ask_qty":1,"last":1e400},{"symbol":"MATIC/USD","bid":-1,'
         '"bid_qty":1,"ask":0.6,"ask_qty":1}]}', [("MATIC/USD", None)], ["bad_price"], 0),
        ("kraken", '{"channel":"trade","type":"update","data":[' + kraken_trade % ("0.5", 7)
         + "," + kraken_trade % ("-1", 8) + "]}", [("MATIC/USD", 7)], ["bad_price"], 0),
        ("kraken", '{"channel":"trade","type":"update","data":[' + kraken_trade % ("0.5", 2**64)
         + "]}", [], [], 1),
    ]  # fmt: skip
    for kind, raw, published, rejected, malformed in cases:
        ticks, reasons, counts, _ = _outcome(kind, [(raw, time.time_ns())], trust=True)
        ids = [(t.sym, getattr(t, "trade_id", None)) for t in ticks[0]]
        assert (ids, reasons[0], counts[0]) == (published, rejected, malformed), raw


def test_continuity_drops_replays_and_finds_holes_in_trade_ids() -> None:
    c = Continuity(consecutive_trade_ids=True)
    assert c.trade("X", 10, 0) == (True, None)
    assert c.trade("X", 11, 0) == (True, None)
    assert c.trade("X", 11, 0) == (False, None)  # replayed after a reconnect
    ok, gap = c.trade("X", 15, 7)
    assert ok and gap is not None and (gap.first, gap.last, gap.missing) == (12, 14, 3)
    assert c.trade("Y", 3, 0) == (True, None)  # per symbol
    assert c.duplicates == 1
    q = Quote("X", 1, 1.0, 1.0, 2.0, 1.0)
    assert c.quote(q, None) and not c.quote(q, None)
    assert c.quote(q, 5) and not c.quote(q, 5) and c.quote(q, 6)


def test_symbols_are_the_venues_unless_mapped() -> None:
    assert symbol_map(["btcusdt", "BTC/USD"], []) == {"BTCUSDT": "BTCUSDT", "BTC/USD": "BTC/USD"}
    assert symbol_map(["BTCUSDT"], ["btcusdt=BTC-USDT"]) == {"BTCUSDT": "BTC-USDT"}
    with pytest.raises(ValueError, match="not among --symbols"):
        symbol_map(["BTCUSDT"], ["ETHUSDT=ETH"])
    with pytest.raises(ValueError, match="VENUE_SYMBOL=SYMBOL"):
        symbol_map(["BTCUSDT"], ["BTCUSDT"])
    with pytest.raises(ValueError, match="cannot be a tickpipe symbol"):
        symbol_map(["BTC USD"], [])
    with pytest.raises(ValueError, match="BTCUSDT and BTCUSDC would both be published as BTC"):
        symbol_map(["BTCUSDT", "BTCUSDC"], ["BTCUSDT=BTC", "BTCUSDC=BTC"])
    with pytest.raises(ValueError, match="would both be published as ETHUSDT"):
        symbol_map(["BTCUSDT", "ETHUSDT"], ["BTCUSDT=ETHUSDT"])


# -- against the local venue and a real Redis ----------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    proc = RedisProcess(tmp_path_factory.mktemp("sources"))
    proc.start()
    yield proc.url
    proc.kill()


class Running:
    """A feed process's tickerplant and venue session, in this test's event loop."""

    def __init__(self, plant: Tickerplant, feed: VenueFeed, task: asyncio.Task[None]) -> None:
        self.plant, self.feed, self.task = plant, feed, task

    async def epoch(self, sym: str) -> bytes:
        r = aioredis.Redis.from_url(self.plant.settings.redis_url)
        try:
            return await r.hget(f"tp:sym:{sym}", "epoch")
        finally:
            await r.aclose()

    async def events(self, sym: str) -> list[dict[str, Any]]:
        r = aioredis.Redis.from_url(self.plant.settings.redis_url)
        try:
            entries = await r.xrange(f"tp:hist:{sym}")
        finally:
            await r.aclose()
        return [orjson.loads(e) for _id, f in entries for e in split_events(f[b"d"].decode())]


@contextlib.asynccontextmanager
async def running(
    redis_url: str, venue: FakeVenue, kind: str, symbols: list[str], **opts: Any
) -> AsyncIterator[Running]:
    if opts.pop("flush", True):
        r = aioredis.Redis.from_url(redis_url)
        await r.flushdb()
        await r.aclose()
    settings = Settings(redis_url=redis_url, feed_name=f"test-{kind}", feed_batch_ms=5)
    adapter = ADAPTERS[kind]
    if opts.pop("agg_trades", False):
        adapter = type(adapter.__name__, (adapter,), {"agg_trades": True})
    adapter = opts.pop("adapter", adapter)
    opts.setdefault("backoff_min_s", 0.05)
    opts.setdefault("backoff_max_s", 0.2)
    options = SessionOptions(**opts)
    secrets = {"key_id": SECRET[0], "secret_key": SECRET[1]}
    feed = VenueFeed(adapter, symbol_map(symbols, []), venue.url, secrets, options)
    plant = Tickerplant(settings, feed)
    task = asyncio.create_task(plant.run())
    try:
        yield Running(plant, feed, task)
    finally:
        plant.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT_S)


async def _published(run: Running, syms: list[str], n: int) -> list[dict[str, Any]]:
    async def all_events() -> list[dict[str, Any]]:
        return [e for s in syms for e in await run.events(s)]

    return await eventually(all_events, lambda evs: len(evs) >= n, what=f"{n} published ticks")


def _by_time(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["sym"], e["type"], e["seq"]))


async def test_binance_futures_trades_and_quotes_are_the_venues_messages(redis_url) -> None:
    venue = await FakeVenue("binance-futures").start()
    syms = ["BTCUSDT", "SUSHIUSDT", "CTKUSDT"]
    streams = {f"{s.lower()}@{k}" for s in syms for k in ("trade", "bookTicker")}
    want = _binance_expected(BINANCE_FUTURES, streams)
    try:
        async with running(redis_url, venue, "binance-futures", syms) as run:
            await venue.subscribed(1)
            await venue.emit(BINANCE_FUTURES)
            got = await _published(run, syms, len(want))
            await asyncio.sleep(0.2)
            got = [e for s in syms for e in await run.events(s)]
            assert len(got) == len(want) == 35  # 5 trades, 30 book tickers
            _assert_each_symbol_same(got, want, syms)
            assert {e["venue"] for e in got} == {"BINANCE-FUTURES"}
            assert all(e["recv_ts"] >= e["ts"] for e in got if e["type"] == "trade")
            assert run.feed.state == "live" and run.feed.unexpected_count == 0
    finally:
        await venue.stop()


async def test_binance_spot_agg_trades_and_book_tickers(redis_url) -> None:
    venue = await FakeVenue("binance").start()
    syms = ["FTMUSDT", "XMRBTC", "SXPBTC"]
    streams = {f"{s.lower()}@{k}" for s in syms for k in ("aggTrade", "bookTicker")}
    want = _binance_expected(BINANCE_SPOT, streams)
    try:
        async with running(redis_url, venue, "binance", syms, agg_trades=True) as run:
            await venue.subscribed(1)
            await venue.emit(BINANCE_SPOT)  # depth and kline messages: not subscribed, not sent
            await _published(run, syms, len(want))
            await asyncio.sleep(0.2)
            got = [e for s in syms for e in await run.events(s)]
            assert len(got) == len(want) > 0
            _assert_each_symbol_same(got, want, syms)
    finally:
        await venue.stop()


async def test_coinbase_matches_and_tickers_with_the_aggressor_side(redis_url) -> None:
    venue = await FakeVenue("coinbase").start()
    syms = ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"]
    want = _coinbase_expected(COINBASE)
    try:
        async with running(redis_url, venue, "coinbase", syms) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE)  # l2update: level2 was not subscribed, never sent
            await _published(run, syms, len(want))
            await asyncio.sleep(0.2)
            got = [e for s in syms for e in await run.events(s)]
            assert len(got) == len(want) > 0
            _assert_each_symbol_same(got, want, syms)
            # A match's side is the maker's: the first capture line is a "buy" maker.
            first = next(e for e in got if e.get("trade_id") == 1287326)
            assert first["side"] == "sell"
            assert orjson.loads(venue.received[0])["channels"] == ["matches", "ticker"]
    finally:
        await venue.stop()


async def test_kraken_trades_and_tickers_and_its_snapshot_replayed_once(redis_url) -> None:
    venue = await FakeVenue("kraken").start()
    venue.on_subscribe = KRAKEN  # the trade and ticker snapshots, on every subscription
    try:
        async with running(redis_url, venue, "kraken", ["MATIC/USD", "ALGO/USD"]) as run:
            got = await _published(run, ["MATIC/USD", "ALGO/USD"], 3)
            trades = [e for e in got if e["type"] == "trade"]
            assert [(e["trade_id"], e["price"], e["size"], e["side"]) for e in trades] == [
                (4665846, 0.5147, 6423.46326, "buy"),
                (4665847, 0.5147, 1136.19677815, "buy"),
            ]
            quote = next(e for e in got if e["type"] == "quote")
            assert (quote["sym"], quote["bid"], quote["bid_size"], quote["ask"]) == (
                "ALGO/USD", 0.10025, 740.0, 0.10036)  # fmt: skip
            assert quote["ts"] == ns_from_iso("2023-09-25T09:04:31.742648Z")
            venue.drop()  # TCP reset: the resubscription gets the same snapshots again
            await venue.subscribed(2)
            await eventually(lambda: run.feed.continuity.duplicates >= 3, what="replay dropped")
            await asyncio.sleep(0.2)
            assert len([e for s in ("MATIC/USD", "ALGO/USD") for e in await run.events(s)]) == 3
            assert run.feed.reconnects == 1
    finally:
        await venue.stop()


async def test_a_restarted_feed_does_not_publish_the_venues_snapshot_again(redis_url) -> None:
    """Kraken sends its latest trades and ticker on every subscription: a feed started again
    goes on after what the first run published (its latest trade and quote in Redis), so they
    are not stored twice under new seqs; and a snapshot is not latency (its ts is old)."""
    venue = await FakeVenue("kraken").start()
    venue.on_subscribe = KRAKEN
    syms = ["MATIC/USD", "ALGO/USD"]
    try:
        async with running(redis_url, venue, "kraken", syms) as run:
            await _published(run, syms, 3)
            assert run.feed.latency_ms() == (None, None, [])
        async with running(redis_url, venue, "kraken", syms, flush=False) as run:
            await venue.subscribed(2)
            await eventually(lambda: run.feed.continuity.duplicates == 3, what="all dropped")
            await asyncio.sleep(0.2)
            assert len([e for s in syms for e in await run.events(s)]) == 3
            assert run.feed.upstream_gaps == 0
    finally:
        await venue.stop()


def test_coinbase_last_match_is_a_snapshot() -> None:
    sink = _Collect()
    last_match = lines("coinbase/exchange_session_start.jsonl")
    ADAPTERS["coinbase"]({"BAND-GBP": "BAND-GBP", "SKL-GBP": "SKL-GBP"}, sink, {}).on_message(
        next(m for m in last_match if '"last_match"' in m), 1
    )
    assert sink.snapshots == [True]


async def test_alpaca_signs_in_and_publishes_trades_and_quotes(redis_url) -> None:
    venue = await FakeVenue("alpaca", key=SECRET).start()
    try:
        async with running(redis_url, venue, "alpaca", ["AAPL", "AMD"]) as run:
            await venue.subscribed(1)
            await venue.emit(ALPACA)  # a trade, a quote, a bar and a status point
            got = await _published(run, ["AAPL", "AMD"], 2)
            trade = next(e for e in got if e["type"] == "trade")
            quote = next(e for e in got if e["type"] == "quote")
            assert (trade["sym"], trade["price"], trade["size"], trade["trade_id"]) == (
                "AAPL", 126.55, 1.0, 96921)  # fmt: skip
            assert "side" not in trade  # stocks: the venue gives no aggressor
            assert trade["ts"] == ns_from_iso("2021-02-22T15:51:44.208Z")
            assert (quote["bid"], quote["bid_size"], quote["ask"], quote["ask_size"]) == (
                87.66, 1.0, 87.68, 4.0)  # fmt: skip
            assert quote["ts"] == 1614009105335689322  # to the nanosecond
            await eventually(lambda: run.feed.unexpected_count == 2, what="bar, status counted")
            auth = orjson.loads(venue.received[0])
            assert auth == {"action": "auth", "key": SECRET[0], "secret": SECRET[1]}
    finally:
        await venue.stop()


async def test_alpaca_stock_trades_are_told_apart_by_exchange_and_id(redis_url) -> None:
    """On SIP a trade id is unique per exchange (``x``): the same ``i`` on two exchanges is two
    trades; the same (``x``, ``i``) again is a replay, published once."""
    venue = await FakeVenue("alpaca", key=SECRET).start()
    trade = orjson.loads(lines("alpaca/stocks_v2_data_points_docs.jsonl")[0])
    other = {**trade, "x": "V", "p": 126.56}  # IEX's trade 96921
    try:
        async with running(redis_url, venue, "alpaca", ["AAPL"]) as run:
            await venue.subscribed(1)
            await venue.emit([orjson.dumps([trade, other]).decode()])
            await venue.emit([orjson.dumps([trade]).decode()])  # sent again
            await eventually(lambda: run.feed.continuity.duplicates == 1, what="the replay")
            got = await _published(run, ["AAPL"], 2)
            await asyncio.sleep(0.2)
            got = await run.events("AAPL")
            assert [(e["trade_id"], e["price"]) for e in got] == [(96921, 126.55), (96921, 126.56)]
    finally:
        await venue.stop()


@pytest.mark.parametrize("close_frame", [False, True], ids=["tcp-reset", "close-frame"])
async def test_a_dropped_connection_loses_and_doubles_nothing(redis_url, close_frame) -> None:
    """Coinbase drops the connection mid-stream; on resubscribing it replays its latest trade
    (``last_match``) and tickers: published once, and every later message published."""
    venue = await FakeVenue("coinbase").start()
    syms = ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"]
    want = _coinbase_expected(COINBASE)
    half = len(COINBASE) // 2
    try:
        async with running(redis_url, venue, "coinbase", syms, backoff_min_s=1.0) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE[:half])
            first = len(_coinbase_expected(COINBASE[:half]))
            await _published(run, syms, first)
            epoch = await run.epoch("BAND-BTC")
            venue.drop(close_frame=close_frame)
            await eventually(lambda: run.feed.state == "reconnecting", what="reconnecting")
            assert run.feed.reason
            await venue.subscribed(2)
            await eventually(lambda: run.feed.state == "live", what="live again")
            replay = COINBASE[half - 6 : half]  # the venue sends recent messages again
            await venue.emit(replay + COINBASE[half:])
            await _published(run, syms, len(want))
            await asyncio.sleep(0.3)
            got = [e for s in syms for e in await run.events(s)]
            assert len(got) == len(want)
            _assert_each_symbol_same(got, want, syms)
            assert await run.epoch("BAND-BTC") == epoch  # the same epoch throughout
            assert run.feed.reconnects == 1 and run.feed.continuity.duplicates > 0
    finally:
        await venue.stop()


async def test_ticks_waiting_for_an_unreachable_redis_are_bounded(tmp_path) -> None:
    """Redis goes away while the venue goes on: at most ``max_pending`` ticks wait, newer ones
    are dropped and counted, and a dropped trade is reported as an upstream gap when the next
    trade of its symbol comes, so no trade goes missing silently."""
    redis = RedisProcess(tmp_path, persist=True)
    redis.start()
    venue = await FakeVenue("coinbase").start()
    syms = ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"]
    try:
        async with running(redis.url, venue, "coinbase", syms, max_pending=3) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE[:5])  # BAND-BTC trade 1287326
            await _published(run, ["BAND-BTC"], 1)
            redis.kill()
            await venue.emit(COINBASE[5:70])  # BAND-BTC trades 1287327..1287329, and more
            await eventually(lambda: run.feed.dropped > 0, what="ticks dropped")
            pending = len(run.feed._pending)
            redis.start()
            await eventually(lambda: run.plant.state == "running", what="publishing again")
            await venue.emit(COINBASE[70:])  # BAND-BTC trade 1287330
            events = await eventually(
                lambda: run.events("BAND-BTC"),
                lambda evs: any(e.get("trade_id") == 1287330 for e in evs),
                what="the trade after the outage",
            )
            published = {e["trade_id"] for e in events if e["type"] == "trade"}
            gaps = [e for e in events if e.get("code") == "upstream_gap"]
            missing = {i for g in gaps for i in range(g["first_id"], g["last_id"] + 1)}
            assert missing and published | missing == set(range(1287326, 1287331))
            assert pending <= 3 and run.feed.figures()["dropped"] == run.feed.dropped > 0
            assert "ticks waiting for Redis" in run.feed.last_error
    finally:
        await venue.stop()
        redis.kill()


async def test_silence_past_the_heartbeat_is_a_lost_connection(redis_url) -> None:
    venue = await FakeVenue("kraken").start()
    try:
        # silence_s: six heartbeats' time, so a busy machine's late one is not taken for silence
        async with running(redis_url, venue, "kraken", ["MATIC/USD"], silence_s=3.0) as run:
            await venue.subscribed(1)
            await asyncio.sleep(4.0)  # past silence_s; heartbeats every 0.5 s: still live
            assert run.feed.state == "live" and run.feed.reconnects == 0
            venue.muted = True
            await eventually(lambda: run.feed.reconnects >= 1, what="a reconnect after silence")
            assert "no message from the venue for 3s" in run.feed.last_error
            venue.muted = False
            await eventually(lambda: run.feed.state == "live", what="live again")
    finally:
        await venue.stop()


async def test_planned_reconnect_overlaps_connections_without_loss(redis_url) -> None:
    """Binance ends connections at 24 h: the feed opens a new one first, then closes the old;
    the ticks sent meanwhile are published once each. (A symbol that goes quiet cannot show
    the new stream caught up: the overlap then ends after ``overlap_s``.)"""
    venue = await FakeVenue("binance-futures").start()
    syms = ["SUSHIUSDT", "CTKUSDT", "BTCUSDT"]
    streams = {f"{s.lower()}@{k}" for s in syms for k in ("trade", "bookTicker")}
    want = _binance_expected(BINANCE_FUTURES, streams)
    try:
        async with running(
            redis_url, venue, "binance-futures", syms, lifetime_s=0.6, overlap_s=0.2
        ) as run:
            await venue.subscribed(1)
            await venue.emit(BINANCE_FUTURES, every_s=0.05)  # 42 messages over ~2 s
            await _published(run, syms, len(want))
            await asyncio.sleep(0.3)
            got = [e for s in syms for e in await run.events(s)]
            assert len(got) == len(want)
            _assert_each_symbol_same(got, want, syms)
            assert run.feed.planned_reconnects >= 2 and run.feed.reconnects == 0
            assert venue.subscriptions >= 3
    finally:
        await venue.stop()


async def test_planned_reconnect_loses_nothing_when_the_new_stream_starts_late(redis_url):
    """Binance attaches a new connection's stream a while after the handshake: the old
    connection is read until the new one delivers what the old one already did, so no trade
    sent meanwhile is lost, none is doubled and no hole is reported."""
    venue = await FakeVenue("binance-futures").start()
    venue.attach_s = 0.15
    syms = ["SUSHIUSDT", "CTKUSDT", "BTCUSDT"]
    trades = [m for m in BINANCE_FUTURES if "@trade" in m]
    # A steady market: the capture's trades again and again, trade ids going on per symbol.
    market, next_id = [], {}
    for _round in range(60):
        for m in trades:
            d = orjson.loads(m)["data"]
            d["t"] = next_id.setdefault(d["s"], d["t"])
            next_id[d["s"]] += 1
            market.append(orjson.dumps({"stream": f"{d['s'].lower()}@trade", "data": d}).decode())
    try:
        async with running(redis_url, venue, "binance-futures", syms, lifetime_s=0.5) as run:
            await venue.subscribed(1)
            await venue.emit(market, every_s=0.01)  # 300 trades over about 3 s
            await _published(run, syms, len(market))
            await asyncio.sleep(0.3)
            got = [e for s in syms for e in await run.events(s)]
            assert [e["type"] for e in got] == ["trade"] * len(market)
            assert run.feed.planned_reconnects >= 2
            assert run.feed.upstream_gaps == 0 and run.feed.reconnects == 0
    finally:
        await venue.stop()


async def test_malformed_messages_and_error_replies_are_counted_not_fatal(redis_url) -> None:
    venue = await FakeVenue("binance-futures").start()
    try:
        async with running(redis_url, venue, "binance-futures", ["BTCUSDT"]) as run:
            await venue.subscribed(1)
            await venue.emit(BINANCE_FUTURES[:2])
            await venue.send_raw('{"stream":"btcusdt@trade","data":{"e":"trade","p":')  # cut off
            await venue.send_raw(lines("binance/error_replies_docs.jsonl")[0])
            await venue.send_raw('{"stream":"btcusdt@depth","data":{"e":"depthUpdate"}}')
            await venue.emit(BINANCE_FUTURES[2:5])
            await _published(run, ["BTCUSDT"], 5)
            f = run.feed.figures()
            assert (f["malformed"], f["venue_errors"], f["unexpected"]) == (1, 1, 1)
            assert f["state"] == "live"
            assert "Invalid value type" in f["last_error"]
    finally:
        await venue.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [("t", "2691833900"), ("T", "1660228023949"), ("t", 2691833900.0), ("T", True)],
    ids=["id-string", "time-string", "id-float", "time-bool"],
)
async def test_a_binance_number_of_the_wrong_type_is_malformed_and_harms_nothing_after(
    redis_url, field, value
) -> None:
    """A trade whose id or time is not a JSON integer is one malformed message: it does not
    become the symbol's last trade id (every later trade would fail) nor a huge string."""
    venue = await FakeVenue("binance-futures").start()
    first = orjson.loads(BINANCE_FUTURES[0])
    bad = {**first, "data": {**first["data"], field: value}}
    try:
        async with running(redis_url, venue, "binance-futures", ["BTCUSDT"]) as run:
            await venue.subscribed(1)
            await venue.send_raw(orjson.dumps(bad).decode())
            await venue.emit(BINANCE_FUTURES[:5])
            got = await _published(run, ["BTCUSDT"], 5)
            assert [e["type"] for e in got] == ["trade"] * 5
            assert run.feed.malformed_count == 1 and run.plant.rejected == {}
    finally:
        await venue.stop()


@pytest.mark.parametrize(
    ("kind", "symbols", "odd", "market", "ticks"),
    [("kraken", ["MATIC/USD", "ALGO/USD"],
      '{"method":"subscribe","success":true,"result":"oops"}', KRAKEN, 3),
     ("coinbase", ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"],
      '{"type":"subscriptions","channels":["matches"]}', COINBASE,
      len(_coinbase_expected(COINBASE))),
     ("alpaca", ["AAPL", "AMD"], '[{"T":"subscription","trades":"AAPL","quotes":"AMD"}]',
      ALPACA, 2)],
    ids=["kraken-ack-result", "coinbase-channel-names", "alpaca-listed-string"],
)  # fmt: skip
async def test_a_venue_reply_of_an_unexpected_shape_is_counted_not_fatal(
    redis_url, kind, symbols, odd, market, ticks
) -> None:
    """A subscription reply the venue's documentation does not describe is one malformed
    message: the feed stays live and publishes what follows."""
    venue = await FakeVenue(kind, key=SECRET).start()
    try:
        async with running(redis_url, venue, kind, symbols) as run:
            await venue.subscribed(1)
            await eventually(lambda: run.feed.state == "live", what="live")
            await venue.send_raw(odd)
            await venue.emit(market)
            await _published(run, symbols, ticks)
            assert not run.task.done() and run.feed.state == "live"
            assert run.feed.malformed_count == 1, run.feed.last_error
    finally:
        await venue.stop()


class _BrokenCoinbase(ADAPTERS["coinbase"]):  # type: ignore[misc,valid-type]
    """An adapter with a bug on one kind of message (what the session must outlive)."""

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        if b'"product_id":"BAND-GBP"' in (raw if isinstance(raw, bytes) else raw.encode()):
            raise RuntimeError("a bug in the adapter")
        super().on_message(raw, recv_ns)


async def test_an_adapter_failing_on_a_message_counts_it_malformed_and_goes_on(redis_url):
    venue = await FakeVenue("coinbase").start()
    syms = ["BAND-BTC", "BAND-GBP", "DASH-BTC", "SKL-USD"]
    want = [w for w in _coinbase_expected(COINBASE) if w["sym"] != "BAND-GBP"]
    failing = sum(p["product_id"] == "BAND-GBP" and p["type"] in ("match", "ticker")
                  for p in _payloads(COINBASE))  # fmt: skip
    try:
        async with running(redis_url, venue, "coinbase", syms, adapter=_BrokenCoinbase) as run:
            await venue.subscribed(1)
            await venue.emit(COINBASE)
            await _published(run, syms, len(want))
            await eventually(lambda: run.feed.malformed_count == failing, what="all counted")
            assert not run.task.done() and run.feed.state == "live"
            assert "RuntimeError: a bug in the adapter" in run.feed.last_error
    finally:
        await venue.stop()


@pytest.mark.parametrize(
    ("kind", "symbols", "refused"),
    [("coinbase", ["BAND-BTC", "GIBBERISH-USD"], "GIBBERISH-USD"),
     ("kraken", ["MATIC/USD", "XBT/USD"], "XBT/USD"),
     ("alpaca", ["AAPL", "NOTASTOCK"], "NOTASTOCK"),
     # The refused symbol, not another whose name is part of it.
     ("coinbase", ["BTC-USD", "BTC-USDT"], "BTC-USDT"),
     ("kraken", ["XBT/USD", "XBT/USDT"], "XBT/USDT")],
)  # fmt: skip
async def test_a_refused_symbol_stops_the_start_naming_it(redis_url, kind, symbols, refused):
    venue = await FakeVenue(kind, refuse=frozenset({refused}), key=SECRET).start()
    try:
        async with running(redis_url, venue, kind, symbols) as run:
            with pytest.raises(VenueRefused, match=f"refused the symbol {refused}:"):
                await asyncio.wait_for(run.task, WAIT_S)
            assert run.feed.state == "down"
    finally:
        await venue.stop()


async def test_a_symbol_another_live_source_publishes_is_refused_at_start(redis_url) -> None:
    """Binance spot and USD-M futures both call it BTCUSDT: the second feed to start is refused,
    saying how to publish it under another name, and the first goes on alone."""
    futures = await FakeVenue("binance-futures").start()
    spot = await FakeVenue("binance").start()
    try:
        async with running(redis_url, futures, "binance-futures", ["BTCUSDT"]) as first:
            await futures.subscribed(1)
            r = aioredis.Redis.from_url(redis_url)
            try:
                await eventually(lambda: r.hget("tp:feed:test-binance-futures", "source"),
                                 what="the first feed's heartbeat")  # fmt: skip
            finally:
                await r.aclose()
            async with running(redis_url, spot, "binance", ["ETHUSDT", "BTCUSDT"],
                               flush=False) as second:  # fmt: skip
                with pytest.raises(VenueRefused, match=(
                    "BTCUSDT is already published by the feed 'test-binance-futures' "
                    r"\(binance-futures\).*--map BTCUSDT=BTCUSDT-BINANCE")):  # fmt: skip
                    await asyncio.wait_for(second.task, WAIT_S)
            assert spot.subscriptions == 0 and not first.task.done()
    finally:
        await futures.stop()
        await spot.stop()


async def test_ticks_gaps_finds_upstream_gaps_by_their_own_time_under_clock_skew(redis_url):
    """The gap stream's entry ids are Redis' clock; a gap found by a feed whose clock is 30 s
    behind is still listed for the range its own ``ts`` falls in."""
    from server.live.bus import Bus, encode_upstream_gap

    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.flushdb()
        bus = Bus(r)
        now = time.time_ns()
        found = now - 30 * 10**9  # the feed's clock
        ticks = [Trade("BTCUSDT", now, 1.0, 1.0, trade_id=9), Trade("BTCUSDT", now, 1.0, 1.0)]
        await bus.publish(ticks, [(ticks[1], encode_upstream_gap("BINANCE", 10, 11, found))])
        gaps = await bus.upstream_gaps(found - 10**9, found + 10**9, 10)
        assert [(g["sym"], g["first_id"], g["ts"]) for g in gaps] == [("BTCUSDT", 10, found)]
        assert await bus.upstream_gaps(now - 10**9, now + 10**9, 10) == []
    finally:
        await r.aclose()


def test_binance_symbol_not_in_the_venues_form_is_refused_at_start() -> None:
    with pytest.raises(VenueRefused, match="'BTC-USDT' is not a BINANCE symbol"):
        VenueFeed(ADAPTERS["binance"], {"BTC-USDT": "BTC-USDT"})


async def test_feed_status_figures_reach_the_heartbeat(redis_url) -> None:
    venue = await FakeVenue("binance-futures").start()
    try:
        async with running(redis_url, venue, "binance-futures", ["BTCUSDT"]) as run:
            await venue.subscribed(1)
            await venue.emit(BINANCE_FUTURES[:5])
            r = aioredis.Redis.from_url(redis_url)
            try:
                raw = await eventually(
                    lambda: r.hgetall("tp:feed:test-binance-futures"),
                    lambda h: b"source" in h and orjson.loads(h[b"source"])["ticks"] == 5,
                    what="the feed's heartbeat with its source figures",
                )
            finally:
                await r.aclose()
            source = orjson.loads(raw[b"source"])
            assert source["kind"] == "binance-futures" and source["state"] == "live"
            assert source["symbols"] == ["BTCUSDT"] and source["latency_p50_ms"] is not None
            assert run.feed.messages >= 5
    finally:
        await venue.stop()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--symbols", "BTCUSDT"], {}, "--symbols goes with --source NAME"),
        (["--source", "binance"], {}, "--source binance needs --symbols"),
        (["--source", "bitmex", "--symbols", "XBTUSD"], {}, "invalid choice: 'bitmex'"),
        (["--source", "alpaca", "--symbols", "AAPL"], {}, "needs TICKPIPE_ALPACA_KEY_ID"),
        (["--source", "coinbase", "--symbols", "BTC-USD", "--url", "https://x"], {},
         "give a WebSocket URL"),
        (["--source", "binance", "--symbols", "BTCUSDT", "--map", "ETHUSDT=ETH"], {},
         "not among --symbols"),
        (["--source", "coinbase", "--symbols", "BTC-USD", "--agg-trades"], {},
         "--agg-trades is for --source binance"),
        (["--source", "binance", "--symbols", "BTC-USDT"], {}, "is not a BINANCE symbol"),
    ],
)  # fmt: skip
def test_feed_source_flags_that_cannot_work_say_what_to_pass(tmp_path, args, env, says) -> None:
    from tests.test_cli import tickpipe

    out = tickpipe(tmp_path, "feed", *args, **env)
    assert out.returncode in (1, 2), out
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr


async def _cli_feed(
    redis_url: str, tmp: Path, *args: str, **env: str
) -> asyncio.subprocess.Process:
    import os
    import sys

    from tests.harness import ROOT

    base = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
    base |= {"TICKPIPE_REDIS_URL": redis_url, "TICKPIPE_DATA_DIR": str(tmp / "data")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "feed", *args, cwd=ROOT, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_cli_feed_exits_naming_the_refused_symbol(redis_url, tmp_path) -> None:
    venue = await FakeVenue("coinbase", refuse=frozenset({"GIBBERISH-USD"})).start()
    try:
        proc = await _cli_feed(redis_url, tmp_path, "--source", "coinbase", "--symbols",
                               "BTC-USD,GIBBERISH-USD", "--url", venue.url)  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), CLI_S)
        text = out.decode()
        assert proc.returncode == 1, text
        assert (
            "coinbase refused the symbol GIBBERISH-USD: Failed to subscribe: GIBBERISH-USD"
            " is not a valid product" in text
        )
        assert "Traceback" not in text
    finally:
        await venue.stop()


async def test_alpaca_key_and_secret_never_appear_in_the_feeds_output(redis_url, tmp_path):
    venue = await FakeVenue("alpaca", key=SECRET).start()
    keys = {"TICKPIPE_ALPACA_KEY_ID": SECRET[0], "TICKPIPE_ALPACA_SECRET_KEY": SECRET[1]}
    try:
        wrong = await _cli_feed(redis_url, tmp_path, "--source", "alpaca", "--symbols", "AAPL",
                                "--url", venue.url, TICKPIPE_ALPACA_KEY_ID=SECRET[0],
                                TICKPIPE_ALPACA_SECRET_KEY="not-the-secret")  # fmt: skip
        out, _ = await asyncio.wait_for(wrong.communicate(), CLI_S)
        text = out.decode()
        assert wrong.returncode == 1 and "402 auth failed" in text, text
        assert SECRET[0] not in text and "not-the-secret" not in text
        ok = await _cli_feed(redis_url, tmp_path, "--source", "alpaca", "--symbols", "AAPL,AMD",
                             "--url", venue.url, "--name", "alpaca-test", **keys)  # fmt: skip
        await venue.subscribed(1)
        await venue.emit(ALPACA)
        venue.drop()  # a reconnect signs in again
        await venue.subscribed(2)
        ok.terminate()
        out, _ = await asyncio.wait_for(ok.communicate(), CLI_S)
        text = out.decode()
        assert "reconnecting" in text and "live again" in text, text
        assert SECRET[0] not in text and SECRET[1] not in text
        assert sum(SECRET[1] in m for m in venue.received) == 2  # it did send them, twice
    finally:
        await venue.stop()


async def test_credentials_in_the_url_never_appear_in_the_feeds_output(redis_url, tmp_path):
    """A private gateway's user, password or token in ``--url`` is used, never logged."""
    venue = await FakeVenue("coinbase").start()
    url = venue.url.replace("ws://", "ws://gw-user:gw-pass-5e6f@") + "?token=tok-9a8b7c"
    try:
        proc = await _cli_feed(redis_url, tmp_path, "--source", "coinbase", "--symbols",
                               "BAND-BTC", "--url", url, "--name", "cb-gateway")  # fmt: skip
        await venue.subscribed(1)
        venue.drop()
        await venue.subscribed(2)
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), CLI_S)
        text = out.decode()
        assert f"from ws://127.0.0.1:{venue.port}/" in text and "live again" in text, text
        assert "gw-pass-5e6f" not in text and "tok-9a8b7c" not in text and "gw-user" not in text
    finally:
        await venue.stop()


def test_the_venues_procfile_runs_the_simulator_and_two_venue_feeds() -> None:
    """``honcho start -f Procfile.venues`` (README): every line is a valid command, the venue
    feeds have their own names; ``make run``'s Procfile keeps the simulator alone."""
    from server.cli import build_parser
    from tests.harness import ROOT

    procs = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile.venues").read_text().splitlines()
    )
    sources = {}
    for command in procs.values():
        args = build_parser().parse_args(command.split()[1:])
        if args.cmd == "feed" and args.source:
            sources[args.source] = args.name
    assert sources == {"binance": "binance", "coinbase": "coinbase"}
    assert "--source" not in (ROOT / "Procfile").read_text()


async def test_a_venue_that_is_not_there_yet_is_connecting_then_live(redis_url) -> None:
    """Connection refused at start: the source stays `connecting`, retrying with backoff, and
    goes live once the venue answers; failed attempts are not counted as reconnects."""
    from tests.harness import free_port

    port = free_port()
    venue = FakeVenue("coinbase")
    venue.port = port
    async with running(redis_url, venue, "coinbase", ["BAND-BTC"]) as run:
        await eventually(lambda: run.feed.last_error, what="a refused attempt")
        await asyncio.sleep(1.0)  # and retries meanwhile
        assert run.feed.state == "connecting" and run.feed.reconnects == 0
        assert "Connect" in run.feed.last_error or "refused" in run.feed.last_error
        from websockets.asyncio.server import serve

        venue.server = await serve(venue._handle, "127.0.0.1", port, ping_interval=None)
        try:
            await eventually(lambda: run.feed.state == "live", what="live once the venue is up")
            assert run.feed.reconnects == 0
        finally:
            await venue.stop()


def test_a_backlog_goes_out_in_bounded_batches_with_each_gap_in_place() -> None:
    """After Redis was slow or away, what piled up is handed out ``MAX_BATCH`` ticks at a time
    (one script call must stay short), each upstream gap with its own batch and position."""
    from server.feed.sources.session import MAX_BATCH

    feed = VenueFeed(ADAPTERS["coinbase"], {"X-USD": "X-USD"})
    ts = 1_700_000_000_000_000_000
    ids = [*range(1, MAX_BATCH + 1), MAX_BATCH + 3, *range(MAX_BATCH + 4, MAX_BATCH + 10)]
    for n, trade_id in enumerate(ids):
        feed.trade(Trade("X-USD", ts + n, 1.0, 1.0, "buy", "COINBASE", trade_id, ts + n))
    first, gaps_first = feed.due(0, 0), feed.take_gaps()
    second, gaps_second = feed.due(0, 0), feed.take_gaps()
    assert len(first) == MAX_BATCH and gaps_first == []
    assert [t.trade_id for t in second] == ids[MAX_BATCH:]
    [(at, gap)] = gaps_second
    assert at == 0 and (gap.first, gap.last) == (MAX_BATCH + 1, MAX_BATCH + 2)
    assert feed.due(0, 0) == [] and feed.take_gaps() == []


# -- what a black-box review of the live sources found (2026-12-01) ----------------------------


@pytest.mark.parametrize(
    ("kind", "syms", "quote"),
    [("coinbase", ["BAND-BTC"], next(m for m in COINBASE if '"ticker"' in m)),
     ("binance", ["FTMUSDT"], next(m for m in BINANCE_SPOT if "bookTicker" in m))],
    ids=["coinbase-ticker", "binance-spot-bookticker"],
)  # fmt: skip
async def test_a_restarted_feed_does_not_publish_the_last_quote_again(
    redis_url, kind, syms, quote
) -> None:
    """A numbered quote (Coinbase `sequence`, Binance `u`) the venue sends again after a restart
    is the one the earlier run published: not stored twice (Binance spot's has no venue time,
    so its receive time differs, and still it is the same quote); a new one is published."""
    venue = await FakeVenue(kind).start()
    newer = quote.replace('"best_bid":"0.00033422"', '"best_bid":"0.00033400"').replace(
        '"b":"0.33989000"', '"b":"0.33900000"'
    )
    newer = newer.replace('"sequence":', '"sequence":1').replace('"u":', '"u":1')
    try:
        async with running(redis_url, venue, kind, syms) as run:
            await venue.subscribed(1)
            await venue.emit([quote])
            await _published(run, syms, 1)
        async with running(redis_url, venue, kind, syms, flush=False) as run:
            await venue.subscribed(2)
            await venue.emit([quote])
            await eventually(lambda: run.feed.continuity.duplicates == 1, what="dropped")
            await venue.emit([newer])
            got = await _published(run, syms, 2)
            await asyncio.sleep(0.2)
            got = [e for s in syms for e in await run.events(s)]
            assert [e["type"] for e in got] == ["quote", "quote"]
            assert got[0]["bid"] != got[1]["bid"] and run.feed.continuity.duplicates == 1
    finally:
        await venue.stop()


def test_coinbase_ticker_sent_on_subscribing_is_a_snapshot() -> None:
    """On subscribing Coinbase sends each product's ticker, which may be old: the first ticker
    of each product on a connection is not latency; the ones after it are."""
    sink = _Collect()
    tickers = [m for m in COINBASE if '"ticker"' in m and '"BAND-BTC"' in m][:2]
    adapter = ADAPTERS["coinbase"]({"BAND-BTC": "BAND-BTC"}, sink, {})
    adapter.on_connected()
    for m in tickers:
        adapter.on_message(m, 1)
    adapter.on_connected()  # a reconnect: the venue sends it again
    adapter.on_message(tickers[1], 1)
    assert sink.snapshots == [True, False, True]


def test_latency_leaves_out_a_time_the_tick_checks_reject() -> None:
    """A trade whose time is not one (Binance `T` in µs read as ms: year 50,000) is rejected
    by the tick checks; it is not a latency sample either, in the percentiles or the
    per-second sparkline."""
    feed = VenueFeed(ADAPTERS["binance"], {"BTCUSDT": "BTCUSDT"})
    now = time.time_ns()
    feed.trade(Trade("BTCUSDT", now - 5_000_000, 1.0, 1.0, "buy", "BINANCE", 1, now))
    feed.trade(Trade("BTCUSDT", now * 1000, 1.0, 1.0, "buy", "BINANCE", 2, now))
    feed.due(0, 0)
    p50, p99, spark = feed.latency_ms(now)
    assert (p50, p99, spark) == (5.0, 5.0, [5.0])


def test_binance_url_keeps_the_query_given_and_reads_microsecond_times() -> None:
    """`--url` with the venue's own parameters (`timeUnit=MICROSECOND`): the streams are added
    with `&`, and the venue's times, then in µs, are read as such."""
    sink = _Collect()
    adapter = ADAPTERS["binance-futures"]({"BTCUSDT": "BTCUSDT"}, sink, {})
    base = "wss://fstream.binance.com/stream"
    assert adapter.url(base) == f"{base}?streams=btcusdt@trade/btcusdt@bookTicker"
    adapter.on_message(BINANCE_FUTURES[0], 1)
    url = adapter.url(base + "?timeUnit=MICROSECOND")
    assert url == f"{base}?timeUnit=MICROSECOND&streams=btcusdt@trade/btcusdt@bookTicker"
    micro = orjson.loads(BINANCE_FUTURES[0])
    micro["data"]["T"] *= 1000
    adapter.on_message(orjson.dumps(micro), 1)
    assert sink.ticks[0].ts == sink.ticks[1].ts == 1660228023973 * 10**6
    assert adapter.url(base + "?") == f"{base}?streams=btcusdt@trade/btcusdt@bookTicker"


def test_binance_refuses_more_symbols_than_one_connection_serves() -> None:
    """Binance serves at most 1,024 streams on a connection, two a symbol: 513 symbols are
    refused at start, saying what to do, not retried for ever against the venue's refusal."""
    names = {f"S{i:03d}USDT": f"S{i:03d}USDT" for i in range(513)}
    with pytest.raises(VenueRefused, match="at most 512 symbols and run several feeds"):
        VenueFeed(ADAPTERS["binance"], names)
    VenueFeed(ADAPTERS["binance"], dict(list(names.items())[:512]))


async def test_a_trade_the_checks_reject_is_an_upstream_gap_of_its_id(redis_url) -> None:
    """A venue trade that arrives but fails the tick checks (a price of 0) is a hole in the
    venue's ids that the next trade does not show: it is reported in-band as an upstream gap
    of its own id, before the next trade, and counted as rejected and as a gap."""
    venue = await FakeVenue("binance-futures").start()
    trades = BINANCE_FUTURES[:5]
    bad = orjson.loads(trades[2])
    bad["data"]["p"] = "0.00"
    try:
        async with running(redis_url, venue, "binance-futures", ["BTCUSDT"]) as run:
            await venue.subscribed(1)
            await venue.emit([*trades[:2], orjson.dumps(bad).decode(), *trades[3:]])
            await _published(run, ["BTCUSDT"], 5)
            events = await run.events("BTCUSDT")
            assert [e.get("trade_id", e.get("code")) for e in events] == [
                2691833663, 2691833664, "upstream_gap", 2691833666, 2691833667]  # fmt: skip
            gap = events[2]
            assert (gap["first_id"], gap["last_id"], gap["missing"]) == (2691833665,) * 2 + (1,)
            assert gap["after_seq"] == events[1]["seq"] == events[3]["seq"] - 1
            assert run.plant.rejected == {"bad_price": 1}
            f = run.feed.figures()
            assert (f["upstream_gaps"], f["missing_trades"]) == (1, 1)
    finally:
        await venue.stop()


async def test_a_subscription_never_confirmed_says_so(redis_url) -> None:
    """A venue that never confirms the subscription: the source retries, its reason says what
    it waited for and how long (not a bare `TimeoutError`)."""
    venue = await FakeVenue("coinbase", refuse=frozenset()).start()

    async def silent(conn: Any, msg: dict[str, Any]) -> None:
        pass

    venue._coinbase = silent  # type: ignore[method-assign]
    try:
        async with running(redis_url, venue, "coinbase", ["BAND-BTC"],
                           subscribe_timeout_s=0.3) as run:  # fmt: skip
            await eventually(lambda: run.feed.reason, what="a failed attempt")
            assert run.feed.state == "connecting"
            assert run.feed.reason == (
                "TimeoutError: the venue did not confirm the subscription within 0.3s"
            )
    finally:
        await venue.stop()


async def test_wss_to_a_plain_endpoint_says_tls_and_logs_no_traceback(redis_url, tmp_path):
    """`--url wss://` against a plain WebSocket server: each attempt fails in the TLS handshake,
    the reason says so, and the log has no traceback (uvloop logs an exception class there,
    which the key-masking log filter once failed on, a 30-line traceback per attempt)."""
    venue = await FakeVenue("coinbase").start()
    try:
        proc = await _cli_feed(redis_url, tmp_path, "--source", "coinbase", "--symbols",
                               "BAND-BTC", "--url", venue.url.replace("ws://", "wss://"),
                               "--name", "tls")  # fmt: skip
        assert proc.stdout is not None
        lines_read: list[str] = []
        try:
            async with asyncio.timeout(CLI_S):
                while not any("retrying" in line for line in lines_read):
                    lines_read.append((await proc.stdout.readline()).decode())
                    assert lines_read[-1], lines_read
        finally:
            proc.terminate()
            out, _ = await asyncio.wait_for(proc.communicate(), CLI_S)
        text = "".join(lines_read) + out.decode()
        assert "in the TLS handshake with wss://127.0.0.1" in text, text
        assert "wss:// is TLS, ws:// plain" in text
        assert "Traceback" not in text and "Exception in default exception handler" not in text
    finally:
        await venue.stop()


async def test_no_pong_to_the_pings_is_the_reason_given_not_a_dropped_connection(redis_url):
    """A venue that hangs (its process stopped: the socket stays open, nothing is read): the
    session's pings go unanswered, it reconnects, and the reason is the missing pong."""
    venue = await FakeVenue("coinbase").start()
    try:
        async with running(redis_url, venue, "coinbase", ["BAND-BTC"], ping_interval_s=0.2,
                           ping_timeout_s=0.3) as run:  # fmt: skip
            await venue.subscribed(1)
            for conn in venue.conns:
                conn.ws.transport.pause_reading()  # pings unread, never answered
            await venue.subscribed(2)
            assert run.feed.reconnects == 1
            assert run.feed.last_error == (
                "no pong to the WebSocket pings (1011 keepalive ping timeout)"
            )
            await eventually(lambda: run.feed.state == "live", what="live again")
    finally:
        await venue.stop()


async def test_a_source_refused_at_start_is_listed_down_with_the_venues_reason(
    redis_url, tmp_path
) -> None:
    """The venue refuses a symbol as the feed starts: the feed exits at once, and its source is
    still listed (`tp:sources`, what `GET /sources` shows) as down with the venue's reason."""
    venue = await FakeVenue("coinbase", refuse=frozenset({"GIBBERISH-USD"})).start()
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.hdel("tp:sources", "refused")
        args = ["--source", "coinbase", "--name", "refused", "--url", venue.url]
        proc = await _cli_feed(redis_url, tmp_path, *args, "--symbols", "BTC-USD,GIBBERISH-USD")
        await asyncio.wait_for(proc.communicate(), CLI_S)
        assert proc.returncode == 1
        source = orjson.loads(await r.hget("tp:sources", "refused"))
        assert source["state"] == "down" and source["kind"] == "coinbase"
        assert source["reason"].startswith("coinbase refused the symbol GIBBERISH-USD:")
    finally:
        await r.aclose()
        await venue.stop()


@pytest.mark.parametrize(
    ("code", "msg", "says"),
    [(405, "symbol limit exceeded", "subscribe fewer symbols"),
     (410, "invalid subscribe action for this feed", "does not serve what was asked")],
)  # fmt: skip
def test_alpaca_subscribe_errors_that_retrying_cannot_mend_are_refusals(code, msg, says) -> None:
    """Alpaca answers the subscription with 405 (symbol limit) or 410 (not on this feed): a
    refusal saying what to change (the feed stops at start), not a retry every 10 s."""
    sink = _Collect()
    ADAPTERS["alpaca"]({"AAPL": "AAPL"}, sink, {}).on_message(
        orjson.dumps([{"T": "error", "code": code, "msg": msg}]), 1
    )
    [(call, text)] = sink.calls
    assert call == "refused" and text.startswith(f"{code} {msg}: ") and says in text


def test_a_kraken_error_reply_to_any_request_is_a_venue_error() -> None:
    """Kraken answers a request it cannot serve with `success: false` and an `error`: counted
    as an error reply of the venue (with its text), not as an unknown message."""
    sink = _Collect()
    adapter = ADAPTERS["kraken"]({"BTC/USD": "BTC/USD"}, sink, {})
    for reply in ({"error": "Method not found", "method": "frobnicate", "success": False},
                  {"error": "Internal error", "success": False},
                  {"error": "Subscription not found", "method": "unsubscribe", "success": False,
                   "symbol": "ETH/USD"}):  # fmt: skip
        times = {"time_in": "2023-09-25T09:04:31.742599Z", "time_out": "2023-09-25T09:04:31.7426Z"}
        adapter.on_message(orjson.dumps({**reply, **times}), 1)
    assert sink.calls == [
        ("venue_error", "frobnicate: Method not found"),
        ("venue_error", "a request: Internal error"),
        ("venue_error", "unsubscribe: Subscription not found"),
    ]


async def test_a_stopped_feed_frees_its_symbols_and_is_listed_down_at_once(redis_url) -> None:
    """A live feed stopped cleanly: its heartbeat goes at once, so another feed may take its
    symbols right away and no page shows it live for the seconds its heartbeat had left; its
    source is listed down, saying the feed stopped."""
    venue = await FakeVenue("coinbase").start()
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with running(redis_url, venue, "coinbase", ["BAND-BTC"]):
            await venue.subscribed(1)
            await eventually(lambda: r.hget("tp:sources", "test-coinbase"), what="a heartbeat")
        assert await r.exists("tp:feed:test-coinbase") == 0
        source = orjson.loads(await r.hget("tp:sources", "test-coinbase"))
        assert (source["state"], source["reason"]) == ("down", "the feed stopped")
        settings = Settings(redis_url=redis_url, feed_name="other", feed_batch_ms=5)
        other = Tickerplant(settings, VenueFeed(ADAPTERS["coinbase"], {"BAND-BTC": "BAND-BTC"},
                                                venue.url))  # fmt: skip
        task = asyncio.create_task(other.run())
        await venue.subscribed(2)  # not refused as "already published by the feed"
        other.stop()
        await asyncio.wait_for(task, WAIT_S)
    finally:
        await r.aclose()
        await venue.stop()


@pytest.mark.parametrize(
    ("kind", "syms", "one_sided", "kept"),
    [("alpaca", ["AMD"],
      '[{"T":"q","S":"AMD","bx":"","bp":0,"bs":0,"ax":"Q","ap":91.98,"as":1,"c":["R"],"z":"C",'
      '"t":"2023-04-06T11:54:21.670905508Z"}]', {"ask": 91.98, "ask_size": 1.0}),
     ("binance", ["FTMUSDT"],
      '{"stream":"ftmusdt@bookTicker","data":{"u":800360990,"s":"FTMUSDT","b":"0.33989000",'
      '"B":"1565.60000000","a":"0.00000000","A":"0.00000000"}}',
      {"bid": 0.33989, "bid_size": 1565.6}),
     ("kraken", ["MATIC/USD"],
      '{"channel":"ticker","type":"update","data":[{"symbol":"MATIC/USD","bid":0,"bid_qty":0,'
      '"ask":0.5147,"ask_qty":6614.0,"last":0.5147,"volume":1.0,"vwap":0.5,"low":0.5,'
      '"high":0.52,"change":0.0,"change_pct":0.0}]}', {"ask": 0.5147, "ask_size": 6614.0})],
    ids=["alpaca-no-bid", "binance-no-ask", "kraken-no-bid"],
)  # fmt: skip
async def test_a_one_sided_quote_is_published_without_its_empty_side(
    redis_url, kind, syms, one_sided, kept
) -> None:
    """A venue sends a price of 0 for an empty side of its book: the quote is published
    one-sided, the empty side's price and size absent (not rejected, not a price of 0)."""
    venue = await FakeVenue(kind, key=SECRET).start()
    try:
        async with running(redis_url, venue, kind, syms) as run:
            await venue.subscribed(1)
            await venue.send_raw(one_sided)
            [event] = await _published(run, syms, 1)
            book = {k: event[k] for k in ("bid", "bid_size", "ask", "ask_size") if k in event}
            assert book == kept and "crossed" not in event
            assert run.plant.rejected == {} and run.feed.malformed_count == 0
    finally:
        await venue.stop()
