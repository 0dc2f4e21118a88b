"""The engine end to end, on a real nats-server: events in, transitions out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from actors import EngineConfig
from protocol import (
    DEFAULT_PARTITIONS,
    SECOND,
    BrokerError,
    DefinitionCause,
    Event,
    EventCause,
    PublishError,
    TimeCause,
    Transition,
    customer_of_event_subject,
    event_subject,
    format_instant,
    from_instant,
    partition,
    stored_event_subject,
    to_instant,
)
from protocol.nats import Publisher, ensure_streams
from store import Store
from tests.helpers import (
    Collector,
    NatsServer,
    collect,
    engine_consumers,
    eventually,
    now,
    running_engine,
    segments,
    sleep_until,
    summary,
    track,
)

ACTIVE_IDLE = segments(
    """
[segments.active]
rule = "since_last('Visit') < '2s'"

[segments.idle]
rule = "since_last('Visit') >= '2s'"
"""
)


async def visit_with_engine_up(
    nats_server: NatsServer, client: Client, db: Path, seen: Collector
) -> int:
    """Run an engine just long enough for a visit of alice (message id a1) to enter `active`;
    return the visit's instant."""
    async with running_engine(nats_server.url, db, ACTIVE_IDLE):
        t0 = now()
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="a1"))
        await eventually(lambda: len(seen.msgs) == 1)
    return t0


async def test_events_and_time_produce_transitions(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE):
        t0 = now()
        await client.jetstream().publish("shoal.events.alice", track("alice", at=t0, mid="v1"))
        await eventually(lambda: len(seen.msgs) >= 3)
        await anyio.sleep(0.2)  # nothing more may come
    ts = seen.transitions()
    assert summary(ts) == [
        ("alice", "active", "entered", EventCause(message_id="v1"), 1),
        ("alice", "active", "exited", TimeCause(), 2),
        ("alice", "idle", "entered", TimeCause(), 3),
    ]
    # The time-based change is stamped with the computed instant, not when it was noticed.
    assert [to_instant(t.at) for t in ts] == [t0, t0 + 2 * SECOND, t0 + 2 * SECOND]
    assert [m.subject for m in seen.msgs] == [
        "shoal.segments.active.entered",
        "shoal.segments.active.exited",
        "shoal.segments.idle.entered",
    ]
    assert [m.headers and m.headers["Nats-Msg-Id"] for m in seen.msgs] == [
        "alice:active:1",
        "alice:active:2",
        "alice:idle:3",
    ]
    info = await client.jetstream().stream_info("SHOAL_SEGMENTS")
    assert info.state.messages == 3


async def test_payload_on_the_wire(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE):
        await client.publish(
            "shoal.events.alice",
            track("alice", at=1_795_000_000_123_456, mid="m-1"),
        )
        await eventually(lambda: len(seen.msgs) >= 1)
    assert json.loads(seen.msgs[0].data) == {
        "customer_id": "alice",
        "segment": "active",
        "change": "entered",
        "at": "2026-11-18T11:06:40.123456Z",
        "cause": {"kind": "event", "message_id": "m-1"},
        "version": 1,
        "true_since": "2026-11-18T11:06:40.123456Z",
    }


async def test_escaped_customer_ids(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    customer = "ann.lee@example.com 2"
    assert event_subject(customer) == "shoal.events.ann%2Elee@example%2Ecom%202"
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE):
        await client.publish(event_subject(customer), track(customer, mid="x"))
        await eventually(lambda: len(seen.msgs) >= 1)
    assert seen.transitions()[0].customer_id == customer
    assert seen.msgs[0].headers == {
        "Nats-Msg-Id": "ann%2Elee@example%2Ecom%202:active:1",
        # The customer's partition, as the broker computed it for its events.
        "Shoal-Partition": str(partition(customer, DEFAULT_PARTITIONS)),
    }


