from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import RedisCluster
from tests.harness import Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared deployment: Redis, web and a feed at 400 ticks/s over 10 symbols.

    Tests that stop, restart or reconfigure a component build their own ``Stack`` instead.
    """
    s = Stack(tmp_path_factory.mktemp("stack")).start()
    yield s
    s.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[type[Stack]]:
    """A private stack with its own settings: ``own_stack(feed=False, max_buffer_bytes=1000)``."""
    made: list[Stack] = []

    def make(**settings: object) -> Stack:
        s = Stack(tmp_path / f"s{len(made)}", **settings)
        made.append(s)
        return s.start()

    yield make  # type: ignore[misc]
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real Redis Cluster, 3 masters + 3 replicas on free loopback ports, for the tests of a
    module (or session) that ask for it; ``Stack(dir, cluster=redis_cluster)`` runs on it."""
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()
