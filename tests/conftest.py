"""Shared fixtures: a real nats-server per test, a client of it, and ``shoal`` subprocesses
stopped at the end of a test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, settings
from nats.aio.client import Client

from tests.cluster import NatsCluster
from tests.helpers import NatsServer, Proc

# Shared, noisy machines: a slow example is not a failure. Examples stay random, so the
# properties keep exploring from run to run.
settings.register_profile(
    "shoal", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("shoal")

_SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/system is a system test (plain ``pytest`` runs them all;
    ``-m 'not system'`` leaves them out)."""
    for item in items:
        if _SYSTEM in item.path.parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server (JetStream, store under tmp_path) on a free port."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A fresh three-node nats-server cluster (JetStream, stores under tmp_path/cluster) on
    free ports, ready: a meta leader elected, every node current with it."""
    async with NatsCluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A nats-py client of the test's server, for publishing and subscribing."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """``shoal`` subprocesses a test starts (append them), killed at its end."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()
