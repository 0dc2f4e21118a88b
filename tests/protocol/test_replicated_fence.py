"""The deadline barrier on a replicated SHOAL_EVENTS (three nodes): a clustered server
stamps an event before a quorum stores it, so the barrier asks the stream's leader and,
when nothing was stored since it was asked, publishes a probe whose position bounds what
may still be on its way; the probe is deleted once used, and never taken for an event."""

from __future__ import annotations

import json

import anyio
import nats
import pytest

from protocol import EVENTS_STREAM, Delivery, event_subject, is_fence_probe, partition
from protocol.nats import FeedClaim, PartitionedFeed, StreamSettings, jetstream_ports
from tests.cluster import NatsCluster

P = 32


async def test_the_barrier_probes_a_quiet_replicated_stream(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(nats_cluster.urls)
    try:
        owned = list(range(8))
        claims: dict[int | None, FeedClaim] = {p: FeedClaim(f"test-{p}") for p in owned}
        claims[None] = FeedClaim("test-strays")
        source, _ = await jetstream_ports(nc, streams=StreamSettings(replicas=3), claims=claims)
        assert isinstance(source, PartitionedFeed)
        js = nc.jetstream()
        mine = [c for c in (f"c{i}" for i in range(400)) if partition(c, P) in owned][:20]
        for c in mine:
            body = json.dumps({"type": "track", "userId": c, "event": "Visit"}).encode()
            await js.publish(event_subject(c), body)
        await source.start()
        taken: list[Delivery] = []
        with anyio.fail_after(10):
            while len(taken) < len(mine):
                await source.wait()
                taken += source.take(100)
        assert not any(is_fence_probe(d.subject) for d in taken)
        await source.ack(taken[-1].stream_sequence)
        before = await js.stream_info(EVENTS_STREAM)

        # Quiet since: a probe bounds what may be on its way, and reaches its partition.
        await anyio.sleep(0.05)
        assert await source.fence()
        after = await js.stream_info(EVENTS_STREAM)
        assert after.state.last_seq == before.state.last_seq + 1  # the probe
        with anyio.fail_after(5):
            await source.wait()
        probes = source.take(10)
        assert [is_fence_probe(d.subject) for d in probes] == [True]
        assert partition_of_probe(probes[0].subject) == owned[0]
        # Kept until acknowledged: deleting it first would move the consumer's floor past
        # it ahead of the store.
        await anyio.sleep(0.05)
        assert await source.fence()
        kept = await js.stream_info(EVENTS_STREAM)
        assert kept.state.messages == before.state.messages + 2  # that one and the next
        await source.ack(probes[-1].stream_sequence)
        await anyio.sleep(0.05)
        assert await source.fence()  # deletes the acknowledged one
        now = await js.stream_info(EVENTS_STREAM)
        assert now.state.messages == before.state.messages + 2  # the second and a third

        await source.stop()
    finally:
        await nc.close()


def partition_of_probe(subject: str) -> int:
    return int(subject.split(".")[2])


@pytest.mark.parametrize("text", ["", "0001-01-01T00:00:00Z", "2026-12-07T02:16:02+01:00", 5])
def test_an_unusable_stamp_reads_as_none(text: object) -> None:
    from protocol.nats._partitioned import _stamp

    assert _stamp(text) is None


def test_a_stamp_to_the_microsecond() -> None:
    from protocol import parse_timestamp
    from protocol.nats._partitioned import _stamp

    assert _stamp("2026-12-07T02:16:02.678906123Z") == parse_timestamp(
        "2026-12-07T02:16:02.678906Z"
    )
    assert _stamp("2026-12-07T02:16:02Z") == parse_timestamp("2026-12-07T02:16:02Z")
