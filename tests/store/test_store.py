"""store.Store: the event log, the transitions outbox and the snapshots in one SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from protocol import NEVER
from store import (
    SCHEMA_VERSION,
    LoggedEvent,
    OutboxEntry,
    Snapshot,
    SnapshotMarks,
    Store,
    StoreError,
    StoreFormatError,
    StoreLockedError,
)
from store._db import translated
from store._lock import WriterLock


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "shoal.db"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[Store]:
    async with await Store.open(path) as store:
        yield store


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


async def all_events(store: Store, chunk: int = 10_000) -> list[LoggedEvent]:
    return [e async for part in store.events.read(chunk=chunk) for e in part]


async def all_transitions(store: Store, *, chunk: int = 10_000) -> list[OutboxEntry]:
    return [t async for part in store.outbox.by_customer(chunk=chunk) for t in part]


async def unpublished(store: Store, *, chunk: int = 10_000) -> list[OutboxEntry]:
    return [t async for part in store.outbox.unpublished(chunk=chunk) for t in part]


# --- opening -----------------------------------------------------------------------------


async def test_new_store_is_empty(store: Store, path: Path) -> None:
    assert path.exists()
    assert await store.events.count() == 0
    assert await all_events(store) == []
    assert await all_transitions(store) == []


async def test_open_with_full_synchronous(path: Path) -> None:
    async with await Store.open(path, synchronous="FULL") as store:
        await store.commit([ev("a", "m1")])
        assert await store.events.count() == 1


async def test_opened_twice_is_locked(store: Store, path: Path) -> None:
    with pytest.raises(StoreLockedError) as e:
        await Store.open(path)
    assert str(e.value) == (
        f"{path} is in use by another shoal engine; stop it, or give this one another --data-dir"
    )
    assert e.value.path == path


async def test_lock_is_released_on_close(path: Path) -> None:
    first = await Store.open(path)
    await first.close()
    second = await Store.open(path)
    await second.close()


async def test_close_is_idempotent(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
    await store.close()


async def test_data_survives_reopening(path: Path) -> None:
    async with await Store.open(path) as store:
        await store.commit([ev("a", "m1", 5)], [tr("a", 1)])
    async with await Store.open(path) as store:
        assert [(e.customer_id, e.message_id, e.at) for e in await all_events(store)] == [
            ("a", "m1", 5)
        ]
        assert [(t.customer_id, t.version) for t in await all_transitions(store)] == [("a", 1)]


def set_schema_version(path: Path, version: str) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))


def schema_version(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return str(row[0])


async def test_new_store_records_schema_version(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
    assert schema_version(path) == str(SCHEMA_VERSION)


async def test_different_schema_version_is_refused(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
    set_schema_version(path, str(SCHEMA_VERSION + 1))
    with pytest.raises(StoreFormatError) as e:
        await Store.open(path)
    assert str(e.value) == (
        f"{path} has schema version {SCHEMA_VERSION + 1}, and this shoal knows versions up to "
        f"{SCHEMA_VERSION}: it was written by a newer shoal. Run that shoal (or a later one) "
        "on this data directory; this one stops rather than misread it"
    )
    assert (e.value.path, e.value.found, e.value.expected) == (
        path,
        SCHEMA_VERSION + 1,
        SCHEMA_VERSION,
    )
    assert isinstance(e.value, StoreError)


async def test_refused_store_releases_its_lock(path: Path) -> None:
    store = await Store.open(path)
    await store.close()
    set_schema_version(path, "99")
    with pytest.raises(StoreFormatError):
        await Store.open(path)
    set_schema_version(path, str(SCHEMA_VERSION))
    store = await Store.open(path)
    await store.close()


async def test_not_a_database_is_a_store_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a sqlite database, not at all" * 100)
    with pytest.raises(StoreError, match=f"^cannot initialise {path}: "):
        await Store.open(path)


# --- events ------------------------------------------------------------------------------


async def test_commit_and_read_events_in_log_order(store: Store) -> None:
    await store.commit([ev("b", "m1", 20), ev("a", "m1", 10)])
    await store.commit([ev("a", "m2", 5, b"\x00\xff")])
    events = await all_events(store)
    assert events == [
        LoggedEvent(customer_id="b", message_id="m1", at=20, body=b"b/m1", seq=1),
        LoggedEvent(customer_id="a", message_id="m1", at=10, body=b"a/m1", seq=2),
        LoggedEvent(customer_id="a", message_id="m2", at=5, body=b"\x00\xff", seq=3),
    ]


async def test_read_events_in_chunks(store: Store) -> None:
    await store.commit([ev("a", f"m{i}", i) for i in range(5)])
    parts = [[e.message_id for e in part] async for part in store.events.read(chunk=2)]
    assert parts == [["m0", "m1"], ["m2", "m3"], ["m4"]]


async def test_count_events(store: Store) -> None:
    await store.commit([ev("a", "m1"), ev("a", "m2")])
    await store.commit([ev("b", "m1")])
    assert await store.events.count() == 3


async def test_same_message_id_for_different_customers(store: Store) -> None:
    await store.commit([ev("a", "m1"), ev("b", "m1")])
    assert await store.events.count() == 2


async def test_known_returns_the_pairs_already_logged(store: Store) -> None:
    await store.commit([ev("a", "m1"), ev("b", "m2")])
    found = await store.events.known([("a", "m1"), ("a", "m2"), ("b", "m2"), ("c", "m1")])
    assert found == {("a", "m1"), ("b", "m2")}


async def test_known_of_nothing(store: Store) -> None:
    assert await store.events.known([]) == set()


async def test_known_over_many_keys(store: Store) -> None:
    await store.commit([ev("a", f"m{i}") for i in range(0, 1000, 3)])
    keys = [("a", f"m{i}") for i in range(1000)]
    assert await store.events.known(iter(keys)) == {("a", f"m{i}") for i in range(0, 1000, 3)}


async def test_empty_commit_writes_nothing(store: Store) -> None:
    await store.commit([])
    assert await store.events.count() == 0


# --- atomicity ---------------------------------------------------------------------------


async def test_duplicate_within_one_commit_writes_nothing(store: Store, path: Path) -> None:
    with pytest.raises(StoreError) as e:
        await store.commit([ev("a", "m1"), ev("a", "m2"), ev("a", "m1")], [tr("a", 1)])
    assert str(e.value) == (
        f"cannot write to {path}: UNIQUE constraint failed: events.customer_id, events.message_id"
    )
    assert await store.events.count() == 0
    assert await all_events(store) == []
    assert await all_transitions(store) == []


async def test_duplicate_of_a_logged_event_writes_nothing(store: Store) -> None:
    await store.commit([ev("a", "m1")], [tr("a", 1)])
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        await store.commit([ev("a", "m2"), ev("a", "m1")], [tr("a", 2)], published_through=1)
    assert [e.message_id for e in await all_events(store)] == ["m1"]
    assert [(t.version, t.published) for t in await all_transitions(store)] == [(1, False)]
    assert store.outbox.published_through == 0
    # The failed commit used no outbox position.
    assert await store.commit([], [tr("a", 2)]) == [2]


async def test_store_works_after_a_failed_commit(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.commit([ev("a", "m1"), ev("a", "m1")])
    await store.commit([ev("a", "m1")])
    assert await store.events.count() == 1


# --- transitions outbox ------------------------------------------------------------------


async def test_transitions_read_by_customer_then_version(store: Store) -> None:
    assert await store.commit([], [tr("b", 1), tr("a", 2), tr("a", 1, "lapsing", 7)]) == [1, 2, 3]
    got = await all_transitions(store)
    assert [(t.customer_id, t.version, t.seq) for t in got] == [
        ("a", 1, 3),
        ("a", 2, 2),
        ("b", 1, 1),
    ]
    assert got[0] == OutboxEntry(
        customer_id="a", version=1, segment="lapsing", at=7, body=b"a:lapsing:1", seq=3
    )


async def test_versions_order_numerically(store: Store) -> None:
    await store.commit([], [tr("a", v) for v in (10, 2, 1)])
    assert [t.version for t in await all_transitions(store)] == [1, 2, 10]


async def test_outbox_positions_continue_across_commits(store: Store) -> None:
    assert await store.commit([], [tr("a", 1), tr("a", 2)]) == [1, 2]
    assert await store.commit([ev("a", "m1")]) == []
    assert await store.commit([], [tr("b", 1)]) == [3]


async def test_published_mark_covers_a_prefix_of_the_outbox(store: Store) -> None:
    await store.commit([], [tr("a", 1), tr("b", 1), tr("a", 2)])
    await store.commit([], published_through=2)
    assert store.outbox.published_through == 2
    got = await all_transitions(store)
    assert [(t.customer_id, t.version, t.published) for t in got] == [
        ("a", 1, True),
        ("a", 2, False),
        ("b", 1, True),
    ]


async def test_unpublished_in_publishing_order(store: Store) -> None:
    await store.commit([], [tr("c", 1), tr("a", 1), tr("b", 1), tr("a", 2)])
    await store.commit([], published_through=1)
    got = await unpublished(store)
    assert [(t.seq, t.customer_id, t.version) for t in got] == [
        (2, "a", 1),
        (3, "b", 1),
        (4, "a", 2),
    ]
    assert not any(t.published for t in got)


async def test_unpublished_in_chunks(store: Store) -> None:
    await store.commit([], [tr("a", v) for v in range(1, 11)])
    await store.commit([], published_through=3)
    parts = [[t.version for t in part] async for part in store.outbox.unpublished(chunk=3)]
    assert parts == [[4, 5, 6], [7, 8, 9], [10]]


async def test_published_mark_never_moves_back(store: Store) -> None:
    await store.commit([], [tr("a", 1), tr("a", 2)])
    await store.commit([], published_through=2)
    assert await store.commit([], published_through=1) == []
    assert store.outbox.published_through == 2


async def test_outbox_and_mark_survive_reopening(path: Path) -> None:
    async with await Store.open(path) as store:
        await store.commit([], [tr("a", 1), tr("a", 2)], published_through=None)
        await store.commit([], published_through=1)
    async with await Store.open(path) as store:
        assert store.outbox.published_through == 1
        assert [t.version for t in await unpublished(store)] == [2]
        assert await store.commit([], [tr("a", 3)]) == [3]


async def test_outbox_by_customer_in_chunks(store: Store) -> None:
    await store.commit([], [tr("a", 1), tr("a", 2), tr("b", 1)])
    parts = [
        [(t.customer_id, t.version) for t in part]
        async for part in store.outbox.by_customer(chunk=2)
    ]
    assert parts == [[("a", 1), ("a", 2)], [("b", 1)]]


async def test_events_transitions_and_mark_in_one_commit(store: Store) -> None:
    await store.commit([ev("a", "m1")], [tr("a", 1)])
    await store.commit([ev("a", "m2")], [tr("a", 2)], published_through=1)
    assert await store.events.count() == 2
    got = await all_transitions(store)
    assert [(t.version, t.published) for t in got] == [(1, True), (2, False)]


async def test_a_version_written_twice_is_an_error_and_writes_nothing(
    store: Store, tmp_path: Path
) -> None:
    await store.commit([], [tr("a", 1, "active")])
    await store.commit([], published_through=1)
    with pytest.raises(StoreError) as e:
        await store.commit([ev("a", "m9")], [tr("a", 1, "lapsing")])
    assert str(e.value).endswith(
        "UNIQUE constraint failed: transitions.customer_id, transitions.version"
    )
    got = await all_transitions(store)
    assert [(t.segment, t.published) for t in got] == [("active", True)]
    assert await store.events.count() == 0


# --- reading beside a writer --------------------------------------------------------------


async def test_read_only_sees_what_the_writer_committed_without_its_lock(
    store: Store, path: Path
) -> None:
    await store.commit([ev("a", "1")], [tr("a", 1)])
    async with await Store.open_read_only(path) as reader:
        assert [e.message_id for e in await all_events(reader)] == ["1"]
        await store.commit([ev("a", "2")])  # the writer goes on meanwhile
        assert [e.message_id for e in await all_events(reader)] == ["1", "2"]
        assert reader.outbox.last_seq == 1
        with pytest.raises(StoreError, match="cannot write to"):
            await reader.commit([ev("b", "1")])


async def test_read_only_of_a_missing_store_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        await Store.open_read_only(tmp_path / "nope.db")
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


async def test_snapshots_replace_each_other_and_page_in_deadline_order(store: Store) -> None:
    await store.commit(
        [], snapshots=[snap("c", 30), snap("a", 20), snap("b", NEVER), snap("d", 20)]
    )
    await store.commit([], snapshots=[snap("c", 10, b"newer")])
    assert await store.snapshots.count() == 4
    first = await store.snapshots.page(None, 2)
    assert [(s.customer_id, s.deadline, s.body) for s in first] == [
        ("c", 10, b"newer"),
        ("a", 20, b"s"),
    ]
    rest = await store.snapshots.page((first[-1].deadline, first[-1].customer_id), 10)
    assert [s.customer_id for s in rest] == ["d", "b"]
    assert sorted(s.customer_id for s in await store.snapshots.of(["b", "zz", "a"])) == ["a", "b"]


async def test_bulk_reads_change_no_result(store: Store) -> None:
    await store.commit([], snapshots=[snap(f"c{i:03d}", (i * 37) % 101) for i in range(300)])
    plain = await store.snapshots.page(None, 1_000)
    await store.bulk_reads(True)
    mapped = await store.snapshots.page(None, 1_000)
    # Written while mapped, read back after.
    await store.commit([], snapshots=[snap("c000", 5, b"newer")])
    await store.bulk_reads(False)
    assert mapped == plain
    assert (await store.snapshots.of(["c000"]))[0].body == b"newer"
    deadlines = {f"c{i:03d}": (i * 37) % 101 for i in range(300)} | {"c000": 5}
    expected = sorted(deadlines, key=lambda c: (deadlines[c], c))
    assert [s.customer_id for s in await store.snapshots.page(None, 1_000)] == expected


async def test_snapshot_marks_survive_reopening(path: Path) -> None:
    marks = SnapshotMarks(events_through=2, outbox_through=1, definitions="d", needs="n")
    async with await Store.open(path) as store:
        assert store.snapshots.marks is None
        await store.commit([ev("a", "1"), ev("a", "2")], [tr("a", 1)])
        await store.commit([], snapshots=[snap("a", 5, log_seq=2)], marks=marks)
        assert store.snapshots.marks == marks
    async with await Store.open(path) as store:
        assert store.snapshots.marks == marks
        assert (store.events.last_seq, store.outbox.last_seq) == (2, 1)


async def test_tail_and_per_customer_reads(store: Store) -> None:
    await store.commit([ev("a", "1"), ev("b", "1"), ev("a", "2")], [tr("a", 1), tr("b", 1)])
    await store.commit([ev("b", "2")], [tr("a", 2)])
    tail = [e async for part in store.events.read(after=2) for e in part]
    assert [(e.seq, e.customer_id, e.message_id) for e in tail] == [(3, "a", "2"), (4, "b", "2")]
    outbox = [t async for part in store.outbox.read(after=1) for t in part]
    assert [(t.seq, t.customer_id, t.version) for t in outbox] == [(2, "b", 1), (3, "a", 2)]
    assert [e.message_id for e in await store.events.of_customers(["a"])] == ["1", "2"]
    assert [(t.customer_id, t.version) for t in await store.outbox.of_customers(["b", "a"])] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
    ]


async def test_a_version_1_store_is_upgraded_in_place(path: Path) -> None:
    async with await Store.open(path) as store:
        await store.commit([ev("a", "1")])
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE snapshots")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.commit()
    async with await Store.open(path) as store:
        assert [e.message_id for e in await all_events(store)] == ["1"]
        assert await store.snapshots.count() == 0
        assert store.upgraded_from == 1
    assert schema_version(path) == str(SCHEMA_VERSION)
    async with await Store.open(path) as store:
        assert store.upgraded_from is None  # once only


async def test_a_version_3_store_is_upgraded_in_place(path: Path) -> None:
    """Version 3 (shoal 484eaec) lacks only the tables version 4 added."""
    async with await Store.open(path) as store:
        await store.commit([ev("a", "1")])
        assert store.upgraded_from is None
    set_schema_version(path, "3")
    async with await Store.open_read_only(path) as store:
        assert [e.message_id for e in await all_events(store)] == ["1"]
    async with await Store.open(path) as store:
        assert store.upgraded_from == 3
        assert [e.message_id for e in await all_events(store)] == ["1"]
    assert schema_version(path) == str(SCHEMA_VERSION)


@pytest.mark.parametrize("found", ["99", "4b"])
async def test_a_newer_store_is_refused_untouched(path: Path, found: str) -> None:
    """A store of a later version (or one not even a number) is refused before anything is
    written to it, for writing and for reading."""
    async with await Store.open(path) as store:
        await store.commit([ev("a", "1")])
    set_schema_version(path, found)
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE snapshots")
        db.commit()
    before = path.read_bytes()
    with pytest.raises(StoreFormatError) as e:
        await Store.open(path)
    assert str(e.value) == (
        f"{path} has schema version {found}, and this shoal knows versions up to "
        f"{SCHEMA_VERSION}: it was written by a newer shoal. Run that shoal (or a later one) "
        "on this data directory; this one stops rather than misread it"
    )
    assert path.read_bytes() == before  # not even the missing table created
    with pytest.raises(StoreFormatError):
        await Store.open_read_only(path)


async def test_snapshot_formats_are_counted(store: Store) -> None:
    assert await store.snapshots.formats() == {}
    snaps = [
        Snapshot(customer_id=c, format=f, needs="n", log_seq=1, deadline=NEVER, body=b"x")
        for c, f in (("a", 1), ("b", 1), ("c", 2))
    ]
    await store.commit([ev("a", "1")], snapshots=snaps)
    assert await store.snapshots.formats() == {1: 2, 2: 1}


# --- history imports ----------------------------------------------------------------------


async def test_import_skips_repeats_and_counts_the_new_events(store: Store) -> None:
    await store.commit([ev("a", "1"), ev("b", "1")], [tr("a", 1)])
    added = await store.import_events(
        [ev("a", "1", body=b"other"), ev("a", "2"), ev("c", "1"), ev("a", "2", body=b"again")]
    )
    assert added == 2
    logged = await all_events(store)
    # Positions follow on from the store, in the order given; the first of a repeat wins.
    assert [(e.seq, e.customer_id, e.message_id, e.body) for e in logged] == [
        (1, "a", "1", b"a/1"),
        (2, "b", "1", b"b/1"),
        (3, "a", "2", b"a/2"),
        (4, "c", "1", b"c/1"),
    ]
    assert store.events.last_seq == 4
    assert await store.import_events([ev("a", "2"), ev("c", "1")]) == 0
    assert await store.import_events([]) == 0
    assert store.events.last_seq == 4


async def test_import_leaves_outbox_and_snapshot_marks_alone(path: Path) -> None:
    marks = SnapshotMarks(events_through=1, outbox_through=1, definitions="d", needs="n")
    async with await Store.open(path) as store:
        await store.commit([ev("a", "1")], [tr("a", 1)], 1, snapshots=[snap("a", 5, log_seq=1)])
        await store.commit([], marks=marks)
        assert await store.import_events([ev("b", "1", at=7)]) == 1
        # commit goes on after the imported events.
        await store.commit([ev("a", "2")])
        assert (store.events.last_seq, store.outbox.last_seq, store.outbox.published_through) == (
            3,
            1,
            1,
        )
    async with await Store.open(path) as store:
        assert store.snapshots.marks == marks
        tail = [e async for part in store.events.read(after=marks.events_through) for e in part]
        assert [(e.seq, e.customer_id, e.at) for e in tail] == [(2, "b", 7), (3, "a", 0)]


async def test_import_is_refused_by_a_read_only_store(store: Store, path: Path) -> None:
    async with await Store.open_read_only(path) as reader:
        with pytest.raises(StoreError, match=f"^cannot write to {path}: "):
            await reader.import_events([ev("a", "1")])
    assert await store.events.count() == 0


async def test_a_cancelled_commit_still_ends_its_transaction(store: Store) -> None:
    # The engine changes its actors before it commits: a stop must not cut the commit short
    # (leaving the actors ahead of the store, or a transaction open for the next write).
    events = [ev("a", str(i)) for i in range(50_000)]
    with anyio.move_on_after(0.001) as scope:
        await store.commit(events, [tr("a", 1)])
    assert scope.cancel_called  # the stop came while the commit ran
    assert await store.events.count() == 50_000
    assert store.events.last_seq == 50_000
    await store.commit([ev("b", "1")], [tr("b", 1)])
    assert await store.events.count() == 50_001


# --- the parts and their one place for driver errors ---------------------------------------


def test_the_one_never_is_protocols() -> None:
    """The surface itself is pinned in tests/test_public_surface.py."""
    import store

    assert not hasattr(store, "NEVER")  # the one "never" is protocol.NEVER


async def test_a_driver_error_is_a_store_error_caused_by_it(store: Store, path: Path) -> None:
    await store.commit([ev("a", "m1")])
    with pytest.raises(StoreError) as e:
        await store.commit([ev("a", "m1")])
    assert str(e.value).startswith(f"cannot write to {path}: ")
    assert isinstance(e.value.__cause__, sqlite3.IntegrityError)


def test_translated_names_what_was_being_done() -> None:
    cause = sqlite3.OperationalError("disk I/O error")
    with pytest.raises(StoreError) as e, translated("cannot read the outbox"):
        raise cause
    assert str(e.value) == "cannot read the outbox: disk I/O error"
    assert e.value.__cause__ is cause
    with translated("not reached"):
        pass  # nothing raised, nothing translated


def test_writer_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    path = tmp_path / "shoal.db"
    first = WriterLock.acquire(path)
    with pytest.raises(StoreLockedError) as e:
        WriterLock.acquire(path)
    assert e.value.path == path
    first.release()
    first.release()  # idempotent
    WriterLock.acquire(path).release()


async def test_outbox_read_is_in_publishing_order(store: Store) -> None:
    await store.commit([], [tr("b", 1), tr("a", 2), tr("a", 1)], published_through=None)
    await store.commit([], published_through=2)
    got = [t async for part in store.outbox.read(chunk=2) for t in part]
    assert [(t.seq, t.customer_id, t.version, t.published) for t in got] == [
        (1, "b", 1, True),
        (2, "a", 2, True),
        (3, "a", 1, False),
    ]


async def test_parts_keep_their_positions_across_a_commit(store: Store) -> None:
    marks = SnapshotMarks(events_through=1, outbox_through=2, definitions="d", needs="n")
    assert await store.commit([ev("a", "1")], [tr("a", 1), tr("b", 1)], 1) == [1, 2]
    assert (store.events.last_seq, store.outbox.last_seq) == (1, 2)
    assert store.outbox.published_through == 1
    assert store.snapshots.marks is None
    assert await store.commit([], snapshots=None, marks=marks) == []
    assert store.snapshots.marks == marks
    assert await store.snapshots.count() == 0


async def test_a_failed_commit_moves_no_position(store: Store) -> None:
    await store.commit([ev("a", "1")], [tr("a", 1)])
    marks = SnapshotMarks(events_through=1, outbox_through=1, definitions="d", needs="n")
    with pytest.raises(StoreError):
        await store.commit(
            [ev("b", "1"), ev("a", "1")], [tr("b", 1)], 1, snapshots=[snap("b", 1)], marks=marks
        )
    assert (store.events.last_seq, store.outbox.last_seq) == (1, 1)
    assert (store.outbox.published_through, store.snapshots.marks) == (0, None)
    assert await store.snapshots.count() == 0


async def test_a_reader_sees_the_marks_and_positions(store: Store, path: Path) -> None:
    marks = SnapshotMarks(events_through=1, outbox_through=1, definitions="d", needs="n")
    await store.commit([ev("a", "1")], [tr("a", 1)], 1, snapshots=[snap("a", 5)], marks=marks)
    async with await Store.open_read_only(path) as reader:
        assert (reader.events.last_seq, reader.outbox.last_seq) == (1, 1)
        assert reader.outbox.published_through == 1
        assert reader.snapshots.marks == marks
        assert [s.customer_id for s in await reader.snapshots.of(["a"])] == ["a"]
