"""What was published of customers rebuilt from the log: their memberships, version and
watermark, taken from their transitions in the outbox, or, for a customer whose earliest
transitions another engine published, from the snapshot its takeover wrote.

A partition taken over from another engine (:func:`~actors.engine._takeover.take_over`)
comes with its events (the log holds each customer's whole history) and its customers'
snapshots, but none of their transitions up to the snapshot: the other engine's outbox holds
those. Rebuilt from the outbox alone, such a customer would start again from version 1, and
subscribers that drop repeats by version would drop what it publishes next. Its snapshot
holds its version and memberships as of the takeover, and the outbox every transition this
engine made after it (a later snapshot of it, too, is the takeover's plus those): the two
give back the published state exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from actors._customer import SNAPSHOT_FORMAT, Customer, SnapshotError
from protocol import Transition
from store import Store

from ._config import breathe

_SLICE = 10_000
"""Customers whose snapshots are read at once."""
_logger = structlog.get_logger("shoal.engine")


class Published:
    """Restores the published state of customers whose facts were folded from the log:
    give each one's transitions in version order to :meth:`add`, then call :meth:`finish`
    with every customer."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # Customers whose outbox begins after version 1: their transitions, until their
        # snapshot gave them the state before.
        self._waiting: dict[str, list[Transition]] = {}

    def add(self, c: Customer, t: Transition) -> None:
        """``t``, the next of ``c``'s transitions in the outbox (in version order)."""
        waiting = self._waiting.get(c.customer_id)
        if waiting is not None:
            waiting.append(t)
        elif c.version == 0 and t.version > 1:
            self._waiting[c.customer_id] = [t]
        else:
            c.restore((t,))

    async def finish(self, customers: Mapping[str, Customer]) -> None:
        """Give each of ``customers`` whose outbox lacks its first transitions (it has none,
        or they begin after version 1) the memberships, version and watermark of its
        snapshot, if that is further; then its transitions after the snapshot's version.

        Raises:
            StoreError: the snapshots cannot be read.
        """
        ids = [i for i, c in customers.items() if c.version == 0]
        for start in range(0, len(ids), _SLICE):
            for i, row in enumerate(await self._store.snapshots.of(ids[start : start + _SLICE])):
                await breathe(i)
                c = customers.get(row.customer_id)
                if c is None or c.version or row.format != SNAPSHOT_FORMAT:
                    continue
                try:
                    c.restore_published(row.body)
                except SnapshotError as e:
                    # Its transitions alone then: versions may start again from 1.
                    _logger.warning(
                        "published state not restored", customer_id=c.customer_id, error=str(e)
                    )
        waiting, self._waiting = self._waiting, {}
        for customer_id, ts in waiting.items():
            c = customers.get(customer_id)
            if c is not None:
                c.restore(t for t in ts if t.version > c.version)
