"""The SQLite connection the parts of a store share, and the one place where the driver's
errors become :class:`StoreError`.

Every query of :mod:`store` goes through :class:`Db`: a ``sqlite3.Error`` from it is
translated here, with what was being done, and chained (``raise ... from e``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from ._errors import StoreError, StoreFullError

Row = sqlite3.Row
"""A result row (a tuple: no row factory is set)."""


def _disk_full(e: sqlite3.Error, path: Path) -> bool:
    """Whether ``e`` says the disk holding ``path`` is full: SQLITE_FULL, or an I/O error
    while that disk has no room left (SQLite reports some failed writes only as I/O errors)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return False
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    if code & 0xFF != sqlite3.SQLITE_IOERR:
        return False
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def translated(doing: str, path: Path | None = None) -> Iterator[None]:
    """Turn a ``sqlite3.Error`` raised inside into :class:`StoreError` ``"{doing}: {error}"``
    (:class:`StoreFullError` when the disk holding ``path`` is full), and an ``OSError`` for
    a full disk into :class:`StoreFullError`."""
    try:
        yield
    except sqlite3.Error as e:
        if path is not None and _disk_full(e, path):
            raise StoreFullError(path, doing) from e
        raise StoreError(f"{doing}: {e}") from e
    except OSError as e:
        if path is not None and e.errno == errno.ENOSPC:
            raise StoreFullError(path, doing) from e
        raise


def chunks(ids: Iterable[str], size: int = 500) -> Iterator[list[str]]:
    """Lists of up to ``size`` ids: well under SQLite's limit on bound parameters."""
    batch: list[str] = []
    for i in ids:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def placeholders(n: int) -> str:
    """``?,?,...``: ``n`` bound parameters, for ``IN (...)``."""
    return ",".join("?" * n)


class Db:
    """One open SQLite connection (in autocommit mode: transactions are explicit).

    Each query names what it was doing, which is what a failure says.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        # One transaction at a time on the connection: the engine's main loop commits, and
        # its erasures (a task beside it) write too.
        self._lock = anyio.Lock()
        self.path = path
        self.writing = f"cannot write to {path}"
        """What a failed write says (the whole transaction failed, nothing was written)."""

    @classmethod
    async def connect(cls, path: Path, *, read_only: bool) -> Db:
        """Open ``path`` (read only: without creating it, and without writing to it).

        Raises:
            StoreError: it cannot be opened.
        """
        with translated(f"cannot open {path}", path):
            if read_only:
                conn = await aiosqlite.connect(
                    path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None
                )
            else:
                conn = await aiosqlite.connect(path, isolation_level=None)
        return cls(conn, path)

    async def close(self) -> None:
        """Close the connection."""
        with translated(f"cannot close {self.path}", self.path):
            await self._conn.close()

    async def rows(self, sql: str, params: Sequence[Any] = (), *, doing: str) -> list[Row]:
        """Every row ``sql`` returns."""
        with translated(doing, self.path):
            async with self._conn.execute(sql, params) as cur:
                return list(await cur.fetchall())

    async def one(self, sql: str, params: Sequence[Any] = (), *, doing: str) -> Row | None:
        """The first row ``sql`` returns (None: none)."""
        with translated(doing, self.path):
            async with self._conn.execute(sql, params) as cur:
                return await cur.fetchone()

    async def execute(self, sql: str, params: Sequence[Any] = (), *, doing: str) -> None:
        """Run one statement."""
        with translated(doing, self.path):
            await self._conn.execute(sql, params)

    async def execute_many(self, sql: str, params: Iterable[Sequence[Any]], *, doing: str) -> int:
        """Run one statement for each parameter tuple; return the rows it changed."""
        with translated(doing, self.path):
            cur = await self._conn.executemany(sql, params)
            return int(cur.rowcount)

    async def script(self, sql: str, *, doing: str) -> None:
        """Run several statements."""
        with translated(doing, self.path):
            await self._conn.executescript(sql)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A write transaction around the block: committed when it ends, rolled back when it
        raises. Shielded from cancellation: once begun, it ends in COMMIT or ROLLBACK even
        if the caller is cancelled, so what the caller did in memory never gets ahead of
        what is committed.

        Raises:
            StoreError: (``cannot write to ...``) nothing was written.
        """
        with anyio.CancelScope(shield=True):
            await self._lock.acquire()
        try:
            async with self._transaction():
                yield
        finally:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        with anyio.CancelScope(shield=True), translated(self.writing, self.path):
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._conn.execute("COMMIT")
            except BaseException:
                # After some errors (a full disk among them) SQLite has rolled back already;
                # a failed ROLLBACK must not hide the error that caused it.
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await self._conn.execute("ROLLBACK")
                raise

    async def checkpoint(self) -> bool:
        """Copy the write-ahead log into the file and truncate it, between transactions;
        False when a reader kept it from finishing.

        Raises:
            StoreError: it failed.
        """
        async with self._lock:
            row = await self.one(
                "PRAGMA wal_checkpoint(TRUNCATE)", doing=f"cannot checkpoint {self.path}"
            )
        return row is None or int(row[0]) == 0

    async def meta(self, *, doing: str) -> dict[str, str]:
        """The store's ``meta`` table: key to value."""
        rows = await self.rows("SELECT key, value FROM meta", doing=doing)
        return {str(k): str(v) for k, v in rows}

    async def set_meta(self, key: str, value: str) -> None:
        """Set one ``meta`` value (inside a :meth:`transaction`)."""
        await self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
            doing=self.writing,
        )

    async def max_seq(self, table: str, *, doing: str) -> int:
        """The largest ``seq`` of ``table`` (0: empty)."""
        row = await self.one(f"SELECT coalesce(max(seq), 0) FROM {table}", doing=doing)
        return int(row[0]) if row else 0

    async def count(self, table: str, *, doing: str) -> int:
        """How many rows ``table`` holds."""
        row = await self.one(f"SELECT count(*) FROM {table}", doing=doing)
        return int(row[0]) if row else 0
