"""Real processes for tests: a redis-server on a free port, the web app under uvicorn, the feed.

Nothing here is mocked. Each ``Stack`` owns a temporary data dir, its own Redis (which a test may
kill and restart), and subprocesses started exactly as the Procfile starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from server.auth import KeyStore
from tests import forkserver

# Every HTTP client the tests make shares one TLS context: each new httpx client would otherwise
# load the CA bundle again (30 ms of CPU on the 2-vCPU machine, some 2,000 clients a suite: a
# minute of CPU), though every URL here is plain http.
TLS = httpx.create_ssl_context()

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a process may take to start listening (or a feed to publish): the wait ends as soon
# as it does; on two cores shared with other test workers, importing Polars, DuckDB and the MCP
# SDK alone can take tens of seconds of wall time.
START_S = 60.0

# How long a test waits for something that should happen (an event, a close, a state): the wait
# ends as soon as it does, so a generous limit costs nothing when all is well, and a machine
# busy with other test workers (two cores at full load in CI) does not fail a correct test.
# Checks that something does NOT happen within a time keep their own short windows.
WAIT_S = 60.0


def wait_port(port: int, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class RedisProcess:
    """A throwaway redis-server; ``kill`` and ``start`` again to simulate an outage.

    ``persist``: an append-only file fsynced on every write (as ``tickpipe redis`` runs it), so
    a restart after a kill comes back with its data; otherwise it comes back empty."""

    def __init__(self, workdir: Path, port: int | None = None, persist: bool = False) -> None:
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else [
            "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.dir), "--logfile", str(self.dir / "log")],
        )  # fmt: skip
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    stop = kill


class Proc:
    """A tickpipe process (``python -m server.cli ...``) with its output in a log file, forked
    from the worker's fork server (``tests.forkserver``; ``TICKPIPE_TEST_SPAWN=exec``: run
    with ``python -m server.cli``)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | forkserver.Child | None = None

    def start(self) -> None:
        if not forkserver.exec_only():
            self.proc = forkserver.start(self.args, self.env, self.log)
            return
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)  # a clean exit (flushes, deregisters) can be slow under load
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Stack:
    """Redis + web (+ feed) with their own settings; ``settings`` are TICKPIPE_* overrides."""

    def __init__(
        self,
        workdir: Path,
        feed: bool = True,
        recorder: bool = False,
        redis_persist: bool = False,
        cluster: Any = None,
        **settings: Any,
    ) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        # ``cluster``: a running ``tests.cluster.RedisCluster`` the stack uses (and leaves
        # running) instead of a Redis of its own.
        self.cluster = cluster
        self.redis = (
            cluster if cluster is not None else RedisProcess(workdir, persist=redis_persist)
        )
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        if cluster is not None:
            env["TICKPIPE_REDIS_MODE"] = "cluster"
        env.update(
            TICKPIPE_REDIS_URL=self.redis.url,
            TICKPIPE_DATA_DIR=str(self.data_dir),
            TICKPIPE_PORT=str(self.port),
            TICKPIPE_SYMBOLS="AAPL,MSFT,NVDA,AMZN,GOOGL,META,TSLA,JPM,EURUSD,BTC-USD",
            TICKPIPE_FEED_RATE="400",
            # 20 batches/s (not the default 100): an idle stack costs 9% of a core instead of
            # 14%, and a suite runs many at once. A test about the log's length in time sets it.
            TICKPIPE_FEED_BATCH_MS="50",
            TICKPIPE_HEARTBEAT_S="1",
            TICKPIPE_AUTH_TIMEOUT_S="1",
        )
        env.update({f"TICKPIPE_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.web = Proc(["web"], env, workdir / "web.log")
        self.feed = Proc(["feed"], env, workdir / "feed.log") if feed else None
        self.recorder = Proc(["recorder"], env, workdir / "recorder.log") if recorder else None
        self._keys: KeyStore | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start_web(self) -> None:
        self.web.start()
        wait_port(self.port)

    def other_web(self, name: str = "web2", **settings: Any) -> tuple[Proc, int]:
        """Another ``tickpipe web`` process of this deployment (same Redis, same data dir) on a
        free port, started: as a second host behind a load balancer would run it. The caller
        stops it."""
        port = free_port()
        env = {**self.env, "TICKPIPE_PORT": str(port)}
        env.update({f"TICKPIPE_{k.upper()}": str(v) for k, v in settings.items()})
        proc = Proc(["web"], env, self.workdir / f"{name}.log")
        proc.start()
        try:
            wait_port(port)
        except TimeoutError:
            proc.stop()  # not left running for the rest of the session
            raise
        return proc, port

    def start(self) -> Stack:
        """Start every process and wait until each is up; if one is not, stop what started
        (a fixture whose set-up fails never reaches its teardown) and raise."""
        try:
            if self.cluster is None:
                self.redis.start()
            self.start_web()
            if self.recorder is not None:
                self.recorder.start()
            if self.feed is not None:
                self.feed.start()
                self.wait_for_ticks()
            if self.recorder is not None:
                self.wait_for_recorder()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        if self.recorder is not None:
            self.recorder.stop()
        self.web.stop()
        if self.cluster is None:
            self.redis.kill()
        if self._keys is not None:
            self._keys.close()

    def _wait_for_key(self, what: str, key_of: Callable[[Any], str], timeout: float) -> None:
        """Poll until the key ``key_of(layout)`` exists in this stack's Redis."""
        from server.config import Settings
        from server.live.bus import Layout
        from server.live.connection import open_sync_redis

        settings = Settings(
            redis_url=self.redis.url, redis_mode="cluster" if self.cluster else "standalone"
        )
        r = open_sync_redis(settings)
        key = key_of(Layout.of(settings))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if r.exists(key):
                    return
                time.sleep(0.05)
        finally:
            r.close()
        raise TimeoutError(what)

    def wait_for_ticks(self, timeout: float = START_S) -> None:
        self._wait_for_key("the feed published nothing", lambda lay: lay.sym_key("AAPL"), timeout)

    def wait_for_recorder(self, timeout: float = START_S) -> None:
        """Until the recorder's first heartbeat: a slow machine can take seconds to start it."""
        from server.live.bus import RECORDER_KEY

        self._wait_for_key("the recorder sent no heartbeat", lambda _: RECORDER_KEY, timeout)

    @property
    def keys(self) -> KeyStore:
        if self._keys is None:
            self._keys = KeyStore(self.data_dir / "keys.sqlite3")
        return self._keys

    def key(
        self,
        name: str,
        scopes: Iterable[str] = ("realtime",),
        symbols: Iterable[str] | None = None,
    ) -> str:
        secret, _ = self.keys.create(name, scopes, symbols)
        return secret

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # A loaded machine can take tens of seconds (importing Polars and DuckDB when exec'd).
        return forkserver.run(list(args), self.env, timeout=90)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=WAIT_S, verify=TLS)

    async def connect(self, key: str | None = None, **kw: Any) -> ClientConnection:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        kw.setdefault("open_timeout", WAIT_S)  # the library's 10 s handshake failed CI under load
        return await websockets.connect(self.ws_url, additional_headers=headers, **kw)

    async def client(
        self, key: str, timeout: float = WAIT_S, **kw: Any
    ) -> tuple[ClientConnection, dict[str, Any]]:
        """A connected, authenticated client and its ``welcome`` event."""
        ws = await self.connect(key, open_timeout=timeout, **kw)
        welcome = await next_event(ws, "welcome", timeout=timeout)
        return ws, welcome


_pending: weakref.WeakKeyDictionary[ClientConnection, list[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


async def recv_events(ws: ClientConnection, timeout: float = WAIT_S) -> list[dict[str, Any]]:
    """The events of the next frame (every frame must be a JSON array of typed events), or
    those ``next_event`` left over from the frame it found its event in."""
    left = _pending.pop(ws, None)
    if left:
        return left
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "server frames must be text"
    events = orjson.loads(raw)
    assert isinstance(events, list) and events, f"frame is not a non-empty array: {raw[:200]}"
    assert all("type" in e for e in events)
    return events


async def next_event(
    ws: ClientConnection, type_: str, timeout: float = WAIT_S, **match: Any
) -> dict[str, Any]:
    """Read until an event of ``type_`` (with the given field values) arrives; the events after
    it in the same frame are kept for the next read."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"no {type_} event {match or ''} within {timeout}s")
        events = await recv_events(ws, left)
        for i, ev in enumerate(events):
            if ev["type"] == type_ and all(ev.get(k) == v for k, v in match.items()):
                if i + 1 < len(events):
                    _pending[ws] = events[i + 1 :]
                return ev


async def send(ws: ClientConnection, **msg: Any) -> None:
    await ws.send(orjson.dumps(msg).decode())


async def close_code(ws: ClientConnection, timeout: float = WAIT_S) -> tuple[int | None, list]:
    """Drain until the server closes; returns the close code and the events seen."""
    seen: list[dict[str, Any]] = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            seen.extend(await recv_events(ws, timeout))
    return ws.close_code, seen


async def recorded_for(stack: Stack, seconds: float, timeout: float = WAIT_S) -> None:
    """Wait until the store holds AAPL ticks at least ``seconds`` old (needs the recorder);
    ``timeout`` counts from when they could first be that old."""
    from tickpipe import Client

    deadline = time.monotonic() + seconds + timeout
    async with Client(
        stack.base, stack.key(f"recorded-{time.monotonic_ns()}", ["historical"])
    ) as c:
        while True:
            now = time.time_ns()
            frame = await c.history(["AAPL"], now - 3600 * 10**9, now)
            if frame.height and now - frame["ts"].dt.epoch("ns").min() >= seconds * 1e9:
                return
            assert time.monotonic() < deadline, f"no AAPL tick {seconds} s old stored"
            await asyncio.sleep(0.5)


def write_history(
    root: Path, rows: list[tuple], first_id: str = "1-0", last_id: str = "1-9"
) -> Path:
    """A hand-written history file in the recorder's layout (rows in ``STORED_SCHEMA`` order, ts
    in ns)."""
    import polars as pl

    from server.history.store import write_file
    from server.ticks import STORED_SCHEMA

    frame = pl.DataFrame(rows, schema={**STORED_SCHEMA, "ts": pl.Int64()}, orient="row")
    frame = frame.with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC")))
    return write_file(root, frame, first_id, last_id)


def corrupt_history_file(root: Path, day: str = "2026-01-05") -> Path:
    """A file that looks like Parquet by its magic bytes and is not."""
    part = root / f"date={day}"
    part.mkdir(parents=True, exist_ok=True)
    bad = part / "3-0_3-9.parquet"
    bad.write_bytes(b"PAR1" + b"\x00garbage" * 50 + b"PAR1")
    return bad


async def eventually(
    probe: Callable[[], Any],
    done: Callable[[Any], bool] = bool,
    timeout: float = WAIT_S,
    every: float = 0.1,
    what: str = "",
) -> Any:
    """Poll ``probe`` (a function, or a coroutine function) every ``every`` s until ``done``
    holds for what it returns (by default: until it is truthy), and return that; on timeout the
    test fails saying ``what`` it waited for and showing the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value
        _not_yet(deadline, value, timeout, what)
        await asyncio.sleep(every)


def eventually_sync(
    probe: Callable[[], Any],
    done: Callable[[Any], bool] = bool,
    timeout: float = WAIT_S,
    every: float = 0.1,
    what: str = "",
) -> Any:
    """``eventually`` for a test that is not async."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        _not_yet(deadline, value, timeout, what)
        time.sleep(every)


def _not_yet(deadline: float, value: Any, timeout: float, what: str) -> None:
    assert time.monotonic() < deadline, (
        f"{what or 'the condition'} not met after {timeout}s; last: {repr(value)[-500:]}"
    )
