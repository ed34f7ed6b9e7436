"""The tickerplant: validation at the edge, rejected ticks counted, the simulator's realism."""

from __future__ import annotations

import asyncio
import math
import time

import orjson
import pytest
import redis

from server.config import Settings
from server.feed.simulator import Simulator
from server.feed.tickerplant import Tickerplant
from server.ticks import Quote, Trade, reject_reason
from tests.harness import RedisProcess, Stack, eventually_sync

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
        (Quote("AAPL", NOW, 1.0, math.nan, 1.1, 1.0), "bad_size"),
        (Quote("AAPL", NOW, 1, 1, 2, 2), None),  # ints are numbers too
        (Quote("AAPL", NOW, None, None, 1.1, 1.0), None),  # one-sided (no bid): kept
        (Quote("AAPL", NOW, 1.0, 1.0, None, None), None),  # one-sided (no ask): kept
        (Quote("AAPL", NOW, None, None, None, None), "bad_price"),  # neither side
        (Quote("AAPL", NOW, None, 1.0, 1.1, 1.0), "bad_size"),  # a size of no bid
        (Quote("AAPL", NOW, 1.0, 1.0, None, 2.0), "bad_size"),  # a size of no ask
        (Quote("AAPL", NOW, None, None, -1.0, 1.0), "bad_price"),
        (Trade("AAPL", NOW, 1.0, 1.0, "buy", "XNAS", 7, NOW), None),  # a venue's, all fields
        (Trade("AAPL", NOW, 1.0, 1.0, "buy", "x nas", 7, NOW), "bad_venue"),
        (Trade("AAPL", NOW, 1.0, 1.0, "buy", "XNAS", 7, 1_700_000_000), "bad_timestamp"),
        (Trade(["AAPL"], NOW, 1.0, 1.0), "bad_symbol"),  # type: ignore[arg-type]
        (Quote("AAPL", NOW, 1.0, 1.0, 1.1, 1.0, ["XNAS"]), "bad_venue"),  # type: ignore[arg-type]
    ],
)
def test_every_tick_is_validated_before_publishing(tick, reason) -> None:
    assert reject_reason(tick) == reason
    assert reject_reason(tick) == reason  # again, its symbol and venue known valid by now


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
    try:
        fig = eventually_sync(lambda: r.hgetall("tp:feed:sim"), what="feed figures")
        assert 0 < r.ttl("tp:feed:sim") <= 10, "figures expire when the feed dies"
    finally:
        r.close()
    assert fig[b"state"] == b"running"
    assert int(fig[b"published"]) > 0
    assert orjson.loads(fig[b"rejected"]) == {}


def test_heartbeat_hashes_are_written_with_their_expiry_in_one_transaction(stack: Stack) -> None:
    """A reader never sees a feed's or web process's figures without their TTL, and a process
    that dies between the two writes leaves none behind for ever (a full-suite run once read
    the feed's hash between its HSET and its EXPIRE)."""
    r = redis.Redis.from_url(stack.redis.url)
    seen: list[list[str]] = []  # per figures hash written: what its client sent with it
    try:
        with r.monitor() as m:
            blocks: dict[tuple[str, str], list[str]] = {}  # per client, inside MULTI..EXEC
            deadline = time.monotonic() + 2.5  # the feed and web write theirs every second
            for event in m.listen():
                client = (event.get("client_address", ""), event.get("client_port", ""))
                command = event["command"].split()
                name = command[0].upper()
                if name == "MULTI":
                    blocks[client] = []
                elif name == "EXEC":
                    seen.append(blocks.pop(client, ["EXEC without MULTI"]))
                elif name in ("HSET", "EXPIRE") and command[1].startswith(
                    ("tp:feed:", "tp:{ops}:web:")
                ):
                    if client in blocks:
                        blocks[client].append(f"{name} {command[1]}")
                    else:
                        seen.append([f"{name} {command[1]} outside a transaction"])
                if time.monotonic() > deadline:
                    break
    finally:
        r.close()
    feeds = [b for b in seen if any("tp:feed:sim" in c for c in b)]
    webs = [b for b in seen if any("tp:{ops}:web:" in c for c in b)]
    assert feeds and webs, seen
    for block in feeds + webs:
        assert [c.split()[0] for c in block] == ["HSET", "EXPIRE"], block
        assert len({c.split()[1] for c in block}) == 1, block


class ReplyEater:
    """A TCP relay in front of a real Redis that, once armed, closes the connection instead of
    passing on the reply to the next publish (a call that carries ``tp:applied``): Redis ran
    the script, the feed never hears so, as when a master dies right after a write."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.eaten = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        asked = asyncio.Event()

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if self.armed and b"tp:applied" in data:
                    asked.set()
                up_w.write(data)
                await up_w.drain()

        async def redis_to_client() -> None:
            while data := await up_r.read(65536):
                if asked.is_set() and self.armed:
                    self.armed = False
                    self.eaten += 1
                    return  # the reply goes nowhere: both connections close below
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.close()
        up_w.close()


async def test_a_batch_whose_reply_was_lost_is_not_published_twice_by_the_retry(tmp_path) -> None:
    proc = RedisProcess(tmp_path)
    proc.start()
    relay = ReplyEater(proc.port)
    await relay.start()
    plant = Tickerplant(Settings(redis_url=f"redis://127.0.0.1:{relay.port}/0"), Simulator(["X"]))
    direct = redis.Redis.from_url(proc.url)
    try:
        await plant.publish([Trade("MSFT", NOW, 1.0, 1.0)])  # the script is loaded
        relay.armed = True
        batch = [Trade("AAPL", NOW + i, 100.0 + i, 1.0) for i in range(5)]
        await plant.publish(batch)
        assert relay.eaten == 1, "the reply to the first try was lost"
        assert plant.published == 6
        assert int(direct.hget("tp:sym:AAPL", "seq") or 0) == 5, "applied once, not twice"
        assert direct.xlen("tp:log") == 2
        assert direct.xlen("tp:hist:AAPL") == 1
        again = [Trade("AAPL", NOW + 10, 110.0, 1.0)]
        await plant.publish(again)  # the next batch is a new one
        assert int(direct.hget("tp:sym:AAPL", "seq") or 0) == 6
    finally:
        await plant.redis.aclose()
        direct.close()
        await relay.stop()
        proc.kill()
