"""Everything a web process holds (Redis, the hub, keys, quotas, caches, status, query history),
built from its settings in one place. The routes, the WebSocket endpoint and the MCP server read
it from ``request.app.state.tp``; ``tickpipe mcp`` builds the same for its stdio server."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from server.auth import KeyStore
from server.config import Settings
from server.live.bus import Bus, Layout
from server.live.connection import RedisClient, open_redis
from server.live.hub import Hub
from server.live.latest import LatestCache
from server.live.quota import ConnectionQuota
from server.ops.board import StatusBoard
from server.ops.metrics import make_registry
from server.ops.queries import QueryLog


@dataclass
class AppState:
    settings: Settings
    redis: RedisClient
    bus: Bus
    hub: Hub
    keys: KeyStore
    quota: ConnectionQuota
    latest: LatestCache
    started_ns: int
    queries: QueryLog
    status: StatusBoard
    metrics: CollectorRegistry


def open_state(settings: Settings) -> AppState:
    """Every part of a web process, built and not yet started (``tickpipe mcp`` builds the same
    for its stdio server)."""
    # A bounded pool: a burst of 1,000 subscribes queues for a connection instead of failing.
    redis = open_redis(
        settings, socket_timeout=2, pool_size=settings.redis_max_connections, retry=True
    )
    bus = Bus(redis, settings.history_per_symbol, layout=Layout.of(settings))
    hub = Hub(settings, bus)
    started_ns = time.time_ns()
    board = StatusBoard(settings, redis, hub, started_ns)
    return AppState(
        settings,
        redis,
        bus,
        hub,
        KeyStore(settings.keys_db),
        ConnectionQuota(redis, settings.max_conns_per_key, board.web_id),
        LatestCache(hub, bus),
        started_ns,
        QueryLog(settings.queries_db, settings.query_log_max),
        board,
        make_registry(board, hub),
    )


async def close_state(st: AppState) -> None:
    """Store the query history still in memory (first: a process told to stop may not get to
    the end), stop the hub, close Redis and the key file."""
    await st.queries.flush()
    await st.hub.stop()
    await st.redis.aclose()
    if isinstance(st.redis, Redis):
        await st.redis.connection_pool.disconnect()
    st.keys.close()
    await st.queries.flush()  # what came in meanwhile
    st.queries.close()
