"""JSON lines between a benchmark and its child processes (one object per line each way).

The benchmark writes to a child's stdin with ``tell`` and reads its stdout with ``read_json``
(bounded by a timeout); the child reads with ``read_line`` and answers with ``emit``.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import subprocess
import sys
from typing import Any

import orjson


def tell(procs: list[subprocess.Popen[bytes]], obj: dict[str, Any]) -> None:
    """Send ``obj`` to each child."""
    data = orjson.dumps(obj) + b"\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(data)
        p.stdin.flush()


def read_json(proc: subprocess.Popen[bytes], timeout: float, what: str) -> Any:
    """One JSON line from a child's stdout, within ``timeout``."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"{what}: no answer within {timeout:.0f}s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: exited (code {proc.poll()})")
    return orjson.loads(line)


async def read_line() -> dict[str, Any]:
    """In a child: the next object from the benchmark (exits if the benchmark went away)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit(f"{sys.argv[0]}: the benchmark went away")
    return orjson.loads(line)


def emit(obj: dict[str, Any]) -> None:
    """In a child: answer the benchmark."""
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()
