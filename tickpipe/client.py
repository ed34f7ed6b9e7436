"""The tickpipe Python client: live ticks, replays, history and latest values.

Async first::

    async with Client("http://127.0.0.1:8000", key) as c:
        async for tick in c.subscribe(["AAPL"]):
            ...

``subscribe`` reconnects with backoff and resumes by seq, so the caller sees an unbroken,
gap-free sequence per symbol or an explicit ``TickpipeError``. ``replay`` is an async iterator
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
import io
import random
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import orjson
import polars as pl
import websockets
from websockets.asyncio.client import ClientConnection

from tickpipe.fingerprint import Fingerprint

TimeLike = int | str | dt.datetime
TICKS = ("trade", "quote")
# Close codes after which reconnecting cannot help (bad key, revoked, forbidden, bad requests).
FINAL_CLOSE_CODES = {4000, 4001, 4003, 4004}


class TickpipeError(Exception):
    """The server refused something or the stream cannot go on; ``code`` says what."""

    def __init__(self, code: str, message: str, event: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.event = event or {}


class ResumeUnavailable(TickpipeError):
    """Missed events could not be recovered; ``event`` says from which seq data is available."""


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
    """A connection to a tickpipe server (``url`` like ``http://host:8000``) with an API key."""

    def __init__(self, url: str, key: str, timeout: float = 30.0, reconnect_tries: int = 30):
        self.url = url.rstrip("/")
        self.ws_url = self.url.replace("http", "ws", 1) + "/ws"
        self.key = key
        self.timeout = timeout
        self.reconnect_tries = reconnect_tries
        self._http: httpx.AsyncClient | None = None

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
                base_url=self.url,
                headers={"Authorization": f"Bearer {self.key}"},
                timeout=self.timeout,
            )
        return self._http

    async def _connect(self) -> ClientConnection:
        ws = await websockets.connect(
            self.ws_url,
            additional_headers={"Authorization": f"Bearer {self.key}"},
            open_timeout=self.timeout,
            max_size=None,
        )
        for ev in orjson.loads(await asyncio.wait_for(ws.recv(), self.timeout)):
            if ev["type"] == "error":
                await ws.close()
                raise _error(ev)
        return ws

    # -- REST --

    async def _get(self, path: str, **params: Any) -> httpx.Response:
        r = await self.http.get(path, params={k: v for k, v in params.items() if v is not None})
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
        """Stored ticks of ``[start, end)`` in (ts, seq) order, as a DataFrame (sent as Arrow)."""
        r = await self._historical(
            symbols, start, end, types, enriched=str(enriched).lower(), format="arrow"
        )
        return pl.read_ipc_stream(io.BytesIO(r.content))

    async def fingerprint(
        self, symbols: Iterable[str], start: TimeLike, end: TimeLike, types: Iterable[str] = TICKS
    ) -> dict[str, Any]:
        """``count``, ``first_ts``, ``last_ts``, ``fingerprint`` of a stored range (server side)."""
        r = await self._historical(symbols, start, end, types, fingerprint="true")
        return r.json()

    async def latest(self, symbols: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The latest trade and quote (with ``epoch``, ``seq``) per symbol."""
        r = await self._get("/ticks/realtime", symbols=",".join(symbols))
        return {row["sym"]: row for row in r.json()["ticks"]}

    # -- live --

    async def subscribe(
        self, symbols: Iterable[str], types: Iterable[str] = TICKS
    ) -> AsyncIterator[dict[str, Any]]:
        """Live ticks of ``symbols``, gap-free per symbol across disconnects.

        After a drop (network, server restart, slow-consumer close, a server-side gap) it
        reconnects with backoff and resubscribes with ``from_seq``: nothing is lost or repeated.
        Raises ``ResumeUnavailable`` if the missed events are gone, ``TickpipeError`` for
        refusals that retrying cannot fix.
        """
        syms = [s.upper() for s in symbols]
        kinds = list(types)
        both = set(kinds) == set(TICKS)  # only then must seq be contiguous in what we see
        last: dict[str, int] = {}
        epochs: dict[str, int] = {}
        backoff = _Backoff(tries=self.reconnect_tries)
        while True:
            try:
                ws = await self._connect()
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                await backoff.wait(exc)
                continue
            try:
                msg: dict[str, Any] = {"op": "subscribe", "id": "sub", "symbols": syms}
                msg["types"] = kinds
                if last:
                    msg["from_seq"] = last
                    msg["epoch"] = {s: epochs[s] for s in last if s in epochs}
                await ws.send(orjson.dumps(msg).decode())
                async for raw in ws:
                    backoff.reset()
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
                            yield ev
                        elif kind == "subscribed":
                            for sym, st in ev["seq"].items():
                                if st["epoch"] is not None:
                                    if epochs.get(sym, st["epoch"]) != st["epoch"]:
                                        raise TickpipeError(
                                            "epoch_changed",
                                            f"{sym} restarted its sequence (epoch "
                                            f"{epochs[sym]} -> {st['epoch']}); events may be lost",
                                        )
                                    epochs[sym] = st["epoch"]
                                last.setdefault(sym, st["seq"])
                            if ev["rejected"]:
                                raise TickpipeError(
                                    "rejected", f"symbols refused: {ev['rejected']}", ev
                                )
                        elif kind == "error":
                            raise _error(ev)
                        elif kind == "gap":  # recovered history has a hole: no retry fills it
                            raise ResumeUnavailable(
                                "gap",
                                f"{ev.get('sym')}: seq {ev.get('from_seq')} to {ev.get('to_seq')} "
                                "were never recorded, so the sequence cannot be made whole",
                                ev,
                            )
                        elif kind == "status" and ev["code"] in ("gap", "epoch_changed"):
                            if ev["code"] == "epoch_changed":
                                raise TickpipeError("epoch_changed", ev["message"], ev)
                            raise _Resync(ev["message"])
                raise _Resync("the server closed the connection")  # e.g. restarting
            except _Resync as exc:
                await ws.close()
                await backoff.wait(exc)
                continue
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in FINAL_CLOSE_CODES:
                    raise TickpipeError("closed", f"server closed the connection ({code})") from exc
                await backoff.wait(exc)
                continue
            except (OSError, TimeoutError) as exc:
                await backoff.wait(exc)
                continue
            finally:
                with contextlib.suppress(Exception):
                    await ws.close()

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

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        backoff = _Backoff(tries=self.client.reconnect_tries)
        live = False
        while True:
            try:
                self._ws = ws = await self.client._connect()
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
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
                raise websockets.ConnectionClosedOK(ws.close_rcvd, ws.close_sent)
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

    def __init__(self, url: str, key: str, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = Client(url, key, **kw)

    def _run(self, coro: Any) -> Any:
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

    def _iterate(self, agen: AsyncIterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self._run(agen.aclose())  # type: ignore[attr-defined]

    def subscribe(self, symbols: Iterable[str], **kw: Any) -> Iterator[dict[str, Any]]:
        """See ``Client.subscribe``."""
        return self._iterate(self.client.subscribe(symbols, **kw))

    def replay(self, *args: Any, **kw: Any) -> tuple[Replay, Iterator[dict[str, Any]]]:
        """A ``Replay`` (for its ``fingerprint``, ``gaps``, ``done``) and a blocking iterator."""
        r = self.client.replay(*args, **kw)
        return r, self._iterate(r._events())
