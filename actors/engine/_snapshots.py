"""Snapshot rounds: every customer changed since the last round is snapshotted, a part per
turn of the loop, and the round's mark recorded once all are written, so a restart replays
only the log tail after it."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from itertools import islice

import structlog

from actors._clock import Clock
from actors._stored import snapshot_row
from protocol import NEVER
from store import Snapshot, SnapshotMarks, Store, StoreFullError

from ._config import EngineConfig, EngineStats
from ._gc import Collector
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition

_FLUSH_BATCH = 50_000
"""Snapshots written per transaction when all are written at once (at a clean stop)."""
_FULL_RETRY = 30.0
"""Seconds (of the engine's clock) before a round the full disk stopped is tried again."""
_SORT_SLICE = 20_000
"""Customer ids of a round sorted per turn of the loop (a few milliseconds)."""
_PART_SECONDS = 0.02
"""About how long writing one part of a round may take (wall time, the commit included).
While a part is written the loop does nothing else: deadlines due meanwhile fire that much
late (parts of 5,000 took 200-300 ms with 1M customers firing 10k deadlines a second)."""
_SMALLEST_PART = 100
_PUT_OFF_FOR = 10.0
"""Seconds (of the engine's clock) a round's parts may be put off, at most, while deadlines
are due faster than they fire (see :meth:`Snapshots.step`)."""


class _Round:
    """The customer ids of a round, handed out in key order (upserts in key order cost half
    as much as in set order: scripts.bench.restart).

    They are sorted a slice per turn of the loop, then merged as they are handed out:
    sorting a large round at once held the loop for half a second (600,000 ids), and every
    deadline due meanwhile fired that much late.
    """

    __slots__ = ("_unsorted", "_slices", "_merged", "_back", "left")

    def __init__(self, ids: list[str]) -> None:
        self._unsorted = ids
        self._slices: list[list[str]] = []
        self._merged: Iterator[str] | None = None
        self._back: list[str] = []  # handed out, then put back
        self.left = len(ids)
        """How many are not handed out yet."""

    def sort_some(self) -> bool:
        """Sort the next slice, if any is left; return whether all are sorted."""
        if self._merged is not None:
            return True
        if self._unsorted:
            piece = self._unsorted[-_SORT_SLICE:]
            del self._unsorted[-_SORT_SLICE:]
            piece.sort()
            self._slices.append(piece)
            if self._unsorted:
                return False
        self._merged = heapq.merge(*self._slices)
        return True

    def take(self, n: int) -> list[str]:
        """The next ``n`` ids (fewer at the end), once all are sorted."""
        assert self._merged is not None
        out = self._back[:n]
        del self._back[:n]
        out += islice(self._merged, n - len(out))
        self.left -= len(out)
        return out

    def put_back(self, ids: list[str]) -> None:
        """Hand ``ids`` out again first (their write failed)."""
        self._back[:0] = ids
        self.left += len(ids)

    def rest(self) -> list[str]:
        """Every id not handed out yet, in no order."""
        rest = [*self._back, *self._unsorted]
        for piece in self._slices if self._merged is None else ():
            rest += piece
        if self._merged is not None:
            rest += self._merged
        return rest


class Snapshots:
    """Rounds of snapshots of the customers the partition marked changed."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        outbox: Outbox,
        parking: Parking,
        stats: EngineStats,
        gc: Collector,
        clock: Clock,
        config: EngineConfig,
    ) -> None:
        assert partition.changed is not None, "the engine's partition tracks changes"
        self._store = store
        self._partition = partition
        self._outbox = outbox
        self._parking = parking
        self._stats = stats
        self._gc = gc
        self._clock = clock
        self._config = config
        self._round: _Round | None = None
        self._marks: SnapshotMarks | None = None
        self._started = 0  # the clock's instant when the last round started
        self._events = 0  # the log position when the last round started
        self._retry_at = -NEVER  # while the disk is full: when to try the round again
        # How many snapshots the next part writes: sized after the last part's wall time
        # (never above the configured batch), so a part takes about _PART_SECONDS.
        self._part = min(config.snapshot_batch, 10 * _SMALLEST_PART)  # grows if fast
        self._put_off: int | None = None  # when the round under way was first put off

    def restarted(self) -> None:
        """The engine starts: the next round is due after the interval from now."""
        self._started = self._clock.now()
        self._events = self._store.events.last_seq

    def due_now(self) -> None:
        """Make the next round due at once (there are no usable snapshots)."""
        self._started = -NEVER

    def abandon(self) -> None:
        """Drop the round under way (the definitions are changing: it would record the old
        ones for snapshots of the new)."""
        self._round = None

    async def step(self, *, put_off: bool = False) -> bool:
        """Start a round of snapshots when one is due, or write the next part of the round
        under way; return whether there was anything to do.

        A round takes the customers changed since the last one and snapshots them, a part
        per turn of the loop, each part in its own transaction. Only once all are written is
        the round's mark recorded: where the log and the outbox stood when it started.

        ``put_off``: deadlines are due faster than they fire (a burst). The round's parts
        then wait, for up to :data:`_PUT_OFF_FOR` seconds a round: snapshots only make a
        restart quicker, and each part written holds the firing back (a round's parts took
        380 ms of a burst of 100,000 deadlines that took 2.4 s).
        """
        cfg = self._config
        if self._retry_at > self._clock.now():
            return False
        if self._round is None:
            if not self._partition.changed:
                return False
            now = self._clock.now()
            if (
                now - self._started < cfg.snapshot_interval * 1_000_000
                and self._store.events.last_seq - self._events < cfg.snapshot_events
            ):
                return False
            self._start(now)
        round_ = self._round
        assert round_ is not None
        if put_off:
            now = self._clock.now()
            if self._put_off is None:
                self._put_off = now
            if now - self._put_off < _PUT_OFF_FOR * 1_000_000:
                return False
        if not round_.sort_some():
            return True
        part = round_.take(self._part)
        # Wall time, not the engine's clock: it sizes work; no instant depends on it.
        t0 = time.perf_counter()
        try:
            await self._write(part, done=not round_.left)
        except StoreFullError as e:
            # Snapshots can wait; ingestion, whose commits are small, need not wait for them.
            round_.put_back(part)
            self._retry_at = self._clock.now() + int(_FULL_RETRY * 1_000_000)
            structlog.get_logger("shoal.engine").warning(
                "snapshots put off: the disk is full", path=str(e.path), retry_in=_FULL_RETRY
            )
            return False
        took = time.perf_counter() - t0
        if part:
            fits = int(len(part) * _PART_SECONDS / max(took, 1e-6))
            # Halfway there each time: one slow commit (a checkpoint) does not swing it.
            self._part = max(_SMALLEST_PART, min(cfg.snapshot_batch, (self._part + fits) // 2))
        return True

    def _start(self, now: int) -> None:
        p = self._partition
        changed = p.changed
        assert changed is not None
        self._round = _Round(list(changed))
        self._put_off = None
        changed.clear()
        last_event_seq = self._store.events.last_seq
        self._marks = SnapshotMarks(
            events_through=last_event_seq,
            outbox_through=self._store.outbox.last_seq,
            definitions=p.segments.fingerprint,
            needs=p.needs,
        )
        self._started, self._events = now, last_event_seq

    async def _write(self, customer_ids: list[str], *, done: bool) -> None:
        # Taken between turns, so each reflects exactly what is committed up to here.
        p = self._partition
        needs, log_seq = p.needs, self._store.events.last_seq
        customers = p.customers
        rows: list[Snapshot] = []
        for customer_id in customer_ids:
            c = customers.get(customer_id)
            if c is None:
                continue  # parked since it changed
            try:
                rows.append(snapshot_row(c, needs=needs, log_seq=log_seq))
            except Exception as e:
                p.fail(customer_id, "snapshot", e)
        # Parked before the round's mark is recorded: a restart must not take the mark as
        # covering them.
        await self._parking.settle()
        await self._outbox.commit_snapshots(rows, self._marks if done else None)
        self._stats.snapshots_written += len(rows)
        if done:
            self._round = None
            self._stats.snapshot_rounds += 1
            self._gc.settle()

    async def flush(self) -> None:
        """Finish the round under way and snapshot every other changed customer."""
        changed = self._partition.changed
        assert changed is not None
        if self._round is None and not changed:
            return
        if self._round is not None:
            self._round = _Round(list(set(self._round.rest()) | changed))
            changed.clear()
        else:
            self._start(self._clock.now())
        round_ = self._round
        assert round_ is not None
        while not round_.sort_some():
            pass
        count = round_.left
        while round_.left:
            part = round_.take(_FLUSH_BATCH)
            await self._write(part, done=not round_.left)
        structlog.get_logger("shoal.engine").info("snapshots written", customers=count)
