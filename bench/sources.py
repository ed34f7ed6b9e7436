"""Live venue sources: how many venue messages per second one feed process parses, normalises
and publishes (issue 12; target: 100,000 messages/s per feed process).

    flock -x /work/.cpu.lock .venv/bin/python bench/sources.py     # 300,000 messages per source
    .venv/bin/python bench/sources.py --quick                        # 50,000

Per source, a stream of ``--messages`` venue messages is built from the captured messages of
``tests/data/venues`` (the trades and quotes each adapter publishes: Binance spot aggTrade and
bookTicker, Binance USD-M futures trade and bookTicker, Coinbase match and ticker, Kraken v2
trade and ticker, the data frames of Alpaca's documented SIP session as the venue framed them:
a quote, three trades in one frame, a quote; ``alpaca-paired``: the documented trade and quote
examples in one frame, the Alpaca stream of earlier runs), cycled in their captured order with
the venue's ids renumbered (trade ids and book update ids go on one by one per symbol from the
captured ones, so no message is a duplicate or leaves a hole); every other field is the captured
text. The
stream is then read as fast as the process goes through the source's real path: the adapter's
parser and normalisation and the session's continuity checks and latency window, in the
source's task, while the tickerplant's own loop (default settings: a batch every 10 ms)
screens and publishes atomically into a real redis-server, as in ``tickpipe feed --source``.
The WebSocket read is left out of that run (the reader stays at most 20,000 ticks ahead of
the publish, as a socket's backpressure would keep it); a third run puts it back: the whole feed
process as ``tickpipe feed --source`` runs it (the session connects to a local venue,
``tests.venues.FakeVenue`` in a process of its own, subscribes as against the venue, and reads
the same stream, sent as pre-built WebSocket frames as fast as the socket takes them, through
picows' client), from the first stream message sent to the last tick published. Every run is on
the feed process's event loop (``run_loop``: uvloop's).

Each source runs ``--repeat`` times (3); the fastest run of each kind is reported, the one
least disturbed by whatever else the machine runs. Reported per source: messages/s and ticks/s
(wall clock, first message read to last tick published) without and with the WebSocket read,
messages per CPU second of the feed process (its user + system time: what one core of its own
would sustain; a shared machine gives it less), its CPU µs per message with the read, without it,
and parsed only (no Redis), and Redis' CPU per message; with the machine, its load average, how
busy it was before each run, and a host probe (``bench.report.host_probe_us``) before and
after the source's runs.
Prints a table and writes ``bench/results/sources-<date>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import wait_quiet  # noqa: E402
from bench.report import (  # noqa: E402
    code_version,
    host_probe_us,
    machine,
    top_lines,
    write_results,
)
from server.config import Settings  # noqa: E402
from server.feed.sources import ADAPTERS, VenueFeed  # noqa: E402
from server.feed.sources.adapter import Adapter  # noqa: E402
from server.feed.tickerplant import Tickerplant, run_loop, settle_heap  # noqa: E402
from tests.harness import RedisProcess  # noqa: E402
from tests.venues import FakeVenue, lines, received  # noqa: E402

TARGET = 100_000
CHUNK = 100  # messages read between two turns of the event loop
AHEAD = 20_000  # ticks read but not yet published at most (a socket's backpressure)
QUIET_PCT = 40.0
QUIET_WAIT_S = 30.0


def _payload(text: str) -> dict[str, Any]:
    msg = orjson.loads(text)
    return msg.get("data", msg)


class Ids:
    """The next id per (symbol, field): each symbol's ids go on from its first captured one,
    one by one, so no message is a duplicate and none leaves a hole."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, str], int] = {}

    def __call__(self, sym: str, field: str, captured: int) -> int:
        key = (sym, field)
        value = self.next.get(key, captured)
        self.next[key] = value + 1
        return value


def _cycle(messages: list[str], n: int, renumber: Callable[[Any, Ids], Any]) -> list[str]:
    """``n`` messages cycling through ``messages`` in order, ids renumbered."""
    parsed = [orjson.loads(m) for m in messages]
    ids = Ids()
    out: list[str] = []
    while len(out) < n:
        out.extend(orjson.dumps(renumber(msg, ids)).decode() for msg in parsed)
    return out[:n]


