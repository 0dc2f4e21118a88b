"""Retention: the customers' *bases*, their state as of the cut of the event log, and the cut.

With a retention policy the engine cuts the oldest part of the event log. What the cut events
made of each customer is kept first, as that customer's base: its state folded from every
event of its own up to the cut (the same encoding as a snapshot's body), so that whatever
rebuilds a customer from the log (a start without usable snapshots, a definitions change,
an import, ``shoal rebuild``) starts from its base and folds only the log after the cut.

A snapshot is a customer's *latest* state, so it cannot stand for the cut: the bases are
their own table. They change only when the cut moves (:meth:`store.Store.cut_log`), in the
transaction that deletes the events folded into them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import msgspec

from ._db import Db, chunks, placeholders
from ._errors import StoreError

RETENTION_TABLE = """
CREATE TABLE IF NOT EXISTS bases (
    customer_id TEXT PRIMARY KEY,
    format INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""
# One row per customer with an event before the cut. ``format`` and ``body`` are those of a
# snapshot body (opaque here). Where the cut stands is one ``meta`` value (CutMark).

_CUT = "log_cut"
"""The ``meta`` key of :attr:`Retention.cut`."""
_READING = "cannot read the retention bases"


class CustomerBase(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One customer's state as of the cut. ``body`` and ``format`` are opaque to the
    store."""

    customer_id: str
    format: int
    body: bytes


class CutMark(msgspec.Struct, frozen=True, kw_only=True):
    """Where the event log was cut: every event up to log position ``through`` is folded
    into its customer's base and gone from the log."""

    through: int
    """The last log position cut (every position up to it is gone)."""
    at: int
    """The latest receive instant among the events cut (microseconds since the epoch):
    the history before it is in the bases only. (The log after ``through`` may still hold
    events received before it, out of receive order: imported history.)"""
    needs: str
    """What facts the bases keep exactly, for all time (opaque: the engine's record)."""
    partitions: dict[int, int] = {}
    """Per partition of the events stream, the stream position up to which every message of
    the partition is folded into the bases or was no event of the log (rejected, a control
    message): the stream may be cut up to it. A partition the store holds no such position
    for is not cut."""


class Retention:
    """The bases and the cut of a :class:`store.Store` (``store.retention``)."""

    def __init__(self, db: Db, cut: CutMark | None) -> None:
        self._db = db
        self._cut = cut

    @classmethod
    async def load(cls, db: Db, meta: dict[str, str]) -> Retention:
        """The retention part of an opened store (its ``meta`` given).

        Raises:
            StoreError: the recorded cut cannot be read (a store written by a newer shoal).
        """
        cut = None
        if _CUT in meta:
            try:
                cut = msgspec.json.decode(meta[_CUT], type=CutMark)
            except msgspec.DecodeError as e:
                # Never read as "no cut": that would take the log for the whole history.
                raise StoreError(f"the log cut recorded in {db.path} cannot be read: {e}") from e
        return cls(db, cut)

    @property
    def cut(self) -> CutMark | None:
        """Where the log was cut (None: never, the log holds the whole history)."""
        return self._cut

    async def of(self, customer_ids: Iterable[str]) -> list[CustomerBase]:
        """The bases of these customers (those that have one)."""
        out: list[CustomerBase] = []
        for ids in chunks(customer_ids):
            rows = await self._db.rows(
                "SELECT customer_id, format, body FROM bases "
                f"WHERE customer_id IN ({placeholders(len(ids))})",
                ids,
                doing=_READING,
            )
            out += [CustomerBase(customer_id=r[0], format=r[1], body=r[2]) for r in rows]
        return out

    async def read(self, *, chunk: int = 10_000) -> AsyncIterator[list[CustomerBase]]:
        """Every base, in customer order, in lists of up to ``chunk``."""
        last = ""
        first = True
        while True:
            rows = await self._db.rows(
                "SELECT customer_id, format, body FROM bases WHERE customer_id > ? OR ? "
                "ORDER BY customer_id LIMIT ?",
                (last, first, chunk),
                doing=_READING,
            )
            if not rows:
                return
            first = False
            last = rows[-1][0]
            yield [CustomerBase(customer_id=r[0], format=r[1], body=r[2]) for r in rows]

    async def count(self) -> int:
        """How many customers have a base (0 before any cut)."""
        if self._cut is None:
            return 0  # a store older than the table, opened read only, has none either
        return await self._db.count("bases", doing=_READING)

    # Inside the store's transactions ---------------------------------------------------------

    async def _cut_to(self, bases: Sequence[CustomerBase], mark: CutMark) -> None:
        db = self._db
        if bases:
            await db.execute_many(
                "INSERT INTO bases (customer_id, format, body) VALUES (?, ?, ?) "
                "ON CONFLICT (customer_id) DO UPDATE SET "
                "format = excluded.format, body = excluded.body",
                [(b.customer_id, b.format, b.body) for b in bases],
                doing=db.writing,
            )
        await db.execute("DELETE FROM events WHERE seq <= ?", (mark.through,), doing=db.writing)
        await db.set_meta(_CUT, msgspec.json.encode(mark).decode())

    async def _drop(self, customer_ids: Sequence[str]) -> None:
        db = self._db
        for ids in chunks(customer_ids):
            await db.execute(
                f"DELETE FROM bases WHERE customer_id IN ({placeholders(len(ids))})",
                ids,
                doing=db.writing,
            )

    async def _drop_partitions(self, partitions: Iterable[int]) -> CutMark | None:
        """Forget the stream positions of ``partitions`` (their customers dropped: another
        engine holds them now); the mark to commit (None: unchanged)."""
        cut = self._cut
        gone = set(partitions)  # (read once: an iterator would be spent by a first look)
        if cut is None or gone.isdisjoint(cut.partitions):
            return None
        mark = msgspec.structs.replace(
            cut, partitions={p: s for p, s in cut.partitions.items() if p not in gone}
        )
        await self._db.set_meta(_CUT, msgspec.json.encode(mark).decode())
        return mark

    def _committed(self, mark: CutMark) -> None:
        self._cut = mark
