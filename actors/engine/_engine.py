"""The engine: one partition of customers run from an event source to a transition sink.

Two tasks, none per customer. Each turn of the main loop:

1. takes a micro-batch of deliveries from the event source and ingests it (:mod:`._ingest`):
   decoded and validated, applied to the actors, events and transitions committed to the
   store in one transaction, rejections published, the batch acknowledged with one message;
2. fires the deadlines that fell due, each at its own instant, in the same way
   (:mod:`._deadlines`);
3. writes the next part of a round of snapshots, when one is under way (:mod:`._snapshots`),
   and with a retention the next part of the log cut (:mod:`._retention`);
4. when there is nothing else to do, prepares the customers whose deadlines fall due within
   the next 10 s, so that firing them costs less;
5. when there is nothing to do, sleeps until a delivery arrives, the next deadline, or a
   request.

New segment definitions (:meth:`Engine.apply_segments`) are switched to at the top of a
turn, between two batches (:mod:`._definitions`). The publishing task publishes committed
transitions in outbox order while the main loop goes on (:mod:`._outbox`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from actors._clock import Clock, SystemClock
from actors._customer import Customer
from actors._errors import ActorsError, DefinitionError, DefinitionsConflict
from actors._retention import decode_needs
from actors.rules import SegmentSet, check_retention, unserved
from protocol import (
    DefinitionsApplied,
    EventSource,
    Origin,
    StoredDefinitions,
    TransitionSink,
    format_instant,
    partition,
)
from store import ParkedCustomer, Store, StoreError

from . import _queries
from ._config import EngineConfig, EngineObserver, EngineStats, Wake
from ._deadlines import Deadlines
from ._definitions import Definitions, Markers, SegmentsRequest
from ._forget import Erased, Eraser, Forgetting
from ._gc import Collector
from ._imports import Imports, open_ids
from ._ingest import Ingest
from ._metrics import Counts
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition
from ._recovery import Recovery
from ._retention import Cutter
from ._snapshots import Snapshots
from ._startup import check_store
from ._stored_definitions import DefinitionsKeeper
from ._takeover import PartitionCut, cut


@dataclass(slots=True)
class _CutRequest:
    partitions: list[int]
    at_cut: Callable[[], None] | None
    done: anyio.Event = field(default_factory=anyio.Event)
    served: bool = False
    cuts: dict[int, PartitionCut] | None = None


_MAX_IDLE = 1.0
"""Seconds the loop sleeps at most, so retries and a lifted time floor are not missed."""
_FENCE_RETRY = 0.01
"""Seconds before asking the broker again whether an event is on its way, while a deadline is
due (a delivery that arrives meanwhile wakes the loop at once)."""


class Engine:
    """Runs the segmentation of one partition of customers: events from ``source``,
    transitions to ``sink``, everything durable in ``store``.

    Args:
        source: where inbound events come from (``protocol.nats.JetStreamSource``, or
            ``protocol.memory`` in tests).
        sink: where committed transitions and rejections are published.
        store: the partition's SQLite store, open for writing.
        segments: the definitions to start with.
        clock: the engine's time (default: the system clock).
        config: batching, snapshots, warm-up.
        observer: told of commits and deadline rounds, for metrics.
        keeper: stores each switch to new definitions (``shoal serve`` gives one, whose
            :meth:`DefinitionsKeeper.resume` chose ``segments``); None: nothing is stored.
        owned: the partitions this engine owns among several sharing a broker (``shoal
            serve`` gives them, term by term); None: every one. The definitions markers
            are published into these only.
        eraser: where the broker's copies of forgotten customers are erased (``shoal
            serve`` gives ``protocol.nats.BrokerEraser``); None: the store's only.
        on_erased: told when erasures finish, per partition (see :mod:`._forget`).
    """

    def __init__(
        self,
        source: EventSource,
        sink: TransitionSink,
        store: Store,
        segments: SegmentSet,
        *,
        clock: Clock | None = None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        keeper: DefinitionsKeeper | None = None,
        owned: Collection[int] | None = None,
        eraser: Eraser | None = None,
        on_erased: Erased | None = None,
    ) -> None:
        self._source = source
        self._sink = sink
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._config = cfg = config or EngineConfig()
        self._partition = p = Partition(segments, track_changes=True)
        self._counts = counts = Counts()
        self._gc = gc = Collector(cfg.freeze_gc)
        self._outbox = outbox = Outbox(store, sink, cfg, counts, observer)
        self._parking = parking = Parking(store, p, outbox, counts, self._clock)
        self._recovery = recovery = Recovery(
            store, p, outbox, parking, counts, gc, self._clock, cfg
        )
        if owned is not None:
            # A static list's customers of other engines' partitions are theirs to add.
            mine, partitions = frozenset(owned), source.partitions
            recovery.owns = lambda customer_id: partition(customer_id, partitions) in mine
        self._snapshots = snaps = Snapshots(
            store, p, outbox, parking, counts.stats, gc, self._clock, cfg
        )
        self._deadlines = deadlines = Deadlines(
            p, recovery, outbox, parking, counts.stats, gc, self._clock, cfg, observer
        )
        self._imports = imports = Imports(store, p, outbox, parking, counts.stats, self._clock)
        self._cutter = Cutter(store, p, self._clock, cfg, source.partitions)
        self._forgetting = forgetting = Forgetting(
            store, p, recovery, outbox, parking, source.partitions, self._clock, eraser, on_erased
        )
        self._ingest = Ingest(
            store,
            p,
            recovery,
            deadlines,
            outbox,
            parking,
            imports,
            sink,
            counts,
            gc,
            self._clock,
            cfg,
            forgetting,
        )
        self._keeper = keeper
        self._markers = Markers(store, sink, source.partitions, owned)
        self._definitions = Definitions(
            p, recovery, snaps, outbox, parking, imports, counts, keeper, self._markers, owned
        )
        self._wake = Wake()
        self._cuts: list[_CutRequest] = []
        self._running = False
        self._consuming = False
        self._recovered = False
        self._logger = structlog.get_logger("shoal.engine")

    # What tests and operators may read -------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """Counters since the engine started."""
        return self._counts.stats

    def customer(self, customer_id: str) -> Customer | None:
        """The actor of ``customer_id``, if the engine knows it (read it, don't change it)."""
        return self._partition.customers.get(customer_id)

    @property
    def customer_count(self) -> int:
        """How many customers this engine holds in memory (after a restart, all of them once
        :attr:`warm`)."""
        return len(self._partition.customers)

    @property
    def warm(self) -> bool:
        """Whether every customer is in memory (after a restart, customers whose deadlines
        are far off load from their snapshots while the engine already runs)."""
        return self._recovery.warm

    def not_ready(self) -> list[str]:
        """Why the engine is not ready to serve, for a readiness probe (none once it
        consumes, warm)."""
        if not self._consuming:
            return ["engine not consuming (starting or stopping)"]
        reasons: list[str] = []
        if not self._recovery.warm:
            reasons.append(f"warming up: {len(self._partition.customers)} customers loaded")
        paused = self._outbox.paused
        if paused is not None:
            reasons.append(f"ingestion paused: {paused}")
        return reasons

    @property
    def buffered(self) -> int:
        """Deliveries received from the broker and not yet applied (bounded by the source:
        the broker holds the rest)."""
        return self._source.buffered if self._consuming else 0

    @property
    def unpublished(self) -> int:
        """Committed transitions not yet confirmed published (ingestion pauses at
        ``max_outbox``)."""
        return len(self._outbox)

    @property
    def paused(self) -> str | None:
        """Why ingestion is paused (``disk full at <path>``: it resumes by itself once there
        is room), or None."""
        return self._outbox.paused

    @property
    def open_imports(self) -> list[str]:
        """The imports begun and not yet ended (``shoal import``), by id."""
        return open_ids(self._store.open_imports)

    @property
    def applied_imports(self) -> list[str]:
        """The ids of the latest imports applied since the engine started (at most 64), the
        latest last."""
        return list(self._imports.applied)

    @property
    def pending_deadlines(self) -> int:
        """How many customers have a deadline armed."""
        return self._partition.pending

    @property
    def segments(self) -> SegmentSet:
        """The definitions in force."""
        return self._partition.segments

    @property
    def definitions_applied(self) -> DefinitionsApplied | None:
        """The stored version of the definitions in force, when and from where they were
        applied (None without a keeper)."""
        return None if self._keeper is None else self._keeper.applied_info()

    @property
    def transition_counts(self) -> dict[tuple[str, str, str], int]:
        """Transitions committed since start, by (segment, change, cause kind)."""
        return self._counts.transition_counts

    @property
    def rejection_counts(self) -> dict[str, int]:
        """Events rejected since start, by class of reason (``InvalidEvent.kind``)."""
        return self._counts.rejection_counts

    # What the query API reads (protocol.nats.serve_api through actors.EngineApi) ---------------

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is under way."""
        return self._running

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def consumer(self) -> str:
        """The name of the durable consumer this engine's source reads."""
        return self._source.consumer

    @property
    def filter_subject(self) -> str:
        """The subjects this engine's source reads: which customers it owns."""
        return self._source.filter_subject

    def now(self) -> int:
        """The engine clock's instant."""
        return self._clock.now()

    async def load(self, customer_id: str) -> Customer | None:
        """The actor of ``customer_id`` (read it, don't change it), or None if the engine
        knows no such customer.

        While the engine warms up after a restart, a customer not loaded yet is loaded from
        its snapshot first, by the main loop between two batches, as for an event.
        """
        customers = self._partition.customers
        c = customers.get(customer_id)
        if c is not None or self._recovery.warm or not self._running:
            return c
        done = self._recovery.ask_load(customer_id)
        self._wake.set()
        await done.wait()
        return self._partition.customers.get(customer_id)

    def parked(self, customer_id: str) -> ParkedCustomer | None:
        """Why the customer is parked, or None if it is not (see :mod:`._parking`)."""
        return self._parking.get(customer_id)

    @property
    def erasures_pending(self) -> int:
        """How many forgotten customers' erasures are under way (see :mod:`._forget`)."""
        return self._forgetting.pending

    @property
    def parked_count(self) -> int:
        """How many customers are parked now."""
        return len(self._parking)

    @property
    def parked_customers(self) -> list[ParkedCustomer]:
        """Every customer parked now, in id order."""
        return self._parking.all()

    async def unpark(self, customer_ids: list[str]) -> list[str]:
        """Try parked customers again; return those unparked (others stay parked, with the
        error of this attempt; ids not parked are ignored). The main loop does it between
        two batches, and this waits for it.

        Raises:
            ActorsError: the engine is not running, or it stopped before doing it.
        """
        if not self._running:
            raise ActorsError("the engine is not running")
        request = self._parking.ask(customer_ids)
        self._wake.set()
        await request.done.wait()
        if request.unparked is None:
            raise ActorsError("the engine stopped before the customers were tried again")
        return request.unparked

    @property
    def segment_sizes(self) -> dict[str, int]:
        """How many customers are in each segment in force, in file order. Counted as
        memberships change, among the customers in memory (every one once :attr:`warm`)."""
        sizes = self._counts.sizes
        return {name: sizes.get(name, 0) for name in self._partition.segments.names}

    async def members(self, segment: str, *, after: str | None = None, limit: int) -> list[str]:
        """Up to ``limit`` ids of the segment's members in memory, in id order, after the id
        ``after`` (a slice at a time, letting the event loop run between slices)."""
        page = await _queries.members(self._partition, segment, after=after, limit=limit)
        return [cid for cid, _ in page]

    async def members_since(
        self, segment: str, *, after: str | None = None, limit: int
    ) -> list[tuple[str, int]]:
        """As :meth:`members`, each id with the instant it entered the segment (its
        ``true_since``)."""
        return await _queries.members(self._partition, segment, after=after, limit=limit)

    async def search(self, prefix: str, *, limit: int) -> list[str]:
        """Up to ``limit`` ids of the customers in memory that start with ``prefix``, in id
        order (a slice at a time, as :meth:`members`)."""
        return await _queries.search(self._partition, prefix, limit=limit)

    @property
    def next_deadline(self) -> int | None:
        """The earliest deadline armed, if any."""
        return self._partition.next_due()

    @property
    def events_per_second(self) -> float:
        """Events applied per second over the last 10 s of the engine's clock."""
        return self._counts.events_per_second(self._clock.now())

    async def consumer_lag(self) -> int | None:
        """Events the broker holds for this engine's consumer, not yet acknowledged; None
        when not consuming or the broker does not answer."""
        return await self._source.lag() if self._consuming else None

    # Changing definitions while running ---------------------------------------------------

    async def apply_segments(self, segments: SegmentSet, *, origin: Origin | None = None) -> int:
        """Switch the running engine to ``segments``; return how many transitions that made.

        The switch is made by the engine's main loop between two batches, and this waits for
        it. Every customer is rebuilt from its event log under the new definitions (replayed
        up to the engine's now, as :func:`actors.reconcile` does), 1,000 customers per
        commit, and each membership that differs from what was published gives one
        transition with cause ``definition``: ``at`` is now, ``true_since`` when the new rule
        became true (or stopped) by the replay. Members of a removed segment exit it. The
        transitions are committed and published like any other, and deadlines are re-armed.
        The customers of static lists the engine does not know yet are added, with no events.

        Requests are applied in the order made. A request whose caller is cancelled while
        it waits is still applied. With a keeper, the definitions are proposed to the shared
        copy as the next version, with ``origin`` (None: the API, under
        ``segments.source``), before the switch, and stored in the store once in force.

        Raises:
            DefinitionsConflict: another engine sharing the broker stored that version first:
                nothing was switched (the engine follows the winner).
            ActorsError: the engine is not running, or it stopped before the switch was made.
        """
        if not self._running:
            raise ActorsError("the engine is not running")
        self.check_segments(segments)
        return await self._switch_to(self._definitions.ask(segments, origin))

    def _warn_unserved(self, segments: SegmentSet, what: str) -> None:
        """Say loudly that ``segments``, in force without this engine applying them (stored
        or another engine's), are what its log cut cannot serve exactly: its rebuilds of
        customers from their bases are then not exact. (Refusing them would leave engines
        sharing a broker on different definitions, or one unable to start.)"""
        try:
            self.check_segments(segments)
        except DefinitionError as e:
            self._logger.error(
                f"{what}: this engine's cut log cannot serve them exactly (give every engine "
                "sharing the broker the same --retain, and apply definitions it can serve)",
                error=str(e),
            )

    def check_segments(self, segments: SegmentSet) -> None:
        """Refuse definitions this engine's event log cannot serve exactly: with a
        retention, a window longer than it; once the log is cut, an all-time fact the
        customers' bases do not keep (the events it would be folded from are gone).

        Raises:
            DefinitionError: the message names the segment and what it reads.
        """
        check_retention(segments, self._config.retain)
        cut = self._store.retention.cut
        if cut is None:
            return
        problems = unserved(decode_needs(cut.needs), segments)
        if problems:
            raise DefinitionError(
                "the event log is cut (retention: history before "
                f"{format_instant(cut.at)} is kept only as each customer's "
                "state), and the state does not hold what these definitions read for all "
                f"time: {'; '.join(problems)}. Use a window (within=...) no longer than the "
                "retention instead",
                source=segments.source,
            )

    async def follow_definitions(self, record: StoredDefinitions, segments: SegmentSet) -> int:
        """Switch the running engine to another engine's version of the definitions,
        ``record`` (read from the shared copy, ``segments`` parsed from it), as
        :meth:`apply_segments` does, and store it as that same version with this engine's
        positions (nothing is proposed); return how many transitions that made (0 when that
        version is in force already).

        Raises:
            ActorsError: the engine is not running, or it stopped before the switch was made.
        """
        if not self._running:
            raise ActorsError("the engine is not running")
        # Followed all the same: engines sharing a broker evaluate one version.
        self._warn_unserved(segments, f"definitions version {record.version} followed")
        return await self._switch_to(self._definitions.ask(segments, record=record))

    async def _switch_to(self, request: SegmentsRequest) -> int:
        self._wake.set()
        await request.done.wait()
        if isinstance(request.error, DefinitionsConflict):
            raise request.error
        if request.transitions is None:
            raise ActorsError("the engine stopped before the new segments were applied") from (
                request.error
            )
        return request.transitions

    # Partitions changing hands ------------------------------------------------------------

    async def cut(
        self, partitions: Collection[int], *, at_cut: Callable[[], None] | None = None
    ) -> dict[int, PartitionCut] | None:
        """The cuts of ``partitions`` (each one's customers between two turns of the loop,
        for its snapshot: see :class:`PartitionCut`); None while the engine still warms up
        (not every customer is in memory yet). The main loop takes them, and this waits.
        ``at_cut`` is called at the cut, on the main loop (to note what the sink published
        by then: only transitions committed before it).

        Raises:
            ActorsError: the engine is not running, or it stopped first.
        """
        if not self._running:
            raise ActorsError("the engine is not running")
        request = _CutRequest(list(partitions), at_cut)
        self._cuts.append(request)
        self._wake.set()
        await request.done.wait()
        if not request.served:
            raise ActorsError("the engine stopped before the partitions were cut")
        return request.cuts

    async def wait_published(self, through: int) -> None:
        """Return once the broker confirmed every transition committed up to outbox position
        ``through`` (a cut's ``outbox_through``)."""
        await self._outbox.wait_confirmed(through)

    def skip_stored(self, versions: Mapping[str, int]) -> None:
        """Do not publish again what the broker already holds: per customer, the transitions
        up to its version in ``versions`` (a partition taken over, whose transitions since
        its snapshot are made again)."""
        stored = self._outbox.stored
        for customer_id, version in versions.items():
            if version > stored.get(customer_id, 0):
                stored[customer_id] = version

    async def _serve_cuts(self) -> None:
        cuts, self._cuts = self._cuts, []
        p = self._partition
        for request in cuts:
            if request.at_cut is not None:
                request.at_cut()
            if self._recovery.warm:
                made = cut(
                    p.customers.values(),
                    request.partitions,
                    partitions=self._source.partitions,
                    through=dict(self._store.partitions_through),
                    outbox_through=self._store.outbox.last_seq,
                    taken_at=self._clock.now(),
                    needs=p.needs,
                    definitions=p.segments.fingerprint,
                    stored=self._outbox.stored,
                    forgotten=self._store.forgotten.all(),
                )
                try:
                    request.cuts = await self._with_bases(made)
                except BaseException:
                    request.done.set()  # not served: the caller is told the engine stopped
                    raise
            request.served = True
            request.done.set()

    async def _with_bases(self, cuts: dict[int, PartitionCut]) -> dict[int, PartitionCut]:
        """``cuts``, with the log cut each with its partition's bases, as of the stream
        position up to which its events are folded in them: read on the main loop, where
        the cut moves, so that the two agree."""
        mark = self._store.retention.cut
        if mark is None:
            return cuts
        out: dict[int, PartitionCut] = {}
        parked = [x.customer_id for x in self._store.parked.all()]
        for p, c in cuts.items():
            through = mark.partitions.get(p, 0)
            if through:
                # A parked customer is not among the cut's, and may have a base.
                ids = {customer_id for customer_id, _, _ in c.customers}
                ids.update(x for x in parked if partition(x, self._source.partitions) == p)
                rows = await self._store.retention.of(sorted(ids))
                c = dataclasses.replace(
                    c,
                    bases=sorted((b.customer_id, b.format, b.body) for b in rows),
                    bases_through=through,
                    cut_at=mark.at,
                    cut_needs=mark.needs,
                )
            out[p] = c
        return out

    async def recover(self) -> None:
        """Load every customer from the store as a start does, without consuming: from
        snapshots plus the log tail after them, or from the whole log (``use_snapshots``).

        :meth:`run` does this itself (or, after this, starts from what it loaded); call it
        on an engine that is not running to read a store's state offline. Memberships that
        changed definitions alter are committed to the outbox (published once it runs).

        Raises:
            StoreError: the store cannot be read or written.
        """
        if self._running or self._recovered:
            raise ActorsError("the engine has recovered already")
        await self._rebuild()
        changed = await self._recovery.load_all()
        await self._parking.settle()
        if changed:
            await self._outbox.commit([], changed)
        self._recovered = True

    # Running ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Rebuild from the store, then consume until cancelled.

        ``task_status.started()`` is called once the engine consumes. Raises
        :class:`protocol.BrokerError` or :class:`store.StoreError` when it cannot go on.
        """
        # From here on, apply_segments() requests queue up for the main loop.
        self._running = True
        try:
            await self._run(task_status)
        finally:
            self._running = False
            self._definitions.release()
            self._parking.release()
            for request in self._cuts:
                request.done.set()
            self._cuts = []
            self._recovery.release_loads()

    async def _rebuild(self) -> None:
        self._snapshots.restarted()
        if await self._recovery.rebuild(self._config.use_snapshots):
            self._snapshots.due_now()
        await self._parking.on_start()
        self._gc.settle()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        sink, source = self._sink, self._source
        await sink.start()
        try:
            await check_store(self._store, source)
            self._warn_unserved(self._partition.segments, "definitions in force")
            if not self._recovered:
                await self._rebuild()
            if self._keeper is not None:
                # Before consuming: the switch they record precedes what comes next.
                await self._markers.publish_missing(self._keeper.current)
            await source.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sink.close()
            raise
        self._consuming = True
        self._deadlines.started(source)
        p = self._partition
        self._logger.info(
            "engine started",
            customers=len(p.customers),
            rebuilt_events=self.stats.rebuilt_events,
            snapshots_loaded=self.stats.snapshots_loaded,
            snapshots_ignored=self.stats.snapshots_ignored,
            warm=self._recovery.warm,
            parked=len(self._parking),
            backlog=source.pending_at_start,
            pending_deadlines=self.pending_deadlines,
            segments=list(p.segments.names),
        )
        task_status.started()
        stopped = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._outbox.publish_loop)
                tg.start_soon(self._forgetting.erase_loop)
                self._recovery.tg = tg
                try:
                    await self._loop(source)
                finally:
                    self._recovery.tg = None
        except anyio.get_cancelled_exc_class():
            stopped = True  # asked to stop, not failing
            raise
        finally:
            self._consuming = False
            with anyio.CancelScope(shield=True):
                await source.stop()
                await sink.close()
                # Record what was published meanwhile; if the store is what failed, the
                # original error matters, and unrecorded marks only mean a republish.
                with contextlib.suppress(StoreError):
                    await self._outbox.commit([], [])
                    if stopped:
                        # A clean stop leaves no tail: the next start loads snapshots only.
                        await self._snapshots.flush()

    async def _loop(self, source: EventSource) -> None:
        cfg, recovery, outbox = self._config, self._recovery, self._outbox
        deadlines, snapshots = self._deadlines, self._snapshots
        while True:
            # Between turns the actors match the log: the place where a stop takes effect
            # (commits are shielded, so a busy loop might otherwise never offer one).
            await anyio.lowlevel.checkpoint()
            self._wake.reset()
            await recovery.serve_loads()
            await self._definitions.serve()
            await self._parking.serve()
            if self._cuts:
                await self._serve_cuts()
            await outbox.wait_for_space()
            batch = source.take(cfg.batch_size)
            if batch:
                await self._ingest.batch(batch, source)
            if source.needs_restart:
                await self._resume(source)
            busy = bool(batch)
            if not recovery.warm:
                changed = await recovery.page(cfg.page_batch)
                await self._parking.settle()
                if changed:
                    await outbox.commit([], changed)
                busy = True
            busy = await deadlines.fire_due(source) or busy
            busy = await snapshots.step(put_off=deadlines.behind) or busy
            busy = await self._cutter.step() or busy
            if not busy and recovery.warm:
                busy = await deadlines.prepare(source)
            if not busy:
                await outbox.record_confirmed()
                await self._idle(source)

    async def _idle(self, source: EventSource) -> None:
        deadlines = self._deadlines
        wake_at = self._partition.next_due()
        behind = deadlines.backlog_cap is not None
        # A deadline due that only the broker's word holds back: ask again soon. Not when
        # an event waiting to be applied comes first (its delivery is what is awaited).
        oldest = source.oldest_buffered_received()
        unfenced = (
            wake_at is not None
            and not behind
            and deadlines.confirmed(source) < wake_at <= self._clock.now()
            and (oldest is None or wake_at < oldest)
        )
        with anyio.move_on_after(_FENCE_RETRY if unfenced else _MAX_IDLE) as quiet:
            async with anyio.create_task_group() as tg:

                async def on_delivery() -> None:
                    await source.wait()
                    tg.cancel_scope.cancel()

                async def on_deadline(instant: int) -> None:
                    await self._clock.sleep_until(instant)
                    tg.cancel_scope.cancel()

                async def on_request() -> None:
                    await self._wake.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_delivery)
                tg.start_soon(on_request)
                if wake_at is not None and not behind and not unfenced:
                    tg.start_soon(on_deadline, wake_at)
        if quiet.cancelled_caught and not unfenced and not source.buffered and behind:
            deadlines.caught_up(source)

    async def _resume(self, source: EventSource) -> None:
        """Restart the source after a lost delivery or connection, once all taken is
        committed and acknowledged: what was on its way comes again at once, as backlog."""
        await source.restart()
        self._deadlines.started(source)
        self._logger.info("consumer resumed", backlog=source.pending_at_start)
