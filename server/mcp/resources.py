"""The ``tick://SYMBOL/latest`` resource and its subscriptions.

Reading it answers what ``latest_ticks`` answers for one symbol. Subscribing (2025 revisions:
``resources/subscribe``; 2026-07-28: a ``subscriptions/listen`` stream) puts a ``TickWatch`` on
the process's hub, the same pub/sub connection the WebSockets use, so an MCP client costs no
Redis connection of its own. The watch tells its subscriber which symbols ticked at most once
per ``mcp_throttle_ms``; the subscriber then sends ``notifications/resources/updated`` and the
client reads the resource again. Subscriptions end on unsubscribe, at the end of the session or
stream, and when the key is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.subscriptions import ListenHandler, ResourceUpdated, ServerEvent
from redis.exceptions import RedisError

from server.api.errors import ApiError, require_scope
from server.api.history import require_entitled
from server.api.state import AppState
from server.live.hub import Hub, RedisUnavailable
from server.mcp.contract import RESOURCE_PREFIX, RESOURCE_SUFFIX
from server.ticks import is_valid_symbol

log = logging.getLogger("tickpipe.mcp")


def resource_uri(sym: str) -> str:
    return f"{RESOURCE_PREFIX}{sym}{RESOURCE_SUFFIX}"


def symbol_of(uri: str) -> str:
    """``tick://AAPL/latest`` -> ``AAPL`` (case-insensitive), or a 422 saying what a URI is."""
    sym = uri.removeprefix(RESOURCE_PREFIX).removesuffix(RESOURCE_SUFFIX).upper()
    if not (uri.startswith(RESOURCE_PREFIX) and uri.endswith(RESOURCE_SUFFIX)):
        raise ApiError(
            422,
            "bad_parameter",
            f"{uri[:80]!r} is not a tickpipe resource; use tick://SYMBOL/latest (e.g. "
            "tick://AAPL/latest; resources/list names them)",
        )
    if not is_valid_symbol(sym):
        raise ApiError(
            422,
            "invalid_symbol",
            "symbols are 1-32 characters of A-Z, 0-9 and . _ / -",
            symbols=[sym[:40]],
        )
    return sym


async def live_symbol(st: AppState, key: Any, uri: str) -> str:
    """The symbol of ``uri`` if ``key`` may watch it live: the realtime scope, the entitlement,
    and a feed that publishes it; else the REST error for what is missing."""
    sym = symbol_of(uri)
    require_scope(key, "realtime")
    require_entitled(key, [sym])
    try:
        [known] = await st.bus.are_known([sym])
    except (RedisError, OSError):
        raise ApiError(
            503, "unavailable", "live data store (Redis) unreachable; retry shortly"
        ) from None
    if not known:
        raise ApiError(404, "unknown_symbol", "no feed publishes these symbols", symbols=[sym])
    return sym


class TickWatch:
    """A hub listener for one MCP subscriber: collects the subscribed symbols that ticked and
    hands them to ``deliver`` at most once per ``interval_s`` (the first change after a quiet
    period at once). ``push`` runs on the hub's reader and never awaits."""

    def __init__(self, hub: Hub, interval_s: float, deliver: Callable[[list[str]], None]) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.deliver = deliver
        self.symbols: dict[str, int] = {}  # what the hub sees as this listener's subscriptions
        self._pending: dict[str, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last = -math.inf
        self.closed = False

    # -- the hub's Listener protocol (server.live.listener) --

    def hold(self, syms: list[str]) -> None:
        pass  # nothing to hold back: an update only says "read it again"

    def unhold(self, syms: list[str]) -> None:
        for sym in syms:
            self._pending.pop(sym, None)

    def release(self, sym: str, after_seq: int, mask: int) -> None:
        pass

    def push(self, sym: str, fragment: str, mask: int) -> None:
        if self.closed:
            return
        self._pending[sym] = None
        if self._timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last + self.interval_s - loop.time())
            self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self.closed or not self._pending:
            return
        self._last = asyncio.get_running_loop().time()
        syms = list(self._pending)
        self._pending.clear()
        self.deliver(syms)

    # -- for the subscriber --

    async def watch(self, syms: list[str]) -> None:
        """Start hearing about ``syms``; a 503 if Redis does not confirm in time."""
        try:
            await self.hub.subscribe(self, syms, ["trade", "quote"])
        except (RedisUnavailable, RedisError, OSError):
            raise ApiError(
                503, "unavailable", "live data store (Redis) unreachable; retry shortly"
            ) from None

    def unwatch(self, syms: list[str]) -> None:
        self.hub.unsubscribe(self, syms)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.hub.unsubscribe(self, list(self.symbols))


