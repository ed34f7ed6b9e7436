"""Sharded pub/sub on a Redis Cluster: one subscription connection per master that owns a slot
the hub needs.

Tick channels are sharded channels (``SPUBLISH`` by the publish script): a channel is delivered
only by the master that owns its slot, so the hub holds one connection per such master and
``SSUBSCRIBE``s each channel there (one command per slot: a slot group's channels share one).
A channel subscribed by a stale map is answered ``MOVED``: it alone is subscribed again where
its slot now is. When a master dies (the connection breaks) or a slot moves away (the master
ends the subscription with ``sunsubscribe``), the channels concerned are *interrupted*: the hub
is told, the slot map is read again from any reachable node until every slot has a live owner,
and the channels are subscribed again where they now live; the hub then works out, per
channel, whether a seq was really missed (``server.live.hub``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisError

from server.live.connection import SeedNode, watch_silence

log = logging.getLogger("tickpipe.hub")

Address = tuple[str, int]


# A link that received nothing this long is sent a PING; one that answers nothing for as long
# again is dropped: a master that hangs (not dies) leaves its socket open, and the cluster fails
# it over after its node timeout.
QUIET_S = 2.0


class _Link:
    """One sharded subscription connection to one master, and the channels it carries."""

    __slots__ = ("addr", "conn", "names", "received", "task")

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.names: set[bytes] = set()
        self.conn: Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.received = 0  # replies read, for the watchdog


class Shards:
    """The hub's sharded subscriptions: ``subscribe``/``unsubscribe`` channel names; messages,
    confirmations and interruptions go to the hub's callbacks."""

    def __init__(
        self,
        seeds: list[SeedNode],
        on_message: Callable[[bytes, bytes], None],
        on_confirm: Callable[[bytes], None],
        on_interrupt: Callable[[set[bytes]], None],
    ) -> None:
        self._seeds = seeds
        self._known: list[Address] = [(s.host, s.port) for s in seeds]
        self._password = seeds[0].password if seeds else None
        self._username = seeds[0].username if seeds else None
        self._on_message = on_message
        self._on_confirm = on_confirm
        self._on_interrupt = on_interrupt
        self._slots: list[tuple[int, int, Address]] = []
        self._links: dict[Address, _Link] = {}
        self._relocating: set[bytes] = set()
        self._relocator: asyncio.Task[None] | None = None
        self.relocations = 0  # channels subscribed again after a failover or a slot move

    # -- the slot map --

    @property
    def known(self) -> list[Address]:
        """Every node address seen so far (the seeds first)."""
        return self._known

    def connection(self, addr: Address, timeout: float | None) -> Connection:
        return Connection(
            host=addr[0],
            port=addr[1],
            username=self._username,
            password=self._password,
            socket_connect_timeout=2,
            socket_timeout=timeout,
            retry=None,
            protocol=2,
        )

    async def refresh(self) -> None:
        """Read the slot map (``CLUSTER SLOTS``) from the first node that answers."""
        last: BaseException | None = None
        for addr in list(self._known):
            conn = self.connection(addr, 2)
            try:
                await conn.connect()
                await conn.send_command("CLUSTER", "SLOTS")
                reply = await conn.read_response()
            except (OSError, RedisError) as exc:
                last = exc
                continue
            finally:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            slots = []
            for lo, hi, master, *_replicas in reply:
                host = master[0].decode() or addr[0]
                slots.append((int(lo), int(hi), (host, int(master[1]))))
                for node in (master, *_replicas):
                    found = (node[0].decode() or addr[0], int(node[1]))
                    if found not in self._known:
                        self._known.append(found)
            self._slots = sorted(slots)
            return
        raise ConnectionError(f"no cluster node answered CLUSTER SLOTS ({last})")

    def owner(self, name: bytes) -> Address | None:
        slot = key_slot(name)
        for lo, hi, addr in self._slots:
            if lo <= slot <= hi:
                return addr
        return None

    # -- subscriptions --

    async def subscribe(self, names: Iterable[bytes]) -> None:
        """Subscribe these channels on the masters that own them (confirmed through
        ``on_confirm``)."""
        if not self._slots:
            await self.refresh()
        by_link: dict[Address, list[bytes]] = {}
        for name in names:
            addr = self.owner(name)
            if addr is None:  # the map has a hole (a failover under way): look again
                self._relocate({name})
                continue
            by_link.setdefault(addr, []).append(name)
        for addr, group in by_link.items():
            link = self._link(addr)
            link.names.update(group)
            if link.conn is not None:
                await _ssubscribe(link.conn, group)
            # else: the link's task subscribes all of its names once connected

    def unsubscribe(self, names: Iterable[bytes]) -> None:
        for name in names:
            self._relocating.discard(name)
            for link in self._links.values():
                if name in link.names:
                    link.names.discard(name)
                    if link.conn is not None:
                        asyncio.get_running_loop().create_task(_sunsubscribe(link.conn, [name]))

    def _link(self, addr: Address) -> _Link:
        link = self._links.get(addr)
        if link is None:
            link = self._links[addr] = _Link(addr)
            link.task = asyncio.create_task(self._run(link), name=f"shard-{addr[1]}")
        return link

    async def _run(self, link: _Link) -> None:
        conn = self.connection(link.addr, None)
        watchdog: asyncio.Task[None] | None = None
        try:
            await conn.connect()
            link.conn = conn
            watchdog = asyncio.create_task(
                watch_silence(
                    conn,
                    lambda: link.received,
                    QUIET_S,
                    f"sharded pub/sub to {link.addr[0]}:{link.addr[1]}",
                )
            )
            await _ssubscribe(conn, sorted(link.names))
            while True:
                try:
                    msg = await conn.read_response(disable_decoding=True)
                    link.received += 1
                except (MovedError, AskError) as exc:
                    # An SSUBSCRIBE sent by a stale slot map (the slot moved while nobody here
                    # listened to it): only that slot's channels go, the link stays.
                    moved = {n for n in link.names if key_slot(n) == exc.slot_id}
                    link.names -= moved
                    self._relocate(moved)
                    continue
                if not isinstance(msg, list) or len(msg) < 3:
                    continue
                kind = msg[0]
                if kind == b"smessage":
                    self._on_message(msg[1], msg[2])
                elif kind == b"ssubscribe":
                    if msg[1] in link.names:
                        self._on_confirm(msg[1])
                elif kind == b"sunsubscribe" and msg[1] in link.names:
                    # Not asked for: the slot moved to another master.
                    link.names.discard(msg[1])
                    self._on_interrupt({msg[1]})
                    self._relocate({msg[1]})
        except asyncio.CancelledError:
            raise
        except (OSError, RedisError) as exc:
            log.warning("sharded pub/sub to %s:%d lost (%s)", *link.addr, exc)
        finally:
            link.conn = None
            if watchdog is not None:
                watchdog.cancel()
            with contextlib.suppress(Exception):
                await conn.disconnect()
        # The master is gone (or unreachable): its channels go wherever its slots went.
        if self._links.get(link.addr) is link:
            del self._links[link.addr]
        if link.names:
            self._on_interrupt(set(link.names))
            self._relocate(set(link.names))

    def _relocate(self, names: set[bytes]) -> None:
        self._relocating |= names
        if self._relocator is None or self._relocator.done():
            self._relocator = asyncio.create_task(self._relocate_all(), name="shard-relocate")

    async def _relocate_all(self) -> None:
        """Until every interrupted channel is subscribed again: read the slot map, subscribe
        each channel at its owner (a failover takes the cluster a few seconds)."""
        delay = 0.1
        while self._relocating:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                await self.refresh()
            except (OSError, RedisError) as exc:
                log.info("cluster slot map unavailable (%s); retrying", exc)
                continue
            names = set(self._relocating)
            movable = {n for n in names if self.owner(n) is not None}
            self._relocating -= movable
            self.relocations += len(movable)
            try:
                await self.subscribe(movable)
            except (OSError, RedisError):
                self._relocating |= movable

    async def stop(self) -> None:
        tasks = [link.task for link in self._links.values() if link.task is not None]
        if self._relocator is not None:
            tasks.append(self._relocator)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._links.clear()

    def figures(self) -> dict[str, int]:
        return {"shard_links": len(self._links), "relocations": self.relocations}


async def _ssubscribe(conn: Connection, names: list[bytes]) -> None:
    """One SSUBSCRIBE per slot (a command's channels must share one)."""
    by_slot: dict[int, list[bytes]] = {}
    for name in names:
        by_slot.setdefault(key_slot(name), []).append(name)
    for group in by_slot.values():
        await conn.send_command("SSUBSCRIBE", *group)


async def _sunsubscribe(conn: Connection, names: list[bytes]) -> None:
    with contextlib.suppress(OSError, RedisError):
        await conn.send_command("SUNSUBSCRIBE", *names)
