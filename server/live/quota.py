"""Connections per key across the deployment: one sorted set per key in Redis (``conns_key``),
shared by every web process."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from redis.exceptions import RedisError

from server.live.bus import WEB_KEY_PREFIX, conns_key
from server.live.connection import RedisClient

# Connections per key, counted across every web process in Redis: a sorted set per key whose
# members are ``<web process id>/<connection id>`` scored by an expiry the holder refreshes. A slot
# belongs to the web process that holds it (its id is that of its heartbeat hash
# ``tp:{ops}:web:<host>:<pid>``, 3 s TTL): acquiring first drops the slots of every process whose
# heartbeat is gone, so a process that died frees its slots within about 3 s, not at their expiry
# (which only backs this up). The heartbeat keys are named from the members, so on a cluster they
# and the connection sets share the ``{ops}`` hash tag: one slot, one node.
_ACQUIRE_LUA = """
local key, now, ttl, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local alive = {[ARGV[5]] = true}
for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
  local proc = string.match(member, '^(.+)/[^/]*$')
  if proc then
    if alive[proc] == nil then alive[proc] = redis.call('EXISTS', ARGV[6] .. proc) == 1 end
    if not alive[proc] then redis.call('ZREM', key, member) end
  end
end
if redis.call('ZCARD', key) >= limit then return 0 end
redis.call('ZADD', key, now + ttl, ARGV[3])
redis.call('PEXPIRE', key, ttl)
return 1
"""
QUOTA_TTL_MS = 60_000


class ConnectionQuota:
    """At most ``limit`` open WebSockets per key across the deployment.

    ``web_id`` names this web process as its heartbeat does (``<host>:<pid>``); the heartbeat
    must be in Redis before the first ``acquire``, or another process takes this one's slots
    for a dead process's. If Redis cannot be reached the connection is allowed: live data is
    down then anyway, and locking every client out would turn a Redis blip into an outage of the
    auth path too.
    """

    def __init__(self, redis: RedisClient, limit: int, web_id: str) -> None:
        self.redis = redis
        self.limit = limit
        self.web_id = web_id
        self._acquire = redis.register_script(_ACQUIRE_LUA)

    def _member(self, conn_id: str) -> str:
        return f"{self.web_id}/{conn_id}"

    async def acquire(self, key_id: str, conn_id: str) -> bool:
        now = int(time.time() * 1000)
        args: list[str | int] = [
            now,
            QUOTA_TTL_MS,
            self._member(conn_id),
            self.limit,
            self.web_id,
            WEB_KEY_PREFIX,
        ]
        try:
            ok = await self._acquire(keys=[conns_key(key_id)], args=args)
        except (RedisError, OSError):
            return True
        return bool(ok)

    async def refresh(self, held: Iterable[tuple[str, str]]) -> None:
        """Push the expiry of the slots this process holds (only those still there: a slot
        taken away while this process's heartbeat lapsed stays away)."""
        expiry = int(time.time() * 1000) + QUOTA_TTL_MS
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id, conn_id in held:
                    pipe.zadd(conns_key(key_id), {self._member(conn_id): expiry}, xx=True)
                    pipe.pexpire(conns_key(key_id), QUOTA_TTL_MS)
                await pipe.execute()
        except (RedisError, OSError):
            pass

    async def release(self, key_id: str, conn_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(conns_key(key_id), self._member(conn_id))
