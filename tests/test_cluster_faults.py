"""Faults on a real Redis Cluster under load: a master SIGKILLed while the feed publishes and
clients are subscribed on two web processes, and a slot migration (``redis-cli --cluster
reshard``). Resuming clients end with every stored tick, none twice; a plain client hears
``gap`` only for symbols whose master failed over, and only where it really missed a seq.

The figures (time to fail over, to recover, ticks clients missed live before resuming) are
printed: ``pytest -s tests/test_cluster_faults.py``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from server.config import Settings
from server.live.bus import Bus, Layout
from server.live.connection import open_redis
from tests.cluster import Node, RedisCluster
from tests.harness import Stack, eventually, recv_events, send

Tick = tuple[str, int, int, int, str]
SYMS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "JPM", "EURUSD", "BTC-USD"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A cluster of this module's own: its tests kill masters and move slots."""
    c = RedisCluster(tmp_path_factory.mktemp("fault-cluster")).start()
    yield c
    c.stop()


@dataclass
class Resuming:
    """A Python client (``tickpipe.Client``, resume on) collecting every tick it yields."""

    name: str
    # (sym, epoch, seq, ts, type): the ts and type tell a tick from another with the same seq
    ticks: list[Tick] = field(default_factory=list)
    at: dict[str, float] = field(default_factory=dict)  # sym -> when its last tick came
    sub: Any = None

    async def run(self, base: str, key: str) -> None:
        from tickpipe import Client

        async with Client(base, key) as c:
            self.sub = c.subscribe(SYMS)
            async for ev in self.sub:
                sym = ev["sym"]
                self.ticks.append(
                    (sym, self.sub.epochs.get(sym, 0), ev["seq"], ev["ts"], ev["type"])
                )
                self.at[ev["sym"]] = time.monotonic()

    def last(self, sym: str) -> int:
        return self.sub.last.get(sym, 0) if self.sub is not None else 0


@dataclass
class Plain:
    """A WebSocket client without resume: what is delivered live, and the status it hears."""

    seqs: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    gaps: list[dict[str, Any]] = field(default_factory=list)
    unavailable: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, stack: Stack, key: str) -> None:
        ws, _ = await stack.client(key)
        await send(ws, op="subscribe", symbols=SYMS)
        try:
            while True:
                for ev in await recv_events(ws):
                    if ev["type"] in ("trade", "quote"):
                        self.seqs[ev["sym"]].append(ev["seq"])
                    elif ev.get("code") == "gap":
                        self.gaps.append(ev)
                    elif ev.get("code") == "redis_unavailable":
                        self.unavailable.append(ev)
        finally:
            await ws.close()

    def heard(self) -> tuple[dict[str, int], set[str]]:
        """Seqs missed live per symbol (only those with some), and the symbols ``gap`` named."""
        missed = {s: self.missed(s) for s in SYMS if self.missed(s)}
        return missed, {s for g in self.gaps for s in g["symbols"]}

    def missed(self, sym: str) -> int:
        """Seqs between the first and the last received that never came."""
        seqs = sorted(set(self.seqs[sym]))
        return seqs[-1] - seqs[0] + 1 - len(seqs) if seqs else 0


def victim_of(cluster: RedisCluster, layout: Layout) -> tuple[Node, list[str]]:
    """The master that holds the most of the test symbols, and those symbols."""
    by_master: dict[int, list[str]] = collections.defaultdict(list)
    for sym in SYMS:
        by_master[cluster.owner(layout.log_key(layout.group(sym))).port].append(sym)
    port, syms = max(by_master.items(), key=lambda kv: len(kv[1]))
    return next(n for n in cluster.nodes if n.port == port), sorted(syms)


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def final_seqs(settings: Settings) -> dict[str, tuple[int, int]]:
    redis = open_redis(settings, socket_timeout=5)
    try:
        states = await Bus(redis, layout=Layout.of(settings)).seq_states(SYMS)
    finally:
        await redis.aclose()
    return {s: (st.epoch or 0, st.seq) for s, st in states.items()}


