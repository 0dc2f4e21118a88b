"""Forgotten customers: the record of each erasure, without the customer's id.

A row is keyed by the hash of the id (``protocol.forget_hash``). It keeps the customer's
last version (an id that comes back continues from it), when it was forgotten, by whom,
in which request, and until when its events are refused. While the erasure is under way
(the store's part is done with the order, the broker's part and the customer's published
transitions follow) the row holds the id too; finishing clears it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ._db import Db

FORGOTTEN_TABLE = """
CREATE TABLE IF NOT EXISTS forgotten (
    hash TEXT PRIMARY KEY,
    customer_id TEXT,
    partition INTEGER NOT NULL,
    floor INTEGER NOT NULL,
    exits INTEGER NOT NULL,
    at INTEGER NOT NULL,
    by TEXT NOT NULL,
    request TEXT NOT NULL,
    suppress_until INTEGER,
    order_seq INTEGER NOT NULL,
    outbox_through INTEGER NOT NULL
);
"""


class Forgotten(msgspec.Struct, frozen=True, kw_only=True):
    """One customer's erasure."""

    hash: str
    customer_id: str | None
    """The id, while the erasure is pending; None once it finished."""
    partition: int
    floor: int
    """The customer's last version: its ``forgotten`` exits' last, or before them."""
    exits: int
    """How many ``forgotten`` exits it got (the last ``exits`` versions up to ``floor``)."""
    at: int
    """When it was forgotten: its order's receive instant."""
    by: str
    request: str
    suppress_until: int | None
    """Its events received before this instant are refused (None: not suppressed)."""
    order_seq: int
    """The stream position of its order."""
    outbox_through: int
    """The outbox position of its last exit (0: none): the store's part of the erasure of
    its published transitions waits until the outbox is published through it."""

    @property
    def pending(self) -> bool:
        """Whether the erasure is still under way."""
        return self.customer_id is not None


_COLUMNS = (
    "hash, customer_id, partition, floor, exits, at, by, request, suppress_until, order_seq, "
    "outbox_through"
)


class ForgottenTable:
    """The ``forgotten`` table, read whole when the store opens (one row per forgotten
    customer: small next to the log)."""

    def __init__(self, db: Db, rows: dict[str, Forgotten]) -> None:
        self._db = db
        self._rows = rows
        # Looked at every second by the engine: kept apart from the (growing) rest.
        self._pending = {h: f for h, f in rows.items() if f.pending}

    @classmethod
    async def load(cls, db: Db, *, doing: str) -> ForgottenTable:
        """Read the table (an older store without it reads as empty)."""
        exists = await db.one(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forgotten'",
            doing=doing,
        )
        rows: dict[str, Forgotten] = {}
        if exists is not None:
            for r in await db.rows(f"SELECT {_COLUMNS} FROM forgotten", doing=doing):
                f = Forgotten(
                    hash=r[0],
                    customer_id=r[1],
                    partition=r[2],
                    floor=r[3],
                    exits=r[4],
                    at=r[5],
                    by=r[6],
                    request=r[7],
                    suppress_until=r[8],
                    order_seq=r[9],
                    outbox_through=r[10],
                )
                rows[f.hash] = f
        return cls(db, rows)

    def get(self, hash_: str) -> Forgotten | None:
        """The erasure of the customer with this hash, if any."""
        return self._rows.get(hash_)

    def all(self) -> list[Forgotten]:
        """Every erasure recorded."""
        return list(self._rows.values())

    def pending(self) -> list[Forgotten]:
        """The erasures still under way, in order of their orders."""
        return sorted(self._pending.values(), key=lambda f: f.order_seq)

    async def _put(self, rows: Sequence[Forgotten]) -> None:
        await self._db.execute_many(
            f"INSERT OR REPLACE INTO forgotten ({_COLUMNS}) VALUES ({', '.join('?' * 11)})",
            [
                (
                    f.hash,
                    f.customer_id,
                    f.partition,
                    f.floor,
                    f.exits,
                    f.at,
                    f.by,
                    f.request,
                    f.suppress_until,
                    f.order_seq,
                    f.outbox_through,
                )
                for f in rows
            ],
            doing=self._db.writing,
        )

    def _committed(self, rows: Sequence[Forgotten]) -> None:
        for f in rows:
            self._rows[f.hash] = f
            if f.pending:
                self._pending[f.hash] = f
            else:
                self._pending.pop(f.hash, None)
