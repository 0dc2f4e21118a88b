"""The event log: every event a customer sent, once, in the order the engine applied them.

The log is the truth: actors are rebuilt from it. It is written only inside the store's
transactions (:meth:`store.Store.commit`, :meth:`store.Store.import_events`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import msgspec

from ._db import Db, Row, chunks, placeholders

_READING = "cannot read the event log"
_COLUMNS = "SELECT seq, customer_id, message_id, at, body FROM events"


class LoggedEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One entry of the event log. ``body`` is opaque to the store."""

    customer_id: str
    message_id: str
    at: int
    body: bytes
    seq: int = 0
    """The log position, assigned on append (0 before)."""
    stream_seq: int | None = None
    """Its position in the events stream (None: logged without one, as by an offline
    import); read back only by :meth:`EventLog.part`."""


def _entries(rows: list[Row]) -> list[LoggedEvent]:
    # One comprehension, no call per row: a rebuild reads millions of them.
    return [
        LoggedEvent(seq=r[0], customer_id=r[1], message_id=r[2], at=r[3], body=r[4]) for r in rows
    ]


class EventLog:
    """The event log of a :class:`store.Store` (``store.events``)."""

    def __init__(self, db: Db, last_seq: int) -> None:
        self._db = db
        self._last_seq = last_seq

    @classmethod
    async def load(cls, db: Db, *, doing: str) -> EventLog:
        """The log of an opened store."""
        return cls(db, await db.max_seq("events", doing=doing))

    @property
    def last_seq(self) -> int:
        """The log position of the last event appended (0: none)."""
        return self._last_seq

    async def known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these ``(customer_id, message_id)`` pairs the log already holds."""
        keys = list(keys)
        found: set[tuple[str, str]] = set()
        # Chunks stay well under SQLite's limit on bound parameters.
        for i in range(0, len(keys), 400):
            chunk = keys[i : i + 400]
            clause = " OR ".join(["(customer_id = ? AND message_id = ?)"] * len(chunk))
            params = [v for pair in chunk for v in pair]
            rows = await self._db.rows(
                f"SELECT customer_id, message_id FROM events WHERE {clause}", params, doing=_READING
            )
            found.update((r[0], r[1]) for r in rows)
        return found

    async def read(
        self, *, after: int = 0, chunk: int = 10_000
    ) -> AsyncIterator[list[LoggedEvent]]:
        """The log after position ``after`` (default: all of it) in log order, in lists of up
        to ``chunk`` entries."""
        last = after
        while True:
            rows = await self._db.rows(
                f"{_COLUMNS} WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk), doing=_READING
            )
            if not rows:
                return
            last = rows[-1][0]
            yield _entries(rows)

    async def part(self, *, after: int, limit: int) -> list[LoggedEvent]:
        """Up to ``limit`` entries after position ``after``, in log order, with their
        stream positions (of a store opened for writing: older ones lack them)."""
        rows = await self._db.rows(
            "SELECT seq, customer_id, message_id, at, body, stream_seq FROM events "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
            doing=_READING,
        )
        return [
            LoggedEvent(
                seq=r[0], customer_id=r[1], message_id=r[2], at=r[3], body=r[4], stream_seq=r[5]
            )
            for r in rows
        ]

    async def of_customers(self, customer_ids: Iterable[str]) -> list[LoggedEvent]:
        """Every event of these customers, in log order."""
        out: list[LoggedEvent] = []
        for ids in chunks(customer_ids):
            rows = await self._db.rows(
                f"{_COLUMNS} WHERE customer_id IN ({placeholders(len(ids))})", ids, doing=_READING
            )
            out += _entries(rows)
        out.sort(key=lambda e: e.seq)
        return out

    async def count(self) -> int:
        """How many events the log holds."""
        return await self._db.count("events", doing=_READING)

    # Inside the store's transactions ---------------------------------------------------------

    async def _append(self, events: Sequence[LoggedEvent]) -> int:
        """Write ``events`` at the next positions; return the last position (for
        :meth:`_committed`, once the transaction is)."""
        first = self._last_seq + 1
        if events:
            await self._db.execute_many(
                "INSERT INTO events (seq, customer_id, message_id, at, body, stream_seq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (seq, e.customer_id, e.message_id, e.at, e.body, e.stream_seq)
                    for seq, e in enumerate(events, first)
                ],
                doing=self._db.writing,
            )
        return first - 1 + len(events)

    async def _import(self, events: Sequence[LoggedEvent]) -> tuple[int, int]:
        """Write the events the log does not hold yet; return how many, and the last
        position (for :meth:`_committed`)."""
        # The next positions, in the order given, as _append() gives them: never one at or
        # below last_seq, even after the last rows were removed (Store.drop_customers), or
        # a position recorded before would cover it. So the repeats are left out first.
        held = await self.known((e.customer_id, e.message_id) for e in events)
        new: list[LoggedEvent] = []
        for e in events:
            key = (e.customer_id, e.message_id)
            if key not in held:
                held.add(key)
                new.append(e)
        return len(new), await self._append(new)

    def _committed(self, last_seq: int) -> None:
        self._last_seq = last_seq
