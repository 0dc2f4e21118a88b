"""A three-node nats-server cluster on one machine: the tests' fixture (``nats_cluster``) and
``shoal cluster`` are one JetStream cluster whose streams have three replicas; it survives
the loss of its meta leader; the command prints its URLs, admits the data directory's role
keys, and stops cleanly."""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from protocol import (
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    BrokerError,
    port_in_use,
    wait_cluster_ready,
)
from protocol.nats import connect
from tests.cluster import NatsCluster
from tests.helpers import Proc, free_port, role_credentials, run

R3 = StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3)


@asynccontextmanager
async def client_of(url: str) -> AsyncIterator[Client]:
    """A client of the node at ``url`` only: what it does goes through that node."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        yield nc
    finally:
        await nc.close()


async def publish_until_acked(nc: Client, subject: str, data: bytes, timeout: float = 10.0) -> int:
    """Publish until JetStream acknowledges; the sequence. No answer comes while a leader is
    elected; and for a few milliseconds after a stream is made through another node, this
    node may not know yet that the stream takes the subject (no responders; seen 3 times in
    40, for 5-7 ms)."""
    js = nc.jetstream()
    with anyio.fail_after(timeout):
        while True:
            try:
                return (await js.publish(subject, data, timeout=1)).seq
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                await anyio.sleep(0.01)


async def test_the_fixture_is_one_jetstream_cluster(nats_cluster: NatsCluster) -> None:
    one, two, three = nats_cluster.urls
    async with client_of(one) as nc1, client_of(two) as nc2, client_of(three) as nc3:
        created = await nc1.jetstream().add_stream(R3)
        assert created.config.num_replicas == 3
        assert await publish_until_acked(nc2, "r3.a", b"through n2") == 1
        msg = await nc3.jetstream().get_msg("R3", 1)
        assert (msg.subject, msg.data) == ("r3.a", b"through n2")
        info = await nc3.jetstream().stream_info("R3")
    assert info.cluster is not None and info.cluster.name == "shoal"
    peers = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
    assert peers == {"n1", "n2", "n3"}
    assert nats_cluster.nodes[await nats_cluster.meta_leader()].name in peers


async def test_the_cluster_elects_another_meta_leader_when_it_is_killed(
    nats_cluster: NatsCluster,
) -> None:
    async with client_of(nats_cluster.url) as nc:
        await nc.jetstream().add_stream(R3)
        assert await publish_until_acked(nc, "r3.a", b"before") == 1
    leader = await nats_cluster.meta_leader()
    nats_cluster.nodes[leader].kill()
    survivor = nats_cluster.nodes[(leader + 1) % 3]
    # Raft's election timeout: 4 to 9 s before the survivors elect another (seen 4.3 to 6.8 s).
    new = await nats_cluster.meta_leader(timeout=15)
    assert new != leader
    async with client_of(survivor.url) as nc:
        assert await publish_until_acked(nc, "r3.b", b"after", timeout=10) == 2


async def test_a_killed_node_rejoins_on_its_store_and_catches_up(
    nats_cluster: NatsCluster,
) -> None:
    async with client_of(nats_cluster.url) as nc:
        info = await nc.jetstream().add_stream(R3)
    assert info.cluster is not None
    leader = await nats_cluster.meta_leader()
    # Neither the meta leader nor the stream's: no election to wait for.
    leaders = {nats_cluster.nodes[leader].name, info.cluster.leader}
    follower = next(n for n in nats_cluster.nodes if n.name not in leaders)
    follower.kill()
    async with client_of(nats_cluster.nodes[leader].url) as nc:
        assert await publish_until_acked(nc, "r3.a", b"while n was down") == 1
    await anyio.to_thread.run_sync(follower.start)
    await nats_cluster.wait_ready()  # seen 2.2-2.9 s: /healthz waits for the stream too
    async with client_of(follower.url) as nc:
        assert (await nc.jetstream().stream_info("R3")).state.messages == 1


async def test_a_paused_node_does_not_stop_the_cluster(nats_cluster: NatsCluster) -> None:
    async with client_of(nats_cluster.url) as nc:
        info = await nc.jetstream().add_stream(R3)
    assert info.cluster is not None
    leader = await nats_cluster.meta_leader()
    # Neither the meta leader nor the stream's: pausing either would wait for an election.
    leaders = {nats_cluster.nodes[leader].name, info.cluster.leader}
    follower = next(n for n in nats_cluster.nodes if n.name not in leaders)
    follower.pause()
    try:
        async with client_of(nats_cluster.nodes[leader].url) as nc:
            assert await publish_until_acked(nc, "r3.a", b"two of three", timeout=5) == 1
        # Not ready as a whole: the paused node does not answer.
        with pytest.raises(BrokerError, match=f"{follower.name}: .* does not answer"):
            await wait_cluster_ready([n.spec for n in nats_cluster.nodes], timeout=1)
    finally:
        follower.resume()
    await nats_cluster.wait_ready()
    async with client_of(follower.url) as nc:
        assert (await nc.jetstream().stream_info("R3")).state.messages == 1


# shoal cluster ---------------------------------------------------------------------------


def free_run() -> int:
    """The first of three consecutive ports nobody listens on."""
    while True:
        first = free_port()
        if first + 2 <= 65535 and not any(port_in_use("127.0.0.1", first + i) for i in (1, 2)):
            return first


def cluster_options(tmp_path: Path) -> tuple[list[str], list[int]]:
    """``shoal cluster`` options for ``tmp_path/data`` on free ports; the nine ports."""
    while True:
        firsts = [free_run() for _ in range(3)]
        ports = [f + i for f in firsts for i in range(3)]
        if len(set(ports)) == 9:
            break
    port, cluster_port, http_port = (str(f) for f in firsts)
    options = ["--data-dir", str(tmp_path / "data"), "--port", port]
    return [*options, "--cluster-port", cluster_port, "--http-port", http_port], ports


async def r3_through_each_node(urls: list[str]) -> None:
    """Make a stream of three replicas through the first node, publish through the second,
    and read through the third."""
    one, two, three = urls
    async with client_of(one) as nc1, client_of(two) as nc2, client_of(three) as nc3:
        await nc1.jetstream().add_stream(R3)
        assert await publish_until_acked(nc2, "r3.a", b"x") == 1
        info = await nc3.jetstream().stream_info("R3")
    assert info.config.num_replicas == 3 and info.state.messages == 1
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2


async def test_shoal_cluster_runs_a_cluster_until_interrupted(
    tmp_path: Path, procs: list[Proc]
) -> None:
    options, ports = cluster_options(tmp_path)
    cluster = Proc("cluster", "--no-auth", *options)
    procs.append(cluster)
    urls = await anyio.to_thread.run_sync(cluster.out_lines, 3)
    assert urls == [f"nats://127.0.0.1:{p}" for p in ports[:3]]
    await r3_through_each_node(urls)
    assert cluster.stop(signal.SIGINT) == 0
    assert any("nats-server cluster stopped" in line for line in cluster.rest())
    assert not any(port_in_use("127.0.0.1", p) for p in ports)
    stores = tmp_path / "data" / "cluster"
    assert sorted(p.name for p in stores.iterdir() if p.is_dir()) == ["n1", "n2", "n3"]
    assert not (tmp_path / "data" / "auth").exists()


async def test_shoal_cluster_admits_the_data_directory_keys(
    tmp_path: Path, procs: list[Proc]
) -> None:
    options, _ = cluster_options(tmp_path)
    cluster = Proc("cluster", *options)
    procs.append(cluster)
    urls = await anyio.to_thread.run_sync(cluster.out_lines, 3)
    with pytest.raises(BrokerError, match="[Aa]uthorization [Vv]iolation"):
        await connect(urls[:1])
    engine = role_credentials(tmp_path / "data", "engine")
    ncs = [await connect([url], credentials=engine) for url in urls]
    try:
        config = StreamConfig(name=REJECTED_STREAM, subjects=[REJECTED_SUBJECT], num_replicas=3)
        await ncs[0].jetstream().add_stream(config)
        assert await publish_until_acked(ncs[1], REJECTED_SUBJECT, b"{}") == 1
        info = await ncs[2].jetstream().stream_info(REJECTED_STREAM)
    finally:
        for nc in ncs:
            await nc.close()
    assert info.config.num_replicas == 3 and info.state.messages == 1
    assert cluster.stop(signal.SIGINT) == 0


async def test_shoal_serve_runs_on_shoal_cluster_with_the_data_directory_keys(
    tmp_path: Path, procs: list[Proc]
) -> None:
    options, _ = cluster_options(tmp_path)
    cluster = Proc("cluster", *options)
    procs.append(cluster)
    urls = await anyio.to_thread.run_sync(cluster.out_lines, 3)
    # As the command's log says to run it: every URL, the engine key of the data directory.
    serve = Proc("serve", "--data-dir", str(tmp_path / "data"), *(f"--nats={u}" for u in urls))
    procs.append(serve)
    await anyio.to_thread.run_sync(serve.wait_err, "shoal is serving")
    assert serve.stop() == 0
    assert cluster.stop(signal.SIGINT) == 0


def test_shoal_cluster_port_in_use_is_one_line(tmp_path: Path) -> None:
    options, ports = cluster_options(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[1]))
        s.listen()
        done = run("cluster", "--no-auth", *options)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"shoal: error: cannot start the nats-server cluster: 127.0.0.1:{ports[1]} (the "
        "client port of n2) is already in use (choose other ports with --port, "
        "--cluster-port and --http-port)"
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_shoal_cluster_ports_that_overlap_are_a_usage_error(tmp_path: Path) -> None:
    port = free_port()
    done = run(
        "cluster", "--data-dir", str(tmp_path), "--port", str(port), "--cluster-port", str(port + 2)
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"shoal: error: the ports overlap (--port {port}-{port + 2}, --cluster-port "
        f"{port + 2}-{port + 4}, --http-port {port + 4000}-{port + 4002}): each option takes "
        "three ports"
    )
