"""The engine's ports to the broker: where inbound events come from, where transitions go.

The engine (``actors``) sees the broker only through these two Protocols. ``protocol.nats``
implements them on NATS JetStream; ``protocol.memory`` implements them in memory, for tests
and for running an engine without a broker. One contract test suite holds both to the same
behaviour (``tests/protocol/test_ports_contract.py``).

Nothing here imports ``nats``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._errors import ProtocolError
from ._inbound import DEFAULT_MAX_EVENT_BYTES, decode_event
from ._types import Event, Transition


@dataclass(frozen=True, slots=True)
class Delivery:
    """One inbound event message as the broker delivered it."""

    subject: str
    data: bytes
    stream_sequence: int
    """Its position in the events stream: increasing, the unit acknowledgements count in."""
    received: int
    """When the broker stored it: microseconds since the epoch."""
    pending: int
    """How many messages the source had still to deliver after this one."""
    msg_id: str | None
    """The producer's message id (``Nats-Msg-Id``), when it set one."""
    import_id: str | None = None
    """The ``Shoal-Import`` header: the import this message claims to belong to (an
    imported event, or an import's marker). The engine believes it only for an import an
    operator opened (see the README's Import section)."""
    received_at: str | None = None
    """The ``Shoal-Received-At`` header as sent: an imported event's original receive
    instant (microseconds since the epoch, decimal)."""
    partition: int | None = None
    """The partition of ``SHOAL_EVENTS`` whose own consumer delivered it; None when the
    consumer reads several."""

    @property
    def default_message_id(self) -> str:
        """The message id of an event that has no ``messageId`` of its own: the producer's
        ``Nats-Msg-Id``, else one derived from its place in the stream (the same every time
        it is read, so a rebuild from the stream logs it under the same id)."""
        return self.msg_id or f"js:{self.stream_sequence}@{self.received}"

    def event(
        self, max_bytes: int = DEFAULT_MAX_EVENT_BYTES, *, received: int | None = None
    ) -> Event:
        """The event this delivery carries, validated as the engine validates it.

        Args:
            max_bytes: the largest payload accepted.
            received: its receive instant, when not the broker's stamp (an imported event's
                original one).

        Raises:
            InvalidEvent: it cannot be applied; its ``reason`` says why.
        """
        return decode_event(
            self.data,
            self.subject,
            received=self.received if received is None else received,
            default_message_id=self.default_message_id,
            max_bytes=max_bytes,
        )


@dataclass(frozen=True, slots=True)
class StreamState:
    """Where an engine's consumer stands in the events stream, as the broker sees it: what
    a start compares with what its store recorded."""

    stream: str
    """The events stream's name."""
    messages: int
    """How many messages the stream holds."""
    ack_floor: int | None
    """The stream position up to which the consumer acknowledged everything (with one
    consumer per partition: the furthest of theirs); None when the consumer does not exist
    (yet)."""
    published: int = 0
    """How many transitions the transitions stream (``SHOAL_SEGMENTS``) holds: published by
    an engine before."""
    partition_floors: Mapping[int, int] = field(default_factory=dict)
    """With one consumer per partition: the acknowledgement floor of each that exists."""
    partition_consumers: Mapping[int, str] = field(default_factory=dict)
    """With one consumer per partition: the consumer each floor of :attr:`partition_floors`
    is from (a claim's, ``<prefix>-<partition>-<claim>``, or one before claims)."""
    strays_floor: int | None = None
    """With one consumer per partition: the acknowledgement floor of the consumer of the
    messages stored without a partition, if it exists."""
    strays_consumer: str | None = None
    """That consumer's name."""


