"""Rebuilding the store of an engine that shares partitions by claims: ``shoal rebuild
--from-stream`` reads how far each partition was committed from its last claim's consumer
(``shoal-engine-<p>-<claim>``), and ``shoal serve --rebuild`` of partitions taken over from
another engine goes on with each customer's versions (their earlier transitions are in the
other engine's outbox, not this one's)."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import nats
import nats.js.errors
from nats.aio.client import Client

from actors import replay
from protocol import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    Event,
    InvalidEvent,
    Transition,
    is_control_subject,
    partition_consumer,
)
from protocol.nats import read_stream
from store import Store
from tests.helpers import NatsServer, Proc, claimed_consumer, run, segments
from tests.helpers import serve_engine as serve
from tests.system.test_engines import (
    P,
    check_versions,
    owners,
    publish,
    transitions,
    wait_owners,
)

RULES = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.regular]
rule = "count('Visit') >= 2"

[segments.loyal]
rule = "count('Visit') >= 3"
"""


async def _floors(nc: Client) -> dict[int, int]:
    """Each partition's acknowledgement floor, read from its last claim's consumer."""
    js = nc.jetstream()
    out: dict[int, int] = {}
    for p in range(P):
        info = await js.consumer_info(EVENTS_STREAM, await claimed_consumer(js, p))
        out[p] = int(info.ack_floor.stream_seq or 0)
    return out


async def _events_through(nc: Client, through: int) -> int:
    """How many events (not control messages) ``SHOAL_EVENTS`` holds up to ``through``."""
    n = 0
    async for chunk in read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD, through=through):
        n += sum(
            1 for d in chunk if d.stream_sequence <= through and not is_control_subject(d.subject)
        )
    return n


async def _wait_published(nc: Client, n: int, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while len(await transitions(nc)) < n:
            await anyio.sleep(0.3)
    await anyio.sleep(0.5)
    assert len(await transitions(nc)) == n


async def _replayed(nc: Client) -> dict[str, list[tuple[str, str, int]]]:
    events: list[Event] = []
    async for chunk in read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD):
        for d in chunk:
            try:
                events.append(d.event())
            except InvalidEvent:
                continue
    return _by_customer(list(replay(events, segments(RULES))))


def _by_customer(ts: list[Transition]) -> dict[str, list[tuple[str, str, int]]]:
    out: dict[str, list[tuple[str, str, int]]] = {}
    for t in sorted(ts, key=lambda t: (t.customer_id, t.version)):
        out.setdefault(t.customer_id, []).append((t.segment, t.change, t.version))
    return out


