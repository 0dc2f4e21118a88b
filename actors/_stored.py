"""The stored forms of events, transitions and customers: the one codec between what the
actors handle and the rows of :mod:`store`.

- an event is logged as the msgpack of its :class:`protocol.Event`;
- a transition goes to the outbox as the JSON of its :class:`protocol.Transition`, the exact
  payload that is published;
- a customer is snapshotted as :meth:`Customer.snapshot` (format
  :data:`SNAPSHOT_FORMAT`), with its next deadline (:data:`protocol.NEVER`: none).

These bytes are the file format of a data directory: they must not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from protocol import NEVER, Event, Transition, to_instant
from store import LoggedEvent, OutboxEntry, Snapshot, StoreError

from ._customer import SNAPSHOT_FORMAT, Customer

_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
_transition_encoder = msgspec.json.Encoder()
_transition_decoder = msgspec.json.Decoder(Transition)


class _Received(msgspec.Struct, array_like=True, gc=False):
    """The leading fields of a logged :class:`Event`, up to its receive instant; the rest
    of the array is ignored."""

    kind: msgspec.Raw
    customer_id: msgspec.Raw
    name: msgspec.Raw
    properties: msgspec.Raw
    traits: msgspec.Raw
    at: int
    received: int


_received_decoder = msgspec.msgpack.Decoder(_Received)


def received_of(entry: LoggedEvent) -> int:
    """The receive instant of the event an entry of the log holds, without decoding the
    rest of it.

    Raises:
        StoreError: its body is not an event this shoal can read.
    """
    try:
        return _received_decoder.decode(entry.body).received
    except msgspec.DecodeError as e:
        raise StoreError(f"event {entry.seq} of the log cannot be read: {e}") from e


def logged_event(event: Event, stream_seq: int | None = None) -> LoggedEvent:
    """The event log entry of a validated event (``stream_seq``: its position in the events
    stream, when it came from there)."""
    return LoggedEvent(
        customer_id=event.customer_id,
        message_id=event.message_id,
        at=event.at,
        body=_event_encoder.encode(event),
        stream_seq=stream_seq,
    )


def event_of(entry: LoggedEvent) -> Event:
    """The event an entry of the log holds.

    Raises:
        StoreError: its body is not an event this shoal can read.
    """
    try:
        return _event_decoder.decode(entry.body)
    except msgspec.DecodeError as e:
        raise StoreError(f"event {entry.seq} of the log cannot be read: {e}") from e


def outbox_entry(transition: Transition) -> OutboxEntry:
    """The outbox entry of a transition: its body is the payload to publish."""
    return _entry(transition, to_instant(transition.at))


def outbox_entries(transitions: Iterable[Transition]) -> list[OutboxEntry]:
    """The outbox entries of transitions, in order (as :func:`outbox_entry`, each instant
    parsed once: the transitions of a batch share few)."""
    instants: dict[datetime, int] = {}
    out: list[OutboxEntry] = []
    for t in transitions:
        at = instants.get(t.at)
        if at is None:
            at = instants[t.at] = to_instant(t.at)
        out.append(_entry(t, at))
    return out


def _entry(t: Transition, at: int) -> OutboxEntry:
    return OutboxEntry(
        customer_id=t.customer_id,
        version=t.version,
        segment=t.segment,
        at=at,
        body=_transition_encoder.encode(t),
    )


def transition_of(entry: OutboxEntry) -> Transition:
    """The transition an outbox entry holds.

    Raises:
        StoreError: its body is not a transition this shoal can read.
    """
    try:
        return _transition_decoder.decode(entry.body)
    except msgspec.DecodeError as e:
        raise StoreError(f"transition {entry.seq} of the outbox cannot be read: {e}") from e


def snapshot_row(customer: Customer, *, needs: str, log_seq: int) -> Snapshot:
    """The snapshot row of a customer's whole state.

    Args:
        customer: the actor, with every event up to ``log_seq`` that is its own folded in.
        needs: what its facts were kept for (``SegmentSet.needs.fingerprint()``).
        log_seq: the event log position it reflects.
    """
    deadline = customer.deadline
    return Snapshot(
        customer_id=customer.customer_id,
        format=SNAPSHOT_FORMAT,
        needs=needs,
        log_seq=log_seq,
        deadline=NEVER if deadline is None else deadline,
        # With its kept outcomes: loaded, it evaluates only what they do not settle.
        body=customer.snapshot(outcomes=True),
    )


def customer_of(row: Snapshot, *, needs: str) -> Customer | None:
    """The actor a snapshot row holds, or None if it was taken in another format or for
    other needs (the customer must then be rebuilt from the log).

    Raises:
        SnapshotError: its body cannot be read (rebuild the customer from the log too).
    """
    if row.format != SNAPSHOT_FORMAT or row.needs != needs:
        return None
    return Customer.from_snapshot(row.customer_id, row.body)