async def stored(stack: Stack, key: str, since_ns: int) -> list[Tick]:
    import polars as pl

    from tickpipe import Client

    async with Client(stack.base, key) as c:
        frame = await c.history(SYMS, since_ns, time.time_ns() + 10**9)
    frame = frame.with_columns(pl.col("ts").dt.epoch("ns"))
    return [
        (r["sym"], r["epoch"], r["seq"], r["ts"], r["type"]) for r in frame.iter_rows(named=True)
    ]


async def settle(
    stack: Stack, key: str, settings: Settings, since_ns: int, clients: list[Resuming]
) -> list[Tick]:
    """Once the feed stopped: every client got up to each symbol's last seq, and history holds
    every tick up to it. Returns the stored ticks."""
    last = await final_seqs(settings)
    for c in clients:
        await eventually(
            lambda c=c: all(c.last(s) >= last[s][1] for s in SYMS),
            timeout=60, every=0.2, what=f"{c.name} got every symbol's last seq",
        )  # fmt: skip

    async def complete() -> list[Tick] | None:
        rows = await stored(stack, key, since_ns)
        top: dict[str, int] = {}
        for sym, epoch, seq, _ts, _type in rows:
            if epoch == last[sym][0]:
                top[sym] = max(top.get(sym, 0), seq)
        return rows if all(top.get(s, 0) >= last[s][1] for s in SYMS) else None

    rows: list[Tick] = await eventually(
        complete, timeout=60, every=0.5, what="history up to every symbol's last seq"
    )
    return rows


def check_clients(rows: list[Tick], clients: list[Resuming]) -> dict[str, Any]:
    """0 doubled among stored ticks (no seq stored twice, no tick under two seqs), 0 doubled and
    0 lost by each resuming client (of the stored ticks from its first one on; a tick is the
    same only with the same ts and type: a seq handed out twice is two ticks)."""
    counts = collections.Counter(r[:3] for r in rows)
    doubled_stored = sum(n - 1 for n in counts.values())
    assert doubled_stored == 0, f"{doubled_stored} stored seqs doubled"
    # The simulator's ticks of a symbol all have their own ts: one stored under two seqs was
    # published twice (a retry whose first try the failed master had applied).
    twice = sum(n - 1 for n in collections.Counter((r[0], r[3], r[4]) for r in rows).values())
    assert twice == 0, f"{twice} ticks stored under two seqs"
    stored_set = set(rows)
    by_run: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for sym, epoch, seq, _ts, _type in rows:
        by_run[(sym, epoch)].append(seq)
    holes = sum(max(v) - min(v) + 1 - len(v) for v in by_run.values())
    figures: dict[str, Any] = {"stored": len(stored_set), "seqs_never_stored": holes}
    for c in clients:
        got = collections.Counter(c.ticks)
        doubled = sum(n - 1 for n in got.values())
        first: dict[tuple[str, int], int] = {}
        for sym, epoch, seq, _ts, _type in c.ticks:
            first[(sym, epoch)] = min(first.get((sym, epoch), seq), seq)
        due = {t for t in stored_set if (t[0], t[1]) in first and t[2] >= first[(t[0], t[1])]}
        lost = due - set(got)
        assert doubled == 0, f"{c.name}: {doubled} ticks twice"
        assert not lost, f"{c.name}: {len(lost)} stored ticks never yielded: {sorted(lost)[:5]}"
        figures[c.name] = {
            "ticks": len(got),
            "lost": len(lost),
            "doubled": doubled,
            "reconnects": c.sub.reconnects,
            "losses": [(x.sym, x.reason, x.from_seq, x.to_seq) for x in c.sub.losses],
        }
    return figures


