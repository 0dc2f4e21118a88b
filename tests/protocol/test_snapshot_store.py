"""Partition snapshots in the Object Store bucket SHOAL_SNAPSHOTS, on a real nats-server:
round trips, replacements that leave no chunks behind, the listing from object infos, and
the snapshots a new owner must not use (refused with the reason, never half-read)."""

from __future__ import annotations

import asyncio
import base64
import random
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.api import ObjectMeta

from protocol import STREAM_FORMAT, FormatTooNewError
from protocol._ownership import SNAPSHOT_FORMAT, PartitionSnapshot
from protocol.nats import SnapshotInfo, SnapshotStore, SnapshotUnusable
from protocol.nats._snapshot_store import OBJECT_STREAM

P = 4
CHUNK = 32 << 10
"""Small chunks, so a snapshot of a few hundred customers takes several."""


def snapshot(partition: int = 1, n: int = 300, *, seed: int = 0, **kw: Any) -> PartitionSnapshot:
    """``n`` customers with random (incompressible) 300-500 byte bodies."""
    rng = random.Random(seed)
    fields: dict[str, Any] = {
        "partition": partition,
        "partitions": P,
        "through": 1000 + seed,
        "progress": 77,
        "needs": "needs-fp",
        "definitions": "defs-fp",
        "definitions_version": 3,
        "taken_at": 1_767_225_600_000_000,
        "engine": "engine-a",
        "claim": 12,
        "customers": [(f"c{i:05d}", i, rng.randbytes(rng.randint(300, 500))) for i in range(n)],
    }
    fields.update(kw)
    return PartitionSnapshot(**fields)


async def store(client: Client, **kw: Any) -> SnapshotStore:
    s = SnapshotStore(client, partitions=kw.pop("partitions", P), chunk_size=CHUNK, **kw)
    await s.ensure()
    return s


async def stream_state(client: Client) -> tuple[int, dict[str, int]]:
    """The bucket's message count and its messages by subject."""
    info = await client.jetstream().stream_info(OBJECT_STREAM, subjects_filter=">")
    return info.state.messages, dict(info.state.subjects or {})


