"""The embedded nats-server: it never outlives the process that started it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol import BrokerError, embedded_broker, port_in_use
from tests.helpers import free_port

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
