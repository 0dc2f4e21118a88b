"""The log cut: events received longer ago than the retention are folded into their
customers' bases and deleted from the log, a bounded part per turn of the loop, off the
path of ingestion (see :mod:`actors._retention`).

The cut is a prefix of the log: it stops at the first event received after the cut instant
(imported history, logged late with old receive instants, waits for the live events logged
before it). It never passes what a restart, an import or an unparking still reads from the
log: the last complete round of snapshots (a restart replays the tail after it), an open
import's start, and a parked customer's position.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from actors._clock import Clock
from actors._customer import Customer
from actors._retention import base_of, base_row, decode_needs, encode_needs, fold_bases
from actors._stored import received_of
from protocol import NEVER, partition
from store import CutMark, LoggedEvent, Store, StoreError

from ._config import EngineConfig, breathe
from ._partition import Partition

_HELD_RETRY = 10.0
"""Seconds (of the engine's clock) before looking again at a cut that what a restart, an
import or an unparking reads held back."""


class Cutter:
    """Moves the cut of the event log as the retention policy says."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        clock: Clock,
        config: EngineConfig,
        partitions: int = 1,
    ) -> None:
        self._store = store
        self._partition = partition
        self._partitions = partitions
        self._clock = clock
        self._config = config
        self._next = -NEVER  # the clock's instant of the next look
        self._drained: int | None = None
        """The log's last position when the last look found nothing after the cut (None:
        it found some): events logged since are looked at without waiting for the interval,
        since an import logs history already past the retention."""
        self._held: str | None = None  # what held the cut back last time (logged once)
        self._logger = structlog.get_logger("shoal.engine")

    def _limit(self) -> tuple[int, str | None]:
        """The last log position the cut may reach now, and what holds it there."""
        store = self._store
        limit, why = store.events.last_seq, None
        marks = store.snapshots.marks
        if marks is not None and marks.events_through < limit:
            # A restart loads the snapshots and replays the tail after their marks (even
            # one that ignored them: the next start may not).
            limit, why = marks.events_through, None
        for begun in store.open_imports.values():
            if begun < limit:
                limit, why = begun, "an import under way"
        for parked in store.parked.all():
            if parked.log_seq < limit:
                limit, why = parked.log_seq, f"parked customer {parked.customer_id!r}"
        return limit, why

    def _stream_cut(self, cut: CutMark | None, entries: Iterable[LoggedEvent]) -> dict[int, int]:
        """Each partition's stream position the events stream may be cut up to once
        ``entries`` are folded: the last one's of the partition. Every earlier message of
        the partition is folded too or was no event of the log, since a partition's events
        are logged in stream order (the engine commits them so; a takeover logs a
        partition's history in stream order, after dropping what the store had of it)."""
        positions = dict(cut.partitions) if cut is not None else {}
        for e in entries:
            if e.stream_seq is not None:
                p = partition(e.customer_id, self._partitions)
                if e.stream_seq > positions.get(p, 0):
                    positions[p] = e.stream_seq
        return positions

    async def step(self) -> bool:
        """Move the cut by up to ``retention_batch`` events when it is due; return whether
        anything was cut (more may follow at the next turn).

        Raises:
            StoreError: the store cannot be read or written.
        """
        cfg = self._config
        if cfg.retain is None:
            return False
        now = self._clock.now()
        store, p = self._store, self._partition
        if now < self._next and self._drained in (None, store.events.last_seq):
            return False
        cut = store.retention.cut
        after = 0 if cut is None else cut.through
        at = now - cfg.retain
        limit, why = self._limit()
        entries: list[LoggedEvent] = []
        latest = -NEVER if cut is None else cut.at
        stopped = held = False
        for e in await store.events.part(after=after, limit=cfg.retention_batch):
            if e.seq > limit:
                stopped = held = True
                break
            received = received_of(e)
            if received > at:
                stopped = True
                break
            entries.append(e)
            latest = max(latest, received)
        # Nothing left after what this look reads: whatever is logged next may be due.
        self._drained = (
            None if stopped or len(entries) >= cfg.retention_batch else store.events.last_seq
        )
        if not entries:
            # Held back (by the snapshots' marks, an import, a parked customer): looked at
            # again soon, since that passes by itself; else at the next interval.
            wait = min(cfg.retention_interval, _HELD_RETRY) if held else cfg.retention_interval
            self._next = now + int(wait * 1_000_000)
            if held and why is not None and why != self._held:
                self._logger.warning("log cut held back", by=why)
            self._held = why if held else None
            return False
        kept = p.segments.needs if cut is None else decode_needs(cut.needs)
        ids = sorted({e.customer_id for e in entries})
        try:
            bases = {}
            if cut is not None:
                bases = {b.customer_id: base_of(b) for b in await store.retention.of(ids)}
            fold_bases(bases, entries, kept)
        except StoreError:
            raise
        except Exception as e:
            # Cutting anyway would lose what the log still knows: the cut waits, and says so.
            self._next = now + int(cfg.retention_interval * 1_000_000)
            self._drained = None  # (for the interval: not again at each event logged)
            self._logger.warning("log cut held back: a base cannot be folded", error=repr(e))
            return False
        mark = CutMark(
            through=entries[-1].seq,
            at=latest,
            needs=encode_needs(kept),
            partitions=self._stream_cut(cut, entries),
        )
        await store.cut_log([base_row(bases[i]) for i in ids if i in bases], mark)
        if cut is None:
            self._logger.info("event log cut for the first time", through=mark.through)
        if held:
            self._next = now + int(min(cfg.retention_interval, _HELD_RETRY) * 1_000_000)
        elif stopped or len(entries) < cfg.retention_batch:
            self._next = now + int(cfg.retention_interval * 1_000_000)
        return True


async def bases_of(
    store: Store, customer_ids: Iterable[str] | None = None
) -> tuple[dict[str, Customer], dict[str, BaseException]]:
    """The bases of these customers (None: of every customer), to fold the log after the
    cut into; and those whose base cannot be read (with why): they cannot be rebuilt.

    Raises:
        StoreError: the store cannot be read.
    """
    bases: dict[str, Customer] = {}
    failed: dict[str, BaseException] = {}
    if store.retention.cut is None:
        return bases, failed
    if customer_ids is None:
        rows = [b async for chunk in store.retention.read() for b in chunk]
    else:
        rows = await store.retention.of(customer_ids)
    for i, row in enumerate(rows):
        try:
            bases[row.customer_id] = base_of(row)
        except Exception as e:
            failed[row.customer_id] = e
        await breathe(i)
    return bases, failed
