"""``shoal serve`` supervises its embedded nats-server: restarted when it dies, and the engine
goes on; dying too often ends ``serve`` with status 1 and the broker's last line."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import anyio
import pytest

from protocol.nats import connect
from tests.helpers import Proc, free_port, role_credentials, track
from tests.protocol.test_embedded_broker import broker_of, running, wait_for
from tests.system.test_health import gauge

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="finds the broker in /proc"
)


def serve(tmp_path: Path, port: int, metrics_port: int) -> Proc:
    return Proc(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    )


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def publish(data_dir: Path, port: int, user: str, mid: str) -> None:
    async def send() -> None:
        credentials = role_credentials(data_dir, "producer")
        nc = await connect([f"nats://127.0.0.1:{port}"], credentials=credentials)
        try:
            await nc.jetstream().publish(f"shoal.events.{user}", track(user, mid=mid))
        finally:
            await nc.close()

    anyio.run(send)


def applied(metrics: str) -> float | None:
    return gauge(metrics, "shoal_events_applied_total")


def test_a_killed_broker_is_restarted_and_the_engine_goes_on(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    metrics = f"http://127.0.0.1:{metrics_port}"
    proc = serve(tmp_path, port, metrics_port)
    try:
        proc.wait_err("shoal is serving", timeout=30)
        publish(tmp_path / "data", port, "ann", "a1")
        wait_for(lambda: applied(metrics) == 1, 20, "a1 not applied")

        first = broker_of(proc.popen.pid, set())
        os.kill(first, signal.SIGKILL)
        proc.wait_err("embedded nats-server restarted", timeout=30)
        broker_of(proc.popen.pid, {first})

        publish(tmp_path / "data", port, "bob", "b1")
        wait_for(lambda: applied(metrics) == 2, 30, "b1 not applied after the restart")
        assert proc.stop() == 0
    finally:
        proc.close()


def test_a_broker_that_keeps_dying_ends_serve_with_its_last_line(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(tmp_path, port, free_port())
    try:
        proc.wait_err("shoal is serving", timeout=30)
        killed: set[int] = set()
        for _ in range(4):
            pid = broker_of(proc.popen.pid, killed)
            # Killed once it listens, so that it has said something: a broker killed the
            # instant it exists has no last line to show (seen on a loaded machine).
            wait_for(lambda: listening(port), 30, "the restarted broker does not listen")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        last = pid
        gone = time.monotonic()
        status = proc.popen.wait(10)
        assert time.monotonic() - gone < 10
        assert status == 1
        final = proc.wait_err("shoal: error:", timeout=5)
    finally:
        proc.close()
    assert final.startswith(
        "shoal: error: the embedded nats-server stopped 4 times within 60 s (the last time "
        "killed by SIGKILL); not restarting it again. Its last line: "
    ), proc.err
    # nats-server starts each line with its pid: the line is the last one the killed one said.
    assert re.search(rf"Its last line: \[{last}\] \S+ \S+ \[INF\] ", final), final
    for pid in killed:
        assert not running(pid)