@pytest.mark.parametrize("fault", ["sigkill", "sigkill-replica-behind", "sigstop"])
async def test_a_master_failing_under_load_loses_no_stored_tick_for_resuming_clients(
    tmp_path: Path, cluster: RedisCluster, fault: str
) -> None:
    """``sigkill``: the master dies, its replica in sync; ``-replica-behind``: its replica is
    stopped and cut off 0.6 s first, so it lacks the master's last writes; ``sigstop``: the
    master hangs with its connections open until the cluster fails it over."""
    cluster.flush()
    stack = Stack(tmp_path, recorder=True, cluster=cluster, feed_rate=400).start()
    web2, port2 = stack.other_web()
    settings = Settings(redis_mode="cluster", redis_url=cluster.url)
    tasks: list[asyncio.Task[None]] = []
    victim: Node | None = None
    try:
        key = stack.key("faults", ["realtime", "historical"])
        since_ns = time.time_ns() - 10**9
        one, two, plain = Resuming("web1"), Resuming("web2"), Plain()
        tasks = [
            asyncio.create_task(one.run(stack.base, key)),
            asyncio.create_task(two.run(f"http://127.0.0.1:{port2}", key)),
            asyncio.create_task(plain.run(stack, key)),
        ]
        await eventually(lambda: len(one.ticks) > 300 and len(two.ticks) > 300,
                         what="both clients receiving")  # fmt: skip
        victim, hit = victim_of(cluster, Layout.of(settings))
        before = {s: max(one.at.get(s, 0), two.at.get(s, 0)) for s in hit}
        t_kill = time.monotonic()
        if fault == "sigstop":
            failover_s = await asyncio.to_thread(cluster.freeze_master, victim)
        else:
            stall_s = 0.6 if fault == "sigkill-replica-behind" else 0.0
            failover_s = await asyncio.to_thread(cluster.kill_master, victim, stall_s)

        # A hung master may still deliver what it had sent before it stopped: count only ticks
        # that came after the cluster had failed it over.
        since = t_kill + (failover_s if fault == "sigstop" else 0.0)

        def recovered() -> bool:
            return all(c.at.get(s, 0) > max(before[s], since) for c in (one, two) for s in hit)

        await eventually(recovered, timeout=60, every=0.05, what="ticks of the failed-over symbols")
        recover_s = time.monotonic() - t_kill
        await asyncio.sleep(3)  # keep publishing on the new masters
        stack.feed.stop()  # type: ignore[union-attr]
        rows = await settle(stack, key, settings, since_ns, [one, two])
        figures = check_clients(rows, [one, two])
        missed, gap_syms = plain.heard()
        print(
            f"\n{fault} of master :{victim.port} (symbols {hit}): cluster ok again after "
            f"{failover_s:.2f} s, ticks of those symbols reach both web processes' clients "
            f"after {recover_s:.2f} s; plain client missed live {sum(missed.values())} ticks "
            f"{missed} and heard gap for {sorted(gap_syms)}; resuming clients: {figures}"
        )
        assert gap_syms <= set(hit), "gap only for symbols whose master failed over"
        assert set(missed) <= gap_syms, "every symbol with a missed seq was announced"
    finally:
        await cancel(tasks)
        web2.stop()
        stack.stop()
        if victim is not None and victim.port in cluster.frozen:
            cluster.thaw(victim)  # back as a replica: the next test finds every master paired
        elif victim is not None:
            cluster.restart(victim)


