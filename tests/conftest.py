from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import RedisCluster
from tests.harness import Stack

# The modules that take longest, longest first (seconds of one worker in a `make test` on the
# 2-vCPU machine, 2026-12-01). They are collected first, so pytest-xdist (`make test`: --dist
# loadfile --no-loadscope-reorder, which keeps this order) starts each on a worker of its own and
# the shorter modules fill in around them; in pytest-xdist's own order (most tests first) the
# dashboard's began last on a worker and ended a minute after the others.
LONGEST_FIRST = (
    "test_dashboard.py",  # 165
    "test_cluster_faults.py",  # 87
    "test_docs_snippets.py",  # 76
    "test_mcp.py",  # 67
    "test_client.py",  # 59
    "test_sources_api.py",  # 49
    "test_sources.py",  # 41
    "test_cli.py",  # 34
    "test_history_merge.py",  # 34
    "test_recorder.py",  # 33
    "test_many_webs.py",  # 31
    "test_history_answers.py",  # 28
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: each module's tests keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
