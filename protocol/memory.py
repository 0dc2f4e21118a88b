"""The engine's ports in memory: an events stream, durable consumers and the published
transitions, with no broker, for tests and for running an engine in one process.

It keeps the contract of the NATS implementation (``tests/protocol/test_ports_contract.py``
holds both to it): events get increasing positions and non-decreasing receive stamps; a
message id already stored within the duplicate window is dropped; a durable consumer keeps
an acknowledgement floor, and whatever is past it is delivered again after a restart or to
the next source of the same name; the sink keeps transitions in publish order and drops a
repeat by message id. Events are stored as ``SHOAL_EVENTS`` stores them: published on
``shoal.events.<customer>``, stored as ``shoal.events.<partition>.<customer>``. Nothing here
imports ``nats``.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from ._errors import BrokerError
from ._partitions import DEFAULT_PARTITIONS
from ._ports import Delivery, PublishError, StreamState
from ._subjects import (
    EVENTS_PREFIX,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    is_control_subject,
    token_partition,
)
from ._time import MINUTE
from ._types import (
    NATS_MAX_PAYLOAD,
    REJECTION_HEADROOM,
    Rejection,
    Transition,
    encode_rejection,
)

__all__ = ("MemoryBroker", "MemorySink", "MemorySource")

_DUPLICATE_WINDOW = 2 * MINUTE
"""As JetStream's default: a message id seen this recently is a duplicate."""


@dataclass(frozen=True, slots=True)
class _Stored:
    seq: int
    subject: str
    data: bytes
    msg_id: str | None
    received: int


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one token or more)."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


