"""tickpipe on a real Redis Cluster (3 masters + 3 replicas, started by the ``redis_cluster``
fixture): hash-tagged keys, per-slot-group publishing and logs, sharded fan-out, and the path
from the feed to history, the same as on one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster as AsyncCluster
from redis.crc import key_slot

from server.config import Settings
from server.live.bus import Bus, Layout, encode_upstream_gap
from server.live.connection import open_redis
from server.ticks import Trade
from tests.cluster import RedisCluster
from tests.harness import Stack, close_code, eventually, recv_events, send

T0 = 1_790_000_000_000_000_000
SYMS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "JPM", "EURUSD", "BTC-USD"]


def cluster_settings(cluster: RedisCluster, **kw: object) -> Settings:
    return Settings(redis_mode="cluster", redis_url=cluster.url, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def bus(redis_cluster: RedisCluster) -> AsyncIterator[Bus]:
    settings = cluster_settings(redis_cluster)
    redis = open_redis(settings, socket_timeout=5)
    assert isinstance(redis, AsyncCluster)
    await redis.flushall()  # every master (a test starts from an empty cluster)
    yield Bus(redis, history_per_symbol=1000, layout=Layout.of(settings))
    await redis.aclose()


def test_cluster_mode_needs_a_url_and_a_single_url_needs_standalone() -> None:
    with pytest.raises(ValueError, match="TICKPIPE_REDIS_URL"):
        Settings(redis_mode="cluster")
    with pytest.raises(ValueError, match="TICKPIPE_REDIS_MODE=cluster"):
        Settings(redis_url="redis://127.0.0.1:7000,redis://127.0.0.1:7001")


def test_a_symbols_keys_channel_and_log_share_one_slot(redis_cluster: RedisCluster) -> None:
    lay = Layout.of(cluster_settings(redis_cluster))
    node = redis_cluster.masters()[0]
    with node.client() as r:

        def slot(name: str) -> int:
            return int(r.execute_command("CLUSTER", "KEYSLOT", name))

        for sym in SYMS:
            g = lay.group(sym)
            names = [lay.sym_key(sym), lay.hist_key(sym), lay.channel(sym), lay.log_key(g),
                     lay.symbols_key(g)]  # fmt: skip
            assert len({slot(n) for n in names}) == 1, names
        groups = {lay.group(s) for s in SYMS}
        owners = {redis_cluster.owner(lay.log_key(g)).port for g in groups}
        assert len(owners) > 1, "the test symbols should live on more than one master"
    assert Layout().sym_key("AAPL") == "tp:sym:AAPL", "standalone names carry no hash tag"


async def test_a_batch_across_slot_groups_is_published_per_group_with_contiguous_seq(
    bus: Bus,
) -> None:
    for i in range(30):
        await bus.publish([Trade(sym, T0 + i, 100.0 + i, 1.0) for sym in SYMS])
    states = await bus.seq_states(SYMS)
    assert {s: st.seq for s, st in states.items()} == dict.fromkeys(SYMS, 30)
    assert await bus.known_symbols() == set(SYMS)
    lay = bus.layout
    for sym in SYMS:
        seqs = [
            int(ev.split(b'"seq":')[1].split(b",")[0])
            for frag in await bus.history(sym, 0)
            for ev in frag.split(b'},{"type"')
        ]
        assert seqs == list(range(1, 31))
    for g in {lay.group(s) for s in SYMS}:
        mine = {s for s in SYMS if lay.group(s) == g}
        entries = await bus.redis.xrange(lay.log_key(g))
        assert len(entries) == 30, "one log entry per batch and slot group"
        for _id, fields in entries:
            in_entry = {p.split(b"=")[0].decode() for p in fields[b"e"].split(b",")}
            assert in_entry == mine


async def test_upstream_gaps_on_a_cluster_are_kept_per_slot_group_and_listed_together(
    bus: Bus,
) -> None:
    now = time.time_ns()
    await bus.publish([Trade("BTC-USD", now, 1.0, 1.0), Trade("AAPL", now, 2.0, 1.0)])
    assert bus.layout.group("BTC-USD") != bus.layout.group("AAPL")
    after = [Trade("BTC-USD", now, 1.0, 1.0), Trade("AAPL", now, 2.0, 1.0)]
    gaps = [(after[0], encode_upstream_gap("BINANCE", 5, 7, now + 1)),
            (after[1], encode_upstream_gap("ALPACA", 9, 9, now + 2))]  # fmt: skip
    await bus.publish(after, gaps)
    [_, fragment] = await bus.history("BTC-USD", 0)
    assert fragment.startswith(b'{"type":"status","code":"upstream_gap","sym":"BTC-USD"')
    assert b'"after_seq":1,' in fragment and b'"seq":2,' in fragment
    listed = await bus.upstream_gaps(now - 10**9, now + 10**9, 100)
    assert [(g["sym"], g["first_id"], g["missing"]) for g in listed] == [
        ("BTC-USD", 5, 3), ("AAPL", 9, 1)
    ]  # fmt: skip


async def test_live_ticks_on_a_cluster_are_contiguous_and_the_same_as_recorded_history(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    from tickpipe import Client

    redis_cluster.flush()  # no sequence or log left by another test
    stack = Stack(tmp_path, recorder=True, cluster=redis_cluster, feed_rate=400)
    stack.start()
    try:
        key = stack.key("cluster", ["realtime", "historical"])
        ws, _ = await stack.client(key)
        await send(ws, op="subscribe", symbols=SYMS)
        got: dict[tuple[str, int], dict] = {}
        deadline = time.monotonic() + 60
        while len(got) < 600 and time.monotonic() < deadline:
            for ev in await recv_events(ws):
                if ev["type"] in ("trade", "quote"):
                    assert (ev["sym"], ev["seq"]) not in got, f"doubled: {ev}"
                    got[(ev["sym"], ev["seq"])] = ev
                assert ev.get("code") != "gap", ev
        await ws.close()
        assert len(got) >= 600, f"only {len(got)} ticks in 60 s"
        by_sym: dict[str, list[int]] = {}
        for sym, seq in got:
            by_sym.setdefault(sym, []).append(seq)
        assert set(by_sym) == set(SYMS), "every symbol, from every master"
        for sym, seqs in by_sym.items():
            seqs.sort()
            assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"{sym}: seq not contiguous"
        lo = min(ev["ts"] for ev in got.values())
        hi = max(ev["ts"] for ev in got.values()) + 1

        async with Client(stack.base, key) as c:

            async def stored() -> dict[tuple[str, int], tuple[str, float]]:
                frame = await c.history(SYMS, lo - 10**9, hi + 10**9)
                return {
                    (r["sym"], r["seq"]): (r["type"], r["ts"].timestamp())
                    for r in frame.iter_rows(named=True)
                    if by_sym[r["sym"]][0] <= r["seq"] <= by_sym[r["sym"]][-1]
                }

            async def missing() -> tuple[int, list[tuple[str, int]]]:
                lost = sorted(set(got) - set(await stored()))
                return len(lost), lost[:5]

            await eventually(missing, lambda m: m[0] == 0, every=0.5,
                             what="every received tick in history")  # fmt: skip
            rows = await stored()
        assert set(rows) == set(got), "history holds exactly the ticks clients received"
        for k, (kind, ts) in rows.items():
            assert kind == got[k]["type"] and abs(ts - got[k]["ts"] / 1e9) < 1e-5
        names = {p.name.partition("~")[0] for p in (stack.data_dir / "history").rglob("*.parquet")}
        assert len(names) > 1 and all(n.startswith("g") for n in names), names
    finally:
        stack.stop()


async def test_a_channel_subscribed_by_a_stale_slot_map_moves_alone(
    redis_cluster: RedisCluster,
) -> None:
    from server.live.connection import seed_nodes
    from server.live.shards import Shards

    redis_cluster.flush()
    settings = cluster_settings(redis_cluster)
    lay = Layout.of(settings)
    # Two channels of different slot groups on one master.
    by_owner: dict[int, list[str]] = {}
    for sym in SYMS:
        by_owner.setdefault(redis_cluster.owner(lay.channel(sym)).port, []).append(sym)
    owner_port, syms = next((p, s) for p, s in by_owner.items() if len(s) >= 2)
    staying, moving = (lay.channel(s).encode() for s in syms[:2])
    assert lay.group(syms[0]) != lay.group(syms[1])
    confirmed: list[bytes] = []
    interrupted: list[bytes] = []
    got: list[tuple[bytes, bytes]] = []
    shards = Shards(
        seed_nodes(settings),
        lambda name, data: got.append((name, data)),
        confirmed.append,
        interrupted.extend,
    )
    try:
        await shards.subscribe([staying])
        await eventually(lambda: staying in confirmed, what="the first channel confirmed")
        target = next(m for m in redis_cluster.masters() if m.port != owner_port)
        await asyncio.to_thread(redis_cluster.assign_slot, key_slot(moving), target)
        await shards.subscribe([moving])  # the map still names the old owner
        await eventually(lambda: moving in confirmed, what="the moved channel confirmed")
        assert interrupted == [], "the other channel on the old owner's link is untouched"
        assert shards.owner(moving) == ("127.0.0.1", target.port)
        redis = open_redis(settings, socket_timeout=5)
        assert isinstance(redis, AsyncCluster)
        await redis.spublish(moving.decode(), b"x")
        await redis.spublish(staying.decode(), b"y")
        await redis.aclose()
        await eventually(lambda: len(got) == 2, what="a message on each channel")
    finally:
        await shards.stop()


async def test_status_quota_and_revocation_work_on_a_cluster(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    redis_cluster.flush()
    stack = Stack(tmp_path, recorder=True, cluster=redis_cluster, max_conns_per_key=1).start()
    try:
        admin = stack.key("ops", ["admin", "realtime"])

        async def status() -> dict:
            async with stack.http() as http:
                r = await http.get("/status", headers={"Authorization": f"Bearer {admin}"})
            return r.json()

        def all_up(body: dict) -> bool:
            parts = {p["id"]: p["state"] for p in body.get("services", [])}
            return (
                body.get("status") == "up"
                and parts.get("feed:sim") == "up"
                and parts.get("recorder") == "up"
                and parts.get("redis") == "up"
                and len(body.get("symbols", [])) == len(SYMS)
            )

        await eventually(status, all_up, every=0.5, what="every part up")
        # The quota script (connection sets and web heartbeats share the {ops} slot).
        key = stack.key("one", ["realtime"])
        ws, _ = await stack.client(key)
        second = await stack.connect(key)
        code, _ = await close_code(second)
        assert code == 4030, "one connection per key, counted in the cluster"
        # Revocation is a plain channel: the cluster broadcasts it to every node.
        listener = redis_cluster.masters()[-1].client().pubsub()
        listener.subscribe("tp:ctl:keys")
        assert listener.get_message(timeout=60)["type"] == "subscribe"
        assert stack.cli("keys", "revoke", "one").returncode == 0
        msg = listener.get_message(timeout=60)
        listener.close()
        assert msg is not None and msg["data"] == b"one"
        code, _ = await close_code(ws)
        assert code == 4004, "the open socket of the revoked key is closed"
    finally:
        stack.stop()
