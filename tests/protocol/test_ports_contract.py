"""One contract for the engine's ports, held by both implementations: in memory
(``protocol.memory``) and on a real nats-server (``protocol.jetstream_ports``).

Each test drives a :class:`Ports` fixture, which gives the same verbs for both: publish an
event, make a source of a durable consumer, make a sink, read back what was published. The
eventsourcing project's recorder test case is the model: what is asserted here is what the
engine may rely on, whichever broker is behind it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client

from protocol import (
    DEFAULT_PARTITIONS,
    REJECTED_STREAM,
    SEGMENTS_STREAM,
    EventCause,
    EventSource,
    PublishError,
    Rejection,
    Transition,
    TransitionSink,
    escape_token,
    stored_event_subject,
)
from protocol.memory import MemoryBroker
from protocol.nats import jetstream_ports
from tests.helpers import NatsServer, eventually


class Ports(Protocol):
    """The verbs a contract test needs of one implementation."""

    async def publish(self, customer: str, msg_id: str | None = None) -> None: ...

    async def stored(self, subject: str) -> bool:
        """Publish an event on ``subject``; whether a stream took it."""
        ...

    async def source(self, consumer: str = "engine", max_in_flight: int = 5_000) -> EventSource: ...

    async def sink(self) -> TransitionSink: ...

    async def transitions(self) -> list[Transition]: ...

    async def rejections(self) -> list[Rejection]: ...


def _now() -> int:
    return time.time_ns() // 1000


def _body(customer: str) -> bytes:
    return msgspec.json.encode({"type": "track", "userId": customer, "event": "Visit"})


class MemoryPorts:
    def __init__(self) -> None:
        self.broker = MemoryBroker(_now)

    async def publish(self, customer: str, msg_id: str | None = None) -> None:
        self.broker.publish(f"shoal.events.{customer}", _body(customer), msg_id=msg_id)

    async def stored(self, subject: str) -> bool:
        try:
            self.broker.publish(subject, b"{}")
        except PublishError:
            return False
        return True

    async def source(self, consumer: str = "engine", max_in_flight: int = 5_000) -> EventSource:
        return self.broker.source(consumer=consumer, max_in_flight=max_in_flight)

    async def sink(self) -> TransitionSink:
        return self.broker.sink()

    async def transitions(self) -> list[Transition]:
        return list(self.broker.transitions)

    async def rejections(self) -> list[Rejection]:
        return list(self.broker.rejections)


class NatsPorts:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def publish(self, customer: str, msg_id: str | None = None) -> None:
        headers = None if msg_id is None else {"Nats-Msg-Id": msg_id}
        await self.js.publish(f"shoal.events.{customer}", _body(customer), headers=headers)

    async def stored(self, subject: str) -> bool:
        try:
            await self.js.publish(subject, b"{}")
        except nats.js.errors.NoStreamResponseError:
            return False
        return True

    async def source(self, consumer: str = "engine", max_in_flight: int = 5_000) -> EventSource:
        source, _ = await jetstream_ports(self.nc, consumer=consumer, max_in_flight=max_in_flight)
        return source

    async def sink(self) -> TransitionSink:
        _, sink = await jetstream_ports(self.nc)
        return sink

    async def _stream(self, stream: str) -> list[bytes]:
        info = await self.js.stream_info(stream)
        return [
            (await self.js.get_msg(stream, seq)).data or b""
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
            if info.state.messages
        ]

    async def transitions(self) -> list[Transition]:
        return [
            msgspec.json.decode(d, type=Transition) for d in await self._stream(SEGMENTS_STREAM)
        ]

    async def rejections(self) -> list[Rejection]:
        data = await self._stream(REJECTED_STREAM)
        return [msgspec.json.decode(d, type=Rejection) for d in data]


@pytest.fixture(params=["memory", "nats"])
async def ports(request: pytest.FixtureRequest) -> AsyncIterator[Ports]:
    if request.param == "memory":
        yield MemoryPorts()
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    nc = await nats.connect(server.url)
    try:
        p = NatsPorts(nc)
        await jetstream_ports(nc)  # the streams exist before anything is published
        yield p
    finally:
        await nc.close()


async def taken(source: EventSource, n: int) -> list[int]:
    """Wait for ``n`` deliveries and take them; their positions. (A source may hold one
    back until every earlier position has arrived: ``wait`` says when one can be taken.)"""
    out: list[int] = []
    with anyio.fail_after(10):
        while len(out) < n:
            await source.wait()
            out += [d.stream_sequence for d in source.take(n - len(out))]
    return out


async def test_ack_up_to_a_position_and_redelivery_past_the_ack_floor(ports: Ports) -> None:
    for i in range(5):
        await ports.publish(f"c{i}", f"m{i}")
    source = await ports.source()
    await source.start()
    assert source.pending_at_start == 5
    positions = await taken(source, 5)
    assert positions == sorted(positions)
    await source.ack(positions[2])
    await eventually_lag(source, 2)

    # A restart delivers again everything past the acknowledgement floor, at once.
    await source.restart()
    assert source.pending_at_start == 2
    assert await taken(source, 2) == positions[3:]
    await source.stop()

    # So does the next source of the same consumer (another engine, after this one).
    again = await ports.source()
    await again.start()
    assert again.pending_at_start == 2
    assert await taken(again, 2) == positions[3:]
    await again.ack(positions[4])
    await eventually_lag(again, 0)
    await again.stop()

    # Another consumer has a floor of its own.
    other = await ports.source("other")
    await other.start()
    assert other.pending_at_start == 5
    await other.stop()


async def eventually_lag(source: EventSource, lag: int) -> None:
    with anyio.fail_after(10):
        while await source.lag() != lag:
            await anyio.sleep(0.02)


async def test_duplicate_message_ids_are_delivered_once(ports: Ports) -> None:
    await ports.publish("ann", "same")
    await ports.publish("ann", "same")
    await ports.publish("ann", "other")
    await ports.publish("ann")  # no id: never a duplicate
    await ports.publish("ann")
    source = await ports.source()
    await source.start()
    await eventually(lambda: source.buffered == 4)
    got = source.take(10)
    assert [d.msg_id for d in got] == ["same", "other", None, None]
    assert [d.pending for d in got] == [3, 2, 1, 0]
    await source.stop()


def _transition(customer: str, version: int) -> Transition:
    return Transition(
        customer_id=customer,
        segment="active",
        change="entered" if version % 2 else "exited",
        at=datetime(2026, 1, 1, tzinfo=UTC),
        cause=EventCause(message_id=f"{customer}-{version}"),
        version=version,
    )


async def test_transitions_are_confirmed_in_order_and_a_repeat_is_dropped(ports: Ports) -> None:
    sink = await ports.sink()
    await sink.start()
    first = [_transition("ann", v) for v in (1, 2, 3)] + [_transition("bob", 1)]
    await sink.publish(first)
    # Published again (as after a failure whose confirmation was lost), plus one more.
    await sink.publish([*first[2:], _transition("bob", 2)])
    assert await ports.transitions() == [*first, _transition("bob", 2)]

    await sink.publish_rejection(
        reason="not JSON", subject="shoal.events.ann", data=b"\xff", received=1, stream_sequence=7
    )
    await sink.publish_rejection(
        reason="not JSON", subject="shoal.events.ann", data=b"\xff", received=1, stream_sequence=7
    )
    rejected = await ports.rejections()
    assert [(r.reason, r.stream_sequence, r.payload_base64) for r in rejected] == [
        ("not JSON", 7, "/w==")
    ]
    await sink.close()


async def test_the_deadline_barrier(ports: Ports) -> None:
    source = await ports.source(max_in_flight=2)
    assert not await source.fence()  # not receiving yet: no promise
    await source.start()
    assert await source.fence()  # nothing stored
    for i in range(4):
        await ports.publish("c0", f"m{i}")
    # At most two are delivered (a partitioned source splits the bound between its
    # partitions); the rest are stored and cannot be, until those are acknowledged.
    await eventually(lambda: source.buffered > 0)
    assert source.buffered <= 2
    assert not await source.fence()
    oldest = source.oldest_buffered_received()
    assert oldest is not None and oldest > 0
    got = 0
    while got + source.buffered < 4:
        batch = source.take(source.buffered)
        got += len(batch)
        await source.ack(batch[-1].stream_sequence)
        await eventually(lambda: source.buffered > 0)
    # What is left is delivered (buffered, not taken): it has reached the source.
    assert await source.fence()
    # Every event on its way is stamped no earlier than this bound; with a consumer per
    # partition it is the earliest of theirs (one that received nothing has none yet).
    last = source.take(4)[-1]
    assert source.received_through <= last.received
    await source.stop()


async def test_events_are_stored_under_their_partition(ports: Ports) -> None:
    customers = ["ann", "a.b c", "café", "%"]
    for c in customers:
        await ports.publish(escape_token(c))
    # No stream takes a subject of several tokens, nor one with a partition already.
    assert not await ports.stored("shoal.events.ann.lee")
    assert not await ports.stored(stored_event_subject("ann", DEFAULT_PARTITIONS))
    # The literal wildcard is taken, and stored as it is (the engine rejects it).
    assert await ports.stored("shoal.events.*")
    source = await ports.source()
    await source.start()
    await eventually(lambda: source.buffered >= len(customers) + 1)
    assert [d.subject for d in source.take(10)] == [
        *(stored_event_subject(c, DEFAULT_PARTITIONS) for c in customers),
        "shoal.events.*",
    ]
    await source.stop()


async def test_the_lag_counts_stored_and_unacknowledged(ports: Ports) -> None:
    source = await ports.source()
    await source.start()
    await eventually_lag(source, 0)
    for i in range(3):
        await ports.publish(f"c{i}", f"m{i}")
    await eventually_lag(source, 3)
    positions = await taken(source, 3)
    await eventually_lag(source, 3)  # delivered, not yet acknowledged
    await source.ack(positions[0])
    await eventually_lag(source, 2)
    await source.ack(positions[-1])
    await eventually_lag(source, 0)
    assert source.consumer == "engine"
    assert source.filter_subject == "shoal.events.>"
    await source.stop()


async def test_the_stream_state_before_and_after_acknowledgements(ports: Ports) -> None:
    for i in range(3):
        await ports.publish(f"c{i}")
    source = await ports.source()
    state = await source.stream_state()
    assert (state.stream, state.messages, state.ack_floor, state.published) == (
        "SHOAL_EVENTS",
        3,
        None,  # no consumer yet
        0,
    )
    await source.start()
    positions = await taken(source, 3)
    assert not (await source.stream_state()).ack_floor  # nothing acknowledged yet
    await source.ack(positions[1])
    await eventually_floor(source, positions[1])
    sink = await ports.sink()
    await sink.start()
    await sink.publish([_transition("c0", 1)])
    assert (await source.stream_state()).published == 1
    await sink.close()
    await source.stop()
    assert (await source.stream_state()).ack_floor == positions[1]  # the consumer stays


async def eventually_floor(source: EventSource, floor: int) -> None:
    with anyio.fail_after(10):
        while (await source.stream_state()).ack_floor != floor:
            await anyio.sleep(0.02)
