"""``GET /ws``: authenticate, then subscribe/unsubscribe/ping; ticks arrive through the hub."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from server import wire
from server.api.screening import Rejection, normalise, screen_symbols
from server.api.state import AppState
from server.api.ws_replay import ConnectionReplays
from server.auth import ApiKey, bearer_token
from server.catchup.backlog import Sources
from server.catchup.resume import Resume
from server.live.bus import Latest
from server.live.hub import RedisUnavailable
from server.live.subscriber import Subscriber
from server.wire import CloseCode, ProtocolError

log = logging.getLogger("tickpipe.ws")
WS_SCOPES = ("realtime", "replay", "admin")
MAX_BAD_STREAK = 20  # consecutive unusable messages before the connection is closed (4000)
R = TypeVar("R", wire.Subscribe, wire.Unsubscribe, wire.Replay)


async def close_with(
    ws: WebSocket, code: int, event: dict[str, Any] | None, timeout: float
) -> None:
    """Send a last ``error`` event and close, its code and message in the close frame too; give
    up after ``timeout`` (peer not reading)."""
    with contextlib.suppress(Exception):
        if event is not None:
            await asyncio.wait_for(ws.send_text(wire.frame(event)), timeout)
        await asyncio.wait_for(ws.close(code, wire.close_reason(code, event)), timeout)


async def authenticate(ws: WebSocket, st: AppState) -> ApiKey | None:
    """The key from the ``Authorization`` header, or from a first ``auth`` message."""
    timeout = st.settings.slow_close_timeout_s
    header = ws.headers.get("authorization")
    if header is not None:
        secret = bearer_token(header)
        req_id = None
    else:
        try:
            msg = await asyncio.wait_for(ws.receive(), st.settings.auth_timeout_s)
        except TimeoutError:
            await close_with(
                ws,
                CloseCode.AUTH_TIMEOUT,
                wire.error(
                    "auth_timeout",
                    f"no auth within {st.settings.auth_timeout_s:g}s; send "
                    '{"op": "auth", "key": "..."} first, or an Authorization: Bearer header',
                    fatal=True,
                ),
                timeout,
            )
            return None
        if msg["type"] == "websocket.disconnect":
            return None
        secret, req_id = None, None
        try:
            op = wire.parse_client_message(msg.get("text") or "", st.settings.max_inbound_bytes)
            req_id = op.id
            if isinstance(op, wire.Auth):
                secret = op.key
        except ProtocolError as exc:
            req_id = exc.req_id
        if secret is None:
            await close_with(
                ws,
                CloseCode.UNAUTHORIZED,
                wire.error(
                    "unauthorized",
                    'the first message must be {"op": "auth", "key": "<your key>"}',
                    req_id,
                    fatal=True,
                ),
                timeout,
            )
            return None
    key = st.keys.lookup(secret)
    if key is None:
        await close_with(
            ws,
            CloseCode.UNAUTHORIZED,
            wire.error(
                "unauthorized",
                "missing, unknown or revoked key; create one with 'tickpipe keys create'",
                req_id,
                fatal=True,
            ),
            timeout,
        )
        return None
    if not any(key.has_scope(s) for s in WS_SCOPES):
        await close_with(
            ws,
            CloseCode.FORBIDDEN,
            wire.error(
                "forbidden",
                f"key {key.name!r} has none of the scopes {', '.join(WS_SCOPES)} needed here",
                req_id,
                fatal=True,
            ),
            timeout,
        )
        return None
    return key


class _RateLimit:
    """Token bucket on client messages; a client far over the limit is disconnected."""

    def __init__(self, per_s: float) -> None:
        self.rate = per_s
        self.burst = max(2.0, 2 * per_s)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.refused = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return True
        self.refused += 1
        return False


class _Closed(Exception):
    """The session closed the connection (the client broke the rules); stop reading."""


Op = wire.Auth | wire.Subscribe | wire.Unsubscribe | wire.Ping | wire.Replay | wire.ReplayControl
Recorded = wire.Subscribe | wire.Unsubscribe | wire.Replay


class Session:
    """One authenticated connection: reads client messages and acts on each through a table of
    handlers, one per ``op``."""

    def __init__(self, ws: WebSocket, st: AppState, key: ApiKey, sub: Subscriber) -> None:
        self.ws = ws
        self.st = st
        self.key = key
        self.sub = sub
        self.limit = _RateLimit(st.settings.max_msgs_per_s)
        self.bad_streak = 0
        self.resumes: set[asyncio.Task[None]] = set()
        self.handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "auth": self.already_authenticated,
            "subscribe": self.recorded(self.subscribe),
            "unsubscribe": self.recorded(self.unsubscribe),
            "ping": self.ping,
            "replay": self.recorded(self.replays.start),
            **dict.fromkeys(("pause", "resume", "speed", "stop"), self.control),
        }

    @functools.cached_property
    def replays(self) -> ConnectionReplays:
        """The connection's replays, made by its first replay (an idle socket holds none)."""
        return ConnectionReplays(self.st, self.key, self.sub)

    async def close(self) -> None:
        """Stop everything the connection started (replays, resume backlogs) and wait until
        each has freed what it held; nothing starts after this."""
        resumes = list(self.resumes)
        for t in resumes:
            t.cancel()
        if "replays" in self.__dict__:
            await self.replays.close()
        await asyncio.gather(*resumes, return_exceptions=True)

    async def read_loop(self) -> None:
        """Act on each client message in turn until the client goes away or is closed."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                op = self._admit(msg.get("text"))
                if op is not None:
                    await self.handlers[op.op](op)
        except _Closed:
            return

    def _admit(self, text: str | None) -> Op | None:
        """The op of a message the session should act on; None (an ``error`` sent) for one
        over the rate limit or one it cannot use; ``_Closed`` when the client went too far."""
        s = self.st.settings
        if not self.limit.allow():
            if self.limit.refused > 5 * self.limit.burst:
                self._close(
                    CloseCode.RATE_LIMITED,
                    "rate_limited",
                    f"far over {s.max_msgs_per_s:g} messages/s; reconnect and slow down",
                )
            self.sub.send(
                wire.error(
                    "rate_limited",
                    f"over {s.max_msgs_per_s:g} messages/s; this message was ignored",
                )
            )
            return None
        try:
            if text is None:
                raise ProtocolError(
                    "bad_request", "binary frames are not accepted; send JSON text frames"
                )
            op = wire.parse_client_message(text, s.max_inbound_bytes)
        except ProtocolError as exc:
            self.bad_streak += 1
            if self.bad_streak >= MAX_BAD_STREAK:
                self._close(
                    CloseCode.BAD_REQUEST,
                    "bad_request",
                    f"{MAX_BAD_STREAK} unusable messages in a row ({exc.message}); "
                    "check the protocol (contracts/asyncapi.yaml) and reconnect",
                    exc.req_id,
                )
            self.sub.send(wire.error(exc.code, exc.message, exc.req_id))
            return None
        self.bad_streak = 0
        return op

    def _close(self, code: int, error: str, message: str, req_id: Any = None) -> None:
        self.sub.close(code, wire.error(error, message, req_id, fatal=True))
        raise _Closed

    def recorded(
        self, act: Callable[[R], Awaitable[tuple[int, str]]]
    ) -> Callable[[R], Awaitable[None]]:
        """``act`` (which answers with the count of symbols it accepted and a status), timed
        and added to the query history."""

        async def run(op: R) -> None:
            ts, t0 = time.time_ns(), time.perf_counter()
            rows, status = await act(op)
            self.record(op, ts, t0, rows, status)

        return run

    def record(self, op: Recorded, ts: int, t0: float, rows: int, status: str) -> None:
        """Add the op to the query history (its fields; the symbols it accepted as rows)."""
        # Without channels the params keep the shape they had before channels existed.
        skip = {"op"} if getattr(op, "channels", None) else {"op", "channels"}
        params = orjson.dumps(op.model_dump(exclude=skip, exclude_none=True)).decode()
        ms = (time.perf_counter() - t0) * 1000
        self.st.queries.record(self.key.name, f"ws:{op.op}", params, rows, None, ms, status, ts)

    async def ping(self, op: wire.Ping) -> None:
        self.sub.send(wire.pong(op.id))

    async def control(self, op: wire.ReplayControl) -> None:
        self.replays.control(op)

    async def already_authenticated(self, op: wire.Auth) -> None:
        self.sub.send(
            wire.error("already_authenticated", "this connection is already authenticated", op.id)
        )

    # -- subscribe --

    async def subscribe(self, op: wire.Subscribe) -> tuple[int, str]:
        """Subscribe and answer; returns the count of symbols accepted and a status."""
        sub = self.sub
        refused = self._refuse_scopes(op)
        if refused is not None:
            return 0, refused
        if op.throttle_ms is not None:
            sub.set_throttle(op.throttle_ms)
        if op.channels:
            sub.channels.update(op.channels)
            if self.st.status.frame is not None:  # the latest status at once, then every second
                sub.send_raw(self.st.status.frame)
        if not op.symbols:
            sub.send(self._subscribed(op, {}, []))
            return 0, "ok"
        syms = normalise(op.symbols)
        limit = self.st.settings.max_symbols_per_conn
        if len(syms) > limit:
            self._refuse(
                op,
                "too_many_symbols",
                f"{len(syms)} symbols requested; at most {limit} per connection",
            )
            return 0, "too_many_symbols"
        try:
            syms, star = await self._expand_star(syms)
            screened = await screen_symbols(
                self.key,
                syms,
                room=limit - len(sub.symbols),
                unknown=self._unknown,
                held=sub.symbols,
            )
        except (RedisError, OSError) as exc:
            self._refuse(op, "unavailable", f"Redis is unreachable ({exc}); retry shortly")
            return 0, "unavailable"
        accepted, rejected = screened.accepted, star + screened.rejected
        new = [s for s in accepted if s not in sub.symbols]
        latest: dict[str, Latest] = {}
        if accepted:
            try:
                latest = await self.st.hub.subscribe(sub, accepted, op.types)
            except RedisUnavailable as exc:
                self._refuse(op, "unavailable", f"Redis is unreachable ({exc}); retry shortly")
                return 0, "unavailable"
        seq = {s: {"epoch": latest[s].epoch, "seq": latest[s].seq} for s in accepted}
        rejected += await self._from_seq_rejections(op, syms, rejected)
        sub.send(self._subscribed(op, seq, rejected))
        if op.snapshot:
            self._send_snapshot(op, accepted, latest)
        self._go_live(op, accepted, new, latest)
        return len(accepted), "ok"

    def _refuse(self, op: wire.Subscribe, code: str, message: str) -> None:
        self.sub.send(wire.error(code, message, op.id))

    def _refuse_scopes(self, op: wire.Subscribe) -> str | None:
        """``forbidden`` (said to the client) if the key may not have what ``op`` asks for."""
        key = self.key
        if op.channels and not key.has_scope("admin"):
            self._refuse(
                op,
                "forbidden",
                f"the {'/'.join(op.channels)} channel needs a key with the 'admin' scope; "
                f"key {key.name!r} has {', '.join(sorted(key.scopes))}. Nothing was subscribed",
            )
            return "forbidden"
        if op.symbols and not key.has_scope("realtime"):
            self._refuse(op, "forbidden", f"key {key.name!r} lacks the 'realtime' scope")
            return "forbidden"
        return None

    async def _expand_star(self, syms: list[str]) -> tuple[list[str], list[Rejection]]:
        """``*`` as every published symbol, for a key that may see all of them."""
        if "*" not in syms:
            return syms, []
        syms = [s for s in syms if s != "*"]
        if self.key.symbols is not None:
            return syms, [{"sym": "*", "code": "not_entitled"}]
        return syms + sorted(await self.st.bus.known_symbols() - set(syms)), []

    async def _unknown(self, candidates: list[str]) -> list[str]:
        """The symbols no feed publishes (live subscriptions need a feed)."""
        known = await self.st.bus.are_known(candidates)
        return [sym for sym, ok in zip(candidates, known, strict=True) if not ok]

    def _send_snapshot(
        self, op: wire.Subscribe, syms: list[str], latest: dict[str, Latest]
    ) -> None:
        """The latest trade and quote of each symbol, marked ``"snapshot":true``."""
        for sym in syms:
            for kind, raw in (("trade", latest[sym].trade), ("quote", latest[sym].quote)):
                if raw is not None and kind in op.types:
                    self.sub.send_raw(wire.with_fields(raw, snapshot=True))

    def _go_live(
        self, op: wire.Subscribe, accepted: list[str], new: list[str], latest: dict[str, Latest]
    ) -> None:
        """Release the live events of the new symbols, after a resume's backlog for those
        that ask for one."""
        resuming = self._resume_requests(op, accepted, new)
        for sym in new:
            if sym in resuming:
                self._start_resume(op, sym, resuming[sym], latest[sym])
            else:
                self.sub.release(sym, latest[sym].seq, self.sub.symbols[sym])

    def _subscribed(
        self, op: wire.Subscribe, seq: dict[str, Any], rejected: list[Rejection]
    ) -> dict[str, Any]:
        return {
            "type": "subscribed",
            "id": op.id,
            "symbols": sorted(self.sub.symbols),
            "channels": sorted(self.sub.channels),
            "types": op.types,
            "throttle_ms": round(self.sub.sample_s * 1000),
            "seq": seq,
            "rejected": rejected,
        }

    # -- resume (from_seq) --

    async def _from_seq_rejections(
        self, op: wire.Subscribe, syms: list[str], rejected: list[Rejection]
    ) -> list[Rejection]:
        """The ``from_seq`` symbols this subscribe cannot resume that its ``rejected`` does not
        name yet: not in ``symbols`` (``not_in_symbols``), or refused as a symbol would be
        (``invalid_symbol``, ``not_entitled``: checked first, so nothing is told about a
        symbol the key may not see)."""
        named = set(syms) | {r["sym"] for r in rejected}
        out: list[Rejection] = []
        for sym in normalise(op.from_seq or {}):
            if sym not in named:
                screened = await screen_symbols(self.key, [sym], room=1)
                out += screened.rejected or [{"sym": sym, "code": "not_in_symbols"}]
        return out

    def _resume_requests(
        self, op: wire.Subscribe, accepted: list[str], new: list[str]
    ) -> dict[str, tuple[int, int | None]]:
        """(from_seq, epoch) of each newly subscribed symbol the client resumes."""
        if not op.from_seq:
            return {}
        epochs = op.epoch if isinstance(op.epoch, dict) else {}
        epochs = {s.strip().upper(): e for s, e in epochs.items()}
        out = {}
        for raw, seq in op.from_seq.items():
            sym = raw.strip().upper()
            if sym in new:
                epoch = op.epoch if isinstance(op.epoch, int) else epochs.get(sym)
                out[sym] = (seq, epoch)
            elif sym in accepted:
                self.sub.send(
                    {
                        **wire.error(
                            "resume_unavailable",
                            f"{sym} was already subscribed on this connection, so nothing was "
                            "missed; from_seq applies to newly subscribed symbols",
                            op.id,
                        ),
                        "sym": sym,
                        "reason": "already_subscribed",
                    }
                )
        return out

    def _start_resume(
        self, op: wire.Subscribe, sym: str, want: tuple[int, int | None], state: Latest
    ) -> None:
        s = self.st.settings
        resume = Resume(
            sub=self.sub,
            sources=Sources.of(self.st.bus, s),
            req_id=op.id,
            sym=sym,
            from_seq=want[0],
            epoch=want[1],
            state=state,
            mask=self.sub.symbols[sym],
            room=min(s.replay_buffer_bytes, s.conflate_bytes // 2),
        )
        task = asyncio.create_task(resume.run())
        self.resumes.add(task)
        task.add_done_callback(self.resumes.discard)

    # -- unsubscribe --

    async def unsubscribe(self, op: wire.Unsubscribe) -> tuple[int, str]:
        self.sub.channels.difference_update(op.channels)
        syms = normalise(op.symbols)
        if "*" in syms:
            syms = sorted(self.sub.symbols)
        gone = [s for s in syms if s in self.sub.symbols]
        rejected = [{"sym": s[:40], "code": "not_subscribed"} for s in syms if s not in gone]
        self.st.hub.unsubscribe(self.sub, gone)
        self.sub.send(
            {
                "type": "unsubscribed",
                "id": op.id,
                "symbols": sorted(self.sub.symbols),
                "channels": sorted(self.sub.channels),
                "removed": gone,
                "rejected": rejected,
            }
        )
        return len(gone), "ok"


async def _first_done(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """The first of ``futures`` to finish (``asyncio.wait`` with FIRST_COMPLETED, lighter: an
    idle connection waits here for its whole life)."""
    first: asyncio.Future[asyncio.Future[None]] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[None]) -> None:
        if not first.done():
            first.set_result(f)

    for f in futures:
        f.add_done_callback(done)
    try:
        return await first
    finally:
        for f in futures:
            f.remove_done_callback(done)


async def ws_endpoint(ws: WebSocket) -> None:
    st: AppState = ws.app.state.tp
    s = st.settings
    await ws.accept()
    key = await authenticate(ws, st)
    if key is None:
        return
    conn_id = secrets.token_hex(8)
    if not await st.quota.acquire(key.id, conn_id):
        await close_with(
            ws,
            CloseCode.CONNECTION_LIMIT,
            wire.error(
                "connection_limit",
                f"key {key.name!r} already has {s.max_conns_per_key} open connections; "
                "close one or use several symbols per connection",
                fatal=True,
            ),
            s.slow_close_timeout_s,
        )
        return
    sub = Subscriber(conn_id, ws.send_text, s, key.id)
    st.hub.attach(sub)
    sub.send(wire.welcome(conn_id, s.heartbeat_s, s.limits(), key.public()))
    session = Session(ws, st, key, sub)
    tasks: list[asyncio.Future[None]] = [
        asyncio.create_task(sub.run_writer()),
        asyncio.create_task(session.read_loop()),
        sub.closed,  # a future, not a task: an idle connection runs two tasks
    ]
    try:
        first = await _first_done(tasks)
        exc = None if first.cancelled() else first.exception()
        if exc is not None and not isinstance(exc, WebSocketDisconnect):
            # A bug, not the client's doing: say so in the log and to the client.
            log.error("connection %s failed", conn_id, exc_info=exc)
            sub.close(
                CloseCode.INTERNAL_ERROR,
                wire.error(
                    "internal_error",
                    "the server failed on this connection (logged); reconnect, and resume "
                    "with from_seq to miss nothing",
                    fatal=True,
                ),
            )
    finally:
        for t in tasks:  # the reader first: no op starts anything from here on
            t.cancel()
        sub.stop_sampler()
        await session.close()  # before detach: a replay going live must not subscribe after it
        st.hub.detach(sub)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, Exception):
                await t
        await st.quota.release(key.id, conn_id)
    if sub.close_code is not None:
        reason = (sub.close_event or {}).get("code", "")
        log.info(
            "closing connection %s of key %r: %s (%s)", conn_id, key.name, sub.close_code, reason
        )
        await close_with(ws, sub.close_code, sub.close_event, s.slow_close_timeout_s)