async def test_duplicate_message_ids_are_applied_once(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE) as engine:
        t0 = now()
        # Plain publishes: the broker keeps both, so the engine must drop the repeat.
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="same"))
        await eventually(lambda: engine.stats.events_applied == 1)
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="same"))
        await client.publish("shoal.events.bob", track("bob", at=t0, mid="same"))
        await eventually(lambda: engine.stats.events_applied + engine.stats.events_duplicate == 3)
        await eventually(lambda: len(seen.msgs) >= 2)
    assert engine.stats.events_applied == 2  # alice once, and bob: ids are per customer
    assert engine.stats.events_duplicate == 1
    by_event = [t for t in seen.transitions() if isinstance(t.cause, EventCause)]
    assert [(t.customer_id, t.segment, t.version) for t in by_event] == [
        ("alice", "active", 1),
        ("bob", "active", 1),
    ]
    async with await Store.open(tmp_path / "shoal.db") as log:
        assert await log.events.count() == 2


@pytest.mark.parametrize("use_snapshots", [True, False], ids=["snapshots", "log-only"])
async def test_restart_loses_nothing_and_fires_overdue_deadlines_at_their_instant(
    nats_server: NatsServer, client: Client, tmp_path: Path, use_snapshots: bool
) -> None:
    db = tmp_path / "shoal.db"
    seen = await collect(client, "shoal.segments.>")
    t0 = await visit_with_engine_up(nats_server, client, db, seen)

    # The engine is down: events keep arriving in the stream, one of them twice.
    for i in range(5):
        await client.publish("shoal.events.bob", track("bob", mid=f"b{i}"))
    await client.publish("shoal.events.bob", track("bob", mid="b0"))
    await client.flush()
    await sleep_until(t0 + 2 * SECOND + 300_000)  # alice's deadline passes while down

    config = EngineConfig(use_snapshots=use_snapshots)
    async with running_engine(nats_server.url, db, ACTIVE_IDLE, config=config) as engine:
        await eventually(
            lambda: len([t for t in seen.transitions() if t.customer_id == "bob"]) >= 3
        )
        # The clean stop snapshotted alice: no event is read back from the log for her.
        assert engine.stats.rebuilt_events == (0 if use_snapshots else 1)
        assert engine.stats.snapshots_loaded == (1 if use_snapshots else 0)
        assert engine.stats.events_applied == 5
        assert engine.stats.events_duplicate == 1

    alice = [t for t in seen.transitions() if t.customer_id == "alice"]
    assert summary(alice) == [
        ("alice", "active", "entered", EventCause(message_id="a1"), 1),
        ("alice", "active", "exited", TimeCause(), 2),
        ("alice", "idle", "entered", TimeCause(), 3),
    ]
    assert [to_instant(t.at) for t in alice] == [t0, t0 + 2 * SECOND, t0 + 2 * SECOND]
    bob = [t for t in seen.transitions() if t.customer_id == "bob"]
    assert [t.version for t in bob] == [1, 2, 3]
    assert bob[0].cause == EventCause(message_id="b0")
    # Nothing was published twice, not even to plain subscribers.
    ids = [m.headers["Nats-Msg-Id"] for m in seen.msgs if m.headers]
    assert len(ids) == len(set(ids)) == len(seen.msgs)
    async with await Store.open(db) as log:
        assert await log.events.count() == 6


