"""The append-only event log and the transitions outbox, in one SQLite file.

The log is the truth: actors are rebuilt from it. Each micro-batch is one transaction that
appends its events and the transitions they caused, and marks earlier transitions as
published, so the log, the outbox and the consumer position never disagree after a crash.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import aiosqlite
import anyio
import msgspec

from ._errors import StoreError, StoreFormatError, StoreLockedError

SCHEMA_VERSION = 2
"""2 added the snapshots table; a version-1 store is upgraded in place when opened."""

NEVER = 1 << 62
"""The ``deadline`` of a snapshot whose customer has none: after every instant."""

Synchronous = Literal["NORMAL", "FULL"]

_MMAP_BYTES = 1 << 32
"""How much of the file SQLite may map into memory (it caps this at its build's limit)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (customer_id, message_id)
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    segment TEXT NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (customer_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    customer_id TEXT PRIMARY KEY,
    format INTEGER NOT NULL,
    needs TEXT NOT NULL,
    log_seq INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_deadline ON snapshots (deadline, customer_id);
"""
# A snapshot is one customer's state as of the event log position ``log_seq`` (every event
# up to it that is the customer's is folded in, none after). ``deadline`` is indexed so that
# a restarting engine can load first the customers whose time-based changes are due first.
# The outbox is append-only and published in ``seq`` order, so what is published is a
# prefix: one number in ``meta`` (published_through) marks it, instead of rewriting rows.


class LoggedEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One entry of the event log. ``body`` is opaque to the store."""

    customer_id: str
    message_id: str
    at: int
    body: bytes
    seq: int = 0
    """The log position, assigned on append (0 before)."""


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One transition in the outbox. ``body`` is the exact payload to publish."""

    customer_id: str
    version: int
    segment: str
    at: int
    body: bytes
    seq: int = 0
    """The outbox position, assigned on append (0 before); publishing goes in this order."""
    published: bool = False


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One customer's stored state. ``body`` and ``format`` are opaque to the store."""

    customer_id: str
    format: int
    needs: str
    """What the facts in it were kept for (a fingerprint of the rules' needs)."""
    log_seq: int
    """The event log position it reflects: the customer's events after it are not in it."""
    deadline: int
    """The customer's next deadline when it was taken, or :data:`NEVER`."""
    body: bytes


class SnapshotMarks(msgspec.Struct, frozen=True, kw_only=True):
    """How far the last complete round of snapshots reached.

    Every customer with an event at or before ``events_through``, or a transition at or
    before ``outbox_through``, has a snapshot reflecting them, taken under definitions
    ``definitions`` with facts kept for ``needs``. What came later is the *tail*: a restart
    replays only that.
    """

    events_through: int
    outbox_through: int
    definitions: str
    needs: str


class EventLog:
    """The SQLite store of one engine: event log plus transitions outbox.

    Open it with ``async with await EventLog.open(path):``. Only one process may hold a
    store at a time (an advisory lock beside the file enforces it).
    """

    def __init__(self, db: aiosqlite.Connection, path: Path, lock_fd: int | None) -> None:
        self._db = db
        self._path = path
        self._lock_fd = lock_fd
        self._closed = False
        self._last_outbox_seq = 0
        self._last_event_seq = 0
        self._published_through = 0
        self._marks: SnapshotMarks | None = None

    @classmethod
    async def open(cls, path: Path, *, synchronous: Synchronous = "NORMAL") -> EventLog:
        """Open (creating if needed) the store at ``path``.

        Args:
            path: the SQLite file.
            synchronous: ``NORMAL`` (WAL: a power cut may lose the last transactions, never
                corrupts) or ``FULL`` (every commit reaches the disk before it returns).

        Raises:
            StoreLockedError: another process has it open.
            StoreFormatError: it was written by an incompatible version.
            StoreError: it cannot be opened.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(lock_fd)
            raise StoreLockedError(path) from e
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as e:
            os.close(lock_fd)
            raise StoreError(f"cannot open {path}: {e}") from e
        log = cls(db, path, lock_fd)
        try:
            await log._init(synchronous)
        except BaseException:
            await log.close()
            raise
        return log

    @classmethod
    async def open_read_only(cls, path: Path) -> EventLog:
        """Open an existing store for reading only, even while an engine writes to it.

        No lock is taken: in WAL mode a reader sees the last committed state and never
        blocks the writer. Replays, exports and history queries use this. Writing to it
        raises :class:`StoreError`.

        Raises:
            StoreFormatError: it was written by an incompatible version.
            StoreError: there is no store at ``path``, or it cannot be read.
        """
        if not path.is_file():
            raise StoreError(f"no event log at {path}")
        try:
            db = await aiosqlite.connect(
                path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {path}: {e}") from e
        log = cls(db, path, None)
        try:
            await log._init_read_only()
        except BaseException:
            await log.close()
            raise
        return log

    async def bulk_reads(self, enabled: bool) -> None:
        """Make reads of much of the file in random order cheaper (on), or stop (off).

        On: SQLite reads through a memory map of the file instead of a ``read()`` per page
        into its small page cache. Snapshots in deadline order visit the table's pages in
        random order, each several times; mapped, that costs 40 % less (9 -> 5.6 us a row at
        200k customers). Turn it off once done: mapped pages count in the process's resident
        memory. (A larger page cache would help too, but the memory it took would stay.)

        Raises:
            StoreError: the setting cannot be changed.
        """
        try:
            await self._db.execute(f"PRAGMA mmap_size={_MMAP_BYTES if enabled else 0}")
        except sqlite3.Error as e:
            raise StoreError(f"cannot configure {self._path}: {e}") from e

    async def _init_read_only(self) -> None:
        try:
            meta = await self._meta()
            version = int(meta.get("schema_version", 0))
            # Version 1 lacks only the snapshots table, which readers of events do not need.
            if version not in (1, SCHEMA_VERSION):
                raise StoreFormatError(self._path, version, SCHEMA_VERSION)
            async with self._db.execute("SELECT coalesce(max(seq), 0) FROM transitions") as cur:
                row = await cur.fetchone()
            self._last_outbox_seq = int(row[0]) if row else 0
            async with self._db.execute("SELECT coalesce(max(seq), 0) FROM events") as cur:
                row = await cur.fetchone()
            self._last_event_seq = int(row[0]) if row else 0
            self._published_through = int(meta.get("published_through", 0))
        except sqlite3.Error as e:
            raise StoreError(f"cannot read {self._path}: {e}") from e

    async def _init(self, synchronous: Synchronous) -> None:
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={synchronous}")
            await self._db.executescript(_SCHEMA)
            async with self._db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                await self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) == 1:
                # Version 2 only added the snapshots table, which _SCHEMA just created.
                await self._db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreFormatError(self._path, int(row[0]), SCHEMA_VERSION)
            async with self._db.execute("SELECT coalesce(max(seq), 0) FROM transitions") as cur:
                row = await cur.fetchone()
            self._last_outbox_seq = int(row[0]) if row else 0
            async with self._db.execute("SELECT coalesce(max(seq), 0) FROM events") as cur:
                row = await cur.fetchone()
            self._last_event_seq = int(row[0]) if row else 0
            meta = await self._meta()
            self._published_through = int(meta.get("published_through", 0))
            if "snapshot_marks" in meta:
                try:
                    self._marks = msgspec.json.decode(meta["snapshot_marks"], type=SnapshotMarks)
                except msgspec.DecodeError:
                    self._marks = None  # as if no round had completed: a full rebuild
        except sqlite3.Error as e:
            raise StoreError(f"cannot initialise {self._path}: {e}") from e

    async def _meta(self) -> dict[str, str]:
        async with self._db.execute("SELECT key, value FROM meta") as cur:
            return {str(k): str(v) for k, v in await cur.fetchall()}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the database and release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        fd, self._lock_fd = self._lock_fd, None
        try:
            await self._db.close()
        finally:
            if fd is not None:
                os.close(fd)

    async def known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these ``(customer_id, message_id)`` pairs the log already holds."""
        keys = list(keys)
        found: set[tuple[str, str]] = set()
        # Chunks stay well under SQLite's limit on bound parameters.
        for i in range(0, len(keys), 400):
            chunk = keys[i : i + 400]
            clause = " OR ".join(["(customer_id = ? AND message_id = ?)"] * len(chunk))
            params = [v for pair in chunk for v in pair]
            try:
                async with self._db.execute(
                    f"SELECT customer_id, message_id FROM events WHERE {clause}", params
                ) as cur:
                    found.update((r[0], r[1]) for r in await cur.fetchall())
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the event log: {e}") from e
        return found

    @property
    def published_through(self) -> int:
        """The outbox position up to which every transition is confirmed published."""
        return self._published_through

    @property
    def last_event_seq(self) -> int:
        """The log position of the last event appended (0: none)."""
        return self._last_event_seq

    @property
    def last_outbox_seq(self) -> int:
        """The outbox position of the last transition appended (0: none)."""
        return self._last_outbox_seq

    @property
    def snapshot_marks(self) -> SnapshotMarks | None:
        """How far the last complete round of snapshots reached (None: no round yet)."""
        return self._marks

    async def commit(
        self,
        events: Sequence[LoggedEvent],
        transitions: Sequence[OutboxEntry] = (),
        published_through: int | None = None,
        *,
        snapshots: Sequence[Snapshot] = (),
        marks: SnapshotMarks | None = None,
    ) -> list[int]:
        """Append events and transitions, advance the published mark, and store snapshots,
        atomically.

        Args:
            events: new log entries (their ``(customer_id, message_id)`` must be new).
            transitions: new outbox entries, in the order they are to be published.
            published_through: every outbox entry up to this position is now confirmed
                published (ignored unless it moves the mark forward).
            snapshots: customer states replacing those stored (their ``log_seq`` must not be
                past the events appended before this call).
            marks: a round of snapshots is complete with this commit.

        Returns:
            The outbox positions assigned to ``transitions``, in order.

        Raises:
            StoreError: nothing was written.
        """
        mark = published_through
        if mark is not None and mark <= self._published_through:
            mark = None
        if not (events or transitions or mark is not None or snapshots or marks):
            return []
        first = self._last_outbox_seq + 1
        seqs = list(range(first, first + len(transitions)))
        event_seq = self._last_event_seq
        db = self._db
        # Shielded: once begun, a transaction ends in COMMIT or ROLLBACK even if the caller
        # is cancelled, and the caller's actors never get ahead of what is committed.
        with anyio.CancelScope(shield=True):
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    if events:
                        await db.executemany(
                            "INSERT INTO events (seq, customer_id, message_id, at, body) "
                            "VALUES (?, ?, ?, ?, ?)",
                            [
                                (seq, e.customer_id, e.message_id, e.at, e.body)
                                for seq, e in enumerate(events, event_seq + 1)
                            ],
                        )
                    if transitions:
                        await db.executemany(
                            "INSERT INTO transitions (seq, customer_id, version, segment, at, "
                            "body) VALUES (?, ?, ?, ?, ?, ?)",
                            [
                                (seq, t.customer_id, t.version, t.segment, t.at, t.body)
                                for seq, t in zip(seqs, transitions, strict=True)
                            ],
                        )
                    if mark is not None:
                        await self._set_meta("published_through", str(mark))
                    if snapshots:
                        await db.executemany(
                            "INSERT INTO snapshots "
                            "(customer_id, format, needs, log_seq, deadline, body) "
                            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET "
                            "format = excluded.format, needs = excluded.needs, "
                            "log_seq = excluded.log_seq, deadline = excluded.deadline, "
                            "body = excluded.body",
                            [
                                (s.customer_id, s.format, s.needs, s.log_seq, s.deadline, s.body)
                                for s in snapshots
                            ],
                        )
                    if marks is not None:
                        await self._set_meta("snapshot_marks", msgspec.json.encode(marks).decode())
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to {self._path}: {e}") from e
        if seqs:
            self._last_outbox_seq = seqs[-1]
        self._last_event_seq = event_seq + len(events)
        if mark is not None:
            self._published_through = mark
        if marks is not None:
            self._marks = marks
        return seqs

    async def _set_meta(self, key: str, value: str) -> None:
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def read_events(
        self, *, after: int = 0, chunk: int = 10_000
    ) -> AsyncIterator[list[LoggedEvent]]:
        """The log after position ``after`` (default: all of it) in log order, in lists of up
        to ``chunk`` entries."""
        last = after
        while True:
            try:
                async with self._db.execute(
                    "SELECT seq, customer_id, message_id, at, body FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, chunk),
                ) as cur:
                    rows = list(await cur.fetchall())
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the event log: {e}") from e
            if not rows:
                return
            last = rows[-1][0]
            yield [
                LoggedEvent(seq=r[0], customer_id=r[1], message_id=r[2], at=r[3], body=r[4])
                for r in rows
            ]

    async def read_transitions(self, *, chunk: int = 10_000) -> AsyncIterator[list[OutboxEntry]]:
        """Every outbox entry, ordered by customer and version, in lists of up to ``chunk``."""
        last: tuple[str, int] = ("", 0)
        while True:
            rows = await self._outbox_rows(
                "WHERE (customer_id, version) > (?, ?) ORDER BY customer_id, version LIMIT ?",
                (*last, chunk),
            )
            if not rows:
                return
            last = (rows[-1].customer_id, rows[-1].version)
            yield rows

    async def read_unpublished(self, *, chunk: int = 10_000) -> AsyncIterator[list[OutboxEntry]]:
        """Outbox entries not yet confirmed published, in publishing order."""
        async for rows in self.read_outbox(after=self._published_through, chunk=chunk):
            yield rows

    async def read_outbox(
        self, *, after: int = 0, chunk: int = 10_000
    ) -> AsyncIterator[list[OutboxEntry]]:
        """Outbox entries after position ``after``, in publishing order."""
        last = after
        while True:
            rows = await self._outbox_rows("WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk))
            if not rows:
                return
            last = rows[-1].seq
            yield rows

    async def _outbox_rows(self, clause: str, params: tuple[object, ...]) -> list[OutboxEntry]:
        try:
            async with self._db.execute(
                f"SELECT seq, customer_id, version, segment, at, body FROM transitions {clause}",
                params,
            ) as cur:
                rows = list(await cur.fetchall())
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the outbox: {e}") from e
        through = self._published_through
        return [
            OutboxEntry(
                seq=r[0],
                customer_id=r[1],
                version=r[2],
                segment=r[3],
                at=r[4],
                body=r[5],
                published=r[0] <= through,
            )
            for r in rows
        ]

    async def count_events(self) -> int:
        """How many events the log holds."""
        try:
            async with self._db.execute("SELECT count(*) FROM events") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the event log: {e}") from e
        return int(row[0]) if row else 0

    # Per customer ---------------------------------------------------------------------------

    async def customer_events(self, customer_ids: Iterable[str]) -> list[LoggedEvent]:
        """Every event of these customers, in log order."""
        out: list[LoggedEvent] = []
        for chunk in _chunks(customer_ids):
            try:
                async with self._db.execute(
                    "SELECT seq, customer_id, message_id, at, body FROM events "
                    f"WHERE customer_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ) as cur:
                    rows = await cur.fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the event log: {e}") from e
            out += (
                LoggedEvent(seq=r[0], customer_id=r[1], message_id=r[2], at=r[3], body=r[4])
                for r in rows
            )
        out.sort(key=lambda e: e.seq)
        return out

    async def customer_transitions(self, customer_ids: Iterable[str]) -> list[OutboxEntry]:
        """Every outbox entry of these customers, ordered by customer and version."""
        out: list[OutboxEntry] = []
        for chunk in _chunks(customer_ids):
            out += await self._outbox_rows(
                f"WHERE customer_id IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
        out.sort(key=lambda t: (t.customer_id, t.version))
        return out

    # Snapshots ------------------------------------------------------------------------------

    async def snapshots_of(self, customer_ids: Iterable[str]) -> list[Snapshot]:
        """The stored snapshots of these customers (those that have one)."""
        out: list[Snapshot] = []
        for chunk in _chunks(customer_ids):
            out += await self._snapshot_rows(
                f"WHERE customer_id IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
        return out

    async def page_snapshots(self, after: tuple[int, str] | None, limit: int) -> list[Snapshot]:
        """Up to ``limit`` snapshots in order of (deadline, customer), after ``after``: the
        customers whose time-based changes are due first come first."""
        if after is None:
            return await self._snapshot_rows("ORDER BY deadline, customer_id LIMIT ?", (limit,))
        return await self._snapshot_rows(
            "WHERE (deadline, customer_id) > (?, ?) ORDER BY deadline, customer_id LIMIT ?",
            (*after, limit),
        )

    async def count_snapshots(self) -> int:
        """How many customers have a snapshot."""
        try:
            async with self._db.execute("SELECT count(*) FROM snapshots") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the snapshots: {e}") from e
        return int(row[0]) if row else 0

    async def _snapshot_rows(self, clause: str, params: tuple[object, ...]) -> list[Snapshot]:
        try:
            async with self._db.execute(
                "SELECT customer_id, format, needs, log_seq, deadline, body FROM snapshots "
                + clause,
                params,
            ) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the snapshots: {e}") from e
        return [
            Snapshot(
                customer_id=r[0], format=r[1], needs=r[2], log_seq=r[3], deadline=r[4], body=r[5]
            )
            for r in rows
        ]

    # History imports ------------------------------------------------------------------------

    async def import_events(self, events: Sequence[LoggedEvent]) -> int:
        """Append the events the log does not hold yet, in one transaction; return how many.

        Unlike :meth:`commit`, an event whose ``(customer_id, message_id)`` is already logged,
        or comes earlier in ``events``, is skipped rather than failing the write: imported
        history may overlap what the log holds, and importing it twice adds nothing. The new
        events get the next log positions, in the order given, as :meth:`commit` assigns
        them. The outbox, the snapshots and their marks are left alone, so an engine started
        afterwards finds these events in the tail after its last round of snapshots.

        Args:
            events: log entries (``seq`` is ignored); tens of thousands per call keep a large
                import fast.

        Returns:
            How many of ``events`` were new (the others were repeats).

        Raises:
            StoreError: nothing was written.
        """
        if not events:
            return 0
        db = self._db
        # Shielded: once begun, a transaction ends in COMMIT or ROLLBACK even if the caller
        # is cancelled, and the caller's actors never get ahead of what is committed.
        with anyio.CancelScope(shield=True):
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    # No seq given: SQLite assigns one past the largest, which is what commit()
                    # does (this process holds the only writer's lock, so that is _last_event_seq).
                    cur = await db.executemany(
                        "INSERT OR IGNORE INTO events (customer_id, message_id, at, body) "
                        "VALUES (?, ?, ?, ?)",
                        [(e.customer_id, e.message_id, e.at, e.body) for e in events],
                    )
                    added = cur.rowcount
                    async with db.execute("SELECT coalesce(max(seq), 0) FROM events") as cur:
                        row = await cur.fetchone()
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to {self._path}: {e}") from e
        self._last_event_seq = int(row[0]) if row else 0
        return int(added)


def _chunks(ids: Iterable[str], size: int = 500) -> Iterator[list[str]]:
    """Lists of up to ``size`` ids: well under SQLite's limit on bound parameters."""
    batch: list[str] = []
    for i in ids:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
