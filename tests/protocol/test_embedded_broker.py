"""The embedded nats-server: it never outlives the process that started it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from protocol import BrokerError, embedded_broker, port_in_use
from protocol.nats import connect
from tests.helpers import eventually, free_port

SHOAL = [sys.executable, "-m", "scripts.cli"]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # The command name (in parentheses) may hold spaces: fields count from its end.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an unreaped zombie has ended: it counts as not)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.05)


def broker_of(parent: int, not_one_of: Collection[int] = ()) -> int:
    """The pid of a nats-server child of ``parent``, not one of ``not_one_of``, once there is
    one (within 20 s)."""
    found: list[int] = []

    def check() -> bool:
        found[:] = [
            pid
            for pid in children(parent)
            if pid not in not_one_of and running(pid) and _exe_name(pid) == "nats-server"
        ]
        return bool(found)

    wait_for(check, 20, "no new nats-server child")
    return found[0]


def _exe_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "exe").resolve().name
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_killed_serve_takes_its_embedded_broker_with_it(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serve = subprocess.Popen(
            [*SHOAL, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    broker: list[int] = []
    try:
        wait_for(
            lambda: "shoal is serving" in log.read_text() or serve.poll() is not None,
            30,
            "serve did not start",
        )
        assert serve.poll() is None, log.read_text()
        assert port_in_use("127.0.0.1", port)
        broker = children(serve.pid)
        assert len(broker) == 1, (broker, log.read_text())
        # The broker child is nats-server itself (the launcher execs it), in its own session.
        assert (Path("/proc") / str(broker[0]) / "exe").resolve().name == "nats-server"

        serve.send_signal(signal.SIGKILL)
        serve.wait(10)

        wait_for(lambda: not running(broker[0]), 10, "the orphaned nats-server did not exit")
        wait_for(lambda: not port_in_use("127.0.0.1", port), 5, "the port was not released")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for pid in broker:  # never leak a broker, even when the test fails
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def test_a_broker_binary_that_cannot_run_is_one_line(tmp_path: Path) -> None:
    exe = tmp_path / "nats-server"
    exe.write_text("not a program\n")
    exe.chmod(0o644)
    with pytest.raises(BrokerError) as e:
        async with embedded_broker(tmp_path / "store", port=free_port(), binary=exe):
            pass
    assert str(e.value) == f"cannot start nats-server ({exe}): Permission denied"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the broker in /proc")
async def test_a_broker_that_exits_is_started_again_within_limits(tmp_path: Path) -> None:
    def said(event: str) -> list[MutableMapping[str, Any]]:
        return [e for e in logs if e["event"] == event]

    killed: list[int] = []
    with capture_logs() as logs, pytest.raises(BrokerError) as caught:
        async with embedded_broker(tmp_path / "store", port=free_port(), restarts=1) as url:
            nc = await connect([url])
            try:
                killed.append(await anyio.to_thread.run_sync(broker_of, os.getpid()))
                os.kill(killed[-1], signal.SIGKILL)
                await eventually(lambda: len(said("embedded nats-server restarted")) == 1)
                # Same port, same store: the client is back on its own.
                await eventually(lambda: nc.is_connected)
                await nc.jetstream().account_info()
                killed.append(await anyio.to_thread.run_sync(broker_of, os.getpid(), killed))
                os.kill(killed[-1], signal.SIGKILL)
                await anyio.sleep(30)  # cancelled: a second exit within 60 s is one too many
            finally:
                await nc.close()
    message = str(caught.value)
    assert message.startswith(
        "the embedded nats-server stopped 2 times within 60 s (the last time killed by "
        f"SIGKILL); not restarting it again. Its last line: [{killed[-1]}] "
    ), message
    assert message.endswith(" [INF] Server is ready")
    [restarting] = said("embedded nats-server stopped; restarting it")
    assert restarting["how"] == "killed by SIGKILL"
    assert restarting["last_line"].startswith(f"[{killed[0]}] ")
    assert (restarting["restart"], restarting["of"]) == (1, 1)
    assert not any(running(pid) for pid in killed)