def binance(kind: str, n: int) -> tuple[list[str], dict[str, str]]:
    if kind == "binance":
        captured = [m for m in lines("binance/spot_combined_capture.jsonl")
                    if "@aggTrade" in m or "@bookTicker" in m]  # fmt: skip
        trade_id = "a"
    else:
        captured = lines("binance/usdm_futures_combined_trade.jsonl") + [
            m for m in lines("binance/usdm_futures_combined_bookticker_aggtrade.jsonl")
            if "@bookTicker" in m
        ]  # fmt: skip
        trade_id = "t"

    def renumber(msg: dict[str, Any], ids: Ids) -> dict[str, Any]:
        d = dict(msg["data"])
        field = trade_id if "p" in d else "u"
        d[field] = ids(d["s"], field, d[field])
        return {"stream": msg["stream"], "data": d}

    syms = {_payload(m)["s"]: _payload(m)["s"] for m in captured}
    return _cycle(captured, n, renumber), syms


def coinbase(n: int) -> tuple[list[str], dict[str, str]]:
    captured = [m for m in lines("coinbase/exchange_feed_capture.jsonl")
                if '"type":"match"' in m or '"type":"ticker"' in m]  # fmt: skip

    def renumber(msg: dict[str, Any], ids: Ids) -> dict[str, Any]:
        d = dict(msg)
        d["sequence"] = ids(d["product_id"], "sequence", d["sequence"])
        if d["type"] == "match":
            d["trade_id"] = ids(d["product_id"], "trade_id", d["trade_id"])
        return d

    syms = {orjson.loads(m)["product_id"]: orjson.loads(m)["product_id"] for m in captured}
    return _cycle(captured, n, renumber), syms


def kraken(n: int) -> tuple[list[str], dict[str, str]]:
    captured = lines("kraken/v2_trade_docs.jsonl") + lines("kraken/v2_ticker_docs.jsonl")

    def renumber(msg: dict[str, Any], ids: Ids) -> dict[str, Any]:
        d = dict(msg)
        # The captured messages are each channel's snapshot; what follows a snapshot on the
        # venue is updates of the same shape (type "update").
        if ids(d["channel"], "round", 0):
            d["type"] = "update"
        if d["channel"] == "trade":
            d["data"] = [
                {**t, "trade_id": ids(t["symbol"], "trade_id", t["trade_id"])} for t in d["data"]
            ]
        else:  # Kraken numbers no quote: each round's differs in its bid size
            d["data"] = [{**q, "bid_qty": q["bid_qty"] + ids(q["symbol"], "q", 0)}
                         for q in d["data"]]  # fmt: skip
        return d

    return _cycle(captured, n, renumber), {"MATIC/USD": "MATIC/USD", "ALGO/USD": "ALGO/USD"}


def _alpaca_renumber(msg: list[dict[str, Any]], ids: Ids) -> list[dict[str, Any]]:
    return [{**p, "i": ids(p["S"], "i", p["i"])} if p["T"] == "t"
            else {**p, "bs": p["bs"] + ids(p["S"], "q", 0)} for p in msg]  # fmt: skip


def alpaca(n: int) -> tuple[list[str], dict[str, str]]:
    """The data frames of Alpaca's documented SIP session, as the venue framed them: a quote;
    three trades in one frame; a quote (5 points in 3 frames)."""
    captured = received("alpaca/stocks_v2_sip_wscat_docs.txt")[3:]  # after the subscription
    return _cycle(captured, n, _alpaca_renumber), {"AAPL": "AAPL", "AMD": "AMD"}


def alpaca_paired(n: int) -> tuple[list[str], dict[str, str]]:
    """Frames of two points: the documented trade and quote examples in one array (the Alpaca
    stream of the runs before 2026-12-01's last)."""
    points = [p for p in lines("alpaca/stocks_v2_data_points_docs.jsonl") if '"T":"t"' in p
              or '"T":"q"' in p]  # fmt: skip
    captured = ["[" + ",".join(points) + "]"]
    return _cycle(captured, n, _alpaca_renumber), {"AAPL": "AAPL", "AMD": "AMD"}


