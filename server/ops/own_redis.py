"""The project's own Redis: the redis-server ``tickpipe redis`` (so ``make run``) starts, and how a
process tells it from any other server on its port.

With ``TICKPIPE_REDIS_URL`` unset, every tickpipe process uses ``127.0.0.1:<redis_port>`` (6380),
where ``tickpipe redis`` runs redis-server with its data in ``<data_dir>/redis``. Some other
server may answer there first (someone else's Redis, another checkout's); the feed, recorder and
web processes then refuse to start instead of writing into it. The server is recognised by its
working directory (``CONFIG GET dir``): ours runs in our data directory.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from pathlib import Path

import redis

from server.config import Settings

SAY_WAITING_AFTER_S = 2.0


class Owner(enum.Enum):
    NOBODY = "nothing answers"
    OURS = "tickpipe's own"
    OTHER = "another server"


def data_dir(settings: Settings) -> Path:
    """Where the own Redis keeps its append-only file (absolute: redis-server runs there)."""
    return (settings.data_dir / "redis").resolve()


def probe(settings: Settings) -> tuple[Owner, str]:
    """Who answers at the own Redis' address, and what is known of it (its data directory, or
    why that cannot be told)."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError):
        return Owner.NOBODY, ""
    except redis.RedisError as exc:  # e.g. NOAUTH: a server with a password is not ours
        return Owner.OTHER, f"it answers {exc}"
    try:
        where = str(client.config_get("dir").get("dir", ""))
    except redis.RedisError as exc:
        return Owner.OTHER, f"CONFIG GET dir fails: {exc}"
    finally:
        client.close()
    if where and Path(where).resolve() == data_dir(settings):
        return Owner.OURS, where
    return Owner.OTHER, f"its data is in {where or 'an unknown place'}"


def refusal(settings: Settings, detail: str) -> str:
    """What to tell a user whose own-Redis port is taken by a server tickpipe did not start."""
    return (
        f"another Redis answers on 127.0.0.1:{settings.redis_port} ({detail}; "
        f"tickpipe's own keeps its data in {data_dir(settings)}), and tickpipe never writes into "
        "a Redis it did not start. Stop that server, or give tickpipe's own Redis another port "
        f"(TICKPIPE_REDIS_PORT={settings.redis_port + 10}), or set TICKPIPE_REDIS_URL to use that "
        "server on purpose."
    )


def wait_until_ours(settings: Settings, say: Callable[[str], None]) -> str | None:
    """Block until the own Redis answers; None once it does, or why this process must not use
    what answers (a message that says what to do). ``say`` hears, once, what it waits for."""
    started = time.monotonic()
    said = False
    while True:
        owner, detail = probe(settings)
        if owner is Owner.OURS:
            return None
        if owner is Owner.OTHER:
            return refusal(settings, detail)
        if not said and time.monotonic() - started > SAY_WAITING_AFTER_S:
            say(
                f"waiting for tickpipe's own Redis on 127.0.0.1:{settings.redis_port} "
                "(make run starts it; on its own: tickpipe redis)"
            )
            said = True
        time.sleep(0.2)