async def test_a_slot_migration_under_load_loses_and_doubles_nothing(
    tmp_path: Path, cluster: RedisCluster
) -> None:
    cluster.flush()
    stack = Stack(tmp_path, recorder=True, cluster=cluster, feed_rate=400).start()
    settings = Settings(redis_mode="cluster", redis_url=cluster.url)
    layout = Layout.of(settings)
    tasks: list[asyncio.Task[None]] = []
    try:
        key = stack.key("reshard", ["realtime", "historical"])
        since_ns = time.time_ns() - 10**9
        client, plain = Resuming("web"), Plain()
        tasks = [
            asyncio.create_task(client.run(stack.base, key)),
            asyncio.create_task(plain.run(stack, key)),
        ]
        await eventually(lambda: len(client.ticks) > 300, what="ticks flowing")
        # Move the fewest slots that carry one group of the test symbols: redis-cli takes a
        # source's slots from its lowest one up.
        masters = cluster.masters()
        ranges = {}
        with masters[0].client() as r:
            for lo, hi, port in cluster._slot_owners(r):
                ranges.setdefault(port, []).append((lo, hi))
        best: tuple[int, Node, str] | None = None
        for sym in SYMS:
            slot = key_slot(layout.log_key(layout.group(sym)).encode())
            owner = cluster.owner(layout.log_key(layout.group(sym)))
            lo = min(lo for lo, _hi in ranges[owner.port])
            if best is None or slot - lo + 1 < best[0]:
                best = (slot - lo + 1, owner, sym)
        assert best is not None
        n, source, sym = best
        target = next(m for m in masters if m.port != source.port)
        moved = [s for s in SYMS if layout.group(s) == layout.group(sym)]
        t0 = time.monotonic()
        await asyncio.to_thread(cluster.reshard, source, target, n)
        reshard_s = time.monotonic() - t0
        assert cluster.owner(layout.log_key(layout.group(sym))).port == target.port
        await asyncio.sleep(3)
        stack.feed.stop()  # type: ignore[union-attr]
        rows = await settle(stack, key, settings, since_ns, [client])
        figures = check_clients(rows, [client])
        missed, gap_syms = plain.heard()
        print(
            f"\nreshard of {n} slots :{source.port} -> :{target.port} (moving {moved}) took "
            f"{reshard_s:.2f} s; plain client missed live {sum(missed.values())} ticks {missed}, "
            f"heard gap for {sorted(gap_syms)}; resuming client: {figures}"
        )
        assert set(missed) <= gap_syms, "every symbol with a missed seq was announced"
    finally:
        await cancel(tasks)
        stack.stop()


async def test_a_recorder_killed_twice_on_a_cluster_stores_every_tick_exactly_once(
    tmp_path: Path, cluster: RedisCluster
) -> None:
    """Each slot group's log has its own consumer group and high-water mark: whatever a killed
    recorder had read, written or acknowledged, the next one stores each tick once."""
    import signal

    import polars as pl

    from server.history.store import scan

    cluster.flush()
    stack = Stack(tmp_path, recorder=True, cluster=cluster, feed_rate=400, recorder_flush_s=0.3)
    stack.start()
    settings = Settings(redis_mode="cluster", redis_url=cluster.url)
    recorder = stack.recorder
    assert recorder is not None
    try:
        for _ in range(2):
            await asyncio.sleep(1.5)
            recorder.stop(signal.SIGKILL)
            await asyncio.sleep(0.5)
            recorder.start()
        await asyncio.sleep(1.5)
        stack.feed.stop()  # type: ignore[union-attr]
        last = await final_seqs(settings)
        root = stack.data_dir / "history"

        def files() -> pl.DataFrame:
            paths = [f.path for f in scan(root).files]
            return pl.read_parquet(paths).select("sym", "epoch", "seq") if paths else pl.DataFrame()

        def complete(frame: pl.DataFrame) -> bool:
            if not frame.height:
                return False
            top = dict(frame.group_by("sym").agg(pl.col("seq").max()).iter_rows())
            return all(top.get(s, 0) >= last[s][1] for s in SYMS)

        frame = await eventually(files, complete, timeout=60, every=0.5, what="every tick stored")
        for sym in SYMS:
            seqs = frame.filter(pl.col("sym") == sym)["seq"].sort().to_list()
            assert seqs == list(range(1, last[sym][1] + 1)), f"{sym}: lost or doubled"
        logs = {f.log for f in scan(root).files}
        print(f"\nrecorder SIGKILLed twice: {frame.height} ticks stored once, logs {sorted(logs)}")
        assert len(logs) > 1
    finally:
        stack.stop()
