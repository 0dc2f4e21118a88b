"""The transitions outbox: every transition the engine made, to be published in order.

It is append-only, and what is confirmed published is a prefix of it: one position,
``published_through``, marks it. It is written only inside the store's transactions
(:meth:`store.Store.commit`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import msgspec

from ._db import Db, chunks, placeholders

_READING = "cannot read the outbox"


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


class Outbox:
    """The outbox of a :class:`store.Store` (``store.outbox``)."""

    def __init__(self, db: Db, last_seq: int, published_through: int) -> None:
        self._db = db
        self._last_seq = last_seq
        self._published_through = published_through

    @classmethod
    async def load(cls, db: Db, meta: dict[str, str], *, doing: str) -> Outbox:
        """The outbox of an opened store (its ``meta`` given)."""
        last_seq = await db.max_seq("transitions", doing=doing)
        return cls(db, last_seq, int(meta.get("published_through", 0)))

    @property
    def last_seq(self) -> int:
        """The outbox position of the last transition appended (0: none)."""
        return self._last_seq

    @property
    def published_through(self) -> int:
        """The outbox position up to which every transition is confirmed published."""
        return self._published_through

    async def read(
        self, *, after: int = 0, chunk: int = 10_000
    ) -> AsyncIterator[list[OutboxEntry]]:
        """Outbox entries after position ``after`` (default: all), in publishing order, in
        lists of up to ``chunk``."""
        last = after
        while True:
            rows = await self._rows("WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk))
            if not rows:
                return
            last = rows[-1].seq
            yield rows

    async def unpublished(self, *, chunk: int = 10_000) -> AsyncIterator[list[OutboxEntry]]:
        """Outbox entries not yet confirmed published, in publishing order."""
        async for rows in self.read(after=self._published_through, chunk=chunk):
            yield rows

    async def by_customer(self, *, chunk: int = 10_000) -> AsyncIterator[list[OutboxEntry]]:
        """Every outbox entry, ordered by customer and version, in lists of up to ``chunk``:
        each customer's transitions together, in the order they happened."""
        last: tuple[str, int] = ("", 0)
        while True:
            rows = await self._rows(
                "WHERE (customer_id, version) > (?, ?) ORDER BY customer_id, version LIMIT ?",
                (*last, chunk),
            )
            if not rows:
                return
            last = (rows[-1].customer_id, rows[-1].version)
            yield rows

    async def of_customers(self, customer_ids: Iterable[str]) -> list[OutboxEntry]:
        """Every outbox entry of these customers, ordered by customer and version."""
        out: list[OutboxEntry] = []
        for ids in chunks(customer_ids):
            out += await self._rows(f"WHERE customer_id IN ({placeholders(len(ids))})", ids)
        out.sort(key=lambda t: (t.customer_id, t.version))
        return out

    async def _rows(self, clause: str, params: Sequence[Any]) -> list[OutboxEntry]:
        rows = await self._db.rows(
            f"SELECT seq, customer_id, version, segment, at, body FROM transitions {clause}",
            params,
            doing=_READING,
        )
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

    # Inside the store's transactions ---------------------------------------------------------

    def _next_seqs(self, n: int) -> list[int]:
        """The positions the next ``n`` entries get."""
        first = self._last_seq + 1
        return list(range(first, first + n))

    async def _append(self, entries: Sequence[OutboxEntry], seqs: Sequence[int]) -> None:
        if entries:
            await self._db.execute_many(
                "INSERT INTO transitions (seq, customer_id, version, segment, at, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (seq, t.customer_id, t.version, t.segment, t.at, t.body)
                    for seq, t in zip(seqs, entries, strict=True)
                ],
                doing=self._db.writing,
            )

    async def _mark_published(self, through: int) -> None:
        await self._db.set_meta("published_through", str(through))

    def _committed(self, seqs: Sequence[int], published_through: int | None) -> None:
        if seqs:
            self._last_seq = seqs[-1]
        if published_through is not None:
            self._published_through = published_through
