"""A cluster on one machine: three ``nats-server`` nodes with JetStream on consecutive
ports of one host, for trying shoal on replicated (R3) streams and for testing it there.

Each node is configured by :func:`write_cluster_config`, the writer the tests' cluster uses
too; :func:`embedded_cluster` runs the three as the embedded broker runs its one server
(supervised, tied to this process's life) and yields once JetStream is ready cluster-wide.
The nodes' monitoring endpoints tell who the meta leader is (:func:`meta_leader`) and whether
a node's JetStream is current with it (:func:`jetstream_health`).

Routes and monitoring have no authentication (the role keys admit clients only), so they
listen on a loopback address whatever the clients' host: only this machine reaches them.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from ._broker import _Supervised, find_nats_server, port_in_use, write_server_config
from ._errors import BrokerError

CLUSTER_NAME = "shoal"
"""The name every node gives the cluster (nats-server's ``cluster { name }``)."""
CLUSTER_SIZE = 3
_READY_TIMEOUT = 30.0
_POLL = 0.05
_HTTP_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node of a cluster on one machine: its name (``n1``...), where it listens and
    where it keeps its store and configuration."""

    name: str
    host: str
    """The address clients connect to."""
    port: int
    """The client port."""
    local_host: str
    """The loopback address the routes and the monitoring endpoint listen on."""
    cluster_port: int
    http_port: int
    """The monitoring port (``/jsz``, ``/healthz``)."""
    store_dir: Path
    config: Path

    @property
    def url(self) -> str:
        """The URL clients connect to: ``nats://host:port``."""
        return f"nats://{_host_port(self.host, self.port)}"

    @property
    def monitor_url(self) -> str:
        """The monitoring endpoint's base URL: ``http://local_host:http_port``."""
        return f"http://{_host_port(self.local_host, self.http_port)}"

    @property
    def route_url(self) -> str:
        """The URL the other nodes route to: ``nats-route://local_host:cluster_port``."""
        return f"nats-route://{_host_port(self.local_host, self.cluster_port)}"


def write_cluster_config(
    base_dir: Path,
    *,
    host: str = "127.0.0.1",
    ports: Sequence[int] = (4222, 4223, 4224),
    cluster_ports: Sequence[int] = (6222, 6223, 6224),
    http_ports: Sequence[int] = (8222, 8223, 8224),
    keys: Path | None = None,
) -> tuple[ClusterNode, ...]:
    """Write the configuration of each node of a three-node cluster; the nodes, in order.

    Node ``i`` (1 to 3) is named ``n<i>``, keeps its JetStream store in ``base_dir/n<i>`` and
    its configuration in ``base_dir/n<i>.conf`` (mode 0600). It takes clients on
    ``host:ports[i-1]``, routes on ``cluster_ports[i-1]`` (with routes to all three) and
    serves monitoring on ``http_ports[i-1]``, these two on ``host`` when it is a loopback
    address, else on 127.0.0.1. With ``keys``, a folder of role seed files, every node
    admits the same role users as the embedded broker (see :func:`embedded_broker`).

    Blocking (small files): call it in a worker thread from async code.

    Raises:
        ValueError: not three ports of each kind, a port out of range, or one port twice.
        BrokerError: a folder or file cannot be made, or a key file cannot be used.
    """
    _check_ports(ports, cluster_ports, http_ports)
    local = host if is_loopback(host) else "127.0.0.1"
    nodes = tuple(
        ClusterNode(
            name=f"n{i + 1}",
            host=host,
            port=ports[i],
            local_host=local,
            cluster_port=cluster_ports[i],
            http_port=http_ports[i],
            store_dir=base_dir / f"n{i + 1}",
            config=base_dir / f"n{i + 1}.conf",
        )
        for i in range(CLUSTER_SIZE)
    )
    routes = "".join(f"    {json.dumps(n.route_url)}\n" for n in nodes)
    for node in nodes:
        # A fixed server name per node: JetStream derives the node's peer id from it, so a
        # node restarted on its store rejoins as itself.
        more = (
            f"server_name: {json.dumps(node.name)}\n"
            f"http: {json.dumps(_host_port(local, node.http_port))}\n"
            "cluster {\n"
            f"  name: {json.dumps(CLUSTER_NAME)}\n"
            f"  listen: {json.dumps(_host_port(local, node.cluster_port))}\n"
            f"  routes: [\n{routes}  ]\n"
            "}\n"
        )
        write_server_config(
            node.config, node.store_dir, host=host, port=node.port, keys=keys, more=more
        )
    return nodes


@contextlib.asynccontextmanager
async def embedded_cluster(
    base_dir: Path,
    *,
    host: str = "127.0.0.1",
    ports: Sequence[int] = (4222, 4223, 4224),
    cluster_ports: Sequence[int] = (6222, 6223, 6224),
    http_ports: Sequence[int] = (8222, 8223, 8224),
    keys: Path | None = None,
    binary: Path | None = None,
    restarts: int = 3,
    within: float = 60.0,
    ready_timeout: float = _READY_TIMEOUT,
) -> AsyncIterator[list[str]]:
    """Run a three-node nats-server cluster with JetStream for the duration of the
    ``async with`` block, each node as :func:`embedded_broker` runs its server: supervised
    (restarted on exit, up to ``restarts`` times within ``within`` seconds each), stopped
    on exit, and stopped by the system should this process die (Linux).

    The nodes are configured by :func:`write_cluster_config` (see it for ``base_dir``,
    the ports and ``keys``). Yields the three client URLs once every node's JetStream is
    current with an elected meta leader, so streams with three replicas can be made: under
    a second for a new cluster; 4 to 9 s for one started again on its stores, which waits
    for raft's election timeout.

    Raises:
        ValueError: the ports are not three distinct valid ports of each kind.
        BrokerError: the binary is missing, a port is taken, a key file cannot be used, a
            node exited or did not become ready, the cluster elected no meta leader within
            ``ready_timeout`` seconds, or a node stopped too often since; the message is
            one line for a person.
    """
    _check_ports(ports, cluster_ports, http_ports)
    exe = binary or find_nats_server()
    for kind, chosen in (("client", ports), ("cluster", cluster_ports), ("monitoring", http_ports)):
        listen = host if kind == "client" or is_loopback(host) else "127.0.0.1"
        for i, port in enumerate(chosen):
            if port_in_use(listen, port):
                raise BrokerError(
                    f"cannot start the nats-server cluster: {_host_port(listen, port)} (the "
                    f"{kind} port of n{i + 1}) is already in use (choose other ports with "
                    "--port, --cluster-port and --http-port)"
                )
    write = functools.partial(
        write_cluster_config,
        base_dir,
        host=host,
        ports=ports,
        cluster_ports=cluster_ports,
        http_ports=http_ports,
        keys=keys,
    )
    nodes = await anyio.to_thread.run_sync(write)
    brokers = [_Supervised(exe, [str(exe), "-c", str(n.config)], name=n.name) for n in nodes]
    failure: BrokerError | None = None
    async with anyio.create_task_group() as tg:
        try:
            try:
                # One after the other: a node is ready (listening) without the others, and a
                # failure is then about one node, with its own last line.
                for broker in brokers:
                    await broker.start(tg)
                for broker in brokers:
                    tg.start_soon(broker.supervise, tg, restarts, within)
                await wait_cluster_ready(nodes, timeout=ready_timeout)
            except BrokerError as e:
                failure = e
            else:
                yield [n.url for n in nodes]
        finally:
            tg.cancel_scope.cancel()  # the supervisors, before the servers they watch
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as stopping:
                    for broker in brokers:
                        stopping.start_soon(broker.stop)
    # Raised once the task group is done, so the caller gets it as such, not in a group.
    failure = failure or next((b.failure for b in brokers if b.failure is not None), None)
    if failure is not None:
        raise failure


async def wait_cluster_ready(
    nodes: Sequence[ClusterNode], *, timeout: float = _READY_TIMEOUT
) -> str:
    """Wait until the JetStream of every one of ``nodes`` is current with the same elected
    meta leader, one of them; its name.

    Raises:
        BrokerError: not so after ``timeout`` seconds; the message says how each node was.
    """
    names = {n.name for n in nodes}
    deadline = anyio.current_time() + timeout
    while True:
        # Each request may take until the deadline, not beyond: the last round completes,
        # and its diagnosis is the one reported.
        wait = max(0.1, min(_HTTP_TIMEOUT, deadline - anyio.current_time()))
        why = await _not_ready(nodes, wait)
        if not why:
            leaders: set[str | None] = set()
            for node in nodes:
                try:
                    leaders.add(await meta_leader(node.monitor_url, timeout=wait))
                except BrokerError as e:
                    why.append(f"{node.name}: {e}")
            # A node goes on naming a leader that died until another is elected.
            leader = next(iter(leaders)) if len(leaders) == 1 else None
            if not why and leader in names:
                assert leader is not None
                return leader
            if not why:
                named = ", ".join(sorted(str(name) for name in leaders))
                why.append(f"the nodes name as meta leader: {named}")
        if anyio.current_time() >= deadline:
            raise BrokerError(
                f"the nats-server cluster was not ready after {timeout:g} s: {'; '.join(why)}"
            )
        await anyio.sleep(_POLL)


async def _not_ready(nodes: Sequence[ClusterNode], timeout: float) -> list[str]:
    """Why each of ``nodes`` whose JetStream is not healthy is not (``n2: ...``)."""
    why = []
    for node in nodes:
        health = await jetstream_health(node.monitor_url, timeout=timeout)
        if health is not None:
            why.append(f"{node.name}: {health}")
    return why


class _MetaCluster(msgspec.Struct):
    leader: str = ""


class _Jsz(msgspec.Struct):
    """The part of nats-server's ``/jsz`` answer read here."""

    meta_cluster: _MetaCluster | None = None


class _Health(msgspec.Struct):
    """nats-server's ``/healthz`` answer."""

    status: str = ""
    error: str = ""


_jsz_decoder = msgspec.json.Decoder(_Jsz)
_health_decoder = msgspec.json.Decoder(_Health)


async def meta_leader(monitor_url: str, *, timeout: float = _HTTP_TIMEOUT) -> str | None:
    """The name of the JetStream meta leader as the node whose monitoring endpoint is
    ``monitor_url`` (``http://host:http_port``) knows it, from its ``/jsz``; None when it
    knows of none (no leader elected yet, or JetStream is not clustered there).

    A node goes on naming a leader that has died until another is elected.

    Raises:
        BrokerError: the endpoint does not answer within ``timeout`` seconds, or answers
            something that is not ``/jsz``.
    """
    status, body = await _get(f"{monitor_url}/jsz", timeout)
    if status != 200:
        raise BrokerError(f"{monitor_url}/jsz answered HTTP {status}: {body[:200]!r}")
    try:
        jsz = _jsz_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise BrokerError(f"{monitor_url}/jsz did not answer as nats-server does: {e}") from e
    if jsz.meta_cluster is None:
        return None
    return jsz.meta_cluster.leader or None


async def jetstream_health(monitor_url: str, *, timeout: float = _HTTP_TIMEOUT) -> str | None:
    """None when the JetStream of the node whose monitoring endpoint is ``monitor_url`` is
    healthy (its ``/healthz``: current with a meta leader, its streams and consumers
    current); else why not, in the server's words or as the request failed. Never raises."""
    try:
        status, body = await _get(f"{monitor_url}/healthz", timeout)
    except BrokerError as e:
        return str(e)
    if status == 200:
        return None
    try:
        health = _health_decoder.decode(body)
    except msgspec.DecodeError:
        return f"HTTP {status}"
    return health.error or health.status or f"HTTP {status}"


async def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """The status and body of an HTTP GET of ``url``, in a worker thread (urllib blocks).

    Raises:
        BrokerError: no answer within ``timeout`` seconds.
    """

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as e:  # an answer all the same: /healthz says 503
            with e:
                return e.code, bytes(e.read())
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BrokerError(f"{url} does not answer: {reason}") from e

    # Abandoned on cancellation: a stopped (SIGSTOP) node holds the request until timeout.
    return await anyio.to_thread.run_sync(get, abandon_on_cancel=True)


def _check_ports(*kinds: Sequence[int]) -> None:
    every = [p for ports in kinds for p in ports]
    if any(len(ports) != CLUSTER_SIZE for ports in kinds):
        raise ValueError(f"a cluster takes {CLUSTER_SIZE} ports of each kind, not {kinds}")
    if not all(0 < p <= 65535 for p in every):
        raise ValueError(f"a cluster's ports must be from 1 to 65535, not {every}")
    if len(set(every)) != len(every):
        raise ValueError(f"a cluster's ports must be all different, not {every}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); a host name is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
