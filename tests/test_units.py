"""The pure parts, without a network: the replay's virtual clock, a subscriber's buffer
(conflation, sampling, hold and release), the fingerprint, the parsing of times, integers,
flags, symbols and speeds, and a live source's latency window."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from server.api.errors import ApiError
from server.api.params import parse_flag, parse_int, parse_time
from server.api.ticks import parse_symbols
from server.config import Settings
from server.feed.sources import ADAPTERS, VenueFeed
from server.live.subscriber import QUOTE, TRADE, Subscriber
from server.replay import VirtualClock, parse_speed
from server.ticks import Trade, is_valid_symbol
from tickpipe.fingerprint import Fingerprint, canonical_event, canonical_line

# The virtual clock ----------------------------------------------------------------------------


def test_the_clock_runs_at_its_speed_from_its_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    wall = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: wall[0])
    clock = VirtualClock(10.0)
    clock.start(5_000)
    wall[0] += 2.0  # two wall seconds at 10x: twenty seconds of market time
    assert clock.now() == 5_000 + 20 * 10**9


def test_a_paused_clock_stands_still_and_resumes_where_it_stood(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wall = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: wall[0])
    clock = VirtualClock(1.0)
    clock.start(0)
    wall[0] = 1.0
    clock.pause()
    wall[0] = 50.0
    assert clock.now() == 10**9
    clock.resume()
    wall[0] = 51.0
    assert clock.now() == 2 * 10**9


def test_a_new_speed_applies_from_now_on(monkeypatch: pytest.MonkeyPatch) -> None:
    wall = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: wall[0])
    clock = VirtualClock(1.0)
    clock.start(0)
    wall[0] = 1.0
    clock.set_speed(100.0)
    wall[0] = 2.0
    assert clock.now() == 101 * 10**9


@pytest.mark.parametrize("raw", [0, -1, "fast", True, None, 2e6, float("nan")])
def test_a_bad_speed_says_what_a_speed_is(raw: object) -> None:
    with pytest.raises(ValueError, match='or "max"'):
        parse_speed(raw)


def test_speeds() -> None:
    assert parse_speed("max") is None and parse_speed(10) == 10.0 and parse_speed(0.5) == 0.5


# A subscriber's buffer ------------------------------------------------------------------------


def trade(seq: int, sym: str = "AAPL") -> str:
    return f'{{"type":"trade","sym":"{sym}","seq":{seq},"ts":{seq},"price":1.0,"size":1.0}}'


def quote(seq: int, sym: str = "AAPL") -> str:
    return f'{{"type":"quote","sym":"{sym}","seq":{seq},"ts":{seq},"bid":1.0,"ask":1.1}}'


def subscriber(**settings: int) -> tuple[Subscriber, list[list[dict]]]:
    """A subscriber whose frames are collected instead of sent."""
    frames: list[list[dict]] = []

    async def send_text(text: str) -> None:
        frames.append(orjson.loads(text))

    conf = Settings(_env_file=None, **settings)  # type: ignore[call-arg]
    return Subscriber("c1", send_text, conf), frames


async def drain(sub: Subscriber) -> None:
    """Let the writer send what is queued."""
    writer = asyncio.create_task(sub.run_writer())
    await asyncio.sleep(0.01)
    writer.cancel()


def seqs(frames: list[list[dict]], kind: str | None = None) -> list[int]:
    return [e["seq"] for f in frames for e in f if "seq" in e and kind in (None, e["type"])]


async def test_every_tick_is_sent_in_order_while_the_client_keeps_up() -> None:
    sub, frames = subscriber()
    for n in range(1, 6):
        sub.push("AAPL", trade(n) if n % 2 else quote(n), TRADE | QUOTE)
    await drain(sub)
    assert seqs(frames) == [1, 2, 3, 4, 5]


async def test_a_slow_client_gets_every_trade_and_the_latest_quote_per_symbol() -> None:
    sub, frames = subscriber(conflate_bytes=1024, max_buffer_bytes=100_000)
    sub.push("AAPL", ",".join(trade(n) for n in range(1, 16)), TRADE | QUOTE)  # past 1024 chars
    assert sub.conflating
    for n in range(16, 22):
        sub.push("AAPL", quote(n), TRADE | QUOTE)
    sub.push("AAPL", trade(22), TRADE | QUOTE)
    sub.push("AAPL", quote(23), TRADE | QUOTE)
    await drain(sub)
    events = [e for f in frames for e in f]
    assert seqs(frames, "trade") == [*range(1, 16), 22]
    assert seqs(frames, "quote") == [21, 23]  # 16 to 20 replaced by newer quotes
    assert sub.conflated == 5
    assert events[15]["type"] == "status" and events[15]["code"] == "conflating"


async def test_past_the_buffer_limit_the_connection_closes_as_a_slow_consumer() -> None:
    sub, _frames = subscriber(conflate_bytes=1024, max_buffer_bytes=4096)
    for n in range(1, 60):
        sub.push("AAPL", trade(n), TRADE | QUOTE)
    assert sub.close_code == 4008
    assert sub.close_event is not None and sub.close_event["code"] == "slow_consumer"


async def test_sampling_sends_the_latest_trade_and_quote_once_per_period() -> None:
    sub, frames = subscriber()
    sub.set_throttle(50)
    for n in range(1, 9):
        sub.push("AAPL", trade(n) if n % 2 else quote(n), TRADE | QUOTE)
    sub.push("MSFT", quote(1, "MSFT"), TRADE | QUOTE)
    await drain(sub)
    assert frames == []  # nothing before the period ends
    sampler = asyncio.create_task(sub.run_sampler())
    await asyncio.sleep(0.08)
    await drain(sub)
    sampler.cancel()
    assert sorted((e["sym"], e["seq"]) for f in frames for e in f) == [
        ("AAPL", 7),
        ("AAPL", 8),
        ("MSFT", 1),
    ]


async def test_held_fragments_are_released_after_the_snapshot_without_repeats() -> None:
    sub, frames = subscriber()
    sub.symbols["AAPL"] = TRADE | QUOTE
    sub.hold(["AAPL"])
    sub.push("AAPL", ",".join([trade(4), quote(5)]), TRADE | QUOTE)
    sub.push("AAPL", trade(6), TRADE | QUOTE)
    sub.send_raw(quote(5))  # the snapshot, which covers seq 5
    sub.release("AAPL", 5, TRADE)  # and the client wants trades only
    await drain(sub)
    assert [(e["type"], e["seq"]) for f in frames for e in f] == [("quote", 5), ("trade", 6)]


async def test_a_live_event_older_than_the_snapshot_arriving_after_it_is_dropped() -> None:
    sub, frames = subscriber()
    sub.symbols["AAPL"] = TRADE | QUOTE
    sub.hold(["AAPL"])
    sub.send_raw(quote(9))  # the snapshot: read after seq 9 was published
    sub.release("AAPL", 9, TRADE | QUOTE)
    sub.push("AAPL", ",".join([trade(8), quote(9)]), TRADE | QUOTE)  # came late on pub/sub
    sub.push("AAPL", ",".join([trade(9), quote(10)]), TRADE | QUOTE)
    sub.push("AAPL", trade(11), TRADE | QUOTE)
    await drain(sub)
    assert seqs(frames) == [9, 10, 11]


async def test_a_type_mask_keeps_only_the_types_asked_for() -> None:
    sub, frames = subscriber()
    sub.push("AAPL", ",".join([trade(1), quote(2), trade(3)]), QUOTE)
    await drain(sub)
    assert seqs(frames) == [2]


# The fingerprint --------------------------------------------------------------------------------


def test_the_fingerprint_line_is_the_same_from_a_row_and_from_an_event() -> None:
    row = ("AAPL", "trade", 5, 77, 9, 100.0, 2.0, "buy", None, None, None, None, "X", None)
    event = {"type": "trade", "sym": "AAPL", "seq": 9, "ts": 5, "price": 100, "size": 2,
             "side": "buy", "venue": "X", "epoch": 77}  # fmt: skip
    line = "AAPL|trade|5|77|9|100.0|2.0|buy|||||X|\n"
    assert canonical_line(*row) == canonical_event(event) == line


def test_the_fingerprint_covers_every_tick_in_order() -> None:
    a = {"type": "quote", "sym": "X", "seq": 1, "ts": 10, "bid": 1.0, "ask": 2.0, "crossed": False}
    b = {**a, "seq": 2, "ts": 11, "crossed": True}
    one, two, swapped = Fingerprint(), Fingerprint(), Fingerprint()
    for fp, events in ((one, [a, b]), (two, [a, b]), (swapped, [b, a])):
        for ev in events:
            fp.add_event(ev)
    assert one.hexdigest() == two.hexdigest() != swapped.hexdigest()
    assert one.summary() == {"count": 2, "first_ts": 10, "last_ts": 11,
                             "fingerprint": one.hexdigest()}  # fmt: skip
    assert canonical_event(b).endswith("|1\n") and canonical_event(a).endswith("|\n")


# Parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "ns"),
    [
        ("2026-01-02T14:30:00Z", 1_767_364_200 * 10**9),
        ("2026-01-02T14:30:00", 1_767_364_200 * 10**9),  # naive is UTC
        ("2026-01-02T15:30:00 01:00", 1_767_364_200 * 10**9),  # "+" unescaped in a URL
        ("2026-01-02T14:30:00.000000001Z"[:26] + "Z", 1_767_364_200 * 10**9),
        ("1767364200000000000", 1_767_364_200 * 10**9),
        ("-5", -5),
    ],
)
def test_times_are_iso_or_integer_ns(raw: str, ns: int) -> None:
    assert parse_time("start", raw) == ns


@pytest.mark.parametrize("raw", ["", "yesterday", "9" * 20, "²", "3000-01-01T00:00:00Z", None])
def test_a_bad_time_is_a_422_saying_what_to_send(raw: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse_time("start", raw)
    assert err.value.status == 422 and err.value.code == "bad_parameter"


def test_integers_and_flags() -> None:
    assert parse_int("limit", None, 10, 1, 100) == 10 and parse_int("limit", "42", 10, 1, 100) == 42
    for bad in ("0", "101", "1_0", "٤٢", "4.2"):
        with pytest.raises(ApiError, match="integer from 1 to 100"):
            parse_int("limit", bad, 10, 1, 100)
    assert parse_flag("x", "YES") is True and parse_flag("x", "0") is False
    assert parse_flag("x", None) is False
    with pytest.raises(ApiError, match="true or false"):
        parse_flag("x", "maybe")


def test_symbols_are_upper_case_each_once_and_checked() -> None:
    assert parse_symbols(" aapl,MSFT,aapl ", 10) == ["AAPL", "MSFT"]
    with pytest.raises(ApiError) as err:
        parse_symbols("AAPL,no good", 10)
    assert err.value.code == "invalid_symbol" and err.value.extra["symbols"] == ["NO GOOD"]
    with pytest.raises(ApiError, match="at most 1"):
        parse_symbols("A,B", 1)


@pytest.mark.parametrize("sym", ["AAPL\n", "AAPL\r\n", " AAPL", "", "aapl", "-AAPL", "A" * 33, 7])
def test_what_is_not_a_symbol(sym: object) -> None:
    assert not is_valid_symbol(sym)


@pytest.mark.parametrize("sym", ["AAPL", "BTC/USD", "BRK.B", "ES_F", "X", "A" * 32])
def test_what_is_a_symbol(sym: str) -> None:
    assert is_valid_symbol(sym)


# A live source's latency window ---------------------------------------------------------------


def _venue_feed() -> VenueFeed:
    return VenueFeed(ADAPTERS["binance"], {"BTCUSDT": "BTCUSDT"})


def _trade(trade_id: int, recv_ns: int, latency_ns: int) -> Trade:
    return Trade("BTCUSDT", recv_ns - latency_ns, 100.0, 1.0, "buy", "BINANCE", trade_id, recv_ns)


def test_a_busy_sources_latency_comes_from_a_few_ticks_of_each_batch_spread_evenly() -> None:
    feed = _venue_feed()
    second = 1_790_000_000 * 10**9
    # 5,000 ticks in one batch whose latency grows 1 µs per tick: 1..5,000 µs.
    for i in range(5000):
        feed.trade(_trade(i + 1, second + i, (i + 1) * 1000), None)
    assert len(feed.due(0, 0)) == 5000
    ((_, samples),) = feed._latency
    assert 5 <= len(samples) <= 11  # about ten, not 5,000
    assert min(samples) <= 501_000 and max(samples) >= 4_500_000  # from across the batch
    p50, p99, spark = feed.latency_ms(second + 10**9 // 2)
    assert p50 is not None and 2.0 <= p50 <= 3.0 and p99 is not None and p99 >= 4.5
    assert len(spark) == 1


def test_a_quiet_sources_every_tick_counts_and_snapshots_and_untimed_ticks_never_do() -> None:
    feed = _venue_feed()
    second = 1_790_000_000 * 10**9
    feed.trade(_trade(1, second, 4_000_000), None, snapshot=True)  # from before subscribing
    feed.trade(_trade(2, second + 1, 0), None)  # no venue time: receive time stood in
    feed.trade(_trade(3, second + 2, 2_000_000), None)
    feed.trade(_trade(4, second + 3, 6_000_000), None)
    feed.due(0, 0)
    assert [s for _, s in feed._latency] == [[2_000_000, 6_000_000]]
    assert not feed._snapshots  # forgotten once handed over


def test_latency_keeps_at_most_a_thousand_samples_a_second() -> None:
    feed = _venue_feed()
    second = 1_790_000_000 * 10**9
    trade_id = 0
    for _ in range(300):  # 300 batches of 5 ticks received in the same second
        for _ in range(5):
            trade_id += 1
            feed.trade(_trade(trade_id, second + trade_id, 1_000_000), None)
        feed.due(0, 0)
    ((_, samples),) = feed._latency
    assert len(samples) == 1000
