"""The engine's copy of the definitions in force: one row, replaced each time definitions are
applied, beside the shared copy on the broker (``SHOAL_DEFINITIONS``).

The store keeps the record opaque (``body``: bytes the engine encodes); its version and the
instant it was applied are columns, so a person can read them with ``sqlite3``.
"""

from __future__ import annotations

import msgspec

from ._db import Db

DEFINITIONS_TABLE = """
CREATE TABLE IF NOT EXISTS definitions (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    version INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""
# One row (slot 1): only the definitions in force are kept; the transitions in the outbox
# say what earlier definitions did.


_MARKED = "definitions_marked"
"""The ``meta`` key of :meth:`Definitions.marked`."""


class StoredRow(msgspec.Struct, frozen=True, kw_only=True):
    """The stored definitions in force."""

    version: int
    applied_at: int
    """When they were applied (microseconds since the epoch)."""
    body: bytes
    """The engine's record of them."""


class Definitions:
    """The definitions in force of a :class:`store.Store` (``store.definitions``)."""

    def __init__(self, db: Db) -> None:
        self._db = db

    async def get(self) -> StoredRow | None:
        """The stored definitions, or None (none stored yet, or a store older than the
        table, opened read only).

        Raises:
            StoreError: the store cannot be read.
        """
        doing = f"cannot read the definitions stored in {self._db.path}"
        exists = await self._db.one(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'definitions'",
            doing=doing,
        )
        if exists is None:
            return None
        row = await self._db.one(
            "SELECT version, applied_at, body FROM definitions WHERE slot = 1", doing=doing
        )
        if row is None:
            return None
        return StoredRow(version=int(row[0]), applied_at=int(row[1]), body=bytes(row[2]))

    async def marked(self) -> int | None:
        """The version whose definitions markers were all published into the events stream
        (see :meth:`set_marked`); None when none was.

        Raises:
            StoreError: the store cannot be read.
        """
        row = await self._db.one(
            "SELECT value FROM meta WHERE key = ?",
            (_MARKED,),
            doing=f"cannot read the definitions markers of {self._db.path}",
        )
        return None if row is None else int(row[0])

    async def set_marked(self, version: int) -> None:
        """Record that the definitions markers of ``version`` were all published.

        Raises:
            StoreError: nothing was written.
        """
        async with self._db.transaction():
            await self._db.set_meta(_MARKED, str(version))

    async def put(self, row: StoredRow) -> None:
        """Store ``row`` in place of the definitions stored, in a transaction of its own.

        Raises:
            StoreError: nothing was written.
        """
        async with self._db.transaction():
            await self._db.execute(
                "INSERT INTO definitions (slot, version, applied_at, body) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (slot) DO UPDATE SET version = excluded.version, "
                "applied_at = excluded.applied_at, body = excluded.body",
                (row.version, row.applied_at, row.body),
                doing=self._db.writing,
            )
