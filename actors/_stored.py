"""The stored forms of events, transitions and customer snapshots: one codec for all.

The store keeps opaque bodies; what they hold is decided here, once: an event is the msgpack
of its :class:`protocol.Event`, an outbox entry the JSON of its :class:`protocol.Transition`
(the payload published), a snapshot the actor's own encoding (:meth:`Customer.snapshot`).
"""

from __future__ import annotations

import msgspec

from protocol import NEVER, Event, Transition, to_instant
from store import LoggedEvent, OutboxEntry, Snapshot

from ._customer import SNAPSHOT_FORMAT, Customer

_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
_transition_encoder = msgspec.json.Encoder()
_transition_decoder = msgspec.json.Decoder(Transition)


def logged_event(event: Event) -> LoggedEvent:
    """The log entry of an event."""
    return LoggedEvent(
        customer_id=event.customer_id,
        message_id=event.message_id,
        at=event.at,
        body=_event_encoder.encode(event),
    )


def event_of(entry: LoggedEvent) -> Event:
    """The event a log entry holds."""
    return _event_decoder.decode(entry.body)


def outbox_entry(t: Transition, at: int | None = None) -> OutboxEntry:
    """The outbox entry of a transition (``at``: its instant, if already parsed)."""
    return OutboxEntry(
        customer_id=t.customer_id,
        version=t.version,
        segment=t.segment,
        at=to_instant(t.at) if at is None else at,
        body=_transition_encoder.encode(t),
    )


def transition_of(entry: OutboxEntry) -> Transition:
    """The transition an outbox entry holds."""
    return _transition_decoder.decode(entry.body)


def usable(snap: Snapshot, needs: str) -> bool:
    """Whether a stored snapshot is of this version's format, taken for rules that keep the
    facts ``needs`` names: else the customer is rebuilt from the log."""
    return snap.format == SNAPSHOT_FORMAT and snap.needs == needs


def customer_of(snap: Snapshot) -> Customer:
    """The actor a usable snapshot holds.

    Raises:
        SnapshotError: the body cannot be decoded.
    """
    return Customer.from_snapshot(snap.customer_id, snap.body)


def snapshot_row(c: Customer, *, needs: str, log_seq: int) -> Snapshot:
    """The snapshot row of a customer, taken with the log at ``log_seq`` for rules that keep
    the facts ``needs`` names."""
    return Snapshot(
        customer_id=c.customer_id,
        format=SNAPSHOT_FORMAT,
        needs=needs,
        log_seq=log_seq,
        deadline=NEVER if c.deadline is None else c.deadline,
        body=c.snapshot(),
    )
