"""Shared fixtures: a real nats-server per test, and an engine running in the test's task."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, settings
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors import Clock, Engine, EngineConfig, SegmentSet, parse_segments
from protocol import Rejection, Transition, connect, find_nats_server
from store import EventLog

# Shared, noisy machines: a slow example is not a failure. Examples stay random, so the
# properties keep exploring from run to run.
settings.register_profile(
    "shoal", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("shoal")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A real nats-server child process with JetStream and a store in a temp dir."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(find_nats_server()),
                "-js",
                "-sd",
                str(self.store),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, *, kill: bool = False, down: float = 0.0) -> None:
        """Stop the server and start it again on the same port with the same JetStream
        store, after ``down`` seconds. ``kill`` stops it as a crash would (SIGKILL), not
        cleanly. It blocks: call it in a worker thread from async code."""
        if kill and self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.stop()
        time.sleep(down)
        self.start()


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
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A nats-py client of the test's server, for publishing and subscribing."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


def segments(text: str) -> SegmentSet:
    return parse_segments(text, source="test.toml")


@contextlib.asynccontextmanager
async def running_engine(
    url: str,
    db: Path,
    segment_set: SegmentSet,
    *,
    clock: Clock | None = None,
    config: EngineConfig | None = None,
) -> AsyncIterator[Engine]:
    """An engine consuming from ``url`` with its log at ``db``, stopped on exit."""
    nc = await connect([url])
    log = await EventLog.open(db)
    try:
        engine = Engine(nc, log, segment_set, clock=clock, config=config)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            try:
                yield engine
            finally:
                tg.cancel_scope.cancel()
    finally:
        await log.close()
        await nc.close()


class Collector:
    """Collects what a plain subscriber sees on a subject."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []

    async def on_msg(self, msg: Msg) -> None:
        self.msgs.append(msg)

    def transitions(self) -> list[Transition]:
        return [msgspec.json.decode(m.data, type=Transition) for m in self.msgs]

    def rejections(self) -> list[Rejection]:
        return [msgspec.json.decode(m.data, type=Rejection) for m in self.msgs]


async def collect(nc: Client, subject: str) -> Collector:
    c = Collector()
    await nc.subscribe(subject, cb=c.on_msg)
    await nc.flush()
    return c


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true; fail the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.02)
