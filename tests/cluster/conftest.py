"""Cluster fixtures: a LocalCluster (deploy/local-cluster.sh) per test, stopped afterwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.support import HAPROXY_BIN, LocalCluster, nginx_available

MakeCluster = Callable[..., Awaitable[LocalCluster]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a cluster test; without nginx it is skipped, saying so."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            if not nginx_available():
                item.add_marker(
                    pytest.mark.skip(reason="nginx is not installed (.ci/run installs it)")
                )
            elif "haproxy" in item.name and not os.access(HAPROXY_BIN, os.X_OK):
                item.add_marker(
                    pytest.mark.skip(reason="haproxy is not installed (.ci/run installs it)")
                )


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """Start clusters with deploy/local-cluster.sh; every one is stopped at the end."""
    started: list[LocalCluster] = []

    async def make(nodes: int = 3, **settings: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(started)}", nodes, **settings)
        started.append(cluster)
        await asyncio.to_thread(cluster.start)
        return cluster

    yield make
    for cluster in started:
        await asyncio.to_thread(cluster.stop)
