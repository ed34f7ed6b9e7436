"""``GET /ws``: authenticate, then subscribe/unsubscribe/ping; ticks arrive through the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from server import protocol
from server.api.ws_replay import ConnectionReplays
from server.auth import ApiKey, bearer_token
from server.hub import RedisUnavailable, Subscriber
from server.protocol import CloseCode, ProtocolError
from server.resume import Resume
from server.store import history_dir

if TYPE_CHECKING:
    from server.api.app import AppState

log = logging.getLogger("tickpipe.ws")
WS_SCOPES = ("realtime", "replay", "admin")
MAX_BAD_STREAK = 20  # consecutive unusable messages before the connection is closed (4000)


async def close_with(
    ws: WebSocket, code: int, event: dict[str, Any] | None, timeout: float
) -> None:
    """Send a last ``error`` event and close; give up after ``timeout`` (peer not reading)."""
    with contextlib.suppress(Exception):
        if event is not None:
            await asyncio.wait_for(ws.send_text(protocol.frame(event)), timeout)
        await asyncio.wait_for(ws.close(code), timeout)


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
                protocol.error(
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
            op = protocol.parse_client_message(msg.get("text") or "", st.settings.max_inbound_bytes)
            req_id = op.id
            if isinstance(op, protocol.Auth):
                secret = op.key
        except ProtocolError as exc:
            req_id = exc.req_id
        if secret is None:
            await close_with(
                ws,
                CloseCode.UNAUTHORIZED,
                protocol.error(
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
            protocol.error(
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
            protocol.error(
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


class Session:
    """One authenticated connection: reads client messages and acts on them."""

    def __init__(self, ws: WebSocket, st: AppState, key: ApiKey, sub: Subscriber) -> None:
        self.ws = ws
        self.st = st
        self.key = key
        self.sub = sub
        self.limit = _RateLimit(st.settings.max_msgs_per_s)
        self.bad_streak = 0
        self.replays = ConnectionReplays(st, key, sub)
        self.resumes: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Free everything the connection started (replays, resume backlogs)."""
        for t in self.resumes:
            t.cancel()
        await self.replays.close()

    async def read_loop(self) -> None:
        s = self.st.settings
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if not self.limit.allow():
                if self.limit.refused > 5 * self.limit.burst:
                    self.sub.close(
                        CloseCode.RATE_LIMITED,
                        protocol.error(
                            "rate_limited",
                            f"far over {s.max_msgs_per_s:g} messages/s; reconnect and slow down",
                            fatal=True,
                        ),
                    )
                    return
                self.sub.send(
                    protocol.error(
                        "rate_limited",
                        f"over {s.max_msgs_per_s:g} messages/s; this message was ignored",
                    )
                )
                continue
            text = msg.get("text")
            try:
                if text is None:
                    raise ProtocolError(
                        "bad_request", "binary frames are not accepted; send JSON text frames"
                    )
                op = protocol.parse_client_message(text, s.max_inbound_bytes)
            except ProtocolError as exc:
                self.bad_streak += 1
                if self.bad_streak >= MAX_BAD_STREAK:
                    self.sub.close(
                        CloseCode.BAD_REQUEST,
                        protocol.error(
                            "bad_request",
                            f"{MAX_BAD_STREAK} unusable messages in a row ({exc.message}); "
                            "check the protocol (contracts/asyncapi.yaml) and reconnect",
                            exc.req_id,
                            fatal=True,
                        ),
                    )
                    return
                self.sub.send(protocol.error(exc.code, exc.message, exc.req_id))
                continue
            self.bad_streak = 0
            if isinstance(op, protocol.Subscribe):
                ts, t0 = time.time_ns(), time.perf_counter()
                rows, status = await self.subscribe(op)
                self.record(op, ts, t0, rows, status)
            elif isinstance(op, protocol.Unsubscribe):
                ts, t0 = time.time_ns(), time.perf_counter()
                rows, status = self.unsubscribe(op)
                self.record(op, ts, t0, rows, status)
            elif isinstance(op, protocol.Ping):
                self.sub.send(protocol.pong(op.id))
            elif isinstance(op, protocol.Replay):
                ts, t0 = time.time_ns(), time.perf_counter()
                rows, status = await self.replays.start(op)
                self.record(op, ts, t0, rows, status)
            elif isinstance(op, protocol.ReplayControl):
                self.replays.control(op)
            else:
                self.sub.send(
                    protocol.error(
                        "already_authenticated", "this connection is already authenticated", op.id
                    )
                )

    def record(
        self,
        op: protocol.Subscribe | protocol.Unsubscribe | protocol.Replay,
        ts: int,
        t0: float,
        rows: int,
        status: str,
    ) -> None:
        """Add the op to the query history (its fields; the symbols it accepted as rows)."""
        # Without channels the params keep the shape they had before channels existed.
        skip = {"op"} if getattr(op, "channels", None) else {"op", "channels"}
        params = orjson.dumps(op.model_dump(exclude=skip, exclude_none=True)).decode()
        ms = (time.perf_counter() - t0) * 1000
        self.st.queries.record(self.key.name, f"ws:{op.op}", params, rows, None, ms, status, ts)

    def _normalise(self, symbols: list[str]) -> list[str]:
        return list(dict.fromkeys(s.strip().upper() for s in symbols))

    async def subscribe(self, op: protocol.Subscribe) -> tuple[int, str]:
        """Subscribe and answer; returns the count of symbols accepted and a status."""
        st, sub, key = self.st, self.sub, self.key
        limit = st.settings.max_symbols_per_conn
        if op.channels and not key.has_scope("admin"):
            sub.send(
                protocol.error(
                    "forbidden",
                    f"the {'/'.join(op.channels)} channel needs a key with the 'admin' scope; "
                    f"key {key.name!r} has {', '.join(sorted(key.scopes))}. Nothing was "
                    "subscribed",
                    op.id,
                )
            )
            return 0, "forbidden"
        if op.symbols and not key.has_scope("realtime"):
            sub.send(
                protocol.error("forbidden", f"key {key.name!r} lacks the 'realtime' scope", op.id)
            )
            return 0, "forbidden"
        if op.throttle_ms is not None:
            sub.set_throttle(op.throttle_ms)
        if op.channels:
            sub.channels.update(op.channels)
            if st.status.frame is not None:  # the latest status at once, then every second
                sub.send_raw(st.status.frame)
        if not op.symbols:
            sub.send(self._subscribed(op, {}, []))
            return 0, "ok"
        syms = self._normalise(op.symbols)
        if len(syms) > limit:
            sub.send(
                protocol.error(
                    "too_many_symbols",
                    f"{len(syms)} symbols requested; at most {limit} per connection",
                    op.id,
                )
            )
            return 0, "too_many_symbols"
        rejected: list[dict[str, str]] = []
        try:
            if "*" in syms:
                syms.remove("*")
                if key.symbols is None:
                    syms.extend(sorted(await st.bus.known_symbols() - set(syms)))
                else:
                    rejected.append({"sym": "*", "code": "not_entitled"})
            candidates, refused = key.screen(syms)
            rejected += refused
            known = await st.bus.are_known(candidates)
        except (RedisError, OSError) as exc:
            sub.send(
                protocol.error("unavailable", f"Redis is unreachable ({exc}); retry shortly", op.id)
            )
            return 0, "unavailable"
        accepted = []
        room = limit - len(sub.symbols)
        for sym, ok in zip(candidates, known, strict=True):
            if not ok:
                rejected.append({"sym": sym, "code": "unknown_symbol"})
            elif sym not in sub.symbols and room <= 0:
                rejected.append({"sym": sym, "code": "limit_exceeded"})
            else:
                room -= sym not in sub.symbols
                accepted.append(sym)
        new = [s for s in accepted if s not in sub.symbols]
        latest = {}
        if accepted:
            try:
                latest = await st.hub.subscribe(sub, accepted, op.types)
            except RedisUnavailable as exc:
                sub.send(
                    protocol.error(
                        "unavailable", f"Redis is unreachable ({exc}); retry shortly", op.id
                    )
                )
                return 0, "unavailable"
        seq = {s: {"epoch": latest[s].epoch, "seq": latest[s].seq} for s in accepted}
        sub.send(self._subscribed(op, seq, rejected))
        if op.snapshot:
            for sym in accepted:
                for kind, raw in (("trade", latest[sym].trade), ("quote", latest[sym].quote)):
                    if raw is not None and kind in op.types:
                        sub.send_raw(raw.decode()[:-1] + ',"snapshot":true}')
        resuming = self._resume_requests(op, accepted, new)
        for sym in new:
            if sym in resuming:
                self._start_resume(op, sym, resuming[sym], latest[sym])
            else:
                sub.release(sym, latest[sym].seq, sub.symbols[sym])
        return len(accepted), "ok"

    def _subscribed(
        self, op: protocol.Subscribe, seq: dict[str, Any], rejected: list[dict[str, str]]
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

    def _resume_requests(
        self, op: protocol.Subscribe, accepted: list[str], new: list[str]
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
                        **protocol.error(
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
        self, op: protocol.Subscribe, sym: str, want: tuple[int, int | None], state: Any
    ) -> None:
        s = self.st.settings
        task = asyncio.create_task(
            Resume(
                self.sub,
                self.st.bus,
                history_dir(s),
                op.id,
                sym,
                want[0],
                want[1],
                state,
                self.sub.symbols[sym],
                min(s.replay_buffer_bytes, s.conflate_bytes // 2),
            ).run()
        )
        self.resumes.add(task)
        task.add_done_callback(self.resumes.discard)

    def unsubscribe(self, op: protocol.Unsubscribe) -> tuple[int, str]:
        self.sub.channels.difference_update(op.channels)
        syms = self._normalise(op.symbols)
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
            protocol.error(
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
    sub.send(protocol.welcome(conn_id, s.heartbeat_s, s.limits(), key.public()))
    session = Session(ws, st, key, sub)
    tasks = [
        asyncio.create_task(sub.run_writer()),
        asyncio.create_task(sub.run_sampler()),
        asyncio.create_task(session.read_loop()),
        asyncio.create_task(sub.closed.wait()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                # A bug, not the client's doing: say so in the log and to the client.
                log.error("connection %s failed", conn_id, exc_info=exc)
                sub.close(
                    CloseCode.INTERNAL_ERROR,
                    protocol.error(
                        "internal_error",
                        "the server failed on this connection (logged); reconnect, and resume "
                        "with from_seq to miss nothing",
                        fatal=True,
                    ),
                )
    finally:
        await session.close()  # first: a replay going live must not subscribe after detach
        st.hub.detach(sub)
        for t in tasks:
            t.cancel()
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
