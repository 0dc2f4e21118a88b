"""actors' stored-forms codec: events, transitions and customers as the rows of the store.

The bytes are a data directory's file format: they are pinned here against the encodings
the engine has always written (msgpack of the Event, JSON of the Transition).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from actors import (
    Customer,
    SnapshotError,
    customer_of,
    event_of,
    load_segments,
    logged_event,
    outbox_entries,
    outbox_entry,
    snapshot_row,
    transition_of,
)
from actors._customer import SNAPSHOT_FORMAT
from protocol import (
    DAY,
    NEVER,
    Event,
    EventCause,
    TimeCause,
    Transition,
    from_instant,
    to_instant,
)
from store import LoggedEvent, OutboxEntry, Snapshot, StoreError

T0 = to_instant(datetime(2026, 3, 1, 9, tzinfo=UTC))
EVENT = Event(
    kind="track",
    customer_id="ann",
    name="Order Completed",
    properties={"amount": 12.5, "items": [1, 2]},
    traits={},
    at=T0,
    received=T0 + 3,
    message_id="m1",
)
ENTERED = Transition(
    customer_id="ann",
    segment="buyer",
    change="entered",
    at=from_instant(T0),
    cause=EventCause(message_id="m1"),
    version=1,
)


def test_an_event_is_logged_as_its_msgpack() -> None:
    entry = logged_event(EVENT)
    assert entry == LoggedEvent(
        customer_id="ann", message_id="m1", at=T0, body=msgspec.msgpack.encode(EVENT)
    )
    assert event_of(entry) == EVENT


def test_an_unreadable_event_is_a_store_error() -> None:
    entry = LoggedEvent(customer_id="ann", message_id="m1", at=0, body=b"\xc1", seq=7)
    with pytest.raises(StoreError, match="^event 7 of the log cannot be read: ") as e:
        event_of(entry)
    assert isinstance(e.value.__cause__, msgspec.DecodeError)


def test_a_transition_goes_to_the_outbox_as_its_published_json() -> None:
    entry = outbox_entry(ENTERED)
    assert entry == OutboxEntry(
        customer_id="ann",
        version=1,
        segment="buyer",
        at=T0,
        body=msgspec.json.encode(ENTERED),
    )
    assert entry.body == (
        b'{"customer_id":"ann","segment":"buyer","change":"entered",'
        b'"at":"2026-03-01T09:00:00Z","cause":{"kind":"event","message_id":"m1"},'
        b'"version":1,"true_since":"2026-03-01T09:00:00Z"}'
    )
    assert transition_of(entry) == ENTERED


def test_a_batch_of_transitions_as_outbox_entries() -> None:
    later = msgspec.structs.replace(
        ENTERED, change="exited", at=from_instant(T0 + DAY), cause=TimeCause(), version=2
    )
    batch = [ENTERED, later, msgspec.structs.replace(ENTERED, customer_id="bob")]
    assert outbox_entries(batch) == [outbox_entry(t) for t in batch]
    assert outbox_entries([]) == []
    # The epoch is an instant like any other.
    epoch = msgspec.structs.replace(ENTERED, at=from_instant(0))
    assert [e.at for e in outbox_entries([epoch, epoch])] == [0, 0]


def test_an_unreadable_transition_is_a_store_error() -> None:
    entry = OutboxEntry(customer_id="a", version=1, segment="s", at=0, body=b"{", seq=3)
    with pytest.raises(StoreError, match="^transition 3 of the outbox cannot be read: "):
        transition_of(entry)


def test_a_customer_snapshot_row_and_back() -> None:
    segments = load_segments()
    needs = segments.needs.fingerprint()
    c = Customer("ann")
    c.apply(EVENT, segments)
    row = snapshot_row(c, needs=needs, log_seq=42)
    assert row == Snapshot(
        customer_id="ann",
        format=SNAPSHOT_FORMAT,
        needs=needs,
        log_seq=42,
        deadline=c.deadline if c.deadline is not None else NEVER,
        body=c.snapshot(outcomes=True),  # what it keeps too: loaded, it evaluates less
    )
    back = customer_of(row, needs=needs)
    assert back is not None and back.snapshot() == c.snapshot()
    assert back.snapshot(outcomes=True) == row.body
    # Taken in another format, or for other needs: rebuilt from the log instead.
    assert (
        customer_of(msgspec.structs.replace(row, format=SNAPSHOT_FORMAT + 1), needs=needs) is None
    )
    assert customer_of(row, needs=needs + "x") is None
    with pytest.raises(SnapshotError):
        customer_of(msgspec.structs.replace(row, body=b"\x01"), needs=needs)


def test_a_customer_without_deadline_is_stored_as_never() -> None:
    c = Customer("nobody")
    assert c.deadline is None
    assert snapshot_row(c, needs="n", log_seq=0).deadline == NEVER == 1 << 62
