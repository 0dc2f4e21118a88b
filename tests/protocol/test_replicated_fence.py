"""The deadline barrier on a replicated SHOAL_EVENTS (three nodes): a clustered server
stamps an event before a quorum stores it, so the barrier asks the stream's leader and,
when nothing was stored since it was asked, publishes a probe whose position bounds what
may still be on its way; the probe is deleted once used, and never taken for an event."""

from __future__ import annotations

import json

import anyio
import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext

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
        # Behind until each partition took its start probe (published once its consumer
        # started): events stamped before the start come first, counted or not.
        assert source.backlog_cap is not None
        taken: list[Delivery] = []
        with anyio.fail_after(10):
            while len(taken) < len(mine) + len(owned):
                await source.wait()
                taken += source.take(100)
        assert source.backlog_cap is None
        probes = [d for d in taken if is_fence_probe(d.subject)]
        assert sorted(partition_of_probe(d.subject) for d in probes) == owned
        assert max(d.stream_sequence for d in taken if d not in probes) < min(
            d.stream_sequence for d in probes
        )
        await source.ack(taken[-1].stream_sequence)
        before = await js.stream_info(EVENTS_STREAM)

        # Quiet since: a probe bounds what may be on its way, and reaches its partition.
        await anyio.sleep(0.05)
        assert await source.fence()
        after = await js.stream_info(EVENTS_STREAM)
        assert after.state.last_seq == before.state.last_seq + 1  # the probe
        with anyio.fail_after(5):
            await source.wait()
        probe = source.take(10)
        assert [is_fence_probe(d.subject) for d in probe] == [True]
        assert partition_of_probe(probe[0].subject) == owned[0]
        # The start probes, acknowledged, were deleted; this one is kept until acknowledged:
        # deleting it first would move the consumer's floor past it ahead of the store.
        assert not await stored(js, probes[0].stream_sequence)
        await anyio.sleep(0.05)
        assert await source.fence()
        assert await stored(js, probe[0].stream_sequence)
        await source.ack(probe[-1].stream_sequence)
        await anyio.sleep(0.05)
        assert await source.fence()
        assert not await stored(js, probe[0].stream_sequence)

        await source.stop()
    finally:
        await nc.close()


async def stored(js: JetStreamContext, seq: int) -> bool:
    try:
        await js.get_msg(EVENTS_STREAM, seq)
    except nats.js.errors.NotFoundError:
        return False
    return True


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
