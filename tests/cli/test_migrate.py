"""``shoal migrate``: its plan (what the new stream holds for each old message, and where the
engine's consumers start), and the imports left open."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from protocol import (
    DefinitionsMarker,
    SubjectError,
    decode_marker,
    definitions_marker_subject,
    encode_marker,
    import_marker_subject,
    stored_event_subject,
)
from protocol.nats._migrate import OldMessage, Outgoing, Repartitioner, Switch, plan
from scripts._migrate_cmd import open_imports, repartitioned_imports


def old(seq: int, subject: str, **more: str | None) -> OldMessage:
    return OldMessage(
        seq=seq,
        subject=subject,
        data=b"{}",
        received=1_000 + seq,
        msg_id=more.get("msg_id"),
        import_id=more.get("import_id"),
        received_at=more.get("received_at"),
    )


MESSAGES = [
    old(1, "shoal.events.ann"),
    old(2, "shoal.events.bob", msg_id="p-1"),
    old(3, "shoal.imports.imp.begin", import_id="imp"),
    old(4, "shoal.events.ann", msg_id="import:x", import_id="imp", received_at="7"),
    old(5, "shoal.imports.imp.end", import_id="imp"),
    old(6, "shoal.events.a.b"),  # several tokens: never an event
    old(7, "shoal.events.cy"),
]


def test_each_old_message_in_order_framed_by_the_migration_import() -> None:
    made = plan(MESSAGES, migration_id="mig", partitions=3, committed=5)
    subjects = [m.subject for m in made.messages]
    begin = [import_marker_subject("mig", "begin", p) for p in range(3)]
    end = [import_marker_subject("mig", "end", p) for p in range(3)]
    assert subjects == [
        *begin,
        stored_event_subject("ann", 3),
        stored_event_subject("bob", 3),
        *(import_marker_subject("imp", "begin", p) for p in range(3)),
        stored_event_subject("ann", 3),
        *(import_marker_subject("imp", "end", p) for p in range(3)),
        stored_event_subject("cy", 3),
        *end,
    ]
    # Through the old position 5: the begin markers, 2 events, 3 + 3 markers, 1 event.
    assert made.through == 3 + 2 + 3 + 1 + 3
    assert (made.events, made.markers, made.dropped, made.rejected) == (4, 2, [6], [])


def test_an_event_keeps_its_log_id_and_receive_instant() -> None:
    made = plan(MESSAGES, migration_id="mig", partitions=3, committed=5)
    live, with_id, imported = made.messages[3], made.messages[4], made.messages[8]
    assert live.headers == {
        "Nats-Msg-Id": "js:1@1001",
        "Shoal-Import": "mig",
        "Shoal-Received-At": "1001",
    }
    assert with_id.headers["Nats-Msg-Id"] == "p-1"
    # Imported before: its own import and original instant.
    assert imported.headers == {
        "Nats-Msg-Id": "import:x",
        "Shoal-Import": "imp",
        "Shoal-Received-At": "7",
    }
    assert made.messages[0].headers == {"Shoal-Import": "mig"}


def test_nothing_committed_starts_after_the_begin_markers_and_rejected_are_left_out() -> None:
    assert plan(MESSAGES, migration_id="mig", partitions=2, committed=0).through == 2
    made = plan(MESSAGES, migration_id="mig", partitions=2, committed=2, rejected={2, 7})
    # 2 was committed and rejected: left out; 7 the old engine never read: kept.
    assert made.rejected == [2]
    assert made.through == 2 + 1
    assert made.messages[-3].subject == stored_event_subject("cy", 2)


def test_a_bad_migration_id_is_refused() -> None:
    with pytest.raises(SubjectError):
        plan(MESSAGES, migration_id="a.b", partitions=2, committed=0)


def test_open_imports_are_open_in_every_partition_with_the_migration() -> None:
    """An import the old engine had open (keyed by its id alone) is open in every partition
    once migrated, from where it began; the migration's own too, from the log's end."""
    assert open_imports({"imp": 7}, "mig", 40, 2) == {
        "imp@0": 7,
        "imp@1": 7,
        "mig@0": 40,
        "mig@1": 40,
    }
    assert open_imports({}, "mig", 0, 1) == {"mig@0": 0}


# Re-partitioning a partitioned stream ---------------------------------------------------


def marker(seq: int, q: int, version: int, through: int) -> OldMessage:
    body = DefinitionsMarker(
        version=version, fingerprint="f", applied_at=datetime(2026, 1, 1, tzinfo=UTC),
        applied_through=through,
    )  # fmt: skip
    return OldMessage(
        seq=seq,
        subject=definitions_marker_subject(q, version),
        data=encode_marker(body),
        received=1_000 + seq,
        msg_id=f"shoal-definitions:{version}:{q}",
        import_id=None,
        received_at=None,
    )


def repartitioned(
    messages: list[OldMessage], committed: dict[int, int], partitions: int = 3, **more: Any
) -> tuple[Repartitioner, list[Outgoing]]:
    r = Repartitioner(
        migration_id="mig", partitions=partitions, old_partitions=2, committed=committed, **more
    )
    # Two pieces, as the dump gives them; a pass may ask for some only.
    pieces = [messages[: len(messages) // 2], messages[len(messages) // 2 :]]
    out = list(
        r.messages(lambda only: [p for i, p in enumerate(pieces) if only is None or i in only])
    )
    return r, out


def new_partition(subject: str) -> int:
    return int(subject.split(".")[2])


def test_committed_messages_come_first_split_at_each_definitions_switch() -> None:
    """Old partition 1 lagged at the switch to version 2: its event 4 was applied under
    version 2, after partition 0's event 3 under version 1. The new stream holds 1, 2, 3
    (applied before the switch), the switch's markers, 4 and 7 (committed after it), then
    8 (never read), each customer's events in their order."""
    messages = [
        old(1, "shoal.events.0.ann"),
        old(2, "shoal.events.1.bob", msg_id="b-1"),
        old(3, "shoal.events.0.ann"),
        old(4, "shoal.events.1.bob"),
        marker(5, 0, 2, 3),
        marker(6, 1, 2, 2),
        old(7, "shoal.events.0.cy"),
        old(8, "shoal.events.1.bob"),
        old(9, "shoal.events.*"),  # stored without a partition: the engine rejects it
    ]
    r, out = repartitioned(messages, {0: 7, 1: 4})
    assert [m.old_seq for m in out] == [0, 0, 0, 1, 2, 3, 0, 0, 0, 4, 7, 8, 0, 0, 0]
    assert out[3].subject == stored_event_subject("ann", 3)
    assert out[4].headers == {
        "Nats-Msg-Id": "b-1", "Shoal-Import": "mig", "Shoal-Received-At": "1002",
    }  # fmt: skip
    assert (r.through, r.events, r.unread, r.dropped, r.markers) == (11, 6, 1, [9], 0)
    # Version 2's markers, one per new partition: its last position applied before.
    defs = out[6:9]
    assert [m.subject for m in defs] == [definitions_marker_subject(p, 2) for p in range(3)]
    for p, m in enumerate(defs):
        before = [i + 1 for i, o in enumerate(out[:6]) if new_partition(o.subject) == p]
        assert decode_marker(m.data).applied_through == max(before) == r.definitions[2][p]
        assert m.headers == {"Nats-Msg-Id": f"shoal-definitions:2:{p}"}