@pytest.mark.parametrize("compress", [False, True])
async def test_round_trip(client: Client, compress: bool) -> None:
    s = await store(client, compress=compress)
    snap = snapshot()
    info = await s.put(snap)
    got = await s.get(1)
    assert got == snap
    assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(snap)
    raw = len(msgspec.msgpack.encode(snap))
    assert info.encoding == ("msgpack+zlib" if compress else "msgpack")
    assert (info.size < raw) if compress else (info.size == raw)
    assert info.chunks == -(-info.size // CHUNK) > 1
    assert await s.get(2) is None
    if not compress:
        # Laid out as any Object Store object: nats-py reads it (and checks the digest).
        obs = await client.jetstream().object_store("SHOAL_SNAPSHOTS")
        assert (await obs.get("partition-1")).data == msgspec.msgpack.encode(snap)


async def test_replacing_leaves_no_old_chunks(client: Client) -> None:
    s = await store(client)
    await s.put(snapshot(0, 50))  # another partition's object stays as it is
    for i, n in enumerate((400, 100, 250, 250)):
        info = await s.put(snapshot(1, n, seed=i))
        messages, subjects = await stream_state(client)
        chunk_subjects = [k for k in subjects if ".C." in k]
        assert messages == info.chunks + (await s.list())[0].chunks + 2, i
        assert len(chunk_subjects) == 2, i
        assert await s.get(1) == snapshot(1, n, seed=i)


async def test_concurrent_replacements_leave_no_chunks(client: Client) -> None:
    a, b = await store(client), await store(client)
    for round in range(3):
        await asyncio.gather(
            a.put(snapshot(1, 300, seed=round)), b.put(snapshot(1, 300, seed=10 + round))
        )
        got = await a.get(1)
        assert got in (snapshot(1, 300, seed=round), snapshot(1, 300, seed=10 + round))
        messages, subjects = await stream_state(client)
        assert len([k for k in subjects if ".C." in k]) == 1, round
        assert messages == (await a.list())[1].chunks + 1, round


async def test_list_shows_the_infos(client: Client) -> None:
    s = SnapshotStore(client, partitions=P)
    assert await s.list() == {}  # no bucket yet
    assert await s.get(0) is None
    await s.ensure()
    await s.ensure()  # idempotent
    assert await s.list() == {}
    await s.put(snapshot(0, 10, seed=1))
    info3 = await s.put(snapshot(3, 20, seed=2, engine="engine-b", claim=40, progress=9))
    assert await s.list() == {
        0: SnapshotInfo(
            partition=0,
            partitions=P,
            format=SNAPSHOT_FORMAT,
            encoding="msgpack",
            through=1001,
            progress=77,
            engine="engine-a",
            claim=12,
            taken_at=1_767_225_600_000_000,
            customers=10,
            size=len(msgspec.msgpack.encode(snapshot(0, 10, seed=1))),
            chunks=1,
        ),
        3: info3,
    }
    assert info3.engine == "engine-b" and info3.claim == 40 and info3.customers == 20
    assert await s.delete(0) is True
    assert await s.delete(0) is False
    assert await s.get(0) is None
    assert list(await s.list()) == [3]
    _, subjects = await stream_state(client)
    assert len([k for k in subjects if ".C." in k]) == 1  # partition 0's chunks purged


async def test_a_newer_format_is_refused_and_another_split_unusable(client: Client) -> None:
    s = await store(client)
    await s.put(snapshot(1, format=99))
    # A newer shoal's: refused, not rebuilt over (retention may have cut the events).
    with pytest.raises(FormatTooNewError) as newer:
        await s.get(1)
    assert str(newer.value) == (
        "the snapshot of partition 1 in Object Store bucket SHOAL_SNAPSHOTS has format 99, "
        f"and this shoal knows formats up to {SNAPSHOT_FORMAT}: it was written by a newer "
        "shoal. Run that shoal (or a later one) on this data; this one stops rather than "
        "misread it"
    )
    assert (newer.value.found, newer.value.known) == (99, SNAPSHOT_FORMAT)
    assert (await s.list())[1].problem == (
        f"it is of format 99, this engine reads formats 1 to {SNAPSHOT_FORMAT}"
    )
    await s.put(snapshot(2))
    other = SnapshotStore(client, partitions=16)
    with pytest.raises(SnapshotUnusable) as e:
        await other.get(2)
    assert e.value.reason == "it was taken with 4 partitions, the events stream has 16"
    assert str(e.value) == (
        "the snapshot of partition 2 in Object Store bucket SHOAL_SNAPSHOTS cannot be used: "
        "it was taken with 4 partitions, the events stream has 16; rebuild the partition "
        "from the events stream"
    )
    assert (await other.list())[2].problem == e.value.reason
    with pytest.raises(ValueError, match="taken with 4 partitions, this store keeps those of 16"):
        await other.put(snapshot(2))


async def test_oversized_is_refused(client: Client) -> None:
    s = await store(client)
    info = await s.put(snapshot(1, 300))
    small = SnapshotStore(client, partitions=P, max_bytes=50_000)
    with pytest.raises(SnapshotUnusable) as e:
        await small.get(1)
    assert e.value.reason == f"it is {info.size} bytes, over the limit of 50000"
    with pytest.raises(SnapshotUnusable, match="bytes encoded, over the limit of 50000"):
        await small.put(snapshot(1, 300))
    # Compressed within the limit, but not once inflated: a zip bomb is bounded too.
    zipped = await store(client, compress=True)
    info = await zipped.put(snapshot(2, 1, customers=[("c", 0, bytes(200_000))]))
    assert info.size < 50_000
    with pytest.raises(SnapshotUnusable) as e:
        await small.get(2)
    assert e.value.reason == "its body decompresses to more than the limit of 50000 bytes"


INFO_1 = "$O.SHOAL_SNAPSHOTS.M." + base64.urlsafe_b64encode(b"partition-1").decode()


async def object_info(client: Client) -> dict[str, Any]:
    """Partition 1's object info as stored (JSON)."""
    msg = await client.jetstream().get_last_msg(OBJECT_STREAM, INFO_1)
    info: dict[str, Any] = msgspec.json.decode(msg.data or b"")
    return info


async def test_corrupt_objects_are_refused(client: Client) -> None:
    s = await store(client)
    js = client.jetstream()
    obs = await js.object_store("SHOAL_SNAPSHOTS")

    # Written by other tools: no headers saying what it is.
    await obs.put("partition-1", b"garbage")
    with pytest.raises(SnapshotUnusable) as e:
        await s.get(1)
    assert e.value.reason == "it is of no format, this engine reads formats 1 to 2"

    # The headers of a snapshot over bytes that are not one.
    await s.put(snapshot(1))
    headers = (await object_info(client))["headers"]
    await obs.put("partition-1", b"garbage", meta=ObjectMeta(headers=headers))
    with pytest.raises(SnapshotUnusable) as e:
        await s.get(1)
    assert e.value.reason == "its body is not a snapshot: Expected `object`, got `int`"

    # Bytes that do not match the digest in the info.
    await s.put(snapshot(1))
    info = await object_info(client)
    info["digest"] = "SHA-256=" + base64.urlsafe_b64encode(bytes(32)).decode()
    await js.publish(INFO_1, msgspec.json.encode(info), headers={"Nats-Rollup": "sub"})
    with pytest.raises(SnapshotUnusable) as e:
        await s.get(1)
    assert e.value.reason == "its bytes do not match its SHA-256 digest"

    # Chunks gone while the info names them: refused at once, not waited for.
    stored = await s.put(snapshot(1))
    nuid = (await object_info(client))["nuid"]
    await js.purge_stream(OBJECT_STREAM, subject=f"$O.SHOAL_SNAPSHOTS.C.{nuid}")
    with pytest.raises(SnapshotUnusable) as e:
        await asyncio.wait_for(s.get(1), 2)
    assert e.value.reason == f"{stored.chunks} of its {stored.chunks} chunks are missing"

    # An info that is not JSON.
    await js.publish(INFO_1, b"{", headers={"Nats-Rollup": "sub"})
    with pytest.raises(SnapshotUnusable) as e:
        await s.get(1)
    assert e.value.reason == "its object info is not readable: Input data was truncated"
    assert (await s.list())[1].problem == e.value.reason


async def test_replaced_while_read_reads_the_new_one(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, writer = await store(client), await store(client)
    await s.put(snapshot(1, 200, seed=1))
    usable = SnapshotStore._usable
    calls = 0

    async def replaced_after(self: SnapshotStore, partition: int, name: str) -> Any:
        nonlocal calls
        calls += 1
        info = await usable(self, partition, name)
        if calls == 1:  # the writer replaces it (purging its chunks) before they are read
            await writer.put(snapshot(1, 200, seed=2))
        return info

    monkeypatch.setattr(SnapshotStore, "_usable", replaced_after)
    assert await s.get(1) == snapshot(1, 200, seed=2)
    assert calls == 2


async def test_the_bucket_records_its_format(client: Client) -> None:
    """A bucket made by shoal 484eaec (no format in its metadata) gets this shoal's; one of a
    newer shoal's is refused."""
    js = client.jetstream()
    await js.create_object_store("SHOAL_SNAPSHOTS")  # as nats-py makes it: no metadata
    await store(client)
    config = (await js.stream_info(OBJECT_STREAM)).config
    assert (config.metadata or {}).get("shoal_format") == str(STREAM_FORMAT)
    config.metadata = {"shoal_format": "99"}
    await js.update_stream(config)
    with pytest.raises(FormatTooNewError) as e:
        await store(client)
    assert str(e.value).startswith(
        f"Object Store bucket SHOAL_SNAPSHOTS has format 99, and this shoal knows formats up to "
        f"{STREAM_FORMAT}: it was written by a newer shoal."
    )
