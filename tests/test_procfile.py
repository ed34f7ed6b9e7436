"""`make run`'s process set (the Procfile under honcho) end to end, as a user starts it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import redis

from tests.harness import ROOT, free_port, next_event, recv_events, send, wait_port


async def test_procfile_starts_redis_feed_and_web_and_stops_cleanly(tmp_path) -> None:
    import websockets

    redis_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
    env.update(
        TICKPIPE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        TICKPIPE_PORT=str(web_port),
        TICKPIPE_DATA_DIR=str(tmp_path / "data"),
    )
    honcho = ROOT / ".venv" / "bin" / "honcho"
    log = (tmp_path / "honcho.log").open("wb")
    proc = subprocess.Popen(
        [str(honcho), "start", "-f", "Procfile"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(web_port, 30)
        out = ""
        deadline = time.monotonic() + 20
        while "admin key" not in out and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            out = (tmp_path / "honcho.log").read_text()
        assert f"http://127.0.0.1:{web_port}/" in out
        assert "starting redis-server" in out  # nothing answered on that port, so it started one
        assert re.search(r"admin key \(shown only once, keep it\): tp_\S+", out)

        made = subprocess.run(
            [str(ROOT / ".venv/bin/tickpipe"), "keys", "create", "--name", "agent-1",
             "--scopes", "realtime,historical", "--symbols", "AAPL,MSFT"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        async with websockets.connect(
            f"ws://127.0.0.1:{web_port}/ws", additional_headers={"Authorization": f"Bearer {key}"}
        ) as ws:
            await next_event(ws, "welcome", timeout=10)
            await send(ws, op="subscribe", symbols=["AAPL", "MSFT"])
            sub = await next_event(ws, "subscribed", timeout=10)
            last = {s: v["seq"] for s, v in sub["seq"].items()}
            n, kinds = 0, set()
            while n < 200:
                for ev in await recv_events(ws, timeout=10):
                    if ev["type"] in ("trade", "quote"):
                        assert ev["seq"] == last[ev["sym"]] + 1
                        last[ev["sym"]] = ev["seq"]
                        kinds.add(ev["type"])
                        n += 1
            assert kinds == {"trade", "quote"}
        assert (tmp_path / "data" / "redis").is_dir(), "Redis keeps its data under data/"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rc = proc.wait(30)
        log.close()
    out = (tmp_path / "honcho.log").read_text()
    assert "Traceback" not in out, out[-3000:]
    assert rc in (0, 130), out[-2000:]
    r = redis.Redis(port=redis_port, socket_connect_timeout=0.5)
    try:
        r.ping()
        raise AssertionError("redis-server still running after Ctrl-C")
    except redis.ConnectionError:
        pass
    finally:
        r.close()
