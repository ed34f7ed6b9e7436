"""Start tickpipe's processes for tests by forking a parent that has imported tickpipe already.

Every ``tickpipe web``, ``feed``, ``recorder`` or one-shot command a test starts would spend most
of a second of CPU importing Polars, DuckDB, Starlette, uvicorn and tickpipe itself; a suite
starts about 300 of them on two cores. So each pytest worker keeps one fork server: a process
that imported all of that once, then forks a child per request. The child is a real process
running the real command, ``server.cli.main(args)``, with the environment, working directory
and output files it was given, exactly what ``python -m server.cli ARGS`` would run (the same
``sys.argv``, ``__main__`` and interpreter shutdown); only the import is shared.

``TICKPIPE_TEST_SPAWN=exec`` starts every process with ``python -m server.cli`` instead. The
Procfile and CLI entry-point tests always do (``tests/test_procfile.py``, the README snippets).

The protocol, one JSON object per line: the test side writes ``{"id", "args", "env", "cwd",
"stdout", "stderr"}`` to the server's stdin; the server answers ``{"id", "pid"}`` (or
``{"id", "error"}``) and, when a child ends, ``{"exit": pid, "code": returncode}`` (a negative
code: killed by that signal, as ``subprocess`` reports it). When its stdin closes (the pytest
worker ended) the server kills the children it still has and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / "server" / "cli.py")


def exec_only() -> bool:
    return os.environ.get("TICKPIPE_TEST_SPAWN", "fork") == "exec"


# -- the test side ---------------------------------------------------------------------------


class Child:
    """A process the fork server started, with the part of ``subprocess.Popen`` tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.server.wait_exit(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a signal to a pid that may have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """This pytest worker's fork server (started on first use)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKPIPE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        self._lock = threading.Lock()  # one request at a time on the pipe
        self._changed = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="forkserver", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                msg = orjson.loads(line)
                with self._changed:
                    if "exit" in msg:
                        self._exits[msg["exit"]] = msg["code"]
                    else:
                        self._replies[msg["id"]] = msg
                        # A new child: an earlier one's exit under the same (reused) pid, always
                        # reported before this reply, is not its exit.
                        self._exits.pop(msg.get("pid", -1), None)
                    self._changed.notify_all()
        finally:
            with self._changed:  # the server is gone (or spoke nonsense): nobody waits for ever
                self._replies[-1] = {"error": "the fork server exited"}
                self._changed.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(
        self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path | None
    ) -> Child:
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            request = {
                "id": rid,
                "args": args,
                "env": env,
                "cwd": str(cwd),
                "stdout": str(stdout),
                "stderr": None if stderr is None else str(stderr),
            }
            assert self.proc.stdin is not None
            self.proc.stdin.write(orjson.dumps(request) + b"\n")
            self.proc.stdin.flush()
        with self._changed:
            self._changed.wait_for(lambda: rid in self._replies or -1 in self._replies, 60)
            reply = self._replies.pop(rid, None) or self._replies.get(-1)
        if reply is None:  # no answer in 60 s: the server and what it may still start go
            self.proc.kill()
        if reply is None or "pid" not in reply:
            raise RuntimeError(f"the fork server could not start {args}: {reply}")
        return Child(self, reply["pid"], args)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or -1 in self._replies, timeout)
            if pid not in self._exits and -1 in self._replies:
                raise RuntimeError(f"the fork server exited; the fate of process {pid} is unknown")
            return self._exits.get(pid)


_server: ForkServer | None = None
_server_lock = threading.Lock()


@atexit.register
def _stop_server() -> None:
    """The worker ends: the server kills what is left of its children and exits."""
    if _server is not None and _server.proc.stdin is not None:
        with contextlib.suppress(OSError):
            _server.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _server.proc.wait(10)


def server() -> ForkServer:
    global _server
    with _server_lock:
        if _server is None or not _server.alive():
            _server = ForkServer()
        return _server


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Child:
    """``python -m server.cli ARGS`` with ``env``, its output (both streams) appended to
    ``log``, forked from this worker's fork server."""
    return server().start(args, env, cwd, log, None)


def run(
    args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([python, -m, server.cli, *args], capture_output=True, text=True)``."""
    if exec_only():
        return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tp-run-") as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        child = server().start(args, env, cwd, out, err)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
            raise
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "server.cli", *args],
            code,
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )


# -- the server side -------------------------------------------------------------------------


# Threads a process has once it imported Polars (jemalloc's background threads, Polars' spill
# cleaner): harmless across a fork. Any other (Polars' worker pool, started by a computation)
# could hold a lock a child then waits on for ever: the server refuses to fork.
FORK_SAFE_THREADS = {"jemalloc_bg_thd", "polars-ooc-clea"}


def _unsafe_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return [n for n in names if n not in FORK_SAFE_THREADS]


def _serve() -> dict[str, Any] | None:
    """Answer requests until stdin closes; returns, in a forked child, the request it runs."""
    # The events go out on their own descriptor; what an import may print goes to stderr.
    events = os.dup(1)
    os.dup2(2, 1)

    def say(msg: dict[str, Any]) -> None:
        os.write(events, orjson.dumps(msg) + b"\n")

    import server.app  # what the processes import: once, here
    import server.cli
    import server.feed.sources
    import server.feed.tickerplant
    import server.history.compactor
    import server.history.importers
    import server.history.recorder  # noqa: F401

    requests = sys.stdin.buffer.fileno()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the fd
    sel = selectors.DefaultSelector()
    sel.register(requests, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: set[int] = set()
    pending = b""

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def kill_children() -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while wake_r.recv(4096):
                            pass
                    reap()
                    continue
                chunk = os.read(requests, 1 << 16)
                if not chunk:  # the pytest worker is gone: so are its processes
                    kill_children()
                    os._exit(0)
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = orjson.loads(line)
                    if unsafe := _unsafe_threads():
                        why = f"threads {unsafe} running: not forking (TICKPIPE_TEST_SPAWN=exec)"
                        say({"id": request["id"], "error": why})
                        continue
                    try:
                        pid = os.fork()
                    except OSError as exc:
                        say({"id": request["id"], "error": str(exc)})
                        continue
                    if pid == 0:
                        sel.close()
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        wake_r.close()
                        wake_w.close()
                        os.close(events)
                        return request
                    children.add(pid)
                    say({"id": request["id"], "pid": pid})
            reap()
    except BaseException:  # the server fails: its children do not outlive it
        kill_children()
        raise


def _become(request: dict[str, Any]) -> list[str]:
    """In the forked child: the streams, directory, environment and argv of
    ``python -m server.cli ARGS``; returns ARGS."""
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = out if request["stderr"] is None else os.open(
        request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # fmt: skip
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    for fd in {null, out, err}:
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        errors="backslashreplace",
        line_buffering=True,
    )
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import server.cli
    from server.config import get_settings

    get_settings.cache_clear()  # settings come from this environment, never the server's
    sys.argv = [CLI, *request["args"]]
    sys.modules["__main__"] = server.cli  # as with -m (multiprocessing's spawn reads it)
    time.tzset()
    return list(request["args"])


if __name__ == "__main__":
    job = _serve()
    if job is not None:  # a forked child: run the command, then shut down as Python does
        import server.cli

        sys.exit(server.cli.main(_become(job)))
