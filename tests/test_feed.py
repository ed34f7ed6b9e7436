"""The tickerplant: validation at the edge, rejected ticks counted, the simulator's realism."""

from __future__ import annotations

import math
import time

import orjson
import pytest
import redis

from server.config import Settings
from server.feed.simulator import Simulator
from server.feed.tickerplant import Tickerplant
from server.ticks import Quote, Trade, reject_reason
from tests.harness import Stack

NOW = 1_790_000_000_000_000_000


@pytest.mark.parametrize(
    ("tick", "reason"),
    [
        (Trade("AAPL", NOW, 1.0, 1.0), None),
        (Trade("aapl", NOW, 1.0, 1.0), "bad_symbol"),
        (Trade("AA PL", NOW, 1.0, 1.0), "bad_symbol"),
        (Trade("A;DROP", NOW, 1.0, 1.0), "bad_symbol"),
        (Trade("", NOW, 1.0, 1.0), "bad_symbol"),
        (Trade("AAPL", 1_700_000_000, 1.0, 1.0), "bad_timestamp"),  # seconds, not ns
        (Trade("AAPL", float(NOW), 1.0, 1.0), "bad_timestamp"),  # type: ignore[arg-type]
        (Trade("AAPL", NOW, math.nan, 1.0), "bad_price"),
        (Trade("AAPL", NOW, math.inf, 1.0), "bad_price"),
        (Trade("AAPL", NOW, -1.0, 1.0), "bad_price"),
        (Trade("AAPL", NOW, 1.0, 0.0), "bad_size"),
        (Trade("AAPL", NOW, 1.0, 1.0, side="up"), "bad_side"),
        (Quote("EURUSD", NOW, 1.1, 1e6, 1.0999, 1e6), None),  # crossed: kept
        (Quote("AAPL", NOW, 0.0, 1.0, 1.0, 1.0), "bad_price"),
        (Quote("AAPL", NOW, 1.0, -5.0, 1.1, 1.0), "bad_size"),
        (Quote("EURUSD", NOW, 1.1, None, 1.1001, None), None),  # sizes unknown: allowed
    ],
)
def test_every_tick_is_validated_before_publishing(tick, reason) -> None:
    assert reject_reason(tick) == reason


def test_rejected_ticks_are_counted_with_reason_and_the_rest_kept() -> None:
    plant = Tickerplant(Settings(redis_url="redis://127.0.0.1:1/0"), Simulator(["AAPL"]))
    good = Trade("AAPL", NOW, 1.0, 1.0)
    kept = plant.screen(
        [good, Trade("AAPL", NOW, math.nan, 1.0), Quote("x", NOW, 1, 1, 1, 1), good]
    )
    assert kept == [good, good]
    assert plant.rejected == {"bad_price": 1, "bad_symbol": 1}
    assert [r["reason"] for r in plant.last_rejects] == ["bad_price", "bad_symbol"]


def test_simulator_is_reproducible_and_realistic() -> None:
    a = Simulator(["AAPL", "MSFT", "EURUSD"], seed=3).batch(2000, NOW, NOW + 10**9)
    b = Simulator(["AAPL", "MSFT", "EURUSD"], seed=3).batch(2000, NOW, NOW + 10**9)
    assert a == b
    trades = [t for t in a if isinstance(t, Trade)]
    assert 0.15 < len(trades) / len(a) < 0.35
    assert all(reject_reason(t) is None for t in a)
    book: dict[str, Quote] = {}
    last_ts: dict[str, int] = {}
    for t in a:
        assert t.ts > last_ts.get(t.sym, 0)
        last_ts[t.sym] = t.ts
        if isinstance(t, Quote):
            assert t.ask > t.bid
            assert (t.ask - t.bid) / t.bid < 0.002  # spreads of a few bps
            book[t.sym] = t
        elif t.sym in book:
            q = book[t.sym]
            assert q.bid - 1e-9 <= t.price <= q.ask + 1e-9, "trades print at or inside the quote"


def test_running_feed_reports_its_figures_in_redis(stack: Stack) -> None:
    r = redis.Redis.from_url(stack.redis.url)
    deadline = time.monotonic() + 5
    try:
        while not (fig := r.hgetall("tp:feed:sim")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0 < r.ttl("tp:feed:sim") <= 10, "figures expire when the feed dies"
    finally:
        r.close()
    assert fig[b"state"] == b"running"
    assert int(fig[b"published"]) > 0
    assert orjson.loads(fig[b"rejected"]) == {}
