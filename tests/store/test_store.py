"""store.EventLog: the append-only event log and the transitions outbox in one SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from store import (
    NEVER,
    SCHEMA_VERSION,
    EventLog,
    LoggedEvent,
    OutboxEntry,
    Snapshot,
    SnapshotMarks,
    StoreError,
    StoreFormatError,
    StoreLockedError,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "shoal.db"


@pytest.fixture
async def log(path: Path) -> AsyncIterator[EventLog]:
    async with await EventLog.open(path) as log:
        yield log


def ev(customer_id: str, message_id: str, at: int = 0, body: bytes | None = None) -> LoggedEvent:
    return LoggedEvent(
        customer_id=customer_id,
        message_id=message_id,
        at=at,
        body=body if body is not None else f"{customer_id}/{message_id}".encode(),
    )


def tr(customer_id: str, version: int, segment: str = "active", at: int = 0) -> OutboxEntry:
    return OutboxEntry(
        customer_id=customer_id,
        version=version,
        segment=segment,
        at=at,
        body=f"{customer_id}:{segment}:{version}".encode(),
    )


async def all_events(log: EventLog, chunk: int = 10_000) -> list[LoggedEvent]:
    return [e async for part in log.read_events(chunk=chunk) for e in part]


async def all_transitions(log: EventLog, *, chunk: int = 10_000) -> list[OutboxEntry]:
    return [t async for part in log.read_transitions(chunk=chunk) for t in part]


async def unpublished(log: EventLog, *, chunk: int = 10_000) -> list[OutboxEntry]:
    return [t async for part in log.read_unpublished(chunk=chunk) for t in part]


# --- opening -----------------------------------------------------------------------------


async def test_new_store_is_empty(log: EventLog, path: Path) -> None:
    assert path.exists()
    assert await log.count_events() == 0
    assert await all_events(log) == []
    assert await all_transitions(log) == []


async def test_open_with_full_synchronous(path: Path) -> None:
    async with await EventLog.open(path, synchronous="FULL") as log:
        await log.commit([ev("a", "m1")])
        assert await log.count_events() == 1


async def test_opened_twice_is_locked(log: EventLog, path: Path) -> None:
    with pytest.raises(StoreLockedError) as e:
        await EventLog.open(path)
    assert str(e.value) == (
        f"{path} is in use by another shoal engine; stop it, or give this one another --data-dir"
    )
    assert e.value.path == path


async def test_lock_is_released_on_close(path: Path) -> None:
    first = await EventLog.open(path)
    await first.close()
    second = await EventLog.open(path)
    await second.close()


async def test_close_is_idempotent(path: Path) -> None:
    log = await EventLog.open(path)
    await log.close()
    await log.close()


async def test_data_survives_reopening(path: Path) -> None:
    async with await EventLog.open(path) as log:
        await log.commit([ev("a", "m1", 5)], [tr("a", 1)])
    async with await EventLog.open(path) as log:
        assert [(e.customer_id, e.message_id, e.at) for e in await all_events(log)] == [
            ("a", "m1", 5)
        ]
        assert [(t.customer_id, t.version) for t in await all_transitions(log)] == [("a", 1)]


def set_schema_version(path: Path, version: str) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))


def schema_version(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return str(row[0])


async def test_new_store_records_schema_version(path: Path) -> None:
    log = await EventLog.open(path)
    await log.close()
    assert schema_version(path) == str(SCHEMA_VERSION)


async def test_different_schema_version_is_refused(path: Path) -> None:
    log = await EventLog.open(path)
    await log.close()
    set_schema_version(path, str(SCHEMA_VERSION + 1))
    with pytest.raises(StoreFormatError) as e:
        await EventLog.open(path)
    assert str(e.value) == (
        f"{path} has schema version {SCHEMA_VERSION + 1}, this shoal reads version {SCHEMA_VERSION}"
    )
    assert (e.value.path, e.value.found, e.value.expected) == (
        path,
        SCHEMA_VERSION + 1,
        SCHEMA_VERSION,
    )
    assert isinstance(e.value, StoreError)


async def test_refused_store_releases_its_lock(path: Path) -> None:
    log = await EventLog.open(path)
    await log.close()
    set_schema_version(path, "99")
    with pytest.raises(StoreFormatError):
        await EventLog.open(path)
    set_schema_version(path, str(SCHEMA_VERSION))
    log = await EventLog.open(path)
    await log.close()


async def test_not_a_database_is_a_store_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a sqlite database, not at all" * 100)
    with pytest.raises(StoreError, match=f"^cannot initialise {path}: "):
        await EventLog.open(path)


# --- events ------------------------------------------------------------------------------


async def test_commit_and_read_events_in_log_order(log: EventLog) -> None:
    await log.commit([ev("b", "m1", 20), ev("a", "m1", 10)])
    await log.commit([ev("a", "m2", 5, b"\x00\xff")])
    events = await all_events(log)
    assert events == [
        LoggedEvent(customer_id="b", message_id="m1", at=20, body=b"b/m1", seq=1),
        LoggedEvent(customer_id="a", message_id="m1", at=10, body=b"a/m1", seq=2),
        LoggedEvent(customer_id="a", message_id="m2", at=5, body=b"\x00\xff", seq=3),
    ]


async def test_read_events_in_chunks(log: EventLog) -> None:
    await log.commit([ev("a", f"m{i}", i) for i in range(5)])
    parts = [[e.message_id for e in part] async for part in log.read_events(chunk=2)]
    assert parts == [["m0", "m1"], ["m2", "m3"], ["m4"]]


async def test_count_events(log: EventLog) -> None:
    await log.commit([ev("a", "m1"), ev("a", "m2")])
    await log.commit([ev("b", "m1")])
    assert await log.count_events() == 3


async def test_same_message_id_for_different_customers(log: EventLog) -> None:
    await log.commit([ev("a", "m1"), ev("b", "m1")])
    assert await log.count_events() == 2


async def test_known_returns_the_pairs_already_logged(log: EventLog) -> None:
    await log.commit([ev("a", "m1"), ev("b", "m2")])
    found = await log.known([("a", "m1"), ("a", "m2"), ("b", "m2"), ("c", "m1")])
    assert found == {("a", "m1"), ("b", "m2")}


async def test_known_of_nothing(log: EventLog) -> None:
    assert await log.known([]) == set()


async def test_known_over_many_keys(log: EventLog) -> None:
    await log.commit([ev("a", f"m{i}") for i in range(0, 1000, 3)])
    keys = [("a", f"m{i}") for i in range(1000)]
    assert await log.known(iter(keys)) == {("a", f"m{i}") for i in range(0, 1000, 3)}


async def test_empty_commit_writes_nothing(log: EventLog) -> None:
    await log.commit([])
    assert await log.count_events() == 0


# --- atomicity ---------------------------------------------------------------------------


async def test_duplicate_within_one_commit_writes_nothing(log: EventLog, path: Path) -> None:
    with pytest.raises(StoreError) as e:
        await log.commit([ev("a", "m1"), ev("a", "m2"), ev("a", "m1")], [tr("a", 1)])
    assert str(e.value) == (
        f"cannot write to {path}: UNIQUE constraint failed: events.customer_id, events.message_id"
    )
    assert await log.count_events() == 0
    assert await all_events(log) == []
    assert await all_transitions(log) == []


async def test_duplicate_of_a_logged_event_writes_nothing(log: EventLog) -> None:
    await log.commit([ev("a", "m1")], [tr("a", 1)])
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        await log.commit([ev("a", "m2"), ev("a", "m1")], [tr("a", 2)], published_through=1)
    assert [e.message_id for e in await all_events(log)] == ["m1"]
    assert [(t.version, t.published) for t in await all_transitions(log)] == [(1, False)]
    assert log.published_through == 0
    # The failed commit used no outbox position.
    assert await log.commit([], [tr("a", 2)]) == [2]


async def test_store_works_after_a_failed_commit(log: EventLog) -> None:
    with pytest.raises(StoreError):
        await log.commit([ev("a", "m1"), ev("a", "m1")])
    await log.commit([ev("a", "m1")])
    assert await log.count_events() == 1


# --- transitions outbox ------------------------------------------------------------------


async def test_transitions_read_by_customer_then_version(log: EventLog) -> None:
    assert await log.commit([], [tr("b", 1), tr("a", 2), tr("a", 1, "lapsing", 7)]) == [1, 2, 3]
    got = await all_transitions(log)
    assert [(t.customer_id, t.version, t.seq) for t in got] == [
        ("a", 1, 3),
        ("a", 2, 2),
        ("b", 1, 1),
    ]
    assert got[0] == OutboxEntry(
        customer_id="a", version=1, segment="lapsing", at=7, body=b"a:lapsing:1", seq=3
    )


async def test_versions_order_numerically(log: EventLog) -> None:
    await log.commit([], [tr("a", v) for v in (10, 2, 1)])
    assert [t.version for t in await all_transitions(log)] == [1, 2, 10]


async def test_outbox_positions_continue_across_commits(log: EventLog) -> None:
    assert await log.commit([], [tr("a", 1), tr("a", 2)]) == [1, 2]
    assert await log.commit([ev("a", "m1")]) == []
    assert await log.commit([], [tr("b", 1)]) == [3]


async def test_published_mark_covers_a_prefix_of_the_outbox(log: EventLog) -> None:
    await log.commit([], [tr("a", 1), tr("b", 1), tr("a", 2)])
    await log.commit([], published_through=2)
    assert log.published_through == 2
    got = await all_transitions(log)
    assert [(t.customer_id, t.version, t.published) for t in got] == [
        ("a", 1, True),
        ("a", 2, False),
        ("b", 1, True),
    ]


async def test_unpublished_in_publishing_order(log: EventLog) -> None:
    await log.commit([], [tr("c", 1), tr("a", 1), tr("b", 1), tr("a", 2)])
    await log.commit([], published_through=1)
    got = await unpublished(log)
    assert [(t.seq, t.customer_id, t.version) for t in got] == [
        (2, "a", 1),
        (3, "b", 1),
        (4, "a", 2),
    ]
    assert not any(t.published for t in got)


async def test_unpublished_in_chunks(log: EventLog) -> None:
    await log.commit([], [tr("a", v) for v in range(1, 11)])
    await log.commit([], published_through=3)
    parts = [[t.version for t in part] async for part in log.read_unpublished(chunk=3)]
    assert parts == [[4, 5, 6], [7, 8, 9], [10]]


async def test_published_mark_never_moves_back(log: EventLog) -> None:
    await log.commit([], [tr("a", 1), tr("a", 2)])
    await log.commit([], published_through=2)
    assert await log.commit([], published_through=1) == []
    assert log.published_through == 2


async def test_outbox_and_mark_survive_reopening(path: Path) -> None:
    async with await EventLog.open(path) as log:
        await log.commit([], [tr("a", 1), tr("a", 2)], published_through=None)
        await log.commit([], published_through=1)
    async with await EventLog.open(path) as log:
        assert log.published_through == 1
        assert [t.version for t in await unpublished(log)] == [2]
        assert await log.commit([], [tr("a", 3)]) == [3]


async def test_read_transitions_in_chunks(log: EventLog) -> None:
    await log.commit([], [tr("a", 1), tr("a", 2), tr("b", 1)])
    parts = [
        [(t.customer_id, t.version) for t in part] async for part in log.read_transitions(chunk=2)
    ]
    assert parts == [[("a", 1), ("a", 2)], [("b", 1)]]


async def test_events_transitions_and_mark_in_one_commit(log: EventLog) -> None:
    await log.commit([ev("a", "m1")], [tr("a", 1)])
    await log.commit([ev("a", "m2")], [tr("a", 2)], published_through=1)
    assert await log.count_events() == 2
    got = await all_transitions(log)
    assert [(t.version, t.published) for t in got] == [(1, True), (2, False)]


async def test_a_version_written_twice_is_an_error_and_writes_nothing(
    log: EventLog, tmp_path: Path
) -> None:
    await log.commit([], [tr("a", 1, "active")])
    await log.commit([], published_through=1)
    with pytest.raises(StoreError) as e:
        await log.commit([ev("a", "m9")], [tr("a", 1, "lapsing")])
    assert str(e.value).endswith(
        "UNIQUE constraint failed: transitions.customer_id, transitions.version"
    )
    got = await all_transitions(log)
    assert [(t.segment, t.published) for t in got] == [("active", True)]
    assert await log.count_events() == 0


# --- reading beside a writer --------------------------------------------------------------


async def test_read_only_sees_what_the_writer_committed_without_its_lock(
    log: EventLog, path: Path
) -> None:
    await log.commit([ev("a", "1")], [tr("a", 1)])
    async with await EventLog.open_read_only(path) as reader:
        assert [e.message_id for e in await all_events(reader)] == ["1"]
        await log.commit([ev("a", "2")])  # the writer goes on meanwhile
        assert [e.message_id for e in await all_events(reader)] == ["1", "2"]
        assert reader.last_outbox_seq == 1
        with pytest.raises(StoreError, match="cannot write to"):
            await reader.commit([ev("b", "1")])


async def test_read_only_of_a_missing_store_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        await EventLog.open_read_only(tmp_path / "nope.db")
    assert str(e.value) == f"no event log at {tmp_path / 'nope.db'}"
    assert not (tmp_path / "nope.db").exists()


# --- snapshots ----------------------------------------------------------------------------


def snap(customer_id: str, deadline: int, body: bytes = b"s", log_seq: int = 0) -> Snapshot:
    return Snapshot(
        customer_id=customer_id,
        format=1,
        needs="n",
        log_seq=log_seq,
        deadline=deadline,
        body=body,
    )


async def test_snapshots_replace_each_other_and_page_in_deadline_order(log: EventLog) -> None:
    await log.commit([], snapshots=[snap("c", 30), snap("a", 20), snap("b", NEVER), snap("d", 20)])
    await log.commit([], snapshots=[snap("c", 10, b"newer")])
    assert await log.count_snapshots() == 4
    first = await log.page_snapshots(None, 2)
    assert [(s.customer_id, s.deadline, s.body) for s in first] == [
        ("c", 10, b"newer"),
        ("a", 20, b"s"),
    ]
    rest = await log.page_snapshots((first[-1].deadline, first[-1].customer_id), 10)
    assert [s.customer_id for s in rest] == ["d", "b"]
    assert sorted(s.customer_id for s in await log.snapshots_of(["b", "zz", "a"])) == ["a", "b"]


async def test_bulk_reads_change_no_result(log: EventLog) -> None:
    await log.commit([], snapshots=[snap(f"c{i:03d}", (i * 37) % 101) for i in range(300)])
    plain = await log.page_snapshots(None, 1_000)
    await log.bulk_reads(True)
    mapped = await log.page_snapshots(None, 1_000)
    # Written while mapped, read back after.
    await log.commit([], snapshots=[snap("c000", 5, b"newer")])
    await log.bulk_reads(False)
    assert mapped == plain
    assert (await log.snapshots_of(["c000"]))[0].body == b"newer"
    deadlines = {f"c{i:03d}": (i * 37) % 101 for i in range(300)} | {"c000": 5}
    expected = sorted(deadlines, key=lambda c: (deadlines[c], c))
    assert [s.customer_id for s in await log.page_snapshots(None, 1_000)] == expected


async def test_snapshot_marks_survive_reopening(path: Path) -> None:
    marks = SnapshotMarks(events_through=2, outbox_through=1, definitions="d", needs="n")
    async with await EventLog.open(path) as log:
        assert log.snapshot_marks is None
        await log.commit([ev("a", "1"), ev("a", "2")], [tr("a", 1)])
        await log.commit([], snapshots=[snap("a", 5, log_seq=2)], marks=marks)
        assert log.snapshot_marks == marks
    async with await EventLog.open(path) as log:
        assert log.snapshot_marks == marks
        assert (log.last_event_seq, log.last_outbox_seq) == (2, 1)


async def test_tail_and_per_customer_reads(log: EventLog) -> None:
    await log.commit([ev("a", "1"), ev("b", "1"), ev("a", "2")], [tr("a", 1), tr("b", 1)])
    await log.commit([ev("b", "2")], [tr("a", 2)])
    tail = [e async for part in log.read_events(after=2) for e in part]
    assert [(e.seq, e.customer_id, e.message_id) for e in tail] == [(3, "a", "2"), (4, "b", "2")]
    outbox = [t async for part in log.read_outbox(after=1) for t in part]
    assert [(t.seq, t.customer_id, t.version) for t in outbox] == [(2, "b", 1), (3, "a", 2)]
    assert [e.message_id for e in await log.customer_events(["a"])] == ["1", "2"]
    assert [(t.customer_id, t.version) for t in await log.customer_transitions(["b", "a"])] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
    ]


async def test_a_version_1_store_is_upgraded_in_place(path: Path) -> None:
    async with await EventLog.open(path) as log:
        await log.commit([ev("a", "1")])
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE snapshots")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.commit()
    async with await EventLog.open(path) as log:
        assert [e.message_id for e in await all_events(log)] == ["1"]
        assert await log.count_snapshots() == 0
    assert schema_version(path) == str(SCHEMA_VERSION)


# --- history imports ----------------------------------------------------------------------


async def test_import_skips_repeats_and_counts_the_new_events(log: EventLog) -> None:
    await log.commit([ev("a", "1"), ev("b", "1")], [tr("a", 1)])
    added = await log.import_events(
        [ev("a", "1", body=b"other"), ev("a", "2"), ev("c", "1"), ev("a", "2", body=b"again")]
    )
    assert added == 2
    logged = await all_events(log)
    # Positions follow on from the log, in the order given; the first of a repeat wins.
    assert [(e.seq, e.customer_id, e.message_id, e.body) for e in logged] == [
        (1, "a", "1", b"a/1"),
        (2, "b", "1", b"b/1"),
        (3, "a", "2", b"a/2"),
        (4, "c", "1", b"c/1"),
    ]
    assert log.last_event_seq == 4
    assert await log.import_events([ev("a", "2"), ev("c", "1")]) == 0
    assert await log.import_events([]) == 0
    assert log.last_event_seq == 4


async def test_import_leaves_outbox_and_snapshot_marks_alone(path: Path) -> None:
    marks = SnapshotMarks(events_through=1, outbox_through=1, definitions="d", needs="n")
    async with await EventLog.open(path) as log:
        await log.commit([ev("a", "1")], [tr("a", 1)], 1, snapshots=[snap("a", 5, log_seq=1)])
        await log.commit([], marks=marks)
        assert await log.import_events([ev("b", "1", at=7)]) == 1
        # commit goes on after the imported events.
        await log.commit([ev("a", "2")])
        assert (log.last_event_seq, log.last_outbox_seq, log.published_through) == (3, 1, 1)
    async with await EventLog.open(path) as log:
        assert log.snapshot_marks == marks
        tail = [e async for part in log.read_events(after=marks.events_through) for e in part]
        assert [(e.seq, e.customer_id, e.at) for e in tail] == [(2, "b", 7), (3, "a", 0)]


async def test_import_is_refused_by_a_read_only_store(log: EventLog, path: Path) -> None:
    async with await EventLog.open_read_only(path) as reader:
        with pytest.raises(StoreError, match=f"^cannot write to {path}: "):
            await reader.import_events([ev("a", "1")])
    assert await log.count_events() == 0


async def test_a_cancelled_commit_still_ends_its_transaction(log: EventLog) -> None:
    # The engine changes its actors before it commits: a stop must not cut the commit short
    # (leaving the actors ahead of the log, or a transaction open for the next write).
    events = [ev("a", str(i)) for i in range(50_000)]
    with anyio.move_on_after(0.001) as scope:
        await log.commit(events, [tr("a", 1)])
    assert scope.cancel_called  # the stop came while the commit ran
    assert await log.count_events() == 50_000
    assert log.last_event_seq == 50_000
    await log.commit([ev("b", "1")], [tr("b", 1)])
    assert await log.count_events() == 50_001
