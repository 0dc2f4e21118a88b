"""Snapshots: each customer's stored state, and how far the last complete round reached.

A restart loads customers from their snapshots and replays only the *tail* of the log
after the round's marks. Written only inside the store's transactions
(:meth:`store.Store.commit`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ._db import Db, chunks, placeholders

_READING = "cannot read the snapshots"


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One customer's stored state. ``body`` and ``format`` are opaque to the store."""

    customer_id: str
    format: int
    needs: str
    """What the facts in it were kept for (a fingerprint of the rules' needs)."""
    log_seq: int
    """The event log position it reflects: the customer's events after it are not in it."""
    deadline: int
    """The customer's next deadline when it was taken (``protocol.NEVER``: none)."""
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


class Snapshots:
    """The snapshots of a :class:`store.Store` (``store.snapshots``)."""

    def __init__(self, db: Db, marks: SnapshotMarks | None) -> None:
        self._db = db
        self._marks = marks

    @classmethod
    def load(cls, db: Db, meta: dict[str, str]) -> Snapshots:
        """The snapshots of an opened store (its ``meta`` given)."""
        marks = None
        if "snapshot_marks" in meta:
            try:
                marks = msgspec.json.decode(meta["snapshot_marks"], type=SnapshotMarks)
            except msgspec.DecodeError:
                marks = None  # as if no round had completed: a full rebuild
        return cls(db, marks)

    @property
    def marks(self) -> SnapshotMarks | None:
        """How far the last complete round of snapshots reached (None: no round yet)."""
        return self._marks

    async def of(self, customer_ids: Iterable[str]) -> list[Snapshot]:
        """The stored snapshots of these customers (those that have one)."""
        out: list[Snapshot] = []
        for ids in chunks(customer_ids):
            out += await self._rows(f"WHERE customer_id IN ({placeholders(len(ids))})", ids)
        return out

    async def page(self, after: tuple[int, str] | None, limit: int) -> list[Snapshot]:
        """Up to ``limit`` snapshots in order of (deadline, customer), after ``after``: the
        customers whose time-based changes are due first come first."""
        if after is None:
            return await self._rows("ORDER BY deadline, customer_id LIMIT ?", (limit,))
        return await self._rows(
            "WHERE (deadline, customer_id) > (?, ?) ORDER BY deadline, customer_id LIMIT ?",
            (*after, limit),
        )

    async def formats(self) -> dict[int, int]:
        """How many snapshots there are of each format (a scan of them all)."""
        rows = await self._db.rows(
            "SELECT format, count(*) FROM snapshots GROUP BY format", (), doing=_READING
        )
        return {int(r[0]): int(r[1]) for r in rows}

    async def count(self) -> int:
        """How many customers have a snapshot."""
        return await self._db.count("snapshots", doing=_READING)

    async def _rows(self, clause: str, params: Sequence[Any]) -> list[Snapshot]:
        rows = await self._db.rows(
            "SELECT customer_id, format, needs, log_seq, deadline, body FROM snapshots " + clause,
            params,
            doing=_READING,
        )
        return [
            Snapshot(
                customer_id=r[0], format=r[1], needs=r[2], log_seq=r[3], deadline=r[4], body=r[5]
            )
            for r in rows
        ]

    # Inside the store's transactions ---------------------------------------------------------

    async def _put(self, snapshots: Sequence[Snapshot]) -> None:
        if snapshots:
            await self._db.execute_many(
                "INSERT INTO snapshots (customer_id, format, needs, log_seq, deadline, body) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET "
                "format = excluded.format, needs = excluded.needs, "
                "log_seq = excluded.log_seq, deadline = excluded.deadline, "
                "body = excluded.body",
                [
                    (s.customer_id, s.format, s.needs, s.log_seq, s.deadline, s.body)
                    for s in snapshots
                ],
                doing=self._db.writing,
            )

    async def _mark(self, marks: SnapshotMarks) -> None:
        await self._db.set_meta("snapshot_marks", msgspec.json.encode(marks).decode())

    def _committed(self, marks: SnapshotMarks | None) -> None:
        if marks is not None:
            self._marks = marks