class MemoryBroker:
    """An events stream, the acknowledgement floors of its durable consumers, and what the
    sinks published.

    Args:
        now: the broker's clock (microseconds since the epoch), which stamps each event as
            received; give the engine's virtual clock's ``now`` to test with time as input.
        partitions: how many partitions events are stored in, as ``SHOAL_EVENTS``'s
            subject transform splits them.
    """

    def __init__(self, now: Callable[[], int], *, partitions: int = DEFAULT_PARTITIONS) -> None:
        if partitions < 1:
            raise ValueError(f"the number of partitions must be positive, not {partitions}")
        self._now = now
        self.partitions = partitions
        """How many partitions events are stored in."""
        self._events: list[_Stored] = []
        self._seqs: list[int] = []
        self._ids: dict[str, _Stored] = {}
        self._floors: dict[str, int] = {}
        self._sources: list[MemorySource] = []
        self._last_stamp = 0
        self.transitions: list[Transition] = []
        """Transitions published, in order, each once."""
        self.rejections: list[Rejection] = []
        """Rejections published, in order, each once."""
        self._published: set[str] = set()
        self._changed = anyio.Event()

    def _stored_subject(self, subject: str) -> str:
        """The subject ``SHOAL_EVENTS`` would store a message published on ``subject`` under."""
        if subject.startswith(EVENTS_PREFIX):
            token = subject[len(EVENTS_PREFIX) :]
            if token and "." not in token:
                # As nats-server does: the literal wildcards match the stream's subject but
                # not the transform's source, so they are stored as they are.
                if token in ("*", ">"):
                    return subject
                return f"{EVENTS_PREFIX}{token_partition(token, self.partitions)}.{token}"
            if is_control_subject(subject):
                return subject  # beyond the transform's one token: stored as published
        raise PublishError(
            f"no stream takes subject {subject!r}: events are published on "
            f"{EVENTS_PREFIX}<customer>, one customer token (no responders)"
        )

    def publish(self, subject: str, data: bytes, *, msg_id: str | None = None) -> int | None:
        """Store an event published on ``subject`` (under its stored subject); return its
        position, or None if its message id is a duplicate.

        Raises:
            PublishError: no stream takes ``subject`` (several tokens after
                ``shoal.events.``, say), as a broker with no stream for it would answer.
        """
        subject = self._stored_subject(subject)
        now = max(self._now(), self._last_stamp)  # stamps never go back
        if msg_id is not None:
            seen = self._ids.get(msg_id)
            if seen is not None and now - seen.received < _DUPLICATE_WINDOW:
                return None
        seq = len(self._events) + 1
        stored = _Stored(seq, subject, data, msg_id, now)
        self._events.append(stored)
        self._seqs.append(seq)
        self._last_stamp = now
        if msg_id is not None:
            self._ids[msg_id] = stored
        for source in self._sources:
            source._fill()
        return seq

    def source(
        self,
        *,
        consumer: str = "shoal-engine",
        filter_subject: str = EVENTS_WILDCARD,
        max_in_flight: int = 20_000,
    ) -> MemorySource:
        """A source reading the durable ``consumer`` of ``filter_subject``."""
        return MemorySource(self, consumer, filter_subject, max_in_flight)

    def sink(self) -> MemorySink:
        """A sink publishing into :attr:`transitions` and :attr:`rejections`."""
        return MemorySink(self)

    def ack_floor(self, consumer: str) -> int:
        """The position up to which ``consumer`` acknowledged everything."""
        return self._floors.get(consumer, 0)

    async def wait_for_transitions(self, n: int) -> list[Transition]:
        """Wait until at least ``n`` transitions were published; return them all."""
        while len(self.transitions) < n:
            await self._changed.wait()
        return self.transitions

    def _events_after(self, seq: int) -> list[_Stored]:
        return self._events[bisect.bisect_right(self._seqs, seq) :]

    def _record(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            if t.msg_id not in self._published:
                self._published.add(t.msg_id)
                self.transitions.append(t)
        self._changed.set()
        self._changed = anyio.Event()

    def _reject(self, rejection: Rejection) -> None:
        msg_id = rejection.msg_id
        if msg_id is None or msg_id not in self._published:
            if msg_id is not None:
                self._published.add(msg_id)
            self.rejections.append(rejection)


class MemorySource:
    """A durable consumer of a :class:`MemoryBroker`'s events: the engine's event source.

    Events are delivered into a buffer as they are stored, at most ``max_in_flight``
    delivered and not yet acknowledged.
    """

    def __init__(
        self, broker: MemoryBroker, consumer: str, filter_subject: str, max_in_flight: int
    ) -> None:
        self._broker = broker
        self._consumer = consumer
        self._filter = filter_subject
        self._max_in_flight = max_in_flight
        self._buffer: deque[Delivery] = deque()
        self._ready = anyio.Event()
        self._started = False
        self._delivered_through = 0  # the position of the latest delivery
        self._taken_through = 0
        self._in_flight = 0  # delivered (buffered or taken) and not acknowledged
        self._last_stamp = 0
        self.pending_at_start = 0
        self._catch_up = 0
        self._backlog_cap: int | None = None

    @property
    def consumer(self) -> str:
        return self._consumer

    @property
    def filter_subject(self) -> str:
        return self._filter

    @property
    def partitions(self) -> int:
        return self._broker.partitions

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def received_through(self) -> int:
        return self._last_stamp

    @property
    def needs_restart(self) -> bool:
        return False  # nothing is lost on the way in memory

    async def start(self) -> None:
        """Start receiving just past the consumer's acknowledgement floor.

        Raises:
            BrokerError: another source of the same consumer is receiving.
        """
        broker = self._broker
        if any(s._consumer == self._consumer for s in broker._sources if s is not self):
            raise BrokerError(f"consumer {self._consumer!r} is in use by another engine")
        self._open()
        broker._sources.append(self)

    async def restart(self) -> None:
        self._open()

    async def stop(self) -> None:
        if self in self._broker._sources:
            self._broker._sources.remove(self)
        self._started = False
        self._buffer.clear()

    def _open(self) -> None:
        floor = self._broker.ack_floor(self._consumer)
        self._buffer.clear()
        self._delivered_through = self._taken_through = floor
        self._in_flight = 0
        self.pending_at_start = sum(
            1 for e in self._broker._events_after(floor) if _matches(self._filter, e.subject)
        )
        self._catch_up = self.pending_at_start
        self._backlog_cap = 0 if self.pending_at_start else None
        self._started = True
        self._fill()

    def _fill(self) -> None:
        """Deliver what is stored past the latest delivery, within ``max_in_flight``."""
        if not self._started or self._in_flight >= self._max_in_flight:
            return
        mine = [
            e
            for e in self._broker._events_after(self._delivered_through)
            if _matches(self._filter, e.subject)
        ]
        room = self._max_in_flight - self._in_flight
        for i, e in enumerate(mine[:room]):
            self._buffer.append(
                Delivery(
                    subject=e.subject,
                    data=e.data,
                    stream_sequence=e.seq,
                    received=e.received,
                    pending=len(mine) - i - 1,
                    msg_id=e.msg_id,
                )
            )
            self._delivered_through = e.seq
            self._last_stamp = max(self._last_stamp, e.received)
            self._in_flight += 1
        if self._buffer:
            self._ready.set()

    def take(self, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        buf = self._buffer
        while buf and len(out) < limit:
            out.append(buf.popleft())
        if out:
            last = out[-1]
            self._taken_through = last.stream_sequence
            self._catch_up -= len(out)
            self._backlog_cap = last.received if last.pending or self._catch_up > 0 else None
        if not buf:
            self._ready = anyio.Event()
        return out

    @property
    def backlog_cap(self) -> int | None:
        return self._backlog_cap

    def caught_up(self) -> None:
        self._catch_up = 0
        self._backlog_cap = None

    def oldest_buffered_received(self) -> int | None:
        return self._buffer[0].received if self._buffer else None

    async def wait(self) -> None:
        await self._ready.wait()

    async def ack(self, through: int) -> None:
        through = min(through, self._taken_through)
        floors = self._broker._floors
        floor = floors.get(self._consumer, 0)
        if through <= floor:
            return
        acked = sum(
            1
            for e in self._broker._events_after(floor)
            if e.seq <= through and _matches(self._filter, e.subject)
        )
        floors[self._consumer] = through
        self._in_flight -= acked
        self._fill()

    async def fence(self, *, timeout: float = 2.0) -> bool:
        if not self._started:
            return False
        return not any(
            _matches(self._filter, e.subject)
            for e in self._broker._events_after(self._delivered_through)
        )

    async def lag(self, *, timeout: float = 1.0) -> int | None:
        floor = self._broker.ack_floor(self._consumer)
        return sum(
            1 for e in self._broker._events_after(floor) if _matches(self._filter, e.subject)
        )

    async def holds(self, partition: int, after: int, through: int) -> bool:
        prefix = f"{EVENTS_PREFIX}{partition}."
        return any(
            e.subject.startswith(prefix)
            for e in self._broker._events_after(after)
            if e.seq <= through
        )

    async def stream_state(self) -> StreamState:
        # A consumer that never acknowledged anything has nothing a store could be behind.
        return StreamState(
            stream=EVENTS_STREAM,
            messages=len(self._broker._events),
            ack_floor=self._broker._floors.get(self._consumer),
            published=len(self._broker.transitions),
        )


class MemorySink:
    """Publishes into a :class:`MemoryBroker`: the engine's transition sink.

    :meth:`fail_next` makes the next publishes fail, as a broker that does not confirm.
    A rejection is cut to ``max_payload`` bytes as the NATS sink cuts it to the broker's.
    """

    def __init__(self, broker: MemoryBroker, *, max_payload: int = NATS_MAX_PAYLOAD) -> None:
        self._broker = broker
        self._failures = 0
        self._max_payload = max_payload

    def fail_next(self, n: int = 1) -> None:
        """Make the next ``n`` publishes (transitions or rejections) raise PublishError."""
        self._failures = n

    def _maybe_fail(self, what: str) -> None:
        if self._failures:
            self._failures -= 1
            raise PublishError(f"the broker did not confirm {what} (fault injected)")

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, transitions: Sequence[Transition]) -> None:
        if not transitions:
            return
        self._maybe_fail(f"{len(transitions)} transitions")
        self._broker._record(transitions)

    async def publish_markers(self, markers: Sequence[tuple[str, bytes, str]]) -> None:
        if not markers:
            return
        self._maybe_fail(f"{len(markers)} markers")
        for subject, body, msg_id in markers:
            self._broker.publish(subject, body, msg_id=msg_id)

    async def publish_rejection(
        self,
        *,
        reason: str,
        subject: str,
        data: bytes,
        received: int,
        stream_sequence: int | None,
    ) -> None:
        self._maybe_fail("a rejection")
        rejection, _ = encode_rejection(
            reason=reason,
            subject=subject,
            data=data,
            received=received,
            stream_sequence=stream_sequence,
            max_bytes=self._max_payload - REJECTION_HEADROOM,
        )
        self._broker._reject(rejection)
