"""The outbox: committing events and transitions to the store in one transaction, then
publishing the committed transitions in outbox order through the transition sink."""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import anyio
import structlog

from actors._stored import outbox_entries
from protocol import Delivery, FencedOut, PublishError, Transition, TransitionSink
from store import Forgotten, LoggedEvent, Snapshot, SnapshotMarks, Store, StoreFullError

from ._config import EngineConfig, EngineObserver
from ._metrics import Counts

_NOT_TIMED = contextlib.nullcontext()
_MAX_RETRY_DELAY = 5.0
"""Seconds at most between two attempts to publish the same transitions, or to commit the
same rows while the disk is full."""
_FULL_REMINDER = 60.0
"""Seconds between two log lines saying the engine is still paused by a full disk."""


def positions(deliveries: Iterable[Delivery]) -> dict[int, int]:
    """The stream position of the last of ``deliveries`` (in stream order) in each
    partition whose own consumer delivered it."""
    out: dict[int, int] = {}
    for d in deliveries:
        if d.partition is not None:
            out[d.partition] = d.stream_sequence
    return out


class Outbox:
    """Committed transitions not yet confirmed by the broker, in outbox order.

    :meth:`commit` appends events and transitions to the store in one transaction (which
    also records how far the outbox has been confirmed); :meth:`publish_loop` publishes them
    in order while the main loop goes on, and retries the same ones on failure (the broker
    drops repeats by message id). A bounded outbox makes the main loop wait
    (:meth:`wait_for_space`) when the broker falls behind.
    """

    def __init__(
        self,
        store: Store,
        sink: TransitionSink,
        config: EngineConfig,
        counts: Counts,
        observer: EngineObserver | None,
    ) -> None:
        self._store = store
        self._sink = sink
        self._config = config
        self._counts = counts
        self._observer = observer
        self._pending: deque[tuple[int, Transition]] = deque()
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self.confirmed_through = 0
        """The outbox position the broker has confirmed so far."""
        self.paused: str | None = None
        """Why the engine is paused (``disk full at <path>``), None when it is not."""
        self.stored: dict[str, int] = {}
        """Per customer, the last version the broker holds already (a partition taken over
        from another engine, rebuilt from its snapshot): transitions up to it are made again
        and committed, not published again."""
        self._stopped = False
        self._logger = structlog.get_logger("shoal.engine")

    def __len__(self) -> int:
        return len(self._pending)

    def restore(self, entries: Iterable[tuple[int, Transition]], confirmed_through: int) -> None:
        """Take up what a previous run committed and did not see confirmed."""
        self.confirmed_through = confirmed_through
        self._pending.extend(entries)

    async def commit(
        self,
        events: list[LoggedEvent],
        transitions: Sequence[Transition],
        snapshots: Sequence[Snapshot] = (),
        *,
        unparked: Sequence[str] = (),
        stream_through: int | None = None,
        partitions_through: Mapping[int, int] | None = None,
        imports: Mapping[str, int | None] | None = None,
        forget: Sequence[Forgotten] = (),
    ) -> None:
        """Append ``events`` and ``transitions`` (and replace ``snapshots``, and unpark
        customers) in the store in one transaction, then queue the transitions for
        publishing. ``stream_through``: every message of the events stream up to this
        position is committed with this (what a start checks the store against);
        ``partitions_through``: the same per partition (:func:`positions`).
        ``imports``: imports begun or ended with this, ``forget``: customers forgotten
        with this (:meth:`store.Store.commit`)."""
        entries = outbox_entries(transitions)
        obs = self._observer
        with obs.timing_commit() if obs is not None and (events or entries) else _NOT_TIMED:
            seqs = await self._while_full(
                lambda: self._store.commit(
                    events,
                    entries,
                    self.confirmed_through,
                    snapshots=snapshots,
                    unparked=unparked,
                    stream_through=stream_through,
                    partitions_through=partitions_through,
                    imports=imports,
                    forget=forget,
                )
            )
        self._counts.stats.transitions += len(entries)
        if entries:
            self._counts.committed(transitions)
            self._pending.extend(zip(seqs, transitions, strict=True))
            self._ready.set()

    async def _while_full(self, commit: Callable[[], Awaitable[list[int]]]) -> list[int]:
        """Run ``commit`` until it is done, trying the same one again while the disk is full.

        What it commits is applied in memory already and not yet acknowledged, so waiting
        loses nothing, and the main loop (ingestion with it) pauses meanwhile. The error is
        logged once, then once a minute. Once the engine is stopping, it is raised instead.
        """
        delay, since, told = 0.1, 0.0, 0.0
        while True:
            try:
                seqs = await commit()
            except StoreFullError as e:
                if self._stopped:
                    raise
                now = anyio.current_time()
                if self.paused is None:
                    self.paused = f"disk full at {e.path}"
                    since = told = now
                    self._logger.error(
                        "disk full: ingestion paused until there is room",
                        path=str(e.path),
                        error=str(e),
                    )
                elif now - told >= _FULL_REMINDER:
                    told = now
                    self._logger.warning(
                        "disk still full: ingestion paused",
                        path=str(e.path),
                        paused_for=round(now - since),
                    )
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                continue
            if self.paused is not None:
                self._logger.info(
                    "disk has room again: ingestion resumed",
                    paused_for=round(anyio.current_time() - since, 1),
                )
                self.paused = None
            return seqs

    async def commit_snapshots(self, rows: Sequence[Snapshot], marks: SnapshotMarks | None) -> None:
        """Write snapshots (and, closing a round, its marks) in one transaction.

        Raises:
            StoreFullError: the disk is full (not retried: a round can wait).
        """
        await self._store.commit([], [], self.confirmed_through, snapshots=rows, marks=marks)

    async def record_confirmed(self) -> None:
        """Record in the store how far the broker confirmed, if it moved."""
        if self.confirmed_through > self._store.outbox.published_through:
            await self.commit([], [])

    async def wait_confirmed(self, through: int) -> None:
        """Return once the broker confirmed the outbox up to position ``through``."""
        # Polled: the space event is the main loop's to wait on.
        while self.confirmed_through < through and self._pending:
            if self._pending[0][0] > through:
                return  # all up to it was confirmed, out of order
            await anyio.sleep(0.02)

    async def wait_for_space(self) -> None:
        """Backpressure: wait while the broker is not taking transitions as fast as they are
        made."""
        while len(self._pending) >= self._config.max_outbox:
            self._space = anyio.Event()
            await self._space.wait()

    async def publish_loop(self) -> None:
        """Publish committed transitions in outbox order; on failure, retry the same ones."""
        try:
            await self._publish()
        finally:
            # The engine is stopping: what it still writes must not wait for disk space.
            self._stopped = True

    async def _publish(self) -> None:
        delay = 0.1
        pending, stats = self._pending, self._counts.stats
        while True:
            if not pending:
                self._ready = anyio.Event()
                await self._ready.wait()
            batch = list(itertools.islice(pending, self._config.publish_batch))
            stored = self.stored
            send = [i for i, (_, t) in enumerate(batch) if t.version > stored.get(t.customer_id, 0)]
            try:
                if len(send) == len(batch):
                    await self._sink.publish([t for _, t in batch])
                elif send:
                    await self._sink.publish([batch[i][1] for i in send])
            except FencedOut:
                raise  # not this engine's to publish any more: the caller decides
            except PublishError as e:
                held = set(range(len(batch))) - set(send)
                confirmed = frozenset(held | {send[i] for i in e.confirmed})
                if confirmed:
                    self._confirmed(batch, confirmed)
                self._logger.warning(
                    "publishing transitions failed; will retry", error=str(e), retry_in=delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                continue
            delay = 0.1
            for _ in batch:
                pending.popleft()
            self.confirmed_through = batch[-1][0]
            stats.transitions_published += len(batch)
            self._space.set()

    def _confirmed(self, batch: list[tuple[int, Transition]], confirmed: frozenset[int]) -> None:
        """Some of ``batch`` (the head of the queue) were stored: leave those out of the
        next attempt. What is confirmed stays a prefix of the outbox (a restart publishes
        again what follows it; the broker says which it holds)."""
        pending = self._pending
        for _ in batch:
            pending.popleft()
        rest = [entry for i, entry in enumerate(batch) if i not in confirmed]
        pending.extendleft(reversed(rest))
        prefix = next((i for i in range(len(batch)) if i not in confirmed), len(batch))
        if prefix:
            self.confirmed_through = batch[prefix - 1][0]
        self._counts.stats.transitions_published += len(batch) - len(rest)
        self._space.set()
