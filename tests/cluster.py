"""A real Redis Cluster for tests: 3 masters + 3 replicas on free loopback ports.

``RedisCluster(workdir).start()`` starts six ``redis-server --cluster-enabled yes`` processes,
joins them with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`` and waits
until every node agrees the cluster is ``ok``. ``url`` is the comma-separated seed list for
``TICKPIPE_REDIS_URL`` (with ``TICKPIPE_REDIS_MODE=cluster``). A test may ``kill_master`` (SIGKILL;
its replica is promoted) or ``reshard`` slots from one master to another under load. Port 6379 is
never used: every port is a free one the OS hands out.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.harness import REDIS_SERVER, free_port, wait_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
# The cluster bus listens on port + 10000; a free port above 55535 has no bus port.
MAX_PORT = 65535 - 10000


def redis_version() -> tuple[int, ...]:
    """The installed redis-server's version (sharded pub/sub needs 7.0)."""
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port > MAX_PORT or port == 6379:
            continue
        bus = port + 10000
        with contextlib.suppress(OSError):
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", bus))
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "log")],
        )  # fmt: skip
        wait_port(self.port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


class RedisCluster:
    """Six redis-servers joined into a cluster (3 masters, 1 replica each)."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        if redis_version() < (7,):
            raise RuntimeError(
                f"redis-server {redis_version()} has no sharded pub/sub; the cluster tests "
                "need Redis 7 or later"
            )
        self.replicas = replicas
        n = masters * (1 + replicas)
        self.frozen: set[int] = set()  # ports of nodes stopped with SIGSTOP
        self.nodes = [Node(p, workdir / f"node-{p}") for p in (_cluster_port() for _ in range(n))]

    @property
    def url(self) -> str:
        """Every node as seed, comma-separated (``TICKPIPE_REDIS_URL``)."""
        return ",".join(f"redis://127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_ok()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill(signal.SIGKILL)

    def flush(self) -> None:
        """Empty every master (a test that needs a clean cluster calls it first)."""
        for node in self.masters():
            with node.client() as r:
                r.flushall()

    def live(self) -> list[Node]:
        """The nodes running (not killed, not frozen)."""
        return [n for n in self.nodes if n.proc is not None and n.port not in self.frozen]

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says ``cluster_state:ok``, agrees on every slot's owner and
        all replicas have synced."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                views = set()
                ok = True
                for node in self.live():
                    with node.client() as r:
                        info = r.execute_command("CLUSTER", "INFO").decode()
                        ok &= "cluster_state:ok" in info
                        views.add(tuple(sorted(self._slot_owners(r))))
                        role = r.execute_command("ROLE")
                        if role[0] == b"slave":
                            ok &= role[3] == b"connected"
                if ok and len(views) == 1:
                    return
                last = f"states ok={ok}, {len(views)} different slot maps"
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"the cluster did not settle in {timeout}s ({last})")

    @staticmethod
    def _slot_owners(r: redis.Redis) -> list[tuple[int, int, int]]:
        return [(int(s[0]), int(s[1]), int(s[2][1])) for s in r.execute_command("CLUSTER SLOTS")]

    def masters(self) -> list[Node]:
        """The running masters, by port."""
        out = []
        for node in self.live():
            with contextlib.suppress(redis.RedisError), node.client() as r:
                if r.execute_command("ROLE")[0] == b"master":
                    out.append(node)
        return sorted(out, key=lambda n: n.port)

    def owner(self, key: str) -> Node:
        """The master that serves ``key``'s slot now."""
        node = self.live()[0]
        with node.client() as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            for lo, hi, port in self._slot_owners(r):
                if lo <= slot <= hi:
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        """The running replica of ``master``."""
        mid = self.node_id(master)
        for node in self.live():
            with node.client() as r:
                role = r.execute_command("ROLE")
                if role[0] == b"slave" and int(role[2]) == master.port:
                    return node
        raise LookupError(f"master :{master.port} ({mid}) has no running replica")

    def kill_master(self, node: Node, stall_replica_s: float = 0.0, timeout: float = 60.0) -> float:
        """SIGKILL a master and wait until its replica took over; returns the seconds that took.

        ``stall_replica_s``: first SIGSTOP its replica and cut the replication link, for that
        long (below the node timeout, 1 s), then kill the master: the writes of that time never
        reach the replica, so the promoted replica is behind what clients already received."""
        replica = self.replica_of(node) if stall_replica_s else None
        if replica is not None and replica.proc is not None:
            # Stopped, it cannot reconnect; the master drops the link, so what it writes from
            # now on reaches no replica (what was sent before is still delivered).
            replica.proc.send_signal(signal.SIGSTOP)
            with node.client() as r:
                r.execute_command("CLIENT", "KILL", "TYPE", "replica")
            time.sleep(stall_replica_s)
        t0 = time.monotonic()
        node.kill(signal.SIGKILL)
        if replica is not None and replica.proc is not None:
            replica.proc.send_signal(signal.SIGCONT)
        self.wait_ok(timeout)
        return time.monotonic() - t0

    def freeze_master(self, node: Node, timeout: float = 60.0) -> float:
        """SIGSTOP a master, a server that hangs (its connections stay open, nothing answers),
        and wait until the others failed it over; returns the seconds that took."""
        assert node.proc is not None
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGSTOP)
        self.frozen.add(node.port)
        deadline = t0 + timeout
        while time.monotonic() < deadline:  # until no node's slot map names it any more
            with contextlib.suppress(redis.RedisError):
                maps = []
                for other in self.live():
                    with other.client() as r:
                        maps.append({port for _lo, _hi, port in self._slot_owners(r)})
                if maps and all(node.port not in owners for owners in maps):
                    break
            time.sleep(0.1)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return time.monotonic() - t0

    def thaw(self, node: Node) -> None:
        """SIGCONT a frozen node: it finds itself failed over and rejoins as a replica."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        self.frozen.discard(node.port)
        self.wait_ok()

    def restart(self, node: Node) -> None:
        """Start a killed node again: it rejoins (from its nodes.conf) as a replica."""
        node.start()
        self.wait_ok()

    def node_id(self, node: Node) -> str:
        with node.client() as r:
            return r.execute_command("CLUSTER", "MYID").decode()

    def assign_slot(self, slot: int, target: Node) -> None:
        """Give an empty slot to ``target`` at once (``CLUSTER SETSLOT <slot> NODE``, no keys to
        migrate), on every master, and wait until all agree: a client's slot map is stale."""
        target_id = self.node_id(target)
        for node in [target, *(m for m in self.masters() if m is not target)]:
            with node.client() as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def reshard(self, source: Node, target: Node, slots: int) -> str:
        """Move ``slots`` slots from ``source`` to ``target`` with ``redis-cli --cluster reshard``
        (keys migrate while clients keep writing); returns redis-cli's output."""
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "reshard", f"127.0.0.1:{target.port}",
             "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
             "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "100"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"reshard failed:\n{out.stdout[-2000:]}\n{out.stderr}")
        self.wait_ok()
        return out.stdout