async def test_rebuild_from_stream_reads_each_partitions_last_claims_floor(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    url = nats_server.url
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    data = tmp_path / "a"
    nc = await nats.connect(url)
    try:
        a = serve(url, data, "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        await wait_owners(nc, lambda o: len(o.get("a", [])) == P)
        customers = [f"c{i}" for i in range(120)]
        await publish(nc, customers, 1)
        await publish(nc, customers, 2)
        await _wait_published(nc, 2 * len(customers))
        assert a.stop() == 0, a.rest()
        js = nc.jetstream()
        floors = await _floors(nc)
        first = {await claimed_consumer(js, p) for p in range(P)}
        through = max(floors.values())
        # No consumer of the layout before claims: a floor read from those is none.
        for p in range(P):
            try:
                await js.consumer_info(EVENTS_STREAM, partition_consumer("shoal-engine", p))
            except nats.js.errors.NotFoundError:
                continue
            raise AssertionError(f"partition {p} has a consumer before claims")
        # Events no engine read yet: past every floor, not the store's to hold.
        await publish(nc, customers[:10], 3)
        logged = await _events_through(nc, through)
        assert logged == 2 * len(customers)

        for f in data.glob("shoal.db*"):
            f.unlink()
        refused = await anyio.to_thread.run_sync(
            lambda: run(
                "serve",
                "--nats",
                url,
                "--data-dir",
                str(data),
                "--engine-id",
                "a",
                "--segments",
                str(rules),
                "--lease-ttl",
                "2",
                timeout=60,
            )  # fmt: skip
        )
        assert refused.returncode == 1, refused.stderr
        error = refused.stderr.strip().splitlines()[-1]
        assert "is behind stream SHOAL_EVENTS" in error, error
        # It names the consumer that acknowledged them: the first claim's, as the start
        # claimed every partition again and was refused before starting the new consumers.
        named = error.split("consumer '")[1].split("'")[0]
        assert named in first, error

        # The refused start claimed every partition again, and never started those claims'
        # consumers: the floors are the claims' before.
        rebuilt = await anyio.to_thread.run_sync(
            lambda: run("rebuild", "--from-stream", "--nats", url, "--data-dir", str(data))
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert f"{logged} events logged and {2 * len(customers)} published" in rebuilt.stdout
        assert f"through position {through}" in rebuilt.stdout
        async with await Store.open_read_only(data / "shoal.db") as store:
            assert store.stream_through == through
            assert store.events.last_seq == logged

        a = serve(url, data, "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        # The unread round and one more: versions go on from those published before.
        await publish(nc, customers[:20], 4)
        await _wait_published(nc, 2 * len(customers) + 20)  # loyal: c0-c19
        assert a.stop() == 0, a.rest()
        published = await transitions(nc)
        check_versions(published)
        assert _by_customer([t for t, _ in published]) == await _replayed(nc)
        assert not await owners(nc)  # released at the stop
    finally:
        await nc.close()


async def test_serve_rebuild_after_a_takeover_goes_on_with_each_customers_versions(
    nats_server: NatsServer, tmp_path: Path, procs: list[Proc]
) -> None:
    url = nats_server.url
    rules = tmp_path / "segments.toml"
    rules.write_text(RULES)
    nc = await nats.connect(url)
    try:
        a = serve(url, tmp_path / "a", "a", rules)
        procs.append(a)
        a.wait_err("shoal is serving", timeout=30)
        await wait_owners(nc, lambda o: len(o.get("a", [])) == P)
        customers = [f"c{i}" for i in range(120)]
        await publish(nc, customers, 1)
        await publish(nc, customers, 2)
        await _wait_published(nc, 2 * len(customers))
        await anyio.sleep(2.5)  # a's snapshots (every second) hold them all

        # b joins, a dies: b takes every partition over, half of them from a at once.
        b = serve(url, tmp_path / "b", "b", rules)
        procs.append(b)
        b.wait_err("shoal is serving", timeout=30)
        await wait_owners(nc, lambda o: sorted(len(v) for v in o.values()) == [16, 16])
        a.popen.send_signal(signal.SIGKILL)
        a.popen.wait()
        await wait_owners(nc, lambda o: o.keys() == {"b"} and len(o["b"]) == P)
        await publish(nc, customers[:40], 3)
        await _wait_published(nc, 2 * len(customers) + 40)
        assert b.stop() == 0, b.rest()

        # Its store holds none of the customers' earlier transitions: a published them.
        async with await Store.open_read_only(tmp_path / "b" / "shoal.db") as store:
            held = await store.outbox.of_customers(customers)
        assert {o.version for o in held} <= {3}

        b = Proc(
            "serve", "--nats", url, "--data-dir", str(tmp_path / "b"), "--engine-id", "b",
            "--segments", str(rules), "--lease-ttl", "2", "--snapshot-interval", "1",
            "--rebuild",
        )  # fmt: skip
        procs.append(b)
        b.wait_err("shoal is serving", timeout=60)
        await publish(nc, customers[40:60], 3)
        await publish(nc, customers[:10], 4)
        await _wait_published(nc, 2 * len(customers) + 60)
        assert b.stop() == 0, b.rest()
        published = await transitions(nc)
        last = check_versions(published)
        assert last == {c: 3 if i < 60 else 2 for i, c in enumerate(customers)}
        assert _by_customer([t for t, _ in published]) == await _replayed(nc)
    finally:
        await nc.close()
