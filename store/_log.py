"""The append-only event log and the transitions outbox, in one SQLite file.

The log is the truth: actors are rebuilt from it. Each micro-batch is one transaction that
appends its events and the transitions they caused, and marks earlier transitions as
published, so the log, the outbox and the consumer position never disagree after a crash.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import aiosqlite
import msgspec

from ._errors import StoreError, StoreFormatError, StoreLockedError

SCHEMA_VERSION = 1

Synchronous = Literal["NORMAL", "FULL"]

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
    customer_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    segment TEXT NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS transitions_unpublished
    ON transitions (customer_id, version) WHERE published = 0;
"""


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
    published: bool = False


class EventLog:
    """The SQLite store of one engine: event log plus transitions outbox.

    Open it with ``async with await EventLog.open(path):``. Only one process may hold a
    store at a time (an advisory lock beside the file enforces it).
    """

    def __init__(self, db: aiosqlite.Connection, path: Path, lock_fd: int) -> None:
        self._db = db
        self._path = path
        self._lock_fd: int | None = lock_fd

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
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreFormatError(self._path, int(row[0]), SCHEMA_VERSION)
        except sqlite3.Error as e:
            raise StoreError(f"cannot initialise {self._path}: {e}") from e

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
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            await self._db.close()
        finally:
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

    async def commit(
        self,
        events: Sequence[LoggedEvent],
        transitions: Sequence[OutboxEntry] = (),
        published: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Append events and transitions, and mark transitions published, atomically.

        Args:
            events: new log entries (their ``(customer_id, message_id)`` must be new).
            transitions: new outbox entries (unpublished).
            published: ``(customer_id, version)`` of outbox entries now confirmed published.

        Raises:
            StoreError: nothing was written.
        """
        if not (events or transitions or published):
            return
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                if events:
                    await db.executemany(
                        "INSERT INTO events (customer_id, message_id, at, body) "
                        "VALUES (?, ?, ?, ?)",
                        [(e.customer_id, e.message_id, e.at, e.body) for e in events],
                    )
                if transitions:
                    await db.executemany(
                        "INSERT INTO transitions "
                        "(customer_id, version, segment, at, body) VALUES (?, ?, ?, ?, ?)",
                        [(t.customer_id, t.version, t.segment, t.at, t.body) for t in transitions],
                    )
                if published:
                    await db.executemany(
                        "UPDATE transitions SET published = 1 "
                        "WHERE customer_id = ? AND version = ?",
                        published,
                    )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to {self._path}: {e}") from e

    async def read_events(self, *, chunk: int = 10_000) -> AsyncIterator[list[LoggedEvent]]:
        """The whole log in log order, in lists of up to ``chunk`` entries."""
        last = 0
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

    async def read_transitions(
        self, *, unpublished_only: bool = False, chunk: int = 10_000
    ) -> AsyncIterator[list[OutboxEntry]]:
        """Outbox entries ordered by customer and version, in lists of up to ``chunk``."""
        where = "AND published = 0" if unpublished_only else ""
        last: tuple[str, int] = ("", 0)
        while True:
            try:
                async with self._db.execute(
                    "SELECT customer_id, version, segment, at, body, published FROM transitions "
                    f"WHERE (customer_id, version) > (?, ?) {where} "
                    "ORDER BY customer_id, version LIMIT ?",
                    (*last, chunk),
                ) as cur:
                    rows = list(await cur.fetchall())
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the outbox: {e}") from e
            if not rows:
                return
            last = (rows[-1][0], rows[-1][1])
            yield [
                OutboxEntry(
                    customer_id=r[0],
                    version=r[1],
                    segment=r[2],
                    at=r[3],
                    body=r[4],
                    published=bool(r[5]),
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