Notify = Callable[[str], Awaitable[None]]


class SessionSubscriptions:
    """The ``resources/subscribe`` URIs of one 2025-revision connection (an HTTP session or the
    stdio pipe), and the sending of their updates on its standalone stream."""

    def __init__(self, hub: Hub, interval_s: float, key_id: str) -> None:
        self.key_id = key_id
        self.uris: dict[str, str] = {}  # symbol -> the URI as the client spelled it
        self.notify: Notify | None = None  # set on every subscribe: the connection's sender
        self.watch = TickWatch(hub, interval_s, self._deliver)
        self._backlog: dict[str, None] = {}
        self._sender: asyncio.Task[None] | None = None

    def _deliver(self, syms: list[str]) -> None:
        self._backlog.update(dict.fromkeys(syms))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._backlog and self.notify is not None:
            syms = list(self._backlog)
            self._backlog.clear()
            for sym in syms:
                uri = self.uris.get(sym)
                if uri is not None:
                    await self.notify(uri)  # best effort: a closed stream drops it

    def close(self) -> None:
        self.watch.close()
        self.uris.clear()
        self._backlog.clear()
        if self._sender is not None:
            self._sender.cancel()


class _StreamBus:
    """The ``SubscriptionBus`` of one listen stream: the SDK's ``ListenHandler`` registers its
    listener here and this stream's ``TickWatch`` feeds it."""

    def __init__(self) -> None:
        self._listener: Callable[[ServerEvent], None] | None = None

    async def publish(self, event: ServerEvent) -> None:
        self.emit(event)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        self._listener = listener

        def unsubscribe() -> None:
            self._listener = None

        return unsubscribe

    def emit(self, event: ServerEvent) -> None:
        if self._listener is not None:
            self._listener(event)


class ListenStream:
    """One 2026-07-28 ``subscriptions/listen`` stream: the SDK's handler does the wire (the
    acknowledgment first, the subscription id on every frame, the graceful close); this feeds
    it the throttled updates of its symbols."""

    def __init__(self, hub: Hub, interval_s: float, key_id: str, uris: dict[str, str]) -> None:
        self.key_id = key_id
        self.uris = uris  # symbol -> the URI as the client spelled it
        self.bus = _StreamBus()
        self.handler = ListenHandler(self.bus)
        self.watch = TickWatch(hub, interval_s, self._deliver)

    def _deliver(self, syms: list[str]) -> None:
        for sym in syms:
            uri = self.uris.get(sym)
            if uri is not None:
                self.bus.emit(ResourceUpdated(uri=uri))

    def end(self) -> None:
        """Stop watching and end the stream gracefully (the client's iteration ends)."""
        self.watch.close()
        self.handler.close()


class Subscriptions:
    """Every MCP subscription of this process, so revocations and ended sessions end them."""

    def __init__(self, hub: Hub, interval_s: float) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.sessions: dict[str, SessionSubscriptions] = {}  # by connection id
        self.streams: set[ListenStream] = set()

    def session(self, conn_id: str, key_id: str) -> SessionSubscriptions:
        subs = self.sessions.get(conn_id)
        if subs is None or subs.key_id != key_id:
            if subs is not None:
                subs.close()
            subs = self.sessions[conn_id] = SessionSubscriptions(self.hub, self.interval_s, key_id)
        return subs

    def end_session(self, conn_id: str) -> None:
        subs = self.sessions.pop(conn_id, None)
        if subs is not None:
            subs.close()

    def stream(self, key_id: str, uris: dict[str, str]) -> ListenStream:
        stream = ListenStream(self.hub, self.interval_s, key_id, uris)
        self.streams.add(stream)
        return stream

    def end_stream(self, stream: ListenStream) -> None:
        self.streams.discard(stream)
        stream.watch.close()

    def enforce(self, is_active: Callable[[str], bool], ended: Callable[[str], bool]) -> None:
        """End the subscriptions of revoked keys and of connections that are gone."""
        for conn_id, subs in list(self.sessions.items()):
            if not is_active(subs.key_id) or ended(conn_id):
                self.end_session(conn_id)
        for stream in list(self.streams):
            if not is_active(stream.key_id):
                self.streams.discard(stream)
                stream.end()

    def close(self) -> None:
        for conn_id in list(self.sessions):
            self.end_session(conn_id)
        for stream in list(self.streams):
            self.streams.discard(stream)
            with contextlib.suppress(Exception):
                stream.end()
