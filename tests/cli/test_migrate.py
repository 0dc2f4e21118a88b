"""``shoal migrate``: its plan (what the new stream holds for each old message, and where the
engine's consumers start), and the imports left open."""

from __future__ import annotations

import pytest

from protocol import SubjectError, import_marker_subject, stored_event_subject
from protocol.nats._migrate import OldMessage, plan
from scripts._migrate_cmd import open_imports


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