class PublishError(ProtocolError):
    """Transitions (or a rejection) could not be published, or the broker did not confirm
    them in time. Nothing is lost: publish the same ones again.

    ``confirmed`` holds the indices (into the transitions given) that the broker did
    confirm: publishing again may leave those out.
    """

    def __init__(self, message: str, *, confirmed: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self.confirmed = confirmed


class FencedOut(PublishError):
    """Another engine claimed these partitions since this one did: the broker refused their
    transitions, and this engine owns them no longer. Publishing them again is no use: their
    new owner makes them again from the events."""

    def __init__(self, partitions: Mapping[int, str], *, confirmed: frozenset[int]) -> None:
        first = min(partitions)
        super().__init__(
            f"fenced out of partition{'s' if len(partitions) > 1 else ''} "
            f"{', '.join(map(str, sorted(partitions)))}: another engine claimed "
            f"{'them' if len(partitions) > 1 else 'it'} (the broker said: "
            f"{partitions[first]})",
            confirmed=confirmed,
        )
        self.partitions = dict(partitions)


class EventSource(Protocol):
    """Inbound event messages, in stream order, in micro-batches.

    The broker hands deliveries into a bounded buffer; :meth:`take` hands them out in order.
    Once the engine has committed a batch it acknowledges it with :meth:`ack`: one
    acknowledgement covers every delivery up to a position. Whatever was not acknowledged is
    delivered again after :meth:`restart`, or to the next source of the same consumer.
    """

    @property
    def consumer(self) -> str:
        """The name of the durable consumer read: acknowledgements are kept under it."""
        ...

    @property
    def filter_subject(self) -> str:
        """The event subjects read: which customers the engine reading them owns."""
        ...

    @property
    def partitions(self) -> int:
        """How many partitions ``SHOAL_EVENTS`` splits customers into."""
        ...

    @property
    def pending_at_start(self) -> int:
        """Messages waiting for this consumer when it (re)started (its backlog)."""
        ...

    @property
    def buffered(self) -> int:
        """Deliveries received and not yet taken."""
        ...

    @property
    def received_through(self) -> int:
        """The broker's stamp of the latest delivery that reached this source (taken or
        buffered): every event still on its way is stamped no earlier."""
        ...

    @property
    def needs_restart(self) -> bool:
        """True once a delivery went missing or the connection was lost since (re)start:
        acknowledge what was taken, then call :meth:`restart`."""
        ...

    @property
    def backlog_cap(self) -> int | None:
        """None when caught up as far as the source knows. Else it is behind (the broker
        holds more for it, or the backlog counted at its (re)start is not all taken yet):
        no delivery still to come is stamped before this instant (0: unknown yet), so no
        deadline at or past it may fire."""
        ...

    def caught_up(self) -> None:
        """A whole idle period went by without a delivery: whatever was counted at
        (re)start has arrived, so the source is no longer behind."""
        ...

    async def start(self) -> None:
        """Start receiving (creating the durable consumer if needed)."""
        ...

    async def restart(self) -> None:
        """Start again just past what was acknowledged: the rest is delivered again."""
        ...

    async def stop(self) -> None:
        """Stop receiving; the consumer and its acknowledgements stay. Idempotent."""
        ...

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` buffered deliveries in order, without waiting (never one past a
        delivery that did not arrive)."""
        ...

    def oldest_buffered_received(self) -> int | None:
        """The receive instant of the oldest buffered delivery, if any."""
        ...

    async def wait(self) -> None:
        """Return once deliveries are buffered (or :attr:`needs_restart` may have turned)."""
        ...

    async def ack(self, through: int) -> None:
        """Acknowledge every delivery taken up to stream position ``through`` (one message).

        Call it only once they are all committed: a restart resumes past them.
        """
        ...

    async def fence(self, *, timeout: float = 2.0) -> bool:
        """Whether every event stored when this was called has reached this source (taken or
        buffered): the deadline barrier. Never raises; an unanswered question is no."""
        ...

    async def lag(self, *, timeout: float = 1.0) -> int | None:
        """Events stored for this consumer and not yet acknowledged; None if unknown."""
        ...

    async def stream_state(self) -> StreamState:
        """The stream's size and this consumer's acknowledgement floor (asked before
        :meth:`start`, which creates the consumer).

        Raises:
            BrokerError: the broker does not answer.
        """
        ...

    async def holds(self, partition: int, after: int, through: int) -> bool:
        """Whether the stream holds a message of ``partition`` stored after position
        ``after`` and up to ``through``: one a store that recorded ``after`` would lack, below
        a consumer's floor of ``through`` (a purge of the partition's oldest messages moves
        its consumer's floor past positions that hold none of them).

        Raises:
            BrokerError: the broker does not answer.
        """
        ...


class TransitionSink(Protocol):
    """Where committed transitions and rejections are published.

    :meth:`publish` returns only once the broker confirmed every transition given, so the
    engine learns what was confirmed by it returning; on :class:`PublishError` it publishes
    the same ones again, and the broker drops what it already holds (by message id).
    """

    async def start(self) -> None:
        """Get ready to publish."""
        ...

    async def close(self) -> None:
        """Stop publishing. Idempotent."""
        ...

    async def publish(self, transitions: Sequence[Transition]) -> None:
        """Publish ``transitions`` in order, each once (its message id is
        ``<customer>:<segment>:<version>``), and wait until all are confirmed.

        Raises:
            PublishError: not all were confirmed; publish them again.
        """
        ...

    async def publish_rejection(
        self,
        *,
        reason: str,
        subject: str,
        data: bytes,
        received: int,
        stream_sequence: int | None,
    ) -> None:
        """Publish the rejection of an inbound message, with its reason, and wait until it is
        confirmed.

        Raises:
            PublishError: it was not confirmed; publish it again.
        """
        ...

    async def publish_markers(self, markers: Sequence[tuple[str, bytes, str]]) -> None:
        """Publish control messages into the events stream, each a (stored subject, body,
        message id), and wait until all are confirmed (a repeat of a message id the broker
        holds is dropped).

        Raises:
            PublishError: not all were confirmed; publish them again.
        """
        ...
