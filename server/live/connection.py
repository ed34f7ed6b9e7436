"""Connections to Redis: the one place every process (feed, recorder, web, CLI) opens one.

``TICKPIPE_REDIS_MODE=standalone`` (the default): ``TICKPIPE_REDIS_URL`` is one ``redis://``
URL and a client is ``redis.asyncio.Redis``. ``cluster``: the URL names any node of a Redis
Cluster, or several seed nodes comma-separated (``redis://h1:7000,redis://h2:7000`` or
``redis://h1:7000,h2:7000``); a client is ``redis.asyncio.RedisCluster``, which learns the slot
map from the seeds, sends each command to the master of its key's slot and follows ``MOVED``,
``ASK`` and failovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import redis
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from server.config import Settings

log = logging.getLogger("tickpipe.redis")

# What every process talks to: one Redis, or a cluster behind the same command interface.
RedisClient: TypeAlias = Redis | RedisCluster
SyncRedisClient: TypeAlias = redis.Redis | redis.RedisCluster

# A cluster without a master for some slots (a failover under way) answers CLUSTERDOWN (a
# ResponseError) or leaves redis-py without a node for the slot: both pass, so wait and retry.
REDIS_DOWN = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.BusyLoadingError,
    rx.ClusterError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.AskError,  # a slot migrating (a reshard): the client follows ASK; past its retries, wait
    rx.MovedError,
    rx.SlotNotCoveredError,
    rx.RedisClusterException,
    rx.ReadOnlyError,
    OSError,
)


class SeedNode:
    """One node of ``TICKPIPE_REDIS_URL``: host, port and the credentials the URL carries."""

    __slots__ = ("host", "password", "port", "username")

    def __init__(self, part: str) -> None:
        url = urlsplit(part if "://" in part else "redis://" + part)
        if url.scheme not in ("redis", "rediss") or not url.hostname:
            raise ValueError(
                f"TICKPIPE_REDIS_URL: {part!r} is not a redis://host:port node; give one URL "
                "per node, comma-separated"
            )
        self.host = url.hostname
        self.port = url.port or 6379
        self.username = unquote(url.username) if url.username else None
        self.password = unquote(url.password) if url.password else None


def seed_nodes(settings: Settings) -> list[SeedNode]:
    """The nodes ``TICKPIPE_REDIS_URL`` names (one in standalone mode)."""
    return [SeedNode(p.strip()) for p in settings.redis_url.split(",") if p.strip()]


def open_redis(
    settings: Settings,
    *,
    socket_timeout: float | None,
    socket_connect_timeout: float = 2,
    pool_size: int | None = None,
    retry: bool = False,
) -> RedisClient:
    """A client for this deployment's Redis.

    ``pool_size``: at most that many connections (per node in a cluster), and a burst waits for
    one instead of failing. ``retry``: a command that met a dropped connection (a restart, a
    failover) is retried on a fresh one, so a request right after Redis is back is served."""
    backoff = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2) if retry else None
    if settings.cluster:
        seeds = seed_nodes(settings)
        first = seeds[0]
        return RedisCluster(
            startup_nodes=[ClusterNode(s.host, s.port) for s in seeds],
            username=first.username,
            password=first.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=pool_size or 100,
            # A failover takes the cluster a few seconds: keep re-reading the slot map meanwhile.
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        )
    if pool_size is not None:
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=pool_size,
            timeout=5,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=backoff,
        )
        return Redis(connection_pool=pool)
    if backoff is not None:
        return Redis.from_url(
            settings.redis_url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=backoff,
        )
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
    )


def open_sync_redis(settings: Settings, socket_connect_timeout: float = 1) -> SyncRedisClient:
    """A blocking client, for the command line."""
    if settings.cluster:
        seeds = seed_nodes(settings)
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(s.host, s.port) for s in seeds],
            username=seeds[0].username,
            password=seeds[0].password,
            socket_connect_timeout=socket_connect_timeout,
        )
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=socket_connect_timeout)


async def server_info(redis: RedisClient) -> dict[str, Any]:
    """INFO of the one Redis; on a cluster the fullest master's, with the clients of all
    masters together (what status judges: the first master to run out of memory stops the
    feed's symbols that live there)."""
    if isinstance(redis, Redis):
        return await redis.info()
    replies = cast(dict[str, dict[str, Any]], await redis.info(target_nodes=RedisCluster.PRIMARIES))
    infos = list(replies.values())

    def fill(info: dict[str, Any]) -> float:
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        return used / limit if limit else used / 2**40

    worst = dict(sorted(infos, key=fill)[-1])
    worst["connected_clients"] = sum(int(i.get("connected_clients", 0)) for i in infos)
    return worst


async def watch_silence(
    conn: Connection, received: Callable[[], int], quiet_s: float, what: str
) -> None:
    """For a subscription connection (idle is normal there, so no socket timeout): PING it when
    nothing was ``received`` for ``quiet_s``, and disconnect it if even the PING got no answer
    in ``quiet_s`` more (its reader then fails and reconnects). A server that hangs keeps its
    socket open; this is how it is noticed."""
    seen = -1
    while True:
        await asyncio.sleep(quiet_s)
        if received() != seen:
            seen = received()
            continue
        with contextlib.suppress(OSError, redis.RedisError):
            await conn.send_command("PING")
        await asyncio.sleep(quiet_s)
        if received() == seen:
            log.warning("%s silent for %.0f s, even to PING; dropping it", what, 2 * quiet_s)
            await conn.disconnect()
            return
