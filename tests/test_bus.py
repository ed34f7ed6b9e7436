"""The Redis wire format: sequencing, epochs, history and latest ticks, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis

from server.live.bus import Bus, Layout, SeqState, encode_upstream_gap
from server.ticks import Quote, Trade
from tests.harness import RedisProcess

T0 = 1_790_000_000_000_000_000


@pytest.fixture
async def bus(tmp_path) -> AsyncIterator[Bus]:
    proc = RedisProcess(tmp_path)
    proc.start()
    redis = Redis.from_url(proc.url)
    yield Bus(redis, history_per_symbol=100)
    await redis.aclose()
    proc.kill()


def trade(sym: str, i: int, **kw) -> Trade:
    return Trade(sym, T0 + i, 100.0 + i / 100, 10.0, **kw)


def quote(sym: str, i: int, bid: float = 99.99, ask: float = 100.01) -> Quote:
    return Quote(sym, T0 + i, bid, 100.0, ask, 200.0)


async def test_seq_is_contiguous_per_symbol_across_trades_and_quotes(bus: Bus) -> None:
    await bus.publish([quote("AAPL", 1), trade("AAPL", 2), quote("MSFT", 3)])
    states = await bus.publish([trade("AAPL", 4), quote("MSFT", 5), quote("AAPL", 6)])
    assert states["AAPL"].seq == 4 and states["MSFT"].seq == 2
    frags = await bus.history("AAPL", 0)
    events = orjson.loads("[" + ",".join(f.decode() for f in frags) + "]")
    assert [(e["type"], e["seq"]) for e in events] == [
        ("quote", 1), ("trade", 2), ("trade", 3), ("quote", 4)
    ]  # fmt: skip


async def test_published_message_is_ready_to_wrap_in_a_frame(bus: Bus) -> None:
    pubsub = bus.redis.pubsub()
    await pubsub.subscribe(Layout().channel("AAPL"))
    await pubsub.get_message(timeout=1)
    await bus.publish([trade("AAPL", 1, side="buy"), quote("AAPL", 2)])
    msg = None
    while msg is None:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    await pubsub.aclose()
    events = orjson.loads(b"[" + msg["data"] + b"]")
    assert events[0]["type"] == "status" and events[0]["code"] == "epoch_changed"
    assert events[1] == {
        "type": "trade", "sym": "AAPL", "seq": 1, "ts": T0 + 1, "price": 100.01, "size": 10.0,
        "side": "buy",
    }  # fmt: skip
    assert events[2]["type"] == "quote" and events[2]["seq"] == 2


async def test_epoch_changes_only_when_redis_loses_the_sequence(bus: Bus) -> None:
    first = (await bus.publish([trade("AAPL", 1)]))["AAPL"]
    again = (await bus.publish([trade("AAPL", 2)]))["AAPL"]
    assert again.epoch == first.epoch and again.seq == 2
    await bus.redis.flushall()
    await asyncio.sleep(0.002)
    restarted = (await bus.publish([trade("AAPL", 3)]))["AAPL"]
    assert restarted.seq == 1 and restarted.epoch != first.epoch
    assert await bus.known_symbols() == {"AAPL"}


async def test_latest_holds_the_last_trade_and_quote(bus: Bus) -> None:
    await bus.publish([trade("AAPL", 1), quote("AAPL", 2), trade("AAPL", 3)])
    latest = await bus.latest(["AAPL", "NOPE"])
    assert orjson.loads(latest["AAPL"].trade)["seq"] == 3
    assert orjson.loads(latest["AAPL"].quote)["seq"] == 2
    assert latest["AAPL"].seq == 3
    assert latest["NOPE"].epoch is None and latest["NOPE"].trade is None


async def test_crossed_quote_is_kept_and_flagged(bus: Bus) -> None:
    await bus.publish([quote("EURUSD", 1, bid=1.1002, ask=1.1001)])
    q = orjson.loads((await bus.latest(["EURUSD"]))["EURUSD"].quote)
    assert q["crossed"] is True and q["bid"] > q["ask"]


async def test_recent_history_is_capped_per_symbol(bus: Bus) -> None:
    for i in range(30):
        await bus.publish([trade("AAPL", i * 10 + k) for k in range(10)])
    frags = await bus.history("AAPL", 0)
    seqs = [e["seq"] for f in frags for e in orjson.loads(b"[" + f + b"]")]
    assert seqs[-1] == 300
    assert 100 <= len(seqs) <= 200, "trimmed to about history_per_symbol events"
    assert seqs == list(range(seqs[0], 301))
    resumed = [
        e["seq"] for f in await bus.history("AAPL", 295) for e in orjson.loads(b"[" + f + b"]")
    ]
    assert resumed[-5:] == [296, 297, 298, 299, 300]


async def test_concurrent_publishers_never_share_a_seq(bus: Bus) -> None:
    async def publisher(offset: int) -> None:
        for i in range(50):
            await bus.publish([trade("AAPL", offset + i), quote("AAPL", offset + i)])

    await asyncio.gather(*(publisher(1000 * p) for p in range(4)))
    assert (await bus.seq_states(["AAPL"]))["AAPL"].seq == 400


async def test_a_batch_sent_again_under_its_id_is_answered_not_applied_twice(bus: Bus) -> None:
    bus.publisher = "sim"
    batch = [trade("AAPL", 1), quote("MSFT", 2), trade("AAPL", 3)]
    gaps = {id(batch[2]): [encode_upstream_gap("BINANCE", 7, 8, T0)]}  # AAPL's args run longer
    first = await bus.publish_group(batch, gaps, batch="run.1")
    again = await bus.publish_group(batch, gaps, batch="run.1")
    assert again == first and first["AAPL"].seq == 2 and first["MSFT"].seq == 1
    assert await bus.redis.xlen("tp:log") == 1
    assert len(await bus.history("AAPL", 0)) == 1
    other = await bus.publish_group(batch, batch="run.2")  # a new batch: applied
    assert other["AAPL"].seq == 4
    assert (await Bus(bus.redis).publish_group(batch))["AAPL"].seq == 6  # no id: always applied


async def _events(bus: Bus, sym: str) -> list[dict[str, object]]:
    frags = await bus.history(sym, 0)
    return [e for f in frags for e in orjson.loads(b"[" + f + b"]")]


async def test_a_publish_after_the_first_keeps_the_feeds_numbering_and_latest(bus: Bus) -> None:
    """From its second publish on a feed numbers the events itself (it knows the seq it got
    back); what Redis holds is the same as the script numbering them: contiguous seqs, the
    latest trade and quote being those events, the channel carrying them."""
    await bus.publish([trade("AAPL", 1), quote("AAPL", 2)])
    pubsub = bus.redis.pubsub()
    await pubsub.subscribe(Layout().channel("AAPL"))
    await pubsub.get_message(timeout=1)
    states = await bus.publish([quote("AAPL", 3), trade("AAPL", 4, side="sell"), quote("AAPL", 5)])
    msg = None
    while msg is None:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    await pubsub.aclose()
    assert states["AAPL"].seq == 5
    events = await _events(bus, "AAPL")
    assert [(e["type"], e["seq"]) for e in events] == [
        ("trade", 1), ("quote", 2), ("quote", 3), ("trade", 4), ("quote", 5)
    ]  # fmt: skip
    assert orjson.loads(b"[" + msg["data"] + b"]") == events[2:]
    latest = (await bus.latest(["AAPL"]))["AAPL"]
    assert orjson.loads(latest.trade) == events[3] and events[3]["side"] == "sell"
    assert orjson.loads(latest.quote) == events[4]


async def test_a_symbol_another_publisher_moved_on_is_renumbered_not_doubled(bus: Bus) -> None:
    """A feed's own numbering is only used when Redis is where the feed left it: after another
    publisher's ticks of the same symbol the script numbers the events after theirs."""
    other = Bus(bus.redis)
    await bus.publish([trade("AAPL", 1), quote("AAPL", 2), trade("AAPL", 3)])
    await other.publish([trade("AAPL", 4), quote("AAPL", 5)])
    states = await bus.publish([quote("AAPL", 6), trade("AAPL", 7)])
    assert states["AAPL"].seq == 7
    events = await _events(bus, "AAPL")
    assert [e["seq"] for e in events] == list(range(1, 8))
    assert [e["ts"] for e in events] == [T0 + i for i in range(1, 8)]
    latest = (await bus.latest(["AAPL"]))["AAPL"]
    assert orjson.loads(latest.trade) == events[6] and orjson.loads(latest.quote) == events[5]


async def test_a_seq_found_behind_the_one_handed_out_is_not_handed_out_again(bus: Bus) -> None:
    """A promoted replica that missed the last writes holds an older seq under the same epoch:
    the feed's next events go on after the seq it was given, never reusing one."""
    first = (await bus.publish([trade("AAPL", i) for i in range(1, 4)]))["AAPL"]
    await bus.redis.hset(Layout().sym_key("AAPL"), "seq", 1)  # as the replica had it
    states = await bus.publish([trade("AAPL", 4), quote("AAPL", 5)])
    assert states["AAPL"] == SeqState(first.epoch, 5)
    assert [e["seq"] for e in await _events(bus, "AAPL")] == [1, 2, 3, 4, 5]
