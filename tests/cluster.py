"""A three-node nats-server cluster for tests, configured as ``shoal cluster`` configures its
own (:func:`protocol.write_cluster_config`), with each node a child process a test controls:
stopped, killed, paused, restarted.

    async with NatsCluster(tmp_path / "cluster") as cluster:   # or the nats_cluster fixture
        nc = await nats.connect(cluster.urls)
        leader = await cluster.meta_leader()
        cluster.nodes[leader].kill()
        await cluster.wait_ready()          # another leader, every running node current
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread

from protocol import (
    BrokerError,
    ClusterNode,
    find_nats_server,
    meta_leader,
    wait_cluster_ready,
    write_cluster_config,
)
from tests.helpers import free_port

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


class NatsNode:
    """One node of a :class:`NatsCluster`: a nats-server child process run from its
    configuration file, its output appended to ``<base_dir>/<name>.log``.

    The methods block (a process to start or wait for): call them in a worker thread from
    async code, ``await anyio.to_thread.run_sync(node.restart)``, except the signals
    (``kill``, ``pause``, ``resume``), which return at once.
    """

    def __init__(self, spec: ClusterNode, exe: Path, log: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.url = spec.url
        self.monitor_url = spec.monitor_url
        self._exe = exe
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def running(self) -> bool:
        """Whether the node runs and is not paused: it takes part in the cluster."""
        return self.proc is not None and self.proc.poll() is None and not self.paused

    def start(self) -> None:
        """Start the node (on its store, with its ports) and wait until it takes clients."""
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self._exe), "-c", str(self.spec.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.paused = False
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.spec.host, self.spec.port), timeout=0.2),
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server {self.name} exited with {self.proc.returncode}: see {self._log}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"nats-server {self.name} did not start listening in time")

    def stop(self) -> None:
        """Stop the node cleanly (SIGTERM; SIGKILL if it does not stop in time)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stop the node as a crash would: SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.paused = False

    def pause(self) -> None:
        """Freeze the node (SIGSTOP): its connections stay open, and nothing answers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """Let a paused node go on (SIGCONT)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self, *, kill: bool = False, down: float = 0.0) -> None:
        """Stop the node (as a crash with ``kill``, else cleanly), and start it again on
        its store and ports after ``down`` seconds."""
        if kill:
            self.kill()
        self.stop()
        time.sleep(down)
        self.start()


class NatsCluster:
    """Three nats-server nodes with JetStream on free loopback ports, stores in
    ``base_dir/n1..n3``; with ``keys``, a folder of role seed files, admitting only the
    role users as ``shoal cluster`` does.

    ``async with`` starts the nodes and waits until the cluster is ready (:meth:`wait_ready`),
    and stops them on exit.
    """

    def __init__(self, base_dir: Path, *, keys: Path | None = None) -> None:
        ports: set[int] = set()
        while len(ports) < 9:  # a port released may be handed out again at once
            ports.add(free_port())
        chosen = sorted(ports)
        specs = write_cluster_config(
            base_dir,
            ports=chosen[0:3],
            cluster_ports=chosen[3:6],
            http_ports=chosen[6:9],
            keys=keys,
        )
        exe = find_nats_server()
        self.base_dir = base_dir
        self.nodes = [NatsNode(spec, exe, base_dir / f"{spec.name}.log") for spec in specs]
        """The nodes, ``nodes[i]`` named ``n<i+1>``."""
        self.urls = [node.url for node in self.nodes]
        """The client URLs of the nodes, in order: give them all to a client."""
        self.url = self.urls[0]
        """The first node's client URL."""

    def start(self) -> None:
        """Start every node that is not running (blocking; see :class:`NatsNode`)."""
        for node in self.nodes:
            if node.proc is None:
                node.start()

    def stop(self) -> None:
        """Stop every node, all at once (blocking)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.resume()
                node.proc.terminate()
        for node in self.nodes:
            node.stop()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the running nodes (not paused) are one JetStream cluster: a meta
        leader among them elected, and every one of them current with it (``/healthz``).

        Raises:
            BrokerError: not so after ``timeout`` seconds, saying how each node was.
        """
        await wait_cluster_ready([n.spec for n in self.nodes if n.running], timeout=timeout)

    async def meta_leader(self, timeout: float = 20.0) -> int:
        """The index in :attr:`nodes` of the JetStream meta leader, once every running node
        names the same one, and it runs (a node goes on naming a dead leader until another
        is elected).

        Raises:
            BrokerError: the running nodes did not agree on a running leader in time.
        """
        names = [node.name for node in self.nodes]
        seen: dict[str, str | None] = {}
        with anyio.move_on_after(timeout):
            while True:
                seen = {}
                for node in self.nodes:
                    if node.running:
                        with contextlib.suppress(BrokerError):
                            seen[node.name] = await meta_leader(node.monitor_url)
                leaders = set(seen.values())
                running = {node.name for node in self.nodes if node.running}
                if len(seen) == len(running) and len(leaders) == 1:
                    leader = leaders.pop()
                    if leader in running:
                        return names.index(leader)
                await anyio.sleep(0.05)
        raise BrokerError(f"the nodes named no one running meta leader in {timeout:g} s: {seen}")

    async def __aenter__(self) -> NatsCluster:
        try:
            await anyio.to_thread.run_sync(self.start)
            await self.wait_ready()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)
