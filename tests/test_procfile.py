"""`make run`'s process set (the Procfile under honcho) end to end, as a user starts it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from server.config import Settings
from tests.harness import (
    ROOT,
    START_S,
    RedisProcess,
    eventually,
    free_port,
    next_event,
    recv_events,
    send,
    wait_port,
)

HONCHO = ROOT / ".venv" / "bin" / "honcho"


class Honcho:
    """``honcho start`` of the Procfile in its own session, its output in a file."""

    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.log_path = tmp_path / "honcho.log"
        self.web_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        self.env.update(TICKPIPE_PORT=str(self.web_port), TICKPIPE_DATA_DIR=str(tmp_path / "data"))
        self.env.update({f"TICKPIPE_{k.upper()}": v for k, v in settings.items()})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(HONCHO), "start", "-f", "Procfile"], cwd=ROOT, env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, text: str, timeout: float = 90) -> str:
        out: str = await eventually(
            self.output, lambda out: text in out, timeout, 0.2, f"{text!r} in the output"
        )
        return out

    def ctrl_c(self) -> int:
        """What Ctrl-C in the terminal does; the exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ROOT / ".venv/bin/tickpipe"), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=START_S,
        )  # fmt: skip


@pytest.fixture
def other_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis that tickpipe did not start (like the one this machine runs on 6379)."""
    r = RedisProcess(tmp_path / "other")
    r.start()
    yield r
    r.kill()


def keyspace(port: int) -> dict[str, object]:
    client = redis.Redis(port=port)
    try:
        return client.info("keyspace")
    finally:
        client.close()


def answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


async def check_live_ticks(h: Honcho) -> None:
    """A key made with the CLI gets contiguous trades and quotes over the WebSocket."""
    import websockets

    made = h.cli("keys", "create", "--name", "agent-1", "--scopes", "realtime,historical",
                 "--symbols", "AAPL,MSFT")  # fmt: skip
    assert made.returncode == 0, made.stderr
    async with websockets.connect(
        f"ws://127.0.0.1:{h.web_port}/ws",
        additional_headers={"Authorization": f"Bearer {made.stdout.strip()}"},
    ) as ws:
        await next_event(ws, "welcome")
        await send(ws, op="subscribe", symbols=["AAPL", "MSFT"])
        sub = await next_event(ws, "subscribed")
        last = {s: v["seq"] for s, v in sub["seq"].items()}
        n, kinds = 0, set()
        while n < 200:
            for ev in await recv_events(ws):
                if ev["type"] in ("trade", "quote"):
                    assert ev["seq"] == last[ev["sym"]] + 1
                    last[ev["sym"]] = ev["seq"]
                    kinds.add(ev["type"])
                    n += 1
        assert kinds == {"trade", "quote"}


def test_default_redis_is_the_projects_own_not_6379() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    if "TICKPIPE_REDIS_URL" not in os.environ and "TICKPIPE_REDIS_PORT" not in os.environ:
        assert s.redis_url == "redis://127.0.0.1:6380/0" and s.own_redis
    assert Settings(_env_file=None, redis_port=7001).redis_url == "redis://127.0.0.1:7001/0"  # type: ignore[call-arg]
    assert not Settings(_env_file=None, redis_url="redis://h:1/0").own_redis  # type: ignore[call-arg]


@pytest.mark.slow
async def test_procfile_starts_its_own_redis_feed_recorder_and_web_and_stops_cleanly(
    tmp_path: Path, other_redis: RedisProcess
) -> None:
    redis_port = free_port()
    h = Honcho(tmp_path, redis_port=str(redis_port))
    try:
        wait_port(h.web_port)
        out = await h.wait_for("admin key")
        assert f"http://127.0.0.1:{h.web_port}/" in out
        assert f"starting redis-server on 127.0.0.1:{redis_port}" in out
        assert re.search(r"admin key \(shown only once, keep it\): tp_\S+", out)
        await check_live_ticks(h)
        assert (tmp_path / "data" / "redis").is_dir(), "Redis keeps its data under data/"
        assert keyspace(redis_port), "the processes write into tickpipe's own Redis"
    finally:
        rc = h.ctrl_c()
    out = h.output()
    assert "Traceback" not in out, out[-3000:]
    assert rc in (0, 130), out[-2000:]
    assert not answers(redis_port), "redis-server still running after Ctrl-C"
    assert keyspace(other_redis.port) == {}, "nothing is written into a Redis it did not start"


async def test_procfile_writes_nothing_into_a_redis_it_did_not_start_on_its_port(
    tmp_path: Path, other_redis: RedisProcess
) -> None:
    h = Honcho(tmp_path, redis_port=str(other_redis.port))
    try:
        rc: int | None = h.wait(60)  # it stops by itself
    except subprocess.TimeoutExpired:
        rc = None
    written = keyspace(other_redis.port)
    h.ctrl_c()
    out = h.output()
    assert written == {}, f"make run wrote into a Redis it did not start: {written}"
    assert rc not in (None, 0), out[-2000:]
    assert f"another Redis answers on 127.0.0.1:{other_redis.port}" in out, out[-2000:]
    assert "never writes into a Redis it did not start" in out
    assert "TICKPIPE_REDIS_URL" in out  # and how to use it on purpose
    assert "Traceback" not in out, out[-3000:]
    assert answers(other_redis.port), "a Redis it did not start is not stopped either"


@pytest.mark.slow
async def test_procfile_uses_the_redis_tickpipe_redis_url_names(
    tmp_path: Path, other_redis: RedisProcess
) -> None:
    h = Honcho(tmp_path, redis_url=other_redis.url)
    try:
        wait_port(h.web_port)
        out = await h.wait_for("admin key")
        assert "using the Redis TICKPIPE_REDIS_URL names" in out
        assert "starting redis-server" not in out
        await check_live_ticks(h)
        assert keyspace(other_redis.port), "the processes write into the Redis it names"
    finally:
        rc = h.ctrl_c()
    assert rc in (0, 130), h.output()[-2000:]
    assert not (tmp_path / "data" / "redis").exists()
    assert answers(other_redis.port), "a Redis it did not start is not stopped"
