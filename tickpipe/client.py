"""The tickpipe Python client: live ticks, replays, history and latest values.

Async first::

    async with Client("http://127.0.0.1:8000", key) as c:
        async for tick in c.subscribe(["AAPL"]):
            ...

``subscribe`` reconnects with backoff and resumes by seq, so the caller sees an unbroken,
gap-free sequence per symbol; events the server can no longer deliver (Redis restarted empty,
data no longer kept, never recorded) do not end the stream: each is reported as a ``Loss``
(``on_loss`` callback, ``Subscription.losses``) and the stream goes on after it.
``TickpipeError`` is raised only for what retrying cannot fix. ``replay`` is an async iterator
with ``pause``/``resume``/``set_speed``/``stop`` that, if the connection drops, continues after
the last event it delivered; its ``fingerprint`` covers every event it yielded. ``history``
returns a ``polars.DataFrame``. ``SyncClient`` wraps it all for notebooks and scripts.

Each ``subscribe`` or ``replay`` uses a WebSocket connection of its own. This module does not
import the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import io
import random
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
import polars as pl
import websockets
from websockets.asyncio.client import ClientConnection

from tickpipe.fingerprint import Fingerprint
from tickpipe.wire import FINAL_CLOSE_CODES, RETRIED_ERRORS, TICK_TYPES

TimeLike = int | str | dt.datetime
T = TypeVar("T")
# From the server's wire module (generated): FINAL_CLOSE_CODES, after which reconnecting cannot
# help (bad key, revoked, forbidden, bad requests); RETRIED_ERRORS, which a reconnect (and a
# resume by seq) gets past.
TICKS = TICK_TYPES
MANY_URLS_CONNECT_S = 5.0  # with several web processes, give up on one sooner and try the next
# What makes a web process count as unreachable (then the next one is tried, or a reconnect).
CONNECT_FAILED = (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed)


class TickpipeError(Exception):
    """The server refused something or the stream cannot go on; ``code`` says what."""

    def __init__(self, code: str, message: str, event: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.event = event or {}


class ResumeUnavailable(TickpipeError):
    """A ``resume_unavailable`` error that names no symbol, so it cannot be reported as a
    ``Loss`` (``subscribe`` reports every other one and goes on)."""


@dataclass(frozen=True)
class Loss:
    """Events of one symbol that the server can no longer deliver; the stream went on after
    them. A caller that keeps state per symbol (a moving average, a position) learns here that
    it spans a hole, before the next tick of that symbol is yielded.

    ``reason``:

    * ``epoch_changed``: Redis lost the symbol's sequence (restarted empty). The events of
      ``epoch`` after ``from_seq - 1`` that were never delivered are gone, how many is not known
      (``to_seq`` is None); the stream continues in ``next_epoch`` from its first event still
      kept (seq 1 unless it is too old already, reported as a second ``Loss``).
    * ``too_old``: seqs ``from_seq`` to ``to_seq`` are kept nowhere any more (not in Redis,
      the unrecorded log or the store).
    * ``gap``: seqs ``from_seq`` to ``to_seq`` were never recorded (an in-band ``gap``).
    * ``seq_from_future``: the server's sequence went back (Redis restored from an older copy
      with the same epoch): seqs ``from_seq`` to ``to_seq``, which you already saw, will be
      numbered again for other events.
    """

    sym: str
    reason: str
    epoch: int | None
    from_seq: int
    to_seq: int | None
    next_epoch: int | None
    message: str

    @property
    def missing(self) -> int | None:
        """How many events are lost (None: not known)."""
        return None if self.to_seq is None else max(0, self.to_seq - self.from_seq + 1)


@dataclass(frozen=True)
class UpstreamGap:
    """A hole in a live venue source's own trade ids for one symbol: the venue's trades
    ``first_id``..``last_id`` never reached tickpipe, so they were never published (tickpipe's
    ``seq`` stays contiguous). Reported before the tick with seq ``after_seq + 1``."""

    sym: str
    venue: str
    epoch: int | None
    after_seq: int
    first_id: int
    last_id: int
    missing: int
    ts: int  # when the feed found it, ns UTC
    message: str


def _ns(t: TimeLike) -> int | str:
    if isinstance(t, dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.isoformat()
    return t


def _error(ev: dict[str, Any]) -> TickpipeError:
    cls = ResumeUnavailable if ev.get("code") == "resume_unavailable" else TickpipeError
    return cls(ev.get("code", "error"), ev.get("message", ""), ev)


class _Backoff:
    def __init__(self, first: float = 0.1, most: float = 5.0, tries: int = 30) -> None:
        self.first, self.most, self.tries = first, most, tries
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    async def wait(self, why: BaseException) -> None:
        self.failures += 1
        if self.failures > self.tries:
            raise TickpipeError(
                "unreachable", f"gave up after {self.tries} reconnects: {why}"
            ) from why
        delay = min(self.most, self.first * 2 ** (self.failures - 1))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))


class Client:
    """A connection to a tickpipe deployment with an API key.

    ``url`` is one web process or load balancer (``http://host:8000``), or a list of web
    processes of the same deployment (same Redis, same history store), which serve identical
    streams: a connection that cannot be made to one is tried on the next, so a live
    subscription whose web process died resumes by seq on another one. A web process that
    takes the connection but sends no ``welcome`` within ``connect_timeout`` (default
    ``timeout`` with one URL, at most 5 s with several) counts as one that cannot be reached.
    A REST query is sent to the next web process only when it could not be sent at all: one
    that was taken and is slow to answer raises ``httpx.ReadTimeout`` (it is not run twice).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        key: str,
        timeout: float = 30.0,
        reconnect_tries: int = 30,
        connect_timeout: float | None = None,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give the URL of at least one tickpipe web process")
        self.urls = [u.rstrip("/") for u in urls]
        self._at = 0  # the web process in use; the next one when it cannot be reached
        self.key = key
        self.timeout = timeout
        if connect_timeout is None:
            connect_timeout = timeout if len(urls) == 1 else min(timeout, MANY_URLS_CONNECT_S)
        self.connect_timeout = connect_timeout
        self.reconnect_tries = reconnect_tries
        self._http: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        """The web process in use (the first of ``urls`` until one cannot be reached)."""
        return self.urls[self._at]

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    def _next_url(self) -> None:
        self._at = (self._at + 1) % len(self.urls)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                headers={"Authorization": f"Bearer {self.key}"}, timeout=self.timeout
            )
        return self._http

    async def _connect(self) -> ClientConnection:
        """An open WebSocket past its ``welcome``, on the web process in use or, when that one
        cannot be reached or sends no ``welcome``, on the next of ``urls`` (each tried once; the
        last error raised). A refusal at the door (an ``error`` event) is raised at once."""
        for tried in range(len(self.urls)):
            ws: ClientConnection | None = None
            try:
                ws = await websockets.connect(
                    self.ws_url,
                    additional_headers={"Authorization": f"Bearer {self.key}"},
                    open_timeout=self.connect_timeout,
                    max_size=None,
                )
                hello = await asyncio.wait_for(ws.recv(), self.connect_timeout)
                for ev in orjson.loads(hello):
                    if ev["type"] == "error":
                        raise _error(ev)
                return ws
            except (*CONNECT_FAILED, TickpipeError) as exc:
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
                if isinstance(exc, TickpipeError) or tried == len(self.urls) - 1:
                    raise
                self._next_url()
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- REST --

    async def _get(self, path: str, **params: Any) -> httpx.Response:
        query = {k: v for k, v in params.items() if v is not None}
        for tried in range(len(self.urls)):
            try:
                r = await self.http.get(self.url + path, params=query)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout):  # never reached a web process
                if tried == len(self.urls) - 1:
                    raise
                self._next_url()
        if r.status_code != 200:
            try:
                err = r.json()["error"]
            except Exception:
                err = {"code": f"http_{r.status_code}", "message": r.text[:200]}
            raise TickpipeError(err["code"], err["message"], err)
        return r

    async def _historical(
        self,
        symbols: Iterable[str],
        start: TimeLike,
        end: TimeLike,
        types: Iterable[str],
        **params: Any,
    ) -> httpx.Response:
        return await self._get(
            "/ticks/historical",
            symbols=",".join(symbols),
            start=_ns(start),
            end=_ns(end),
            types=",".join(types),
            **params,
        )

    async def history(
        self,
        symbols: Iterable[str],
        start: TimeLike,
        end: TimeLike,
        types: Iterable[str] = TICKS,
        enriched: bool = False,
    ) -> pl.DataFrame:
        """Stored ticks of ``[start, end)`` in (ts, seq) order, as a DataFrame.

        Sent as Arrow with dictionary-encoded strings and LZ4-compressed buffers (a fifth of the
        bytes of plain Arrow) and decoded by Polars as it is, with no Python per row; the
        string columns come back as plain strings."""
        r = await self._historical(
            symbols,
            start,
            end,
            types,
            enriched=str(enriched).lower(),
            format="arrow",
            dictionary="true",
            compression="lz4",
        )
        frame = pl.read_ipc_stream(io.BytesIO(r.content))
        return frame.with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String))

    async def fingerprint(
        self, symbols: Iterable[str], start: TimeLike, end: TimeLike, types: Iterable[str] = TICKS
    ) -> dict[str, Any]:
        """``count``, ``first_ts``, ``last_ts``, ``fingerprint`` of a stored range (server side)."""
        r = await self._historical(symbols, start, end, types, fingerprint="true")
        summary: dict[str, Any] = r.json()
        return summary

    async def latest(self, symbols: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The latest trade and quote (with ``epoch``, ``seq``) per symbol."""
        r = await self._get("/ticks/realtime", symbols=",".join(symbols))
        return {row["sym"]: row for row in r.json()["ticks"]}

    # -- live --

    def subscribe(
        self,
        symbols: Iterable[str],
        types: Iterable[str] = TICKS,
        on_loss: Callable[[Loss], Any] | None = None,
        on_upstream_gap: Callable[[UpstreamGap], Any] | None = None,
    ) -> Subscription:
        """Live ticks of ``symbols`` (``async for tick in c.subscribe([...])``), gap-free per
        symbol across disconnects; see ``Subscription``. ``on_loss`` (a function or coroutine
        function) is called with each ``Loss``; if it raises, the stream ends with that error.
        ``on_upstream_gap`` likewise with each ``UpstreamGap`` a live venue source reports.
        """
        return Subscription(
            self, [s.upper() for s in symbols], list(types), on_loss, on_upstream_gap
        )

    # -- replay --

    def replay(
        self,
        symbols: Iterable[str],
        start: TimeLike,
        end: TimeLike | None = None,
        speed: float | str = "max",
        types: Iterable[str] = TICKS,
        enriched: bool = False,
        then_live: bool = False,
    ) -> Replay:
        """A replay of stored ticks (``async for tick in c.replay(...)``); see ``Replay``."""
        return Replay(self, list(symbols), start, end, speed, list(types), enriched, then_live)


class _Resync(Exception):
    """The stream saw a hole: reconnect and resume from the last delivered seq."""


class Subscription:
    """An async iterator over live ticks, gap-free per symbol, that survives disconnects and
    Redis restarts.

    After a drop (network, server restart, slow-consumer close, a server-side gap or Redis
    outage) it reconnects with backoff and resubscribes with ``from_seq`` and ``epoch``:
    nothing is lost or repeated. Events that no retry can bring back are reported, never
    silently skipped, and the stream goes on after them: a ``Loss`` is appended to ``losses``
    and passed to ``on_loss`` before the next tick of that symbol is yielded. After Redis
    restarted empty (``Loss.reason`` ``epoch_changed``) the stream continues in the new epoch
    from its first event, so only the old epoch's undelivered tail is lost. ``epochs`` and
    ``last`` say where each symbol stands. A resumed symbol the server calls unknown (Redis
    restarted empty, the feed not back yet) is asked for again while the others stream.
    ``TickpipeError`` is raised only for refusals that retrying cannot fix (bad key, symbols
    rejected, too many reconnects in a row).

    A live venue source's holes in the venue's own trade ids (trades that never reached
    tickpipe, so no seq is missing) are appended to ``upstream_gaps`` and passed to
    ``on_upstream_gap`` before the next tick of that symbol, once each, also when the tick
    after the hole comes in a resume's backlog.
    """

    def __init__(
        self,
        client: Client,
        symbols: list[str],
        types: list[str],
        on_loss: Callable[[Loss], Any] | None,
        on_upstream_gap: Callable[[UpstreamGap], Any] | None = None,
    ) -> None:
        self.client = client
        self.symbols = symbols
        self.types = types
        self.on_loss = on_loss
        self.on_upstream_gap = on_upstream_gap
        self.losses: list[Loss] = []
        self.upstream_gaps: list[UpstreamGap] = []
        self.epochs: dict[str, int] = {}
        self.last: dict[str, int] = {}  # the last seq yielded (or skipped over) per symbol
        self.accepted: set[str] = set()  # the symbols the server has accepted in this stream
        self._wait_s = 0.0  # the last wait before asking again for symbols not known yet
        self.reconnects = 0

    def __aiter__(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._events()

    async def _lost(self, loss: Loss) -> None:
        self.losses.append(loss)
        if self.on_loss is not None:
            result = self.on_loss(loss)
            if inspect.isawaitable(result):
                await result

    async def _upstream_gap(self, ev: dict[str, Any]) -> None:
        sym, after = ev["sym"], ev["after_seq"]
        gap = UpstreamGap(
            sym, ev["venue"], ev.get("epoch"), after, ev["first_id"], ev["last_id"],
            ev["missing"], ev["ts"], ev.get("message", ""),
        )  # fmt: skip
        if after < self.last.get(sym, 0) or gap in self.upstream_gaps[-8:]:
            return  # sent again by a resume: the tick after it (and so it) was delivered
        self.upstream_gaps.append(gap)
        if self.on_upstream_gap is not None:
            result = self.on_upstream_gap(gap)
            if inspect.isawaitable(result):
                await result

    def _request(self, symbols: list[str] | None = None) -> dict[str, Any]:
        """The ``subscribe`` of ``symbols`` (default: all), resuming where each stands."""
        syms = self.symbols if symbols is None else symbols
        msg: dict[str, Any] = {"op": "subscribe", "id": "sub", "symbols": syms}
        msg["types"] = self.types
        resumed = {s: self.last[s] for s in syms if s in self.last}
        if resumed:
            msg["from_seq"] = resumed
            msg["epoch"] = {s: self.epochs[s] for s in resumed if s in self.epochs}
        return msg

    async def _subscribe_later(self, ws: ClientConnection, symbols: list[str]) -> None:
        """Ask again, on the same connection, for symbols the server did not know a moment
        ago, waiting longer each time (up to 5 s); the others stream meanwhile."""
        self._wait_s = min(5.0, self._wait_s * 2) if self._wait_s else 0.5
        await asyncio.sleep(self._wait_s)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(orjson.dumps(self._request(symbols)).decode())

    async def _events(self) -> AsyncGenerator[dict[str, Any], None]:
        both = set(self.types) == set(TICKS)  # only then must seq be contiguous in what we see
        last = self.last
        backoff = _Backoff(tries=self.client.reconnect_tries)
        while True:
            try:
                ws = await self.client._connect()
            except TickpipeError as exc:
                if exc.code not in RETRIED_ERRORS:  # e.g. unauthorized: no retry fixes it
                    raise
                await backoff.wait(exc)
                self.reconnects += 1
                continue
            except CONNECT_FAILED as exc:
                await backoff.wait(exc)
                self.reconnects += 1
                continue
            retry: asyncio.Task[None] | None = None  # asking again for symbols not known yet
            try:
                await ws.send(orjson.dumps(self._request()).decode())
                async for raw in ws:
                    for ev in orjson.loads(raw):
                        kind = ev["type"]
                        if kind in TICKS:
                            sym, seq = ev["sym"], ev["seq"]
                            prev = last.get(sym)
                            if prev is not None and seq <= prev:
                                continue  # already delivered
                            if both and prev is not None and seq != prev + 1:
                                raise _Resync(f"{sym}: seq {seq} after {prev}")
                            last[sym] = seq
                            backoff.reset()
                            yield ev
                        elif kind == "subscribed":
                            waiting = self._waiting(ev) if ev["rejected"] else []
                            if waiting:
                                retry = asyncio.create_task(self._subscribe_later(ws, waiting))
                            else:
                                self._wait_s = 0.0
                            self.accepted.update(ev["seq"])
                            for sym, st in ev["seq"].items():
                                if st["epoch"] is not None:
                                    # A new epoch is handled with the resume_unavailable that
                                    # follows for this symbol.
                                    self.epochs.setdefault(sym, st["epoch"])
                                last.setdefault(sym, st["seq"])
                        elif kind == "error":
                            await self._refused(ev)
                        elif kind == "gap":  # recorded history has a hole: no retry fills it
                            await self._gap(ev)
                        elif kind == "status" and ev["code"] == "epoch_changed":
                            await self._new_epoch(ev["sym"], ev["epoch"], None, ev["message"])
                        elif kind == "status" and ev["code"] == "gap":
                            raise _Resync(ev["message"])
                        elif kind == "status" and ev["code"] == "upstream_gap":
                            await self._upstream_gap(ev)
                raise _Resync("the server closed the connection")  # e.g. restarting
            except _Resync as exc:
                await ws.close()
                await backoff.wait(exc)
                self.reconnects += 1
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in FINAL_CLOSE_CODES:
                    raise TickpipeError("closed", f"server closed the connection ({code})") from exc
                await backoff.wait(exc)
                self.reconnects += 1
            except (OSError, TimeoutError) as exc:
                await backoff.wait(exc)
                self.reconnects += 1
            finally:
                if retry is not None:
                    retry.cancel()
                with contextlib.suppress(Exception):
                    await ws.close()

    def _waiting(self, ev: dict[str, Any]) -> list[str]:
        """The symbols a ``subscribed`` refused, to ask for again. ``unknown_symbol`` for a
        symbol this stream had before is passing (Redis restarted empty and no feed has
        published it again yet: a quiet symbol may take a while) while the others stream. Any
        other refusal is raised: no retry fixes it."""
        passing = all(
            r.get("code") == "unknown_symbol" and r.get("sym") in self.accepted
            for r in ev["rejected"]
        )
        if not passing:
            raise TickpipeError("rejected", f"symbols refused: {ev['rejected']}", ev)
        return [r["sym"] for r in ev["rejected"]]

    async def _refused(self, ev: dict[str, Any]) -> None:
        """An ``error``: a resume that cannot be served is a ``Loss`` (and, where the server
        still has events after it, a reconnect to fetch them); Redis unreachable or a failed
        backlog is retried; anything else is raised."""
        code, reason, sym = ev.get("code"), ev.get("reason"), ev.get("sym")
        if code in RETRIED_ERRORS or (code == "resume_unavailable" and reason == "internal"):
            raise _Resync(ev.get("message", code))
        if code != "resume_unavailable" or sym is None:
            raise _error(ev)
        # no_data: the symbol has no live data yet (an epoch_changed status comes with its first
        # tick); already_subscribed: nothing was missed.
        if reason not in ("epoch_changed", "too_old", "seq_from_future"):
            return
        # These three always say where the symbol stands now (``seq``).
        now: int = ev["seq"]
        avail: int | None = ev.get("available_from_seq")
        if reason == "epoch_changed":
            await self._new_epoch(sym, ev["epoch"], avail, ev.get("message", ""))
        elif reason == "too_old":
            after = self.last.get(sym, 0)
            upto = (avail - 1) if avail is not None else now
            await self._lost(
                Loss(sym, "too_old", ev.get("epoch"), after + 1, upto, ev.get("epoch"),
                     ev.get("message", ""))
            )  # fmt: skip
            self.last[sym] = upto
        else:  # seq_from_future
            seen = self.last.get(sym, 0)
            await self._lost(
                Loss(sym, "seq_from_future", ev.get("epoch"), now + 1, seen, ev.get("epoch"),
                     ev.get("message", ""))
            )  # fmt: skip
            self.last[sym] = now
            return
        if now is not None and self.last[sym] < now:
            # The server went on live at ``now``; the events in between are still kept.
            raise _Resync(f"{sym}: fetching seq {self.last[sym] + 1} to {now}")

    async def _new_epoch(self, sym: str, epoch: int, avail: int | None, message: str) -> None:
        """``sym`` restarted its sequence in ``epoch``: the rest of the old one is lost; go on
        from the new epoch's first event still kept (``avail``, else 1)."""
        old = self.epochs.get(sym)
        self.epochs[sym] = epoch
        if old == epoch:
            return
        if old is not None:
            after = self.last.get(sym, 0)
            await self._lost(Loss(sym, "epoch_changed", old, after + 1, None, epoch, message))
        first = avail if avail is not None else 1
        if first > 1:
            await self._lost(
                Loss(sym, "too_old", epoch, 1, first - 1, epoch,
                     f"seq 1 to {first - 1} of the new epoch {epoch} are no longer kept")
            )  # fmt: skip
        self.last[sym] = first - 1

    async def _gap(self, ev: dict[str, Any]) -> None:
        sym, to_seq = ev["sym"], ev["to_seq"]
        await self._lost(
            Loss(sym, "gap", ev.get("epoch"), ev["from_seq"], to_seq, ev.get("epoch"),
                 ev.get("message", ""))
        )  # fmt: skip
        self.last[sym] = max(self.last.get(sym, 0), to_seq)


class Replay:
    """An async iterator over replayed ticks, with controls.

    ``gaps`` lists the recorded gaps announced in-band; ``done`` is the server's last
    ``replay_done``; ``fingerprint`` is computed here over every tick yielded, so it holds even
    when the replay had to reconnect (it continues strictly after the last tick it yielded).
    With ``then_live`` the iterator goes on with live ticks after ``caught_up``.
    """

    def __init__(
        self,
        client: Client,
        symbols: list[str],
        start: TimeLike,
        end: TimeLike | None,
        speed: float | str,
        types: list[str],
        enriched: bool,
        then_live: bool,
    ) -> None:
        self.client = client
        self.request: dict[str, Any] = {
            "op": "replay",
            "id": "replay",
            "symbols": symbols,
            "start": _ns(start),
            "types": types,
            "speed": speed,
            "enriched": enriched,
            "then_live": then_live,
        }
        if end is not None:
            self.request["end"] = _ns(end)
        self.fp = Fingerprint()
        self.gaps: list[dict[str, Any]] = []
        self.done: dict[str, Any] | None = None
        self.caught_up: dict[str, Any] | None = None
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._after: tuple[int, int, str] | None = None

    @property
    def fingerprint(self) -> str:
        return self.fp.hexdigest()

    @property
    def count(self) -> int:
        return self.fp.count

    async def _control(self, op: str, **fields: Any) -> None:
        if self._ws is None:
            raise TickpipeError("not_running", "the replay is not running")
        await self._ws.send(orjson.dumps({"op": op, "id": "replay", **fields}).decode())

    async def pause(self) -> None:
        await self._control("pause")

    async def resume(self) -> None:
        await self._control("resume")

    async def set_speed(self, speed: float | str) -> None:
        self.request["speed"] = speed
        await self._control("speed", speed=speed)

    async def stop(self) -> None:
        await self._control("stop")

    def __aiter__(self) -> AsyncGenerator[dict[str, Any], None]:
        return self._events()

    async def _events(self) -> AsyncGenerator[dict[str, Any], None]:
        backoff = _Backoff(tries=self.client.reconnect_tries)
        live = False
        while True:
            try:
                self._ws = ws = await self.client._connect()
            except CONNECT_FAILED as exc:
                await backoff.wait(exc)
                self.reconnects += 1
                continue
            try:
                msg = dict(self.request)
                if self._after is not None:
                    msg["after"] = list(self._after)
                await ws.send(orjson.dumps(msg).decode())
                async for raw in ws:
                    backoff.reset()
                    for ev in orjson.loads(raw):
                        kind = ev["type"]
                        if kind in TICKS:
                            if not live:
                                self.fp.add_event(ev)
                                self._after = (ev["ts"], ev["seq"], ev["sym"])
                            yield ev
                        elif kind == "gap":
                            self.gaps.append(ev)
                        elif kind == "replay_done":
                            self.done = ev
                            if not self.request["then_live"]:
                                return
                        elif kind == "caught_up":
                            self.caught_up = ev
                            live = True
                        elif kind == "error":
                            raise _error(ev)
                # The server closed cleanly (e.g. restarting) before the replay was done.
                raise ws.close_exc
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in FINAL_CLOSE_CODES or live:
                    raise TickpipeError("closed", f"connection closed ({code})") from exc
                await backoff.wait(exc)
                self.reconnects += 1
            except (OSError, TimeoutError) as exc:
                if live:
                    raise TickpipeError("closed", str(exc)) from exc
                await backoff.wait(exc)
                self.reconnects += 1
            finally:
                self._ws = None
                with contextlib.suppress(Exception):
                    await ws.close()


class SyncClient:
    """Blocking wrapper around ``Client`` for notebooks and scripts (its own event loop in a
    background thread, so it also works where a loop is already running, as in Jupyter)."""

    def __init__(self, url: str | Sequence[str], key: str, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = Client(url, key, **kw)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def history(self, *args: Any, **kw: Any) -> pl.DataFrame:
        """See ``Client.history``."""
        return self._run(self.client.history(*args, **kw))

    def latest(self, symbols: Iterable[str]) -> dict[str, dict[str, Any]]:
        """See ``Client.latest``."""
        return self._run(self.client.latest(symbols))

    def fingerprint(self, *args: Any, **kw: Any) -> dict[str, Any]:
        """See ``Client.fingerprint``."""
        return self._run(self.client.fingerprint(*args, **kw))

    def _iterate(self, agen: AsyncGenerator[dict[str, Any], None]) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self._run(agen.aclose())

    def subscribe(self, symbols: Iterable[str], **kw: Any) -> Iterator[dict[str, Any]]:
        """See ``Client.subscribe``; ``on_loss`` runs in the client's background thread, before
        the next tick of that symbol is returned."""
        return self._iterate(self.client.subscribe(symbols, **kw).__aiter__())

    def replay(self, *args: Any, **kw: Any) -> tuple[Replay, Iterator[dict[str, Any]]]:
        """A ``Replay`` (for its ``fingerprint``, ``gaps``, ``done``) and a blocking iterator."""
        r = self.client.replay(*args, **kw)
        return r, self._iterate(r._events())