async def test_deadline_never_fires_ahead_of_an_event_waiting_in_the_stream(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    seen = await collect(client, "shoal.segments.>")
    t0 = await visit_with_engine_up(nats_server, client, db, seen)
    # While down, a second visit arrives before the first visit's deadline...
    await anyio.sleep(1.0)
    t1 = now()
    await client.publish("shoal.events.alice", track("alice", at=t1, mid="a2"))
    await sleep_until(t0 + 2 * SECOND + 300_000)  # ...which then passes while down.
    async with running_engine(nats_server.url, db, ACTIVE_IDLE):
        await eventually(lambda: len(seen.msgs) >= 3)
        await anyio.sleep(0.2)
    ts = seen.transitions()
    # Alice never left `active` at t0 + 2s: the waiting visit kept her in.
    assert summary(ts) == [
        ("alice", "active", "entered", EventCause(message_id="a1"), 1),
        ("alice", "active", "exited", TimeCause(), 2),
        ("alice", "idle", "entered", TimeCause(), 3),
    ]
    assert [to_instant(t.at) for t in ts[1:]] == [t1 + 2 * SECOND, t1 + 2 * SECOND]


async def test_changed_definitions_apply_on_restart(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    seen = await collect(client, "shoal.segments.>")
    before = segments("[segments.visitor]\nrule = \"count('Visit') >= 1\"")
    after = segments(
        "[segments.regular]\nrule = \"count('Visit') >= 2\"\n"
        '[segments.member]\nrule = "count() >= 1"'
    )
    async with running_engine(nats_server.url, db, before):
        t0 = now()
        await client.publish("shoal.events.alice", track("alice", at=t0, mid="a1"))
        await eventually(lambda: len(seen.msgs) == 1)
    async with running_engine(nats_server.url, db, after):
        await eventually(lambda: len(seen.msgs) == 3)
    assert summary(seen.transitions()) == [
        ("alice", "visitor", "entered", EventCause(message_id="a1"), 1),
        ("alice", "member", "entered", DefinitionCause(), 2),
        ("alice", "visitor", "exited", DefinitionCause(), 3),
    ]


BIG = json.dumps(
    {"type": "track", "userId": "alice", "event": "Visit", "properties": {"note": "x" * 2000}}
)

BAD_INPUT = {
    "invalid JSON": (
        "shoal.events.alice",
        b'{"type": "track", "userId": "alice", ',
        "invalid JSON: Input data was truncated",
    ),
    "not UTF-8": (
        "shoal.events.alice",
        b"\xff\xfe{}",
        "invalid JSON: JSON is malformed: invalid character (byte 0)",
    ),
    "missing userId": (
        "shoal.events.alice",
        b'{"type": "track", "event": "Visit"}',
        "missing required field `userId`",
    ),
    "mismatched userId": (
        "shoal.events.alice",
        b'{"type": "track", "userId": "mallory", "event": "Visit"}',
        "userId 'mallory' does not match the customer 'alice' of subject 'shoal.events.alice'",
    ),
    "unknown type": (
        "shoal.events.alice",
        b'{"type": "page", "userId": "alice", "name": "Home"}',
        "unknown type 'page': expected 'track' or 'identify'",
    ),
    "missing event on track": (
        "shoal.events.alice",
        b'{"type": "track", "userId": "alice"}',
        "missing required field `event` (the event name) on a track event",
    ),
    "unparseable timestamp": (
        "shoal.events.alice",
        b'{"type": "track", "userId": "alice", "event": "Visit", "timestamp": "yesterday"}',
        "timestamp 'yesterday' is not an ISO-8601 date and time with a UTC offset "
        "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
    ),
    "payload over the size limit": (
        "shoal.events.alice",
        BIG.encode(),
        f"payload is {len(BIG)} bytes, over the limit of 1024 bytes",
    ),
}


async def test_subject_with_two_tokens_reaches_no_stream(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    # SHOAL_EVENTS takes one customer token only (shoal.events.*): a subject of more finds
    # no stream, so its producer gets no answer, and neither the engine nor shoal.rejected
    # ever sees it.
    rejected = await collect(client, "shoal.rejected")
    seen = await collect(client, "shoal.segments.>")
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE) as engine:
        js = client.jetstream()
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await js.publish(
                "shoal.events.alice.smith", track("alice.smith", mid="lost"), timeout=2
            )
        await client.publish("shoal.events.alice.smith", track("alice.smith", mid="lost"))
        await client.publish("shoal.events.bob", track("bob", mid="after"))
        await eventually(lambda: len(seen.msgs) == 1)
        assert (engine.stats.events_applied, engine.stats.events_rejected) == (1, 0)
    assert rejected.msgs == []
    info = await client.jetstream().stream_info("SHOAL_EVENTS")
    assert info.state.messages == 1


@pytest.mark.parametrize("kind", list(BAD_INPUT))
async def test_bad_input_is_rejected_with_its_reason_and_loses_nothing(
    kind: str, nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    subject, payload, reason = BAD_INPUT[kind]
    await _check_rejection(nats_server, client, tmp_path, subject, payload, lambda r: reason)


async def test_timestamp_too_far_ahead_is_rejected(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    stamp = format_instant(now() + 3600 * SECOND)
    payload = track("alice").replace(b'"event"', f'"timestamp": "{stamp}", "event"'.encode())

    def reason(rejection: Any) -> str:
        received = to_instant(rejection.received_at)
        whole, frac = divmod(to_instant(datetime.fromisoformat(stamp)) - received, SECOND)
        ahead = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
        return (
            f"timestamp {stamp!r} is {ahead} s ahead of the time the event was "
            f"received ({format_instant(received)}); at most 300 s ahead is allowed"
        )

    await _check_rejection(nats_server, client, tmp_path, "shoal.events.alice", payload, reason)


async def _check_rejection(
    nats_server: NatsServer,
    client: Client,
    tmp_path: Path,
    subject: str,
    payload: bytes,
    reason: Any,
) -> None:
    rejected = await collect(client, "shoal.rejected")
    seen = await collect(client, "shoal.segments.>")
    config = EngineConfig(max_event_bytes=1024)
    async with running_engine(
        nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE, config=config
    ) as engine:
        await client.publish("shoal.events.bob", track("bob", mid="before"))
        await client.publish(subject, payload)
        await client.publish("shoal.events.carol", track("carol", mid="after"))
        await eventually(lambda: len(rejected.msgs) == 1 and len(seen.msgs) == 2)
        assert engine.stats.events_rejected == 1
        assert engine.stats.events_applied == 2
        # The engine keeps going after it.
        await client.publish("shoal.events.dave", track("dave", mid="later"))
        await eventually(lambda: len(seen.msgs) == 3)
    (r,) = rejected.rejections()
    assert r.reason == reason(r)
    # The subject the stream stored it under, with the customer's partition.
    customer = customer_of_event_subject(subject)
    assert r.subject == stored_event_subject(customer, DEFAULT_PARTITIONS)
    try:
        assert r.payload == payload.decode("utf-8") and r.payload_base64 is None
    except UnicodeDecodeError:
        assert r.payload is None
        assert msgspec.json.decode(f'"{r.payload_base64}"'.encode(), type=bytes) == payload
    assert [t.customer_id for t in seen.transitions()] == ["bob", "carol", "dave"]
    info = await client.jetstream().stream_info("SHOAL_REJECTED")
    assert info.state.messages == 1
    # Acknowledged, so not redelivered: the consumer has nothing pending.
    consumers = await engine_consumers(client.jetstream())
    assert len(consumers) == DEFAULT_PARTITIONS + 1  # and that of unpartitioned subjects
    for consumer in consumers.values():
        assert consumer.num_pending == 0 and consumer.num_ack_pending == 0
        assert consumer.config.flow_control is True
        assert consumer.config.ack_policy == AckPolicy.ALL


async def test_deliveries_held_by_a_dead_engine_come_back_at_once(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    js = client.jetstream()
    await ensure_streams(js)
    for i in range(3):
        await client.publish("shoal.events.c0", track("c0", mid=f"m{i}"))
    # A previous engine took the deliveries and died without acknowledging any of them.
    dead = await nats.connect(nats_server.url)
    got: list[Any] = []

    async def hold(msg: Any) -> None:
        got.append(msg)

    p = partition("c0", DEFAULT_PARTITIONS)
    await dead.jetstream().subscribe(
        f"shoal.events.{p}.>",
        durable=f"shoal-engine-{p}",
        stream="SHOAL_EVENTS",
        manual_ack=True,
        cb=hold,
        config=ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=30.0),
    )
    await eventually(lambda: len(got) == 3)
    await dead.close()
    info = await js.consumer_info("SHOAL_EVENTS", f"shoal-engine-{p}")
    assert info.num_ack_pending == 3 and info.num_pending == 0

    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE) as engine:
        # Well before the 30 s ack_wait would have sent them again.
        await eventually(lambda: engine.stats.events_applied == 3, timeout=10)


async def test_a_consumer_in_use_by_another_engine_is_refused(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    async with running_engine(nats_server.url, tmp_path / "one.db", ACTIVE_IDLE):
        try:
            async with running_engine(nats_server.url, tmp_path / "two.db", ACTIVE_IDLE):
                pass
        except* BrokerError as group:
            errors += group.exceptions
    # The first of its partitions' consumers it found in use.
    assert len(errors) == 1
    assert re.fullmatch(
        r"consumer 'shoal-engine-([0-9]+|unpartitioned)' of stream SHOAL_EVENTS is in use by "
        r"another engine; stop it, or give this engine another consumer name \(--consumer\)",
        str(errors[0]),
    )


async def test_transitions_wait_in_the_outbox_until_the_broker_takes_them(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    js = client.jetstream()
    async with running_engine(nats_server.url, tmp_path / "shoal.db", ACTIVE_IDLE) as engine:
        await js.delete_stream("SHOAL_SEGMENTS")
        await client.publish("shoal.events.alice", track("alice", mid="a1"))
        await eventually(lambda: engine.stats.events_applied == 1)
        await anyio.sleep(0.5)
        assert engine.stats.transitions == 1
        assert engine.stats.transitions_published == 0  # refused: no stream listens
        await ensure_streams(js)
        await eventually(lambda: engine.stats.transitions_published == 1, timeout=15)
    info = await js.stream_info("SHOAL_SEGMENTS")
    assert info.state.messages == 1
    async with await Store.open(tmp_path / "shoal.db") as log:
        assert log.outbox.published_through == 1


async def test_publish_refused_without_a_stream_is_an_error(
    nats_server: NatsServer, client: Client
) -> None:
    publisher = Publisher(client, timeout=5.0)
    await publisher.start()
    t = Transition(
        customer_id="a",
        segment="active",
        change="entered",
        at=from_instant(0),
        cause=TimeCause(),
        version=1,
    )
    with pytest.raises(PublishError) as e:
        await publisher.publish_transitions([t, t])
    assert str(e.value) == (
        "the broker refused 2 of 2 transitions: no stream is listening on the subject "
        "(503 no responders)"
    )
    await publisher.close()


async def _delayed_proxy(target: int, delay: float) -> tuple[asyncio.Server, int]:
    """A TCP proxy to ``target`` that holds broker-to-engine bytes for ``delay`` seconds
    (in order), as a busy network or event loop would."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, hold: float) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                if hold:
                    loop.call_later(hold, w.write, data)  # one delay for all: order kept
                else:
                    w.write(data)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target)
        try:
            await asyncio.gather(pipe(cr, sw, 0), pipe(sr, cw, delay))
        finally:
            sw.close()
            cw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.slow
async def test_a_deadline_waits_for_an_event_the_broker_stored_before_it(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    """The second visit is stored 0.4 s after the first, but reaches the engine 0.7 s later:
    the first visit's deadline (1 s) must wait for it, not fire ahead of it."""
    server, port = await _delayed_proxy(nats_server.port, 0.7)
    seen = await collect(client, "shoal.segments.>")
    rule = segments("[segments.idle]\nrule = \"since_last('Visit') >= '1s'\"\n")
    try:
        async with running_engine(f"nats://127.0.0.1:{port}", tmp_path / "shoal.db", rule):
            await client.publish("shoal.events.alice", track("alice", mid="v1"))
            await anyio.sleep(0.4)
            await client.publish("shoal.events.alice", track("alice", mid="v2"))
            await eventually(lambda: len(seen.msgs) >= 1, 15)
            await anyio.sleep(0.5)
    finally:
        server.close()
    async with await Store.open(tmp_path / "shoal.db") as log:
        logged = [
            msgspec.msgpack.decode(e.body, type=Event)
            for chunk in [c async for c in log.events.read()]
            for e in chunk
        ]
    v1, v2 = (e.received for e in logged)
    assert v2 < v1 + SECOND, "the second visit came too late to test anything"
    assert summary(seen.transitions()) == [("alice", "idle", "entered", TimeCause(), 1)]
    assert to_instant(seen.transitions()[0].at) == v2 + SECOND