def test_the_stores_record_stands_for_markers_never_published() -> None:
    switch = Switch(
        version=3, fingerprint="g", applied_at=datetime(2026, 2, 1, tzinfo=UTC),
        applied_through={0: 1},
    )  # fmt: skip
    messages = [old(1, "shoal.events.0.ann"), old(2, "shoal.events.0.ann")]
    r, out = repartitioned(messages, {0: 2, 1: 0}, partitions=2, switch=switch)
    assert [m.old_seq for m in out] == [0, 0, 1, 0, 0, 2, 0, 0]
    assert [decode_marker(m.data).version for m in out[3:5]] == [3, 3]
    assert r.through == 6


def test_an_import_has_its_markers_in_every_new_partition_around_its_events() -> None:
    """Import imp began in both old partitions; old partition 1 had read neither its event
    nor its end: the begins go where the first began, the ends where the last ended (after
    what was committed), and its events between."""
    messages = [
        old(1, import_marker_subject("imp", "begin", 0), import_id="imp"),
        old(2, import_marker_subject("imp", "begin", 1), import_id="imp"),
        old(3, "shoal.events.0.ann", import_id="imp", received_at="5"),
        old(4, import_marker_subject("imp", "end", 0), import_id="imp"),
        old(5, "shoal.events.1.bob", import_id="imp", received_at="6"),
        old(6, import_marker_subject("imp", "end", 1), import_id="imp"),
    ]
    r, out = repartitioned(messages, {0: 4, 1: 2})
    subjects = [m.subject for m in out]
    assert subjects == [
        *(import_marker_subject("mig", "begin", p) for p in range(3)),
        *(import_marker_subject("imp", "begin", p) for p in range(3)),
        stored_event_subject("ann", 3),
        stored_event_subject("bob", 3),
        *(import_marker_subject("imp", "end", p) for p in range(3)),
        *(import_marker_subject("mig", "end", p) for p in range(3)),
    ]
    assert out[6].headers["Shoal-Import"] == "imp"
    assert (r.through, r.markers, r.unread) == (7, 1, 2)
    assert repartitioned_imports({"imp@0": 9, "imp@1": 4}, "mig", 20, 2) == {
        "imp@0": 4, "imp@1": 4, "mig@0": 20, "mig@1": 20,
    }  # fmt: skip
