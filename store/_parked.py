"""Parked customers: those set aside after an error that no message could be blamed for.

A parked customer is not loaded, evaluated, fired or snapshotted until it is tried again; its
later events are still appended to the log. The rows are few (one per customer in trouble),
so they are read whole when the store opens, and each change is its own small transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from ._db import Db, chunks, placeholders

_TABLE = """
CREATE TABLE IF NOT EXISTS parked (
    customer_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    during TEXT NOT NULL,
    at INTEGER NOT NULL,
    log_seq INTEGER NOT NULL,
    definitions TEXT NOT NULL,
    shoal_version TEXT NOT NULL
)
"""


class ParkedCustomer(msgspec.Struct, frozen=True, kw_only=True):
    """Why and when one customer was parked. The store keeps the text fields opaque."""

    customer_id: str
    reason: str
    """The error, one line."""
    during: str
    """What the engine was doing (for example ``deadline``, ``snapshot``, ``definitions``)."""
    at: int
    """The engine clock's instant when it was parked (microseconds since the epoch)."""
    log_seq: int
    """The event log position then: the customer's events after it were not applied."""
    definitions: str
    """The fingerprint of the definitions in force then."""
    shoal_version: str
    """The version of shoal that parked it."""


class Parked:
    """The parked customers of a :class:`store.Store` (``store.parked``)."""

    def __init__(self, db: Db, rows: dict[str, ParkedCustomer]) -> None:
        self._db = db
        self._rows = rows

    @classmethod
    async def load(cls, db: Db, *, writable: bool, doing: str) -> Parked:
        """The parked customers of an opened store (an older store has none)."""
        if writable:
            await db.script(_TABLE, doing=doing)
        exists = await db.one(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'parked'", doing=doing
        )
        rows: dict[str, ParkedCustomer] = {}
        if exists is not None:
            for r in await db.rows(
                "SELECT customer_id, reason, during, at, log_seq, definitions, shoal_version "
                "FROM parked ORDER BY customer_id",
                doing=doing,
            ):
                rows[str(r[0])] = ParkedCustomer(
                    customer_id=str(r[0]),
                    reason=str(r[1]),
                    during=str(r[2]),
                    at=int(r[3]),
                    log_seq=int(r[4]),
                    definitions=str(r[5]),
                    shoal_version=str(r[6]),
                )
        return cls(db, rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, customer_id: object) -> bool:
        return customer_id in self._rows

    def get(self, customer_id: str) -> ParkedCustomer | None:
        """Why the customer is parked, or None if it is not."""
        return self._rows.get(customer_id)

    def all(self) -> list[ParkedCustomer]:
        """Every parked customer, in id order."""
        return [self._rows[i] for i in sorted(self._rows)]

    async def put(self, rows: Sequence[ParkedCustomer]) -> None:
        """Park these customers (replacing what was recorded for any already parked).

        Raises:
            StoreError: nothing was written.
        """
        if not rows:
            return
        async with self._db.transaction():
            await self._db.execute_many(
                "INSERT INTO parked (customer_id, reason, during, at, log_seq, definitions, "
                "shoal_version) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO "
                "UPDATE SET reason = excluded.reason, during = excluded.during, "
                "at = excluded.at, definitions = excluded.definitions, "
                "shoal_version = excluded.shoal_version",
                [
                    (
                        r.customer_id,
                        r.reason,
                        r.during,
                        r.at,
                        r.log_seq,
                        r.definitions,
                        r.shoal_version,
                    )
                    for r in rows
                ],
                doing=self._db.writing,
            )
        for r in rows:
            # Parked again while parked: its events are applied from where it first was.
            old = self._rows.get(r.customer_id)
            self._rows[r.customer_id] = (
                r if old is None else msgspec.structs.replace(r, log_seq=old.log_seq)
            )

    # Inside the store's transactions ---------------------------------------------------------

    async def _remove(self, customer_ids: Sequence[str]) -> None:
        """Unpark these customers (inside a transaction; :meth:`_committed` once it is)."""
        for part in chunks(customer_ids):
            await self._db.execute(
                f"DELETE FROM parked WHERE customer_id IN ({placeholders(len(part))})",
                part,
                doing=self._db.writing,
            )

    def _committed(self, customer_ids: Iterable[str]) -> None:
        for i in customer_ids:
            self._rows.pop(i, None)
