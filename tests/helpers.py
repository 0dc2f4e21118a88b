"""Helpers shared by the tests: a real nats-server, an engine running in the test's task,
collectors of what subscribers see, Segment Spec messages, and the ``shoal`` command as a
subprocess."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors import Clock, Engine, EngineConfig, SegmentSet, parse_segments
from protocol import (
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    Rejection,
    Transition,
    find_nats_server,
    format_instant,
    partition_consumer,
    role_key_file,
)
from protocol.nats import (
    Credentials,
    connect,
    ensure_streams,
    jetstream_ports,
    last_claim,
    read_stream,
)
from store import Store


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A real nats-server child process with JetStream and a store in a temp dir."""

    def __init__(self, store: Path, *args: str) -> None:
        self.store = store
        self.args = args
        """More nats-server arguments (``-c`` a configuration file, say)."""
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
                *self.args,
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


def role_credentials(data_dir: Path, role: str) -> Credentials:
    """The credentials of ``role`` with the key that ``shoal serve``'s embedded broker made
    in ``data_dir``."""
    return Credentials(nkey=role_key_file(data_dir, role), role=role)


def declare_streams(url: str) -> None:
    """Create shoal's streams on the server at ``url``, as the engine does when it starts:
    ``shoal publish`` creates none."""

    async def declare() -> None:
        nc = await connect([url])
        try:
            await ensure_streams(nc.jetstream())
        finally:
            await nc.close()

    anyio.run(declare)


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
    consumer: str = "shoal-engine",
    max_in_flight: int = 20_000,
    credentials: Credentials | None = None,
) -> AsyncIterator[Engine]:
    """An engine consuming from ``url`` (as durable ``consumer``, connected with
    ``credentials``) with its log at ``db``, stopped on exit."""
    nc = await connect([url], credentials=credentials)
    log = await Store.open(db)
    try:
        source, sink = await jetstream_ports(nc, consumer=consumer, max_in_flight=max_in_flight)
        engine = Engine(source, sink, log, segment_set, clock=clock, config=config)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            try:
                yield engine
            finally:
                tg.cancel_scope.cancel()
    finally:
        await log.close()
        await nc.close()


async def published(url: str, credentials: Credentials | None = None) -> list[Transition]:
    """Every transition ``SHOAL_SEGMENTS`` holds, in stream order."""
    nc = await connect([url], credentials=credentials)
    try:
        decoder = msgspec.json.Decoder(Transition)
        return [
            decoder.decode(d.data)
            async for chunk in read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD)
            for d in chunk
        ]
    finally:
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


def now() -> int:
    return time.time_ns() // 1000


def track(
    user: str, name: str = "Visit", *, at: int | None = None, mid: str | None = None, **extra: Any
) -> bytes:
    doc: dict[str, Any] = {"type": "track", "userId": user, "event": name, **extra}
    if at is not None:
        doc["timestamp"] = format_instant(at)
    if mid is not None:
        doc["messageId"] = mid
    return json.dumps(doc).encode()


async def sleep_until(instant: int) -> None:
    while now() < instant:
        await anyio.sleep(0.05)


def summary(ts: list[Any]) -> list[tuple[str, str, str, Any, int]]:
    return [(t.customer_id, t.segment, t.change, t.cause, t.version) for t in ts]


SHOAL = [sys.executable, "-m", "scripts.cli"]


class Proc:
    """A running ``shoal`` command whose output lines can be awaited; ``cwd``: where it runs
    (a command finds its role's key in ``./shoal-data`` there unless given ``--data-dir``)."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.popen = subprocess.Popen(
            [*SHOAL, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._err_q: queue.Queue[str] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(stream, q), daemon=True)
            for stream, q in ((self.popen.stdout, self.out), (self.popen.stderr, self._err_q))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: object, q: queue.Queue[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            q.put(line.rstrip("\n"))

    def wait_err(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._err_q.get(timeout=0.1)
            except queue.Empty:
                if self.popen.poll() is not None and self._err_q.empty():
                    break
                continue
            self.err.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not seen on stderr: {self.err}")

    def out_lines(self, n: int, timeout: float = 20.0) -> list[str]:
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while len(lines) < n:
            lines.append(self.out.get(timeout=max(0.01, deadline - time.monotonic())))
        return lines

    def rest(self) -> list[str]:
        """The lines of stdout and stderr not read yet (call it once it has exited)."""
        return [q.get() for q in (self.out, self._err_q) for _ in range(q.qsize())]

    def close(self) -> None:
        """Kill it if it still runs, and release its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for t in self._threads:
            t.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)


def serve_engine(
    urls: str | list[str], data: Path, engine_id: str, rules: Path, *, lease_ttl: float = 2
) -> Proc:
    """``shoal serve`` as one of several engines on ``urls`` (no auth): its own data
    directory and id, the segments file ``rules``, a short lease, snapshots every second."""
    nats_args = [a for url in ([urls] if isinstance(urls, str) else urls) for a in ("--nats", url)]
    return Proc(
        "serve", *nats_args, "--data-dir", str(data), "--engine-id", engine_id,
        "--segments", str(rules), "--lease-ttl", f"{lease_ttl:g}", "--snapshot-interval", "1",
    )  # fmt: skip


def run(
    *args: str, stdin: str | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, *args], input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


async def engine_consumers(js: Any, prefix: str = "shoal-engine") -> dict[str, Any]:
    """The engine's durable consumers of ``SHOAL_EVENTS`` (one per partition, and the one of
    subjects stored without a partition), by name: their ``ConsumerInfo``."""
    infos = await js.consumers_info("SHOAL_EVENTS")
    return {i.name: i for i in infos if i.name.startswith(prefix + "-")}


async def claimed_consumer(js: Any, partition: int, prefix: str = "shoal-engine") -> str:
    """The name of the consumer of ``partition`` under its last claim (``shoal serve``
    names each claim's consumer ``<prefix>-<partition>-<claim>``)."""
    found = await last_claim(js, SEGMENTS_STREAM, partition)
    assert found is not None, f"partition {partition} was never claimed"
    return partition_consumer(found[1].consumers, partition, found[0])