STREAMS: dict[str, Callable[[int], tuple[list[str], dict[str, str]]]] = {
    "binance": lambda n: binance("binance", n),
    "binance-futures": lambda n: binance("binance-futures", n),
    "coinbase": coinbase,
    "kraken": kraken,
    "alpaca": alpaca,
    "alpaca-paired": alpaca_paired,
}
# A stream's venue, where its name is not one.
VENUE_OF = {"alpaca-paired": "alpaca"}


def _adapter(kind: str) -> type[Adapter]:
    adapter = ADAPTERS[VENUE_OF.get(kind, kind)]
    if kind == "binance":
        adapter = type(adapter.__name__, (adapter,), {"agg_trades": True})
    return adapter


class CapturedFeed(VenueFeed):
    """The venue session with its connection replaced by the captured stream, read as fast as
    the process goes: a chunk of messages, then a turn for the tickerplant's loop (as a socket
    read that finds its buffer empty gives)."""

    def __init__(self, kind: str, names: dict[str, str], messages: list[str]) -> None:
        super().__init__(_adapter(kind), names, secrets={"key_id": "", "secret_key": ""})
        self.stream = messages
        self.read_all = asyncio.Event()

    async def run(self) -> None:
        on_message = self.adapter.on_message
        for i in range(0, len(self.stream), CHUNK):
            for raw in self.stream[i : i + CHUNK]:
                self.messages += 1
                on_message(raw, time.time_ns())
            await asyncio.sleep(0)
            while len(self._pending) > AHEAD:  # noqa: ASYNC110 (read no further ahead of the publish)
                await asyncio.sleep(0.001)
        self.read_all.set()
        await asyncio.Event().wait()


