"""Backpressure: under a burst, memory stays bounded and the broker holds what waits.

Two slow stages, each made slow for real: the SQLite store (commits delayed, as on a slow
disk) and the broker taking transitions (SHOAL_SEGMENTS full, refusing new messages). In both
the engine slows down instead of queueing: deliveries in memory stay within
``max_in_flight``, committed-but-unpublished transitions within ``max_outbox`` plus one
batch, and the rest waits in the stream. Nothing is lost once the stage recovers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StreamConfig

from actors import Engine, EngineConfig
from protocol.nats import connect, jetstream_ports
from store import Forgotten, LoggedEvent, OutboxEntry, Snapshot, SnapshotMarks, Store
from tests.helpers import NatsServer, engine_consumers, eventually, segments

VISITED = segments("""
[segments.visited]
rule = "count('Visit') >= 1"
""")
BURST = 3_000


async def publish_burst(client: Client, n: int) -> None:
    js = client.jetstream()
    futures = []
    for i in range(n):
        payload = json.dumps({"type": "track", "userId": f"c{i}", "event": "Visit"})
        futures.append(
            await js.publish_async(
                f"shoal.events.c{i}", payload.encode(), headers={"Nats-Msg-Id": f"m{i}"}
            )
        )
    for f in futures:
        await f


class SlowDisk(Store):
    """A store whose every commit takes 20 ms longer, as on a slow disk."""

    async def commit(
        self,
        events: Sequence[LoggedEvent],
        entries: Sequence[OutboxEntry] = (),
        published_through: int | None = None,
        *,
        snapshots: Sequence[Snapshot] | None = None,
        marks: SnapshotMarks | None = None,
        unparked: Sequence[str] = (),
        stream_through: int | None = None,
        partitions_through: Mapping[int, int] | None = None,
        imports: Mapping[str, int | None] | None = None,
        forget: Sequence[Forgotten] = (),
    ) -> list[int]:
        await anyio.sleep(0.02)
        return await super().commit(
            events,
            entries,
            published_through,
            snapshots=snapshots,
            marks=marks,
            unparked=unparked,
            stream_through=stream_through,
            partitions_through=partitions_through,
            imports=imports,
            forget=forget,
        )


async def pending_in_stream(client: Client) -> int:
    infos = await engine_consumers(client.jetstream())
    return sum(int(i.num_pending or 0) for i in infos.values())


async def watch(engine: Engine, client: Client, until: int) -> tuple[int, int, int]:
    """Sample until ``until`` events are applied: the most deliveries held in memory, the
    most transitions waiting to be published, and the most events waiting in the stream."""
    most_buffered = most_unpublished = most_waiting = 0
    with anyio.fail_after(120):
        while engine.stats.events_applied < until:
            most_buffered = max(most_buffered, engine.buffered)
            most_unpublished = max(most_unpublished, engine.unpublished)
            most_waiting = max(most_waiting, await pending_in_stream(client))
            await anyio.sleep(0.01)
    return most_buffered, most_unpublished, most_waiting


CONFIG = EngineConfig(batch_size=50, max_outbox=100)
MAX_IN_FLIGHT = 200


async def test_a_slow_disk_slows_ingestion_instead_of_growing_queues(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    nc = await connect([nats_server.url])
    log = await SlowDisk.open(tmp_path / "shoal.db")
    try:
        source, sink = await jetstream_ports(nc, max_in_flight=MAX_IN_FLIGHT)
        engine = Engine(source, sink, log, VISITED, config=CONFIG)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await publish_burst(client, BURST)
            buffered, unpublished, waiting = await watch(engine, client, BURST)
            await eventually(lambda: engine.stats.transitions_published == BURST, 30)
            tg.cancel_scope.cancel()
    finally:
        await log.close()
        await nc.close()
    assert buffered <= MAX_IN_FLIGHT
    assert unpublished <= CONFIG.max_outbox + CONFIG.batch_size
    # The burst waited in the broker, not in the engine.
    assert waiting > MAX_IN_FLIGHT
    assert engine.stats.events_applied == BURST


@pytest.mark.timeout(180)
async def test_a_broker_refusing_transitions_pauses_ingestion_at_max_outbox(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    js = client.jetstream()
    nc = await connect([nats_server.url])
    log = await Store.open(tmp_path / "shoal.db")
    try:
        source, sink = await jetstream_ports(nc, max_in_flight=MAX_IN_FLIGHT)
        engine = Engine(source, sink, log, VISITED, config=CONFIG)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            # SHOAL_SEGMENTS full: the broker refuses every transition from now on.
            info = await js.stream_info("SHOAL_SEGMENTS")
            full: StreamConfig = info.config
            full.max_msgs, full.discard = 1, DiscardPolicy.NEW
            await js.update_stream(full)
            await js.publish("shoal.segments.visited.entered", b"{}")  # fills it
            await publish_burst(client, BURST)

            # Ingestion stops once max_outbox transitions wait; the rest waits in the stream.
            await eventually(lambda: engine.unpublished >= CONFIG.max_outbox, 30)
            await anyio.sleep(1.0)
            stalled = engine.stats.events_applied
            assert stalled <= CONFIG.max_outbox + CONFIG.batch_size
            assert engine.unpublished <= CONFIG.max_outbox + CONFIG.batch_size
            assert engine.buffered <= MAX_IN_FLIGHT
            assert await pending_in_stream(client) >= BURST - stalled - MAX_IN_FLIGHT

            # Room again: everything goes through, nothing was lost.
            await js.purge_stream("SHOAL_SEGMENTS")
            full.max_msgs = -1
            await js.update_stream(full)
            await eventually(lambda: engine.stats.transitions_published == BURST, 90)
            assert engine.stats.events_applied == BURST
            tg.cancel_scope.cancel()
    finally:
        await log.close()
        await nc.close()
    stored = await js.stream_info("SHOAL_SEGMENTS")
    assert stored.state.messages == BURST
