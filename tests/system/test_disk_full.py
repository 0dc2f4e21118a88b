"""A full disk under ``shoal.db``, end to end: ``shoal serve`` runs with its data directory on
a small tmpfs of its own (``unshare -m``, as root), the tmpfs is filled while events keep
coming, and the engine logs an error naming the file and pauses; once the filler is deleted
it resumes by itself, and every event is applied exactly once. The broker's store is on
another disk, as the issue has it.

Skipped where a mount namespace or a tmpfs cannot be had (not root, or a container that
refuses the mount).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import nats
import pytest

from protocol import event_subject
from tests.helpers import SHOAL, NatsServer, eventually, published

SEGMENTS = """
[segments.seen]
rule = "count('Visit') >= 1"
"""
BEFORE, WHILE_FULL = 20, 300
PAD = "x" * 4000
"""Each event's padding: the log outgrows what SQLite's files have spare within a few
batches."""


def _mount_refused(tmp_path: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"cannot mount a tmpfs in a mount namespace: {done.stderr.strip()}"
    return None


class _Serve:
    """``shoal serve`` with its data directory on a tmpfs of ``size`` only it sees."""

    def __init__(self, data: Path, url: str, segments: Path, size: str) -> None:
        shoal = " ".join(SHOAL)
        self.popen = subprocess.Popen(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                f"mount -t tmpfs -o size={size} tmpfs {data} && exec {shoal} serve "
                f"--nats {url} --data-dir {data} --segments {segments}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        # The process's own view of its data directory, from outside its namespace.
        self.data = Path(f"/proc/{self.popen.pid}/root") / data.relative_to("/")
        self._dir = data

    def logged(self) -> list[str]:
        """The customers of the events in its log, in log order (``shoal export`` run in its
        mount namespace)."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.popen.pid), "-m", *SHOAL, "export"]
            + ["--data-dir", str(self._dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["userId"] for line in done.stdout.splitlines()]

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip("\n"))

    def seen(self, needle: str) -> bool:
        return any(needle in line for line in self.lines)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._pump.join(5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 65536):
            pass
    return filler


async def test_a_full_disk_pauses_ingestion_which_resumes_once_there_is_room(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    refused = _mount_refused(tmp_path)
    if refused is not None:
        pytest.skip(refused)
    data = tmp_path / "data"
    data.mkdir()
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    serve = _Serve(data, nats_server.url, segments, "8m")

    async def visit(i: int) -> None:
        body = {"type": "track", "userId": f"c{i}", "event": "Visit", "properties": {"p": PAD}}
        await js.publish(event_subject(f"c{i}"), msgspec.json.encode(body))

    try:
        await eventually(lambda: serve.seen("shoal is serving"), timeout=30)
        for i in range(BEFORE):
            await visit(i)
        await _wait_for(serve, BEFORE)

        filler = _fill(serve.data)
        for i in range(BEFORE, BEFORE + WHILE_FULL):
            await visit(i)
        await eventually(lambda: serve.seen("disk full"), timeout=30)
        line = next(line for line in serve.lines if "disk full" in line)
        assert str(data / "shoal.db") in line
        assert serve.popen.poll() is None  # paused, not stopped

        filler.unlink()
        await eventually(lambda: serve.seen("ingestion resumed"), timeout=30)
        await _wait_for(serve, BEFORE + WHILE_FULL)
        customers = serve.logged()
    finally:
        serve.close()
        await nc.close()
    assert sorted(customers) == sorted(f"c{i}" for i in range(BEFORE + WHILE_FULL))
    transitions = await published(nats_server.url)
    assert sorted((t.customer_id, t.version) for t in transitions) == sorted(
        (f"c{i}", 1) for i in range(BEFORE + WHILE_FULL)
    )
    assert not any("Traceback" in line for line in serve.lines), serve.lines


async def _wait_for(serve: _Serve, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        got = len(await anyio.to_thread.run_sync(serve.logged))
        if got == n:
            return
        await anyio.sleep(0.2)
    raise AssertionError(f"{got} events logged, not {n}")
