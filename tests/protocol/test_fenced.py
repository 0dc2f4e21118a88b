"""Fenced output on a real nats-server: each partition's transitions in atomic batches that
the broker stores only while the partition's last claim is the publisher's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from protocol import (
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    EventCause,
    FencedOut,
    Transition,
    partition,
)
from protocol._ownership import PROGRESS_DECODER, FenceClaim
from protocol._subjects import fence_subject, progress_subject
from protocol.nats import Publisher, ensure_streams, read_stream

P = 4


def transition(customer: str, version: int) -> Transition:
    return Transition(
        customer_id=customer,
        segment="vip",
        change="entered" if version % 2 else "exited",
        at=datetime(2026, 1, 1, tzinfo=UTC),
        cause=EventCause(message_id=f"m{version}"),
        version=version,
    )


async def claim(js: Any, p: int, engine: str, expected: int) -> int:
    body = msgspec.json.encode(FenceClaim(engine=engine, partition=p, at=0, previous=expected))
    ack = await js.publish(
        fence_subject(p), body, headers={"Nats-Expected-Last-Subject-Sequence": str(expected)}
    )
    return int(ack.seq)


async def stored(nc: Client) -> list[Transition]:
    out: list[Transition] = []
    async for chunk in read_stream(nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD):
        out += [msgspec.json.decode(m.data, type=Transition) for m in chunk]
    return out


async def progress(nc: Client, p: int) -> list[Any]:
    out = []
    async for chunk in read_stream(nc, SEGMENTS_STREAM, progress_subject(p)):
        out += [PROGRESS_DECODER.decode(m.data) for m in chunk]
    return out


def customers_of(p: int, n: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        if partition(f"c{i}", P) == p:
            out.append(f"c{i}")
        i += 1
    return out


@pytest.fixture
async def publisher(client: Client) -> Any:
    from protocol.nats import StreamSettings

    await ensure_streams(client.jetstream(), StreamSettings(partitions=P))
    pub = Publisher(client, partitions=P, timeout=5)
    await pub.start()
    yield pub
    await pub.close()


async def test_each_partition_in_fenced_batches_with_its_progress(
    client: Client, publisher: Publisher
) -> None:
    js = client.jetstream()
    claims = {p: await claim(js, p, "a", 0) for p in range(P)}
    for p, seq in claims.items():
        publisher.claim(p, seq)
    ts = [transition(f"c{i}", v) for v in (1, 2) for i in range(40)]
    await publisher.publish(ts)
    got = await stored(client)
    assert sorted((t.customer_id, t.version) for t in got) == sorted(
        (t.customer_id, t.version) for t in ts
    )
    for p in range(P):
        records = await progress(client, p)
        assert len(records) == 1 and records[0].claim == claims[p]
        mine = {t.customer_id for t in ts if partition(t.customer_id, P) == p}
        assert dict(records[0].versions) == dict.fromkeys(mine, 2)
        assert publisher.progress[p] > claims[p]


async def test_a_partition_claimed_by_another_is_refused_whole(
    client: Client, publisher: Publisher
) -> None:
    js = client.jetstream()
    claims = {p: await claim(js, p, "a", 0) for p in range(P)}
    for p, seq in claims.items():
        publisher.claim(p, seq)
    await claim(js, 1, "b", claims[1])  # b takes partition 1 over
    ts = [transition(f"c{i}", 1) for i in range(40)]
    with pytest.raises(FencedOut) as caught:
        await publisher.publish(ts)
    assert set(caught.value.partitions) == {1}
    assert "wrong last sequence" in caught.value.partitions[1]
    assert str(caught.value).startswith("fenced out of partition 1: another engine claimed it")
    # The other partitions' transitions are stored, and said so; none of partition 1's.
    assert caught.value.confirmed == {
        i for i, t in enumerate(ts) if partition(t.customer_id, P) != 1
    }
    assert {t.customer_id for t in await stored(client)} == {
        t.customer_id for t in ts if partition(t.customer_id, P) != 1
    }
    assert await progress(client, 1) == []


async def test_a_partition_never_claimed_is_refused(client: Client, publisher: Publisher) -> None:
    js = client.jetstream()
    publisher.claim(0, await claim(js, 0, "a", 0))
    (c,) = customers_of(2, 1)
    with pytest.raises(FencedOut, match="no claim of this engine"):
        await publisher.publish([transition(c, 1)])


async def test_a_retry_of_stored_transitions_is_stored_once(
    client: Client, publisher: Publisher
) -> None:
    js = client.jetstream()
    publisher.claim(0, await claim(js, 0, "a", 0))
    cs = customers_of(0, 3)
    first = [transition(c, 1) for c in cs]
    await publisher.publish(first)
    # Its answer lost, say: the same again with more; the broker refuses a batch holding a
    # message id it has (10201), and one at a time stores only the new ones.
    again = first + [transition(c, 2) for c in cs]
    await publisher.publish(again)
    got = sorted((t.customer_id, t.version) for t in await stored(client))
    assert got == sorted((t.customer_id, t.version) for t in again)
    records = await progress(client, 0)
    assert [dict(r.versions) for r in records] == [dict.fromkeys(cs, 1), dict.fromkeys(cs, 2)]


async def test_more_than_a_batch_of_one_partition(client: Client, publisher: Publisher) -> None:
    js = client.jetstream()
    publisher.claim(0, await claim(js, 0, "a", 0))
    (c,) = customers_of(0, 1)
    ts = [transition(c, v) for v in range(1, 2_101)]
    await publisher.publish(ts)
    got = await stored(client)
    assert [t.version for t in got] == list(range(1, 2_101))
    assert [r.versions for r in await progress(client, 0)] == [[(c, 999)], [(c, 1998)], [(c, 2100)]]
