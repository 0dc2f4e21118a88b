"""``SHOAL_EVENTS`` splits customers into partitions on a real nats-server: the broker
computes each event's partition with its subject transform, and :func:`protocol.partition`
must agree with it for every customer id, escaped as :func:`protocol.event_subject` escapes
it. What the stream stores untransformed, what it does not take at all, and a stream made
by an earlier shoal (without partitions) are here too."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    customer_of_stored_subject,
    event_subject,
    partition,
    stored_event_subject,
)
from protocol.nats import (
    StreamNeedsMigration,
    StreamSettings,
    ensure_streams,
    read_stream,
    stream_partitions,
)
from tests.helpers import NatsServer, collect, eventually, running_engine, segments, track

ACTIVE = segments("[segments.active]\nrule = \"since_last('Visit') < '1h'\"\n")

_FIXED = [
    "café",
    "日本語",
    "emoji😀",
    "a%b",
    "100%",
    "%",
    "%41",
    "a.b",
    "...",
    "a b",
    " ",
    "tab\there",
    "*",
    ">",
    "a*b",
    "a>b",
    "ümlaut.dot %",
    "\u3000ideographic space",
    "0",
    "7",
    "-",
]


def _ids(n: int, seed: int = 18) -> list[str]:
    """``n`` distinct customer ids: the fixed awkward ones, random printable ASCII (spaces,
    '.', '%', '*' and '>' included), and random text of any plane (no lone surrogates)."""
    rng = random.Random(seed)
    ascii_chars = [chr(c) for c in range(0x20, 0x7F)]
    out = dict.fromkeys(_FIXED)
    while len(out) < n:
        if rng.random() < 0.5:
            text = "".join(rng.choices(ascii_chars, k=rng.randint(1, 40)))
        else:
            chars = []
            for _ in range(rng.randint(1, 12)):
                c = rng.choice((rng.randint(0x20, 0x7FF), rng.randint(0x800, 0xFFFF)))
                c = c if not 0xD800 <= c <= 0xDFFF else 0x263A
                chars.append(chr(rng.choice((c, rng.randint(0x10000, 0x1FAFF)))))
            text = "".join(chars)
        out[text] = None
    return list(out)


async def _stored_subjects(nc: Client) -> list[str]:
    # Through the engine's own filter, shoal.events.>, which the stored subjects match.
    return [
        d.subject async for chunk in read_stream(nc, EVENTS_STREAM, EVENTS_WILDCARD) for d in chunk
    ]


@pytest.mark.parametrize("partitions", [DEFAULT_PARTITIONS, 7])
async def test_partition_agrees_with_the_server_and_every_partition_is_used(
    client: Client, partitions: int
) -> None:
    js = client.jetstream()
    assert await ensure_streams(js, StreamSettings(partitions=partitions)) == partitions
    ids = _ids(3_000)
    for start in range(0, len(ids), 500):
        await asyncio.gather(
            *(js.publish(event_subject(c), b"{}") for c in ids[start : start + 500])
        )
    stored = await _stored_subjects(client)
    assert len(stored) == len(ids)
    seen: dict[str, int] = {}
    for subject in stored:
        p, customer = customer_of_stored_subject(subject)
        seen[customer] = p
    assert seen.keys() == set(ids)
    disagree = {
        c: (p, partition(c, partitions)) for c, p in seen.items() if p != partition(c, partitions)
    }
    assert disagree == {}
    assert sorted(stored) == sorted(stored_event_subject(c, partitions) for c in ids)
    assert set(seen.values()) == set(range(partitions))


async def test_a_hand_published_wildcard_is_stored_unpartitioned_and_rejected(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    rejected = await collect(client, "shoal.rejected")
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE) as engine:
        js = client.jetstream()
        await js.publish(event_subject("bob"), track("bob", mid="before"))
        # The literal wildcards match the stream's subject shoal.events.*, but the transform
        # stores them as they are: no partition, no customer.
        star = await js.publish("shoal.events.*", track("*", mid="star"))
        rest = await js.publish("shoal.events.>", track(">", mid="rest"))
        await js.publish(event_subject("carol"), track("carol", mid="after"))
        # The literal * is read by the consumer of unpartitioned subjects and rejected. No
        # consumer filter can single out the literal >: it stays in the stream, unread.
        await eventually(lambda: len(rejected.msgs) == 1 and len(seen.msgs) == 2)
        assert engine.stats.events_applied == 2
        assert engine.rejection_counts == {"subject": 1}
    assert [(await js.get_msg(EVENTS_STREAM, a.seq)).subject for a in (star, rest)] == [
        "shoal.events.*",
        "shoal.events.>",
    ]
    assert [(r.subject, r.reason) for r in rejected.rejections()] == [
        (
            f"shoal.events.{w}",
            f"subject 'shoal.events.{w}' was published by hand on a wildcard subject and "
            "stored without a partition: it names no customer (publish each event on "
            "shoal.events.<customer>)",
        )
        for w in ("*",)
    ]
    assert [t.customer_id for t in seen.transitions()] == ["bob", "carol"]
    # Each transition carries its customer's partition.
    assert [m.headers and m.headers["Shoal-Partition"] for m in seen.msgs] == [
        str(partition(c, DEFAULT_PARTITIONS)) for c in ("bob", "carol")
    ]


@pytest.mark.parametrize(
    "subject", ["shoal.events.alice.smith", "shoal.events.7.alice", "shoal.events.a.b.c"]
)
async def test_a_subject_of_several_tokens_gets_no_stream(client: Client, subject: str) -> None:
    js = client.jetstream()
    await ensure_streams(js)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish(subject, b"{}")
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 0


async def _add_old_events_stream(client: Client) -> None:
    # SHOAL_EVENTS as shoal made it before partitions.
    await client.jetstream().add_stream(
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_WILDCARD, "shoal.imports.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )


async def test_a_stream_without_partitions_must_be_migrated(client: Client) -> None:
    await _add_old_events_stream(client)
    js = client.jetstream()
    await js.publish("shoal.events.alice", b"{}")
    assert await stream_partitions(js) is None
    with pytest.raises(StreamNeedsMigration) as e:
        await ensure_streams(js)
    assert str(e.value) == (
        "stream SHOAL_EVENTS was made by an earlier shoal, without partitions: this shoal "
        "reads events only from a partitioned stream. Migrate the stream and the data "
        "directory with `shoal migrate`, then start again"
    )
    assert (e.value.found, e.value.wanted) == (None, None)
    # Left as it was.
    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.subject_transform is None and info.state.messages == 1


async def test_the_number_of_partitions_is_read_back_and_kept(client: Client) -> None:
    js = client.jetstream()
    with pytest.raises(ValueError, match="must be positive, not 0"):
        StreamSettings(partitions=0)
    with pytest.raises(Exception, match="does not exist"):
        await stream_partitions(js)
    assert await ensure_streams(js, StreamSettings(partitions=12)) == 12
    assert await stream_partitions(js) == 12
    # Not told: the stream's own number is kept.
    assert await ensure_streams(js) == 12
    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.subjects == ["shoal.events.*", "shoal.events.*.ctl.>"]
    assert info.config.subject_transform is not None
    assert info.config.subject_transform.dest == "shoal.events.{{partition(12,1)}}.{{wildcard(1)}}"
    assert not info.config.max_age  # every event is kept
    with pytest.raises(StreamNeedsMigration) as e:
        await ensure_streams(js, StreamSettings(partitions=16))
    assert str(e.value) == (
        "stream SHOAL_EVENTS splits customers into 12 partitions, not the 16 asked for: the "
        "number is fixed when the stream is made. To change it, stop the engine and "
        "re-partition the stream and the data directory with `shoal migrate --partitions 16`"
    )
    assert await stream_partitions(js) == 12
