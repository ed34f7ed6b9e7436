"""A venue as a live source: the connection's life (connect, subscribe, read, reconnect) around one
adapter, and what it gives the tickerplant (ticks, upstream gaps, figures).

States: ``connecting`` (the first connection), ``live`` (subscribed and reading), ``reconnecting``
(the connection was lost: the reason is kept; backoff with jitter, then resubscribe) and ``down``
(the venue refuses what it was asked for after having served it). A refusal on the first
connection (a symbol the venue does not know, a key it rejects) is ``VenueRefused``: the feed
stops with that message. Before the venue's connection limit a planned reconnect opens the new
connection first and reads both until the new one delivers what the old one already published
(or ``overlap_s``), then closes the old one; what both delivered is published once
(``Continuity``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import statistics
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

# picows' client (Cython) behind the websockets client's API: reading a venue's stream costs
# 0.7 µs a message where the websockets client's costs 4.2 (bench/sources.py).
from picows import websockets
from picows.websockets import ClientConnection
from picows.websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from server.feed.sources.adapter import Adapter, VenueRefused
from server.feed.sources.continuity import Continuity, UpstreamGap
from server.ticks import MAX_TS_NS, MIN_TS_NS, Quote, Tick, Trade, is_valid_symbol

log = logging.getLogger("tickpipe.feed")
CONNECTION_LOST = (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, EOFError)
LATENCY_WINDOW_S = 60
LATENCY_SAMPLES_PER_S = 1000  # per second of the window at most (bounds the work)
LATENCY_SAMPLES_PER_BATCH = 10  # per batch handed to the tickerplant, evenly spread
MAX_REASON = 200
# Ticks handed to one publish at most: one script call runs in Redis alone, so a backlog (Redis
# was slow or away while the venue went on) must not become one call of seconds.
MAX_BATCH = 5000
OVERLAP_POLL_S = 0.02  # how often a planned reconnect checks whether the new stream caught up
# Messages read in a row at most before the tickerplant's loop gets a turn: reading what has
# arrived already never waits, and a batch whose publish returned would wait behind thousands.
READ_TURN = 100


@dataclass(slots=True)
class SessionOptions:
    """How a session connects and reconnects (from the settings)."""

    connect_timeout_s: float = 10.0
    subscribe_timeout_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    lifetime_s: float | None = None  # overrides the adapter's planned-reconnect time
    # A planned reconnect reads both connections at most this long, until the new one has
    # delivered trades the old one already published.
    overlap_s: float = 5.0
    # Ticks waiting for the tickerplant at most (it stops taking them while Redis is down):
    # past this, new ones are dropped and counted; a dropped trade shows as an upstream gap.
    max_pending: int = 200_000
    silence_s: float | None = None  # overrides the adapter's silence limit
    # WebSocket pings to the venue: one after this long without one, and no pong within
    # ``ping_timeout_s`` ends the connection (a half-open one, a venue that hangs).
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0


@dataclass(slots=True)
class _Conn:
    ws: ClientConnection
    # While a planned reconnect's new connection subscribes, what it reads waits here.
    # (a trade and its key, or a quote and its update id)
    staged: list[tuple[Tick, Hashable, bool]] | None = None  # ... and whether a snapshot
    # The lowest trade id (True) or quote update id (False) staged per symbol, up to scanned.
    lowest: dict[tuple[str, bool], int] = field(default_factory=dict)
    scanned: int = 0
    received: int = 0  # messages read
    opened: float = field(default_factory=time.monotonic)


class VenueFeed:
    """One venue's stream as a tickerplant source: ``run`` keeps the connection, ``due`` hands
    over what arrived, ``take_gaps`` the upstream gaps among it."""

    def __init__(
        self,
        adapter_cls: type[Adapter],
        symbols: dict[str, str],
        url: str | None = None,
        secrets: dict[str, str] | None = None,
        options: SessionOptions | None = None,
    ) -> None:
        self.kind = adapter_cls.kind
        self.adapter = adapter_cls(symbols, self, secrets or {})
        self.symbols = list(symbols.values())
        self.base_url = url or adapter_cls.default_url
        self.options = options or SessionOptions()
        self.lifetime_s = self.options.lifetime_s or adapter_cls.lifetime_s
        self.silence_s = self.options.silence_s or adapter_cls.silence_s
        self.continuity = Continuity(adapter_cls.consecutive_trade_ids)
        self.state = "connecting"
        self.reason = ""
        self.ever_live = False
        self.reconnects = 0
        self.planned_reconnects = 0
        self.messages = 0
        self._handed = 0  # ticks handed to the tickerplant (``ticks``: these and those waiting)
        self.unexpected_count = 0
        self.malformed_count = 0
        self.venue_errors = 0
        self.upstream_gaps = 0
        self.missing_trades = 0
        self.dropped = 0  # ticks dropped because the tickerplant could not take them
        self._dropping = False
        self.last_error = ""
        self._pending: list[Tick] = []
        self._gaps: list[tuple[int, UpstreamGap]] = []  # (index in _pending, gap)
        self._due_gaps: list[tuple[int, UpstreamGap]] = []  # those among the ticks due gave
        self._replies: list[str] = []
        self._refusal: str | None = None
        self._adapter_failures: set[str] = set()
        self._staged: list[tuple[Tick, Hashable, bool]] | None = None  # the message's connection's
        self._rate_mark = (time.monotonic(), 0)
        self._latency: collections.deque[tuple[int, list[int]]] = collections.deque(
            maxlen=LATENCY_WINDOW_S
        )
        self._snapshots: set[int] = set()  # id() of the snapshot ticks waiting in _pending
        self._max_pending = self.options.max_pending
        # Whether the adapter holds its ticks to the tick checks (``Adapter.screens``; its
        # symbols and venue valid ones), whether every tick waiting is one it vouched for, and
        # whether the ticks ``due`` last handed over all were (``screened``): the tickerplant
        # does not screen those again.
        self._vouching = adapter_cls.screens and all(
            is_valid_symbol(s) for s in (*symbols.values(), adapter_cls.venue)
        )
        self._pending_vouched = self._vouching
        self.screened = False

    def describe(self) -> str:
        return f"{self.kind}: {', '.join(self.symbols)} from {redacted(self.base_url)}"

    # -- the tickerplant's side --

    def due(self, start_ns: int, end_ns: int) -> list[Tick]:
        """The ticks admitted since the last call (the interval does not matter: live), at most
        ``MAX_BATCH``: after Redis was slow or away a backlog goes out in bounded script calls,
        the rest at the next batches."""
        self._dropping = False
        self.screened = self._pending_vouched
        if len(self._pending) <= MAX_BATCH:
            out, self._pending = self._pending, []
            self._due_gaps, self._gaps = self._gaps, []
            self._pending_vouched = self._vouching
        else:
            out, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._due_gaps = [(at, gap) for at, gap in self._gaps if at < MAX_BATCH]
            self._gaps = [(at - MAX_BATCH, gap) for at, gap in self._gaps if at >= MAX_BATCH]
        if out:
            self._handed += len(out)
            self._sample_latency(out)
        return out

    def unpublished(self, rejected: list[tuple[int, Tick]]) -> list[tuple[int, UpstreamGap]]:
        """Where trade ids are consecutive, each trade of those ``due`` just handed over that
        the tick checks rejected is a hole in the venue's numbering that the next trade does
        not show (the continuity checks admitted it): an upstream gap of its own id, placed
        where it was (``rejected``: index and tick)."""
        if not self.continuity.consecutive:
            return []
        now, out = time.time_ns(), []
        for at, tick in rejected:
            number = tick.trade_id if isinstance(tick, Trade) else None
            if type(number) is int:
                out.append((at, UpstreamGap(tick.sym, number, number, now)))
                self.upstream_gaps += 1
                self.missing_trades += 1
        return out

    @property
    def ticks(self) -> int:
        """The ticks admitted (not dropped, not duplicates): handed over, and waiting."""
        return self._handed + len(self._pending)

    def take_gaps(self) -> list[tuple[int, UpstreamGap]]:
        """The upstream gaps among the ticks ``due`` just returned, each with the index of the
        first tick after it."""
        out, self._due_gaps = self._due_gaps, []
        return out

    def resume(self, latest: dict[str, tuple[bytes | None, bytes | None]]) -> None:
        """Go on after what an earlier run of this source published: each symbol's latest trade
        and quote events (``tp:sym:S``), those of this venue, seed the duplicate checks (a
        restarted feed gets Kraken's snapshot or Coinbase's ``last_match`` again)."""
        for trade, quote in latest.values():
            events = [orjson.loads(e) if e else None for e in (trade, quote)]
            mine = [e if e and e.get("venue") == self.adapter.venue else None for e in events]
            self.continuity.seed(mine[0], mine[1])

    # -- the adapter's side (Sink) --

    def trade(self, tick: Trade, key: Hashable = None, snapshot: bool = False) -> None:
        if self._staged is not None:
            self._staged.append((tick, key, snapshot))
            return
        if len(self._pending) >= self._max_pending:
            self._drop()  # before the duplicate check: the next trade shows the hole
            return
        ok, gap = self.continuity.trade(tick.sym, tick.trade_id, tick.recv_ts or 0, key)
        if gap is not None:
            self._gaps.append((len(self._pending), gap))
            self.upstream_gaps += 1
            self.missing_trades += gap.missing
            log.warning(
                "upstream gap: %s trades %d..%d (%d) never arrived from %s",
                gap.sym, gap.first, gap.last, gap.missing, self.kind,
            )  # fmt: skip
        if ok:  # admitted (the same three lines in ``quote``: a call per tick costs 3%)
            self._pending.append(tick)
            if snapshot:  # what happened before subscribing: no latency to learn from it
                self._snapshots.add(id(tick))

    def quote(self, tick: Quote, update_id: int | None = None, snapshot: bool = False) -> None:
        if self._staged is not None:
            self._staged.append((tick, update_id, snapshot))
        elif len(self._pending) >= self._max_pending:
            self._drop()
        elif self.continuity.quote(tick, update_id):
            self._pending.append(tick)
            if snapshot:
                self._snapshots.add(id(tick))

    def _drop(self) -> None:
        self.dropped += 1
        if not self._dropping:
            self._dropping = True
            self.last_error = (
                f"{self.options.max_pending} ticks waiting for Redis: dropping new ones "
                "(a dropped trade is reported as an upstream gap)"
            )
            log.warning("%s: %s", self.kind, self.last_error)

    def _sample_latency(self, ticks: list[Tick]) -> None:
        """Learn (receive - event time) from ``ticks``, the ones ``due`` hands over: from at
        most about ``LATENCY_SAMPLES_PER_BATCH`` of them, evenly spread (every tick of a small
        batch), and at most ``LATENCY_SAMPLES_PER_S`` per second received."""
        snapshots = self._snapshots
        bins = self._latency
        step = len(ticks) // LATENCY_SAMPLES_PER_BATCH + 1
        for tick in ticks[::step] if step > 1 else ticks:
            recv, ts = tick.recv_ts, tick.ts
            if (
                recv is None
                or not MIN_TS_NS <= ts < MAX_TS_NS
                or (snapshots and id(tick) in snapshots)
            ):
                continue  # no receive time, a time the tick checks reject, or a snapshot
            latency = recv - ts
            if not latency:  # no venue time: the receive time stood in for it
                continue
            second = recv // 1_000_000_000
            if not bins or bins[-1][0] != second:
                bins.append((second, []))
            samples = bins[-1][1]
            if len(samples) < LATENCY_SAMPLES_PER_S:
                samples.append(latency)
        if snapshots:
            snapshots.difference_update(id(t) for t in ticks)

    def subscribed(self, what: str) -> None:
        self.adapter.ready = True

    def refused(self, symbol: str, message: str) -> None:
        self.venue_errors += 1
        if symbol:
            self._refusal = f"{self.kind} refused the symbol {symbol}: {message}"
        else:
            self._refusal = f"{self.kind} refused the subscription: {message}"
        self.last_error = self._refusal[:MAX_REASON]

    def venue_error(self, message: str) -> None:
        self.venue_errors += 1
        self.last_error = f"venue error: {message}"[:MAX_REASON]
        log.warning("%s error reply: %s", self.kind, message)

    def unexpected(self, what: str) -> None:
        self.unexpected_count += 1

    def malformed(self, what: str) -> None:
        self.malformed_count += 1
        self.last_error = f"malformed message: {what}"[:MAX_REASON]

    def reply(self, text: str) -> None:
        self._replies.append(text)

    def unscreened(self) -> None:
        self._pending_vouched = False

    # -- the connection --

    async def run(self) -> None:
        """Keep the venue connected until cancelled. Raises ``VenueRefused`` when the venue
        refuses the first subscription."""
        attempt = 0
        while True:
            try:
                conn = await self._open()
                attempt = 0
                await self._live(conn)
            except VenueRefused as exc:
                if not self.ever_live:
                    self.state, self.reason = "down", str(exc)
                    raise
                self._lost("down", str(exc))
            except InvalidURI as exc:
                raise VenueRefused(f"{self.kind}: the URL {redacted(exc.uri)!r} is not a "
                                   "WebSocket URL (ws://... or wss://...)") from None  # fmt: skip
            except CONNECTION_LOST as exc:
                self._lost("reconnecting" if self.ever_live else "connecting", _reason(exc))
            delay = min(self.options.backoff_max_s, self.options.backoff_min_s * 2**attempt)
            attempt = min(attempt + 1, 20)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _lost(self, state: str, reason: str) -> None:
        if self.state == "live":  # a connection lost; a failed attempt to reconnect is not one
            self.reconnects += 1
        self.state, self.reason = state, reason
        self.last_error = reason[:MAX_REASON]
        log.warning(
            "%s: %s; %s", self.kind, reason, "reconnecting" if self.ever_live else "retrying"
        )

    async def _open(self, staged: bool = False) -> _Conn:
        """Connect, subscribe, and read until the venue confirmed every subscription."""
        if not staged:
            self.state = "reconnecting" if self.ever_live else "connecting"
        url = self.adapter.url(self.base_url)
        try:
            ws = await websockets.connect(
                url,
                open_timeout=self.options.connect_timeout_s,
                ping_interval=self.options.ping_interval_s,
                ping_timeout=self.options.ping_timeout_s,
                max_size=2**23,
                max_queue=4096,
            )
        except (ssl.SSLError, ConnectionResetError) as exc:
            if not url.startswith("wss:") or isinstance(exc, ssl.SSLCertVerificationError):
                raise  # (a TLS endpoint whose certificate is refused: its own reason)
            raise ConnectionError(  # (an OSError: a lost connection, retried)
                f"{_reason(exc)} in the TLS handshake with {redacted(url)}: is it a TLS "
                "endpoint? (wss:// is TLS, ws:// plain)"
            ) from exc
        conn = _Conn(ws, [] if staged else None)
        try:
            self.adapter.on_connected()
            for text in self.adapter.hello():
                await ws.send(text)
            deadline = time.monotonic() + self.options.subscribe_timeout_s
            while not self.adapter.ready:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    await self._read(conn, left)
                except TimeoutError:
                    raise TimeoutError(
                        "the venue did not confirm the subscription within "
                        f"{self.options.subscribe_timeout_s:g}s"
                    ) from None
        except BaseException:
            await ws.close()
            raise
        if not staged:
            self.state, self.reason = "live", ""
            if self.ever_live:
                log.info("%s: live again (resubscribed)", self.kind)
            self.ever_live = True
        return conn

    async def _read(self, conn: _Conn, timeout: float | None) -> None:
        """Read and take one message within ``timeout`` (while subscribing)."""
        replies = self._take(conn, await asyncio.wait_for(conn.ws.recv(decode=False), timeout))
        for text in replies or ():
            await conn.ws.send(text)

    def _take(self, conn: _Conn, raw: str | bytes) -> list[str] | None:
        """Hand one message to the adapter; returns what to send back to the venue, if any.
        Raises ``VenueRefused`` when the venue refused what it was asked for."""
        self.messages += 1
        conn.received += 1
        self._staged = conn.staged
        try:
            self.adapter.on_message(raw, time.time_ns())
        except Exception as exc:  # an adapter's bug on one message costs that message only
            self.malformed(f"{type(exc).__name__}: {str(exc)[:120]}")
            if type(exc).__name__ not in self._adapter_failures:  # once per kind, not per message
                self._adapter_failures.add(type(exc).__name__)
                log.warning("%s: a message the adapter could not read: %r", self.kind, exc)
        finally:
            self._staged = None
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            raise VenueRefused(refusal)
        if self._replies:
            replies, self._replies = self._replies, []
            return replies
        return None

    async def _read_on(self, conn: _Conn) -> None:
        """Read and take messages until the connection ends (raises why)."""
        recv, send, take = conn.ws.recv, conn.ws.send, self._take
        turn = 0
        while True:
            replies = take(conn, await recv(decode=False))
            if replies:
                for text in replies:
                    await send(text)
            turn += 1
            if turn == READ_TURN:  # a read that finds messages waiting does not yield
                turn = 0
                await asyncio.sleep(0)

    async def _pump(self, conn: _Conn) -> None:
        """Read ``conn`` until it ends; with a silence limit, a watchdog ends it (raising
        ``TimeoutError``) when no message came for that long. (No timer per message: a timeout
        around each read cost more than the read itself.)"""
        if self.silence_s is None:
            await self._read_on(conn)
            return
        silence = self.silence_s
        reader = asyncio.create_task(self._read_on(conn))
        try:
            heard, since = conn.received, time.monotonic()
            while True:
                done, _ = await asyncio.wait({reader}, timeout=silence / 4)
                if done:
                    reader.result()  # raises why the connection ended
                now = time.monotonic()
                if conn.received != heard:
                    heard, since = conn.received, now
                elif now - since >= silence:
                    raise TimeoutError(f"no message from the venue for {silence:g}s")
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _live(self, conn: _Conn) -> None:
        """Read ``conn`` until it is lost (raises why); hand over to a new connection before
        the venue's connection limit."""
        pump = asyncio.create_task(self._pump(conn))
        try:
            while True:
                left = None if self.lifetime_s is None else self.lifetime_s - (
                    time.monotonic() - conn.opened)  # fmt: skip
                done, _ = await asyncio.wait({pump}, timeout=None if left is None else max(left, 0))
                if pump in done:
                    pump.result()  # raises why the connection ended
                conn, pump = await self._hand_over(conn, pump)
        finally:
            pump.cancel()
            with contextlib.suppress(Exception):
                await conn.ws.close()

    async def _hand_over(
        self, old: _Conn, pump: asyncio.Task[None]
    ) -> tuple[_Conn, asyncio.Task[None]]:
        """A planned reconnect: subscribe a new connection while the old one goes on, read both
        until the new one has delivered what the old one already published (``_overlapped``;
        a venue starts a new stream a while after the handshake) or ``overlap_s`` passed, then
        close the old one and publish what the new one read meanwhile, without duplicates."""
        try:
            new = await self._open(staged=True)
        except (VenueRefused, *CONNECTION_LOST) as exc:
            self._retry_hand_over(old, exc)
            return old, pump
        new_pump = asyncio.create_task(self._pump(new))
        deadline = time.monotonic() + self.options.overlap_s
        while not self._overlapped(new) and not new_pump.done():
            left = deadline - time.monotonic()
            if left <= 0 or pump.done():
                break
            await asyncio.wait({pump, new_pump}, timeout=min(left, OVERLAP_POLL_S))
        if new_pump.done():  # the new connection failed while the old one went on
            with contextlib.suppress(asyncio.CancelledError, *CONNECTION_LOST, VenueRefused):
                new_pump.result()
            with contextlib.suppress(Exception):
                await new.ws.close()
            self._retry_hand_over(old, RuntimeError("the new connection ended during the overlap"))
            return old, pump
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, *CONNECTION_LOST, VenueRefused):
            await pump
        with contextlib.suppress(Exception):
            await old.ws.close()
        staged, new.staged = new.staged or [], None  # what the new one reads now is published
        if staged:  # (read while earlier batches went out: whether each was vouched for is lost)
            self.unscreened()
        for tick, key, snapshot in staged:
            if isinstance(tick, Trade):
                self.trade(tick, key, snapshot)
            else:
                self.quote(tick, key if isinstance(key, int) else None, snapshot)
        self.planned_reconnects += 1
        log.info("%s: planned reconnect done", self.kind)
        return new, new_pump

    def _retry_hand_over(self, old: _Conn, exc: BaseException) -> None:
        log.warning("%s: planned reconnect failed (%s); keeping the old connection",
                    self.kind, _reason(exc))  # fmt: skip
        old.opened = time.monotonic() - (self.lifetime_s or 0) + 60  # try again in 60 s

    def _overlapped(self, new: _Conn) -> bool:
        """Whether the new connection has delivered, for every symbol the old one published
        numbered trades or quotes of, one the old one published already: from there on it
        misses nothing. (What the old one published only grows, so the lowest number the new
        one delivered per symbol and kind tells.)"""
        staged, lowest = new.staged or [], new.lowest
        for tick, key, _ in staged[new.scanned :]:
            trade = isinstance(tick, Trade)
            number = tick.trade_id if isinstance(tick, Trade) else key
            if not isinstance(number, int):
                continue
            kind = (tick.sym, trade)
            if number < lowest.get(kind, number + 1):
                lowest[kind] = number
        new.scanned = len(staged)
        c = self.continuity
        if not lowest or not (c.last_trade or c.last_update):
            return False
        caught_up = {
            sym
            for (sym, trade), number in lowest.items()
            if number <= (c.last_trade if trade else c.last_update).get(sym, -1)
        }
        return caught_up >= c.last_trade.keys() | c.last_update.keys()

    # -- figures --

    def latency_ms(
        self, now_ns: int | None = None
    ) -> tuple[float | None, float | None, list[float]]:
        """p50 and p99 of (receive - event time) over the last minute, in ms, and each second's
        p50 (oldest first) for a sparkline."""
        second = (now_ns or time.time_ns()) // 1_000_000_000
        window = [(s, v) for s, v in self._latency if second - s < LATENCY_WINDOW_S and v]
        every = sorted(x for _, v in window for x in v)
        if not every:
            return None, None, []
        p50 = every[len(every) // 2] / 1e6
        p99 = every[min(len(every) - 1, int(len(every) * 0.99))] / 1e6
        spark = [round(statistics.median(v) / 1e6, 3) for _, v in window]
        return round(p50, 3), round(p99, 3), spark

    def figures(self) -> dict[str, Any]:
        """This source's figures for its feed's heartbeat (``GET /sources``)."""
        p50, p99, spark = self.latency_ms()
        now = time.monotonic()
        before, self._rate_mark = self._rate_mark, (now, self.messages)
        rate = (self.messages - before[1]) / (now - before[0]) if now > before[0] else 0.0
        return {
            "kind": self.kind,
            "venue": self.adapter.venue,
            "symbols": self.symbols,
            "state": self.state,
            "reason": self.reason,
            "messages": self.messages,
            "messages_per_s": round(rate, 1),
            "ticks": self.ticks,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "latency_ms": spark,
            "reconnects": self.reconnects,
            "planned_reconnects": self.planned_reconnects,
            "upstream_gaps": self.upstream_gaps,
            "missing_trades": self.missing_trades,
            "duplicates": self.continuity.duplicates,
            "dropped": self.dropped,
            "unexpected": self.unexpected_count,
            "malformed": self.malformed_count,
            "venue_errors": self.venue_errors,
            "last_error": self.last_error,
        }


def redacted(url: str) -> str:
    """``url`` without what may be a credential (user and password, the query), for logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        rcvd, sent = exc.rcvd, exc.sent
        if rcvd is None and sent is not None and "ping" in (sent.reason or ""):
            return f"no pong to the WebSocket pings ({sent.code} {sent.reason})"[:MAX_REASON]
        if rcvd is None:
            return "connection dropped without a close frame"
        return f"the venue closed the connection ({rcvd.code} {rcvd.reason})".strip()[:MAX_REASON]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:MAX_REASON] if text != type(exc).__name__ else text
