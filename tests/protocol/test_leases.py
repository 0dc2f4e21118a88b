"""Partition leases and engine heartbeats in ``SHOAL_LEASES``, and the fence claims in the
transitions stream, on a real broker.

Every test reaches the broker through the ``broker`` fixture (a URL and the replicas to
ask for), so the same tests can run on a cluster by parametrizing that one fixture.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from protocol import (
    BrokerError,
    EngineIdInUse,
    EngineInfo,
    FenceClaim,
    Fenced,
    LeaseLost,
    Unconfirmed,
    UnreadableRecord,
)
from protocol.nats import (
    ChangeKind,
    Holder,
    Lease,
    LeaseBucket,
    LeaseChange,
    claim_fence,
    connect,
    fence_headers,
    fenced,
    is_fenced_error,
    last_claim,
)
from scripts._serving import _broker_failure
from tests.helpers import NatsServer, now

SEGMENTS = "TEST_SEGMENTS"
EXPIRY = 5.0
"""Seconds a 1 s lease may take to be seen expired (the broker's sweep is not exact)."""


@dataclass(frozen=True)
class Broker:
    url: str
    replicas: int


@pytest.fixture
def broker(nats_server: NatsServer) -> Broker:
    """The broker the tests use: one server now; a cluster later, with 3 replicas."""
    return Broker(nats_server.url, 1)


@pytest.fixture
async def clients(broker: Broker) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    """Opens clients of the broker (one per engine), closed at the end of the test."""
    opened: list[Client] = []

    async def open_client() -> Client:
        nc = await connect([broker.url], name=f"engine-{len(opened)}")
        opened.append(nc)
        return nc

    yield open_client
    for nc in opened:
        await nc.close()


@pytest.fixture
async def two(
    broker: Broker, clients: Callable[[], Awaitable[Client]]
) -> tuple[LeaseBucket, LeaseBucket]:
    """Two engines' views of one bucket, made."""
    a = LeaseBucket(await clients())
    b = LeaseBucket(await clients())
    await a.ensure(replicas=broker.replicas)
    await b.ensure(replicas=broker.replicas)  # idempotent
    return a, b


async def _claimed(bucket: LeaseBucket, partition: int, engine: str, ttl: int) -> Lease:
    got = await bucket.claim(partition, engine, ttl)
    assert isinstance(got, Lease), got
    return got


async def _claim_when_free(bucket: LeaseBucket, partition: int, engine: str) -> Lease:
    """Claim once the partition is free, within :data:`EXPIRY` seconds."""
    with anyio.fail_after(EXPIRY):
        while True:
            got = await bucket.claim(partition, engine, 5)
            if isinstance(got, Lease):
                return got
            await anyio.sleep(0.05)


async def test_claim_renew_release(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, _ = two
    before = time.monotonic()
    lease = await _claimed(a, 3, "engine-a", 10)
    assert (lease.partition, lease.engine, lease.ttl) == (3, "engine-a", 10)
    assert before <= lease.sent <= time.monotonic()
    assert lease.deadline == lease.sent + 10

    renewed = await a.renew(lease)
    assert renewed.revision > lease.revision
    assert renewed.sent >= lease.sent
    longer = await a.renew(renewed, ttl=20)
    assert longer.ttl == 20
    assert (await a.holders())[3].ttl == 20

    assert await a.release(longer) is True
    assert await a.holders() == {}
    assert await a.release(longer) is False  # idempotent
    # Free again: claimed over the release's tombstone.
    again = await _claimed(a, 3, "engine-a", 10)
    assert again.revision > longer.revision


async def test_a_held_lease_names_its_holder(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, b = two
    lease = await _claimed(a, 0, "engine-a", 10)
    held = await b.claim(0, "engine-b", 10)
    assert isinstance(held, Holder)
    assert (held.partition, held.engine, held.revision, held.ttl) == (
        0,
        "engine-a",
        lease.revision,
        10,
    )
    assert 0 <= held.age(now()) < 5
    # Its own engine is told it holds it already (an earlier run's lease, say).
    mine = await a.claim(0, "engine-a", 10)
    assert isinstance(mine, Holder)
    assert mine.engine == "engine-a"
    # Another partition is free.
    assert isinstance(await b.claim(1, "engine-b", 10), Lease)


async def test_an_expired_lease_is_free_and_lost(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, b = two
    lease = await _claimed(a, 5, "engine-a", 1)
    taken = await _claim_when_free(b, 5, "engine-b")
    assert taken.revision > lease.revision + 1  # over the expiry's marker
    with pytest.raises(LeaseLost) as lost:
        await a.renew(lease)
    assert str(lost.value) == (
        f"engine engine-a lost partition.5 (its revision {lease.revision}; the key is now at "
        f"revision {taken.revision}): it expired or another engine took it; stop the work "
        "it guarded"
    )
    assert (lost.value.partition, lost.value.current) == (5, taken.revision)
    # Releasing a lost lease changes nothing.
    assert await a.release(lease) is False
    assert (await b.holders())[5].engine == "engine-b"


async def test_a_renewal_after_expiry_is_lost(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, b = two
    lease = await _claimed(a, 2, "engine-a", 1)
    with anyio.fail_after(EXPIRY):
        while 2 in await b.holders():
            await anyio.sleep(0.05)
    with pytest.raises(LeaseLost) as lost:
        await a.renew(lease)
    assert lost.value.current is not None and lost.value.current > lease.revision


async def test_holders_and_engines(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, b = two
    assert await a.holders() == {}
    assert await a.engines() == {}
    for p in range(0, 64, 2):
        await _claimed(a, p, "engine-a", 30)
    for p in range(1, 64, 2):
        await _claimed(b, p, "engine-b", 30)
    dropped = await _claimed(b, 64, "engine-b", 30)
    assert await b.release(dropped)
    started = now()
    ra = await a.beat("engine-a", EngineInfo(started=started, partitions=32), 10)
    await b.beat("engine-b", EngineInfo(started=started), 10)

    holders = await b.holders()
    assert sorted(holders) == list(range(64))
    assert {p: h.engine for p, h in holders.items()} == {
        p: "engine-b" if p % 2 else "engine-a" for p in range(64)
    }
    assert all(h.ttl == 30 and 0 <= h.age(now()) < 5 for h in holders.values())
    engines = await b.engines()
    assert sorted(engines) == ["engine-a", "engine-b"]
    assert engines["engine-a"].info == EngineInfo(started=started, partitions=32)
    assert engines["engine-a"].revision == ra
    assert engines["engine-a"].ttl == 10
    assert 0 <= engines["engine-b"].age(now()) < 5

    assert await a.stop_beating("engine-a", revision=ra - 1) is False
    assert await a.stop_beating("engine-a", revision=ra) is True
    assert sorted(await b.engines()) == ["engine-b"]


async def test_heartbeats(two: tuple[LeaseBucket, LeaseBucket]) -> None:
    a, b = two
    info = EngineInfo(started=now())
    first = await a.beat("engine-a", info, 10)
    second = await a.beat("engine-a", info, 10, first)
    assert second > first
    # Another engine with the same id is refused.
    with pytest.raises(EngineIdInUse) as in_use:
        await b.beat("engine-a", EngineInfo(started=info.started + 1), 10)
    assert str(in_use.value) == (
        f"engine id engine-a is in use: its heartbeat is live at revision {second} (its TTL "
        "is 10 s); another engine runs with this id, or this one restarted before its last "
        "heartbeat expired: wait for it to expire, or give another id"
    )
    # A beat whose earlier try was stored unconfirmed is recognized by its start.
    assert await a.beat("engine-a", info, 10, first) > second
    # One that another engine wrote over is lost.
    with pytest.raises(LeaseLost):
        await b.beat("engine-a", EngineInfo(started=info.started + 1), 10, first)
    # A stopped heartbeat can start again.
    await a.stop_beating("engine-a")
    assert await a.beat("engine-a", info, 1) > second


async def test_watch_sees_claims_releases_and_expiries(
    two: tuple[LeaseBucket, LeaseBucket],
) -> None:
    a, b = two
    existing = await _claimed(a, 9, "engine-a", 30)
    gone = await _claimed(a, 8, "engine-a", 30)
    await a.release(gone)
    seen: list[LeaseChange] = []
    async with b.watch() as changes:

        async def next_change() -> tuple[ChangeKind, int | None, str | None]:
            with anyio.fail_after(EXPIRY):
                change = await changes.__anext__()
            seen.append(change)
            return change.kind, change.partition, change.engine

        # The state it starts from, in the order written.
        assert await next_change() == (ChangeKind.CLAIMED, 9, "engine-a")
        assert seen[-1].revision == existing.revision
        assert await next_change() == (ChangeKind.RELEASED, 8, None)
        # Then the changes.
        lease = await _claimed(a, 4, "engine-a", 1)
        assert await next_change() == (ChangeKind.CLAIMED, 4, "engine-a")
        assert seen[-1].revision == lease.revision
        renewed = await a.renew(existing)
        assert await next_change() == (ChangeKind.RENEWED, 9, "engine-a")
        assert seen[-1].revision == renewed.revision
        await a.release(renewed)
        assert await next_change() == (ChangeKind.RELEASED, 9, "engine-a")
        await a.beat("engine-a", EngineInfo(started=now()), 30)
        assert await next_change() == (ChangeKind.BEAT, None, "engine-a")
        # Partition 4's lease (1 s) expires: the server's marker says so.
        assert await next_change() == (ChangeKind.EXPIRED, 4, "engine-a")
        assert seen[-1].revision > lease.revision
        assert 4 not in await a.holders()
    assert [c.initial for c in seen] == [True, True, False, False, False, False, False]
    assert all(0 <= now() - c.written < 10_000_000 for c in seen)


async def test_ensure_takes_over_a_bucket_nats_py_made(
    broker: Broker, clients: Callable[[], Awaitable[Client]]
) -> None:
    nc = await clients()
    kv = await nc.jetstream().create_key_value(bucket="SHOAL_LEASES", history=5)
    await kv.put("partition.1", b'{"engine": "engine-x"}')
    bucket = LeaseBucket(nc)
    await bucket.ensure(replicas=broker.replicas)
    config = (await nc.jetstream().stream_info("KV_SHOAL_LEASES")).config
    assert (config.max_msgs_per_subject, config.subject_delete_marker_ttl) == (1, 300)
    assert config.allow_direct and config.allow_msg_ttl
    assert {p: h.engine for p, h in (await bucket.holders()).items()} == {1: "engine-x"}


async def test_a_broker_that_does_not_answer_is_unconfirmed(
    broker: Broker, nats_server: NatsServer, clients: Callable[[], Awaitable[Client]]
) -> None:
    """Not a lost lease: a renewal retried once the broker is back (single node: it stops
    the server)."""
    bucket = LeaseBucket(await clients(), timeout=0.3)
    await bucket.ensure(replicas=broker.replicas)
    lease = await _claimed(bucket, 1, "engine-a", 10)
    await anyio.to_thread.run_sync(nats_server.stop)
    with pytest.raises(Unconfirmed) as unconfirmed:
        await bucket.renew(lease)
    assert not isinstance(unconfirmed.value, LeaseLost)
    assert str(unconfirmed.value).startswith(
        "the broker did not confirm renewing the lease on $KV.SHOAL_LEASES.partition.1 ("
    )
    assert str(unconfirmed.value).endswith("): it may have been stored or not; try again")
    # Retried once the broker is back, within the lease's deadline.
    await anyio.to_thread.run_sync(nats_server.start)
    with anyio.fail_after(EXPIRY):
        while True:
            try:
                renewed = await bucket.renew(lease)
            except Unconfirmed:
                await anyio.sleep(0.1)
                continue
            break
    assert renewed.revision > lease.revision
    assert time.monotonic() < lease.deadline


async def test_no_replica_to_answer_a_read_is_the_broker_unavailable(
    clients: Callable[[], Awaitable[Client]],
) -> None:
    """A direct read no replica answers (503: here the bucket is not made; on a cluster,
    its replicas lost for a moment) is the broker's unavailability, which serving rides
    out for a while, not an error that stops the engine at once (a CI run saw an engine
    exit on it just after the broker's meta leader was killed)."""
    bucket = LeaseBucket(await clients(), timeout=1.0)
    with pytest.raises(BrokerError) as refused:
        await bucket.holders()
    assert str(refused.value) == (
        "cannot read KV bucket SHOAL_LEASES: no replica answers direct reads (is the "
        "bucket made, by an engine of this version?)"
    )
    assert isinstance(refused.value.__cause__, nats.js.errors.ServiceUnavailableError)
    assert _broker_failure(refused.value) is refused.value


async def test_bad_input_and_records(
    two: tuple[LeaseBucket, LeaseBucket], clients: Callable[[], Awaitable[Client]]
) -> None:
    a, _ = two
    for ttl in (0, -1, True):
        with pytest.raises(ValueError, match="a TTL is a whole number of seconds, at least 1"):
            await a.claim(0, "engine-a", ttl)
    with pytest.raises(ValueError, match="a stream has 1 to 5 replicas, not 0"):
        await a.ensure(replicas=0)
    js = (await clients()).jetstream()
    ack = await js.publish("$KV.SHOAL_LEASES.partition.7", b"not json")
    with pytest.raises(UnreadableRecord) as unreadable:
        await a.holders()
    assert str(unreadable.value) == (
        f"the record $KV.SHOAL_LEASES.partition.7 at revision {ack.seq} cannot be read: "
        "JSON is malformed: invalid character (byte 4) (shoal did not write it: replace or "
        "remove it)"
    )


# -- fences ------------------------------------------------------------------------------


@pytest.fixture
async def segments(broker: Broker, clients: Callable[[], Awaitable[Client]]) -> Client:
    """A client, and a transitions stream with fence and progress subjects."""
    nc = await clients()
    await nc.jetstream().add_stream(
        StreamConfig(
            name=SEGMENTS,
            subjects=["shoal.segments.>", "shoal.fence.*", "shoal.progress.*"],
            num_replicas=broker.replicas,
            allow_atomic=True,
        )
    )
    return nc


async def test_fence_claims(segments: Client) -> None:
    js = segments.jetstream()
    assert await last_claim(js, SEGMENTS, 7) is None
    first = FenceClaim(engine="engine-a", partition=7, at=now())
    a_claim = await claim_fence(js, SEGMENTS, 7, first, 0)
    assert await last_claim(js, SEGMENTS, 7) == (a_claim, first)
    # The owner's output is stored while its claim is the last.
    await js.publish("shoal.segments.7.c1", b"one", headers=fence_headers(7, a_claim))

    second = FenceClaim(
        engine="engine-b", partition=7, at=now(), previous=a_claim, previous_engine="engine-a"
    )
    b_claim = await claim_fence(js, SEGMENTS, 7, second, a_claim)
    assert await last_claim(js, SEGMENTS, 7) == (b_claim, second)
    # Then the old owner's is refused, and says why.
    with pytest.raises(nats.js.errors.APIError) as refused:
        await js.publish("shoal.segments.7.c1", b"two", headers=fence_headers(7, a_claim))
    assert (refused.value.err_code, refused.value.description) == (
        10071,
        f"wrong last sequence: {b_claim}",
    )
    assert is_fenced_error(refused.value.err_code, refused.value.description)
    out = fenced(7, refused.value.err_code, refused.value.description)
    assert out is not None
    assert (out.partition, out.subject, out.sequence) == (7, "shoal.fence.7", b_claim)
    assert str(out) == (
        f"partition 7 is fenced: the last claim on shoal.fence.7 is sequence {b_claim}, not "
        "the one expected; another engine claimed the partition, so stop publishing its output"
    )
    await js.publish("shoal.segments.7.c1", b"three", headers=fence_headers(7, b_claim))

    # A claim over a stale one is fenced too.
    third = FenceClaim(engine="engine-c", partition=7, at=now(), previous=a_claim)
    with pytest.raises(Fenced) as stale:
        await claim_fence(js, SEGMENTS, 7, third, a_claim)
    assert stale.value.sequence == b_claim
    with pytest.raises(ValueError, match="a claim on partition 8 replacing claim 0 cannot be"):
        await claim_fence(js, SEGMENTS, 8, first, 0)


def test_refusals_are_told_apart() -> None:
    assert is_fenced_error(10071, "wrong last sequence: 12")
    assert is_fenced_error(None, "wrong last sequence: 12")
    # A clustered stream's collision with the publisher's own message in flight.
    assert not is_fenced_error(10164, "wrong last sequence")
    assert not is_fenced_error(None, "wrong last sequence")
    assert fenced(3, 10164, "wrong last sequence") is None
    assert not is_fenced_error(10060, "expected stream does not match")
    out = fenced(3, 10071, "wrong last sequence: 12")
    assert out is not None and (out.sequence, out.subject) == (12, "shoal.fence.3")
    assert fence_headers(3, 12) == {
        "Nats-Expected-Last-Subject-Sequence": "12",
        "Nats-Expected-Last-Subject-Sequence-Subject": "shoal.fence.3",
    }
    assert fence_headers(3, 12) is not fence_headers(3, 12)


async def test_an_undecodable_fence_record(segments: Client) -> None:
    js = segments.jetstream()
    ack = await js.publish("shoal.fence.2", b'{"engine": 5}')
    with pytest.raises(UnreadableRecord) as unreadable:
        await last_claim(js, SEGMENTS, 2)
    assert str(unreadable.value) == (
        f"the record shoal.fence.2 at sequence {ack.seq} of stream {SEGMENTS} cannot be read: "
        "Expected `str`, got `int` - at `$.engine` (shoal did not write it: replace or "
        "remove it)"
    )


async def test_a_release_racing_a_renewal_leaves_the_lease_free(
    two: tuple[LeaseBucket, LeaseBucket], clients: Callable[[], Awaitable[Client]]
) -> None:
    """A renewal on its way when the lease is released (a handover) moves the revision, so
    the release fails on it; the renewal's end then gives the lease up too. Kept, it was
    renewed for ever, and no other engine could claim the partition (balancing stalled)."""
    from protocol.nats import Claims, ensure_streams

    a, b = two
    nc = await clients()
    await ensure_streams(nc.jetstream())
    claims = Claims(nc, a, engine_id="a", ttl=5, now=now)
    assert not isinstance(await claims.claim(7), Holder)
    renewed = anyio.Event()
    go_on = anyio.Event()
    real_renew = a.renew

    async def renew_then_wait(lease: Lease, ttl: int | None = None) -> Lease:
        got = await real_renew(lease, ttl)  # stored: the revision moved
        renewed.set()
        await go_on.wait()
        return got

    a.renew = renew_then_wait  # type: ignore[method-assign]
    lost: dict[int, str] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(claims._renew, 7, lost)
        await renewed.wait()
        await claims.release(7)  # fails on the moved revision: "expires by itself"
        go_on.set()
    assert lost == {}
    assert 7 not in claims._held and 7 not in claims.owned
    got = await b.claim(7, "b", 5)
    assert isinstance(got, Lease), got  # free at once, not in 5 s