async def parse_only(kind: str, messages: list[str], names: dict[str, str]) -> dict[str, float]:
    """The adapter and the session's checks alone: no tickerplant, no Redis."""
    feed = CapturedFeed(kind, names, messages)
    cpu0, t0 = time.process_time(), time.perf_counter()
    on_message = feed.adapter.on_message
    ticks = 0
    for i in range(0, len(messages), CHUNK):
        for raw in messages[i : i + CHUNK]:
            feed.messages += 1
            on_message(raw, time.time_ns())
        while batch := feed.due(0, 0):  # taken as the tickerplant takes them, bounded
            ticks += len(batch)
    assert ticks == feed.ticks, (ticks, feed.figures())  # nothing dropped
    return {"ticks": ticks, "wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}


def frames(messages: list[str]) -> bytes:
    """The messages as a venue's server sends them: unmasked WebSocket text frames."""
    out = bytearray()
    for text in messages:
        data = text.encode()
        n = len(data)
        if n < 126:
            out += bytes((0x81, n))
        elif n < 65536:
            out += bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            out += bytes((0x81, 127)) + n.to_bytes(8, "big")
        out += data
    return bytes(out)


def _venue(kind: str, stream: bytes, pipe: Any) -> None:
    """The venue's process: a ``FakeVenue`` that subscribes the feed as the venue does, then on
    "go" writes the whole stream to the subscribed connection, as fast as the socket takes it."""

    async def main() -> None:
        venue = await FakeVenue(VENUE_OF.get(kind, kind)).start()
        pipe.send(venue.url)
        await venue.subscribed(1)
        pipe.send("subscribed")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        for conn in venue.conns:
            if conn.ready:
                conn.ws.transport.write(stream)
        await asyncio.Event().wait()

    asyncio.run(main())


def _settings(url: str, batch_ms: int | None) -> Settings:
    """The feed's default settings, publishing into ``url`` (``batch_ms``: another batch
    interval)."""
    settings = Settings(redis_url=url)
    if batch_ms is not None:
        settings = settings.model_copy(update={"feed_batch_ms": batch_ms})
    return settings


async def measure_read(
    kind: str,
    stream: bytes,
    names: dict[str, str],
    url: str,
    messages: int,
    ticks: int,
    batch_ms: int | None = None,
) -> dict[str, float]:
    """The whole feed process: the session reads the stream from a local venue's WebSocket,
    the tickerplant (``batch_ms``: another batch interval) publishes into the Redis at
    ``url``, until every tick is published."""
    ctx = multiprocessing.get_context("spawn")
    pipe, child_end = ctx.Pipe()
    venue = ctx.Process(target=_venue, args=(kind, stream, child_end), daemon=True)
    venue.start()
    try:
        loop = asyncio.get_running_loop()
        venue_url = await loop.run_in_executor(None, pipe.recv)
        feed = VenueFeed(_adapter(kind), names, url=venue_url,
                         secrets={"key_id": "", "secret_key": ""})  # fmt: skip
        plant = Tickerplant(_settings(url, batch_ms), feed)
        settle_heap()
        run = asyncio.create_task(plant.run())
        assert await loop.run_in_executor(None, pipe.recv) == "subscribed"
        read0 = feed.messages
        cpu0, t0 = time.process_time(), time.perf_counter()
        pipe.send("go")
        # (a tick dropped because too many waited for Redis would never be published)
        while plant.published < ticks and not run.done() and not feed.dropped:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        plant.stop()
        await run
        read = feed.messages - read0
    finally:
        venue.kill()
        venue.join()
    assert plant.published == ticks and not plant.rejected, (kind, plant.published, ticks)
    assert read >= messages and feed.dropped == 0, (read, messages, feed.figures())
    assert feed.malformed_count == 0 and feed.upstream_gaps == 0, feed.figures()
    return {"messages": messages, "ticks": ticks, "wall": wall, "cpu": cpu}


async def measure(
    kind: str,
    messages: list[str],
    names: dict[str, str],
    url: str,
    ticks: int,
    batch_ms: int | None = None,
) -> dict[str, float]:
    """Run the feed process's loop (tickerplant, default settings; ``batch_ms``: another batch
    interval) over the captured stream until every tick is published into the Redis at
    ``url``."""
    feed = CapturedFeed(kind, names, messages)
    plant = Tickerplant(_settings(url, batch_ms), feed)
    settle_heap()  # as the feed process does once started (run_feed)
    cpu0, t0 = time.process_time(), time.perf_counter()
    run = asyncio.create_task(plant.run())
    while plant.published < ticks and not run.done():  # noqa: ASYNC110 (no event to wait on)
        await asyncio.sleep(0.001)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    plant.stop()
    await run
    assert plant.published == ticks and not plant.rejected, (kind, plant.published, ticks)
    assert feed.malformed_count == 0 and feed.upstream_gaps == 0, feed.figures()
    assert feed.continuity.duplicates == 0, feed.figures()
    return {"messages": len(messages), "ticks": ticks, "wall": wall, "cpu": cpu}


def source_runs(kind: str, n: int, repeat: int, url: str, redis_pid: int | None) -> tuple[Any, ...]:
    """One source's runs, in a process of its own (as a feed process runs one source, and so
    that no source's runs leave their garbage to the next one's): the fastest of each kind."""
    messages, names = STREAMS[kind](n)
    stream = frames(messages)
    redis_ps = psutil.Process(redis_pid) if redis_pid else None
    r = redis.Redis.from_url(url)
    probes = [host_probe_us()]
    best: tuple[Any, ...] | None = None
    best_read: dict[str, float] | None = None
    for _ in range(repeat):  # the fastest run: the least disturbed by others
        parse = run_loop(parse_only(kind, messages, names))
        r.flushall()
        busy = wait_quiet(QUIET_PCT, QUIET_WAIT_S)
        load = os.getloadavg()
        rc0 = sum(redis_ps.cpu_times()[:2]) if redis_ps else 0.0
        full = run_loop(measure(kind, messages, names, url, int(parse["ticks"])))
        rc = (sum(redis_ps.cpu_times()[:2]) - rc0) if redis_ps else 0.0
        if best is None or full["wall"] < best[2]["wall"]:
            best = (kind, parse, full, rc, busy, load)
        r.flushall()
        wait_quiet(QUIET_PCT, QUIET_WAIT_S)
        read = run_loop(measure_read(kind, stream, names, url, len(messages), full["ticks"]))
        if best_read is None or read["wall"] < best_read["wall"]:
            best_read = read
        probes.append(host_probe_us())
    r.close()
    assert best is not None and best_read is not None
    return (*best, best_read, probes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300_000)
    ap.add_argument("--quick", action="store_true", help="50,000 messages per source")
    ap.add_argument("--repeat", type=int, default=3, help="runs per source; the fastest counts")
    ap.add_argument("--source", action="append", choices=list(STREAMS), help="(default: all)")
    args = ap.parse_args()
    n = 50_000 if args.quick else args.messages
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rp = RedisProcess(Path(tmp))
        rp.start()
        redis_pid = rp.proc.pid if rp.proc else None
        try:
            for kind in args.source or list(STREAMS):
                spawn = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    row = pool.submit(source_runs, kind, n, args.repeat, rp.url, redis_pid)
                    rows.append(row.result())
                kind, _, full, _, busy, load, read, probes = rows[-1]
                print(
                    f"{kind:16} {full['messages'] / full['wall']:>9,.0f} msgs/s "
                    f"{full['ticks'] / full['wall']:>9,.0f} ticks/s  "
                    f"{full['messages'] / full['cpu']:>9,.0f} msgs per CPU s; with the read "
                    f"{read['messages'] / read['wall']:>9,.0f} msgs/s "
                    f"(load {load[0]:.1f}, busy {busy:.0f}%, host probe "
                    f"{min(probes):.1f}-{max(probes):.1f} µs)",
                    flush=True,
                )
        finally:
            rp.kill()
    text = report(rows, n)
    print(text)
    write_results("sources", text, quick=args.quick or bool(args.source))
    return 0


def report(rows: list[tuple[Any, ...]], n: int) -> str:
    out = [
        "# Live venue sources: normalisation throughput per feed process",
        "",
        f"- Machine: {machine()}",
        f"- Code: {code_version()}",
        f"- Stream: {n:,} captured venue messages per source, ids renumbered, read as fast as "
        "possible by the adapter and the session's checks while the tickerplant's loop "
        "(default settings: a batch every 10 ms) publishes into a local redis-server; wall "
        "clock from the first message read to the last tick published. Then the same with the "
        "WebSocket read: a local venue process writes the stream as WebSocket frames as fast as "
        "the socket takes them, the feed's session reads it (picows' client) as `tickpipe feed "
        "--source` does; wall clock from the first frame sent to the last tick published. Each "
        "source in a process of its own; the fastest of the runs of each kind",
        f"- Target: {TARGET:,} messages/s per feed process",
        "",
        "| source | ticks per msg | messages/s (wall), with the WebSocket read | messages/s "
        "(wall), without it | ticks/s (wall), without it | messages per feed CPU second, with "
        "/ without the read | feed CPU µs per msg: with the read / without it (parse only) "
        "| Redis CPU µs per msg | load avg (1/5/15 min) | busy before | host probe µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for kind, parse, full, rc, busy, load, read, probes in rows:
        n_msgs = full["messages"]
        out.append(
            f"| {kind} | {full['ticks'] / n_msgs:.1f} | {n_msgs / read['wall']:,.0f} | "
            f"{n_msgs / full['wall']:,.0f} | {full['ticks'] / full['wall']:,.0f} | "
            f"{n_msgs / read['cpu']:,.0f} / {n_msgs / full['cpu']:,.0f} | "
            f"{read['cpu'] / n_msgs * 1e6:.1f} / {full['cpu'] / n_msgs * 1e6:.1f} "
            f"({parse['cpu'] / n_msgs * 1e6:.1f}) | "
            f"{rc / n_msgs * 1e6:.1f} | {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} | "
            f"{busy:.0f}% | {min(probes):.1f}-{max(probes):.1f} |"
        )
    out += [
        "",
        "Messages/s (wall) is what the feed process achieved on this machine as it was; on a "
        "shared machine (see the load average) the process gets a fraction of a core, so "
        "messages per feed CPU second is what one core it had to itself would sustain (the "
        "feed is one thread; Redis runs in its own process, its CPU apart). A CPU second of a "
        "shared host does more or less at different times: the host probe (µs for `sum(range("
        "1000))`, best of 5, taken in the source's process before its runs and after each; a "
        "quiet modern core takes about 10) is that yardstick, so rows and runs on hosts of "
        "other speeds can be compared.",
    ]
    out += ["", "What else ran just before the measurement (`top`):", "", "```"]
    out += [*top_lines(), "```", ""]
    return "\n".join(line.rstrip() for line in out)


if __name__ == "__main__":
    sys.exit(main())
