"""The engine: owns a set of customers and runs the loop from inbound events to transitions.

Two tasks, none per customer. Each turn of the main loop:

1. takes a micro-batch of deliveries from the durable consumer; decodes and validates them;
   drops those the log already holds (by customer and message id); applies the rest to their
   actors, which return transitions; appends events and transitions to SQLite in one
   transaction (which also records how far the outbox has been published); publishes a
   rejection for each invalid event; acknowledges the batch with one message;
2. fires the deadlines that fell due, each at its own instant, in the same way;
3. when there is nothing else to do, prepares the customers whose deadlines fall due within
   the next 10 s, so that firing them costs less (``Engine._prepare``);
4. when there is nothing to do, sleeps until a delivery arrives or the next deadline.

New segment definitions (:meth:`Engine.apply_segments`) are switched to at the top of a
turn, between two batches, so no event is ever applied under a mix of old and new rules.

The publishing task publishes committed transitions in outbox order (``Nats-Msg-Id`` set)
while the main loop goes on; a bounded outbox makes the main loop wait when it falls behind.

A deadline fires only once every event received before it has been applied (the *time
floor*), so after downtime the backlog is applied first and a customer never enters a
segment that an event already waiting in the stream would have kept it out of.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import heapq
import itertools
from collections import defaultdict, deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog
from nats.aio.client import Client

from protocol import (
    DEFAULT_MAX_EVENT_BYTES,
    EVENTS_WILDCARD,
    NEVER,
    SECOND,
    DefinitionCause,
    Delivery,
    Event,
    EventFeed,
    InvalidEvent,
    Publisher,
    PublishError,
    StreamSettings,
    TimeCause,
    Transition,
    decode_event,
    ensure_streams,
    to_instant,
)
from store import (
    LoggedEvent,
    OutboxEntry,
    Snapshot,
    SnapshotMarks,
    Store,
    StoreError,
)

from ._clock import Clock, SystemClock
from ._customer import SNAPSHOT_FORMAT, Customer, SnapshotError
from ._errors import ActorsError
from ._segments import SegmentSet
from ._timers import TimerQueue

_event_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
_transition_encoder = msgspec.json.Encoder()
_transition_decoder = msgspec.json.Decoder(Transition)

_MAX_IDLE = 1.0
"""Seconds the loop sleeps at most, so retries and a lifted time floor are not missed."""
_FENCE_RETRY = 0.01
"""Seconds before asking the broker again whether an event is on its way, while a deadline is
due (a delivery that arrives meanwhile wakes the loop at once)."""
_DEFINITION = DefinitionCause()
_TIME = TimeCause()
_PREPARE_AHEAD = 10 * SECOND
"""How long before their deadlines customers are prepared, when the engine has nothing
else to do (see :meth:`Engine._prepare`)."""
_PREPARE_SLICE = 500
"""Customers prepared per turn of the loop (about 20 ms)."""
_RATE_WINDOW = 10 * SECOND
"""The span over which :attr:`Engine.events_per_second` is measured."""
_SCAN_SLICE = 20_000
"""Customers looked at between two checkpoints of :meth:`Engine.members`."""
_NOT_TIMED = contextlib.nullcontext()
_FREEZE_EVENTS = 20_000
"""Events applied (or customers prepared or fired) between two freezes of the garbage
collector."""


_SERVE_EVERY = 200
"""Events (or fired customers) of a batch between two turns of the event loop, so queries
wait for a slice of a batch (about 20 ms at 100 us an event), not the whole of it."""


async def _breathe(i: int, every: int = 2_000) -> None:
    """Every ``every`` customers (or events) of a long evaluation, let the event loop run:
    nats-py answers the server's pings (a client silent for minutes is dropped) and the
    query service answers. No stop is offered there: the actors are ahead of the log until
    the commit that follows."""
    if i % every == every - 1:
        await anyio.lowlevel.cancel_shielded_checkpoint()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine consumes and batches.

    ``consumer`` and ``filter_subject`` say which customers this engine owns: one engine
    with the defaults owns them all; several engines can each own a partition.
    """

    consumer: str = "shoal-engine"
    filter_subject: str = EVENTS_WILDCARD
    batch_size: int = 2_000
    max_in_flight: int = 20_000
    fire_batch: int = 5_000
    publish_batch: int = 2_000
    max_outbox: int = 50_000
    """Committed transitions waiting to be published beyond which ingestion pauses."""
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    streams: StreamSettings = field(default_factory=StreamSettings)
    snapshot_interval: float = 60.0
    """Seconds (of the engine's clock) after which changed customers are snapshotted."""
    snapshot_events: int = 200_000
    """Events appended since the last round of snapshots that start the next one sooner."""
    snapshot_batch: int = 5_000
    """Snapshots encoded and written per turn of the loop while a round is under way."""
    page_batch: int = 5_000
    """Snapshots loaded per turn of the loop while the engine warms up after a restart."""
    use_snapshots: bool = True
    """False: ignore stored snapshots at start and rebuild every customer from the log."""
    freeze_gc: bool = True
    """Take the objects alive out of the cyclic garbage collector's view (``gc.freeze``)
    once the customers are loaded, after each page loaded while warming up (the collector
    is off while a page decodes), every 20,000 events applied or customers prepared or fired
    (their deadlines), and after each round of snapshots. A million actors are tens of
    millions of objects that live as long as the engine; each full collection walked them
    all: 28 % of ingest time at 1M customers, and pauses of seconds
    (scripts/results/bench/gc-stalls). The cost: cyclic garbage alive at those instants
    (rare: actors hold no cycles) is never collected. Process-wide, as the collector is."""


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started."""

    events_applied: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    transitions: int = 0
    transitions_published: int = 0
    deadlines_fired: int = 0
    rebuilt_events: int = 0
    """Events read from the log to rebuild customers (at start: only the tail after the
    snapshots; everything without them)."""
    rebuilt_customers: int = 0
    """Customers made ready at start (the rest load from their snapshots afterwards)."""
    snapshots_loaded: int = 0
    snapshots_ignored: int = 0
    """Snapshots of another format, for other facts, or unreadable: rebuilt from the log."""
    snapshots_written: int = 0
    snapshot_rounds: int = 0


class EngineObserver(Protocol):
    """What an engine tells as it goes, for metrics (``protocol.metrics``).

    Called on the engine's event loop: each call must be quick and must not block. What the
    engine counts anyway (:attr:`Engine.stats`, :attr:`Engine.transition_counts`, ...) is
    not told: read it when wanted.
    """

    def timing_commit(self) -> contextlib.AbstractContextManager[object]:
        """Entered around each store transaction that commits events or transitions."""
        ...

    def deadlines_fired(self, fired_at: int, due: Sequence[int]) -> None:
        """A round of deadlines fired when the engine's clock read ``fired_at``; ``due``
        holds the instant each one was due."""
        ...


@dataclass(eq=False, slots=True)
class _LoadRequest:
    """A customer a query asks about, to load from its snapshot before its turn."""

    customer_id: str
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False, slots=True)
class _PageAhead:
    """The next page of snapshots, read while the loop loads the one before it."""

    after: tuple[int, str]
    limit: int
    done: anyio.Event = field(default_factory=anyio.Event)
    rows: list[Snapshot] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _SegmentsRequest:
    """New definitions waiting for the main loop, and the caller waiting for the outcome."""

    segments: SegmentSet
    done: anyio.Event = field(default_factory=anyio.Event)
    transitions: int | None = None
    """How many transitions the switch made; None until it is done, or if it failed."""
    error: BaseException | None = None


class Engine:
    """Runs the segmentation of one set of customers against NATS and a SQLite store."""

    def __init__(
        self,
        nc: Client,
        log: Store,
        segments: SegmentSet,
        *,
        clock: Clock | None = None,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self._nc = nc
        self._log = log
        self._segments = segments
        # What the facts of these rules' customers are kept for: snapshots must match it.
        self._needs = segments.needs.fingerprint()
        self._clock: Clock = clock or SystemClock()
        self._config = config or EngineConfig()
        self._customers: dict[str, Customer] = {}
        self._timers = TimerQueue()
        # Deadlines taken out of the timer queue ahead of time by _prepare(): (deadline,
        # customer) in order (taken in order, so appending keeps it sorted but for rare
        # entries armed meanwhile). An entry holds only while the customer's deadline is
        # still that one and the timer queue has not been given one again (_held_valid).
        self._held: deque[tuple[int, str]] = deque()
        self._preparing = 0  # taken out of the timer queue by _prepare(), not yet held
        # Committed, not yet confirmed by the broker, in outbox order.
        self._outbox: deque[tuple[int, Transition]] = deque()
        self._outbox_ready = anyio.Event()
        self._outbox_space = anyio.Event()
        self._confirmed_through = 0  # the outbox position confirmed published so far
        self._backlog_cap: int | None = None
        # Every event the broker stored before this instant has reached the feed (fence()).
        self._fenced = -NEVER
        self._catch_up = 0
        self._publisher: Publisher | None = None
        self._feed: EventFeed | None = None
        self._logger = structlog.get_logger("shoal.engine")
        self.stats = EngineStats()
        self._observer = observer
        # Committed transitions by (segment, change, cause type), and rejections by class.
        self._transitions_by: dict[tuple[str, str, type[msgspec.Struct]], int] = {}
        self._rejections_by: dict[str, int] = {}
        # apply_segments() hands its work to the main loop through these.
        self._running = False
        self._requests: deque[_SegmentsRequest] = deque()
        self._wake = anyio.Event()
        # Snapshots. A round writes every customer changed since the last one (``_dirty``)
        # and ends by recording how far it reached, so a restart replays only the tail.
        self._dirty: set[str] = set()
        self._round: list[str] | None = None
        self._round_marks: SnapshotMarks | None = None
        self._round_started = 0  # the clock's instant when the last round started
        self._round_events = 0  # the log position when the last round started
        # Warming up: after a restart customers load from their snapshots in deadline order;
        # until all have, ``_horizon`` is the deadline up to which all are loaded.
        self._warm = True
        self._applied_since_gc = 0  # events applied since then
        self._cursor: tuple[int, str] | None = None
        self._ahead: _PageAhead | None = None
        self._tg: anyio.abc.TaskGroup | None = None  # the main loop's, while it runs
        self._horizon = NEVER
        self._recovered = False
        # For the query API: members per segment (counted on transitions and as customers
        # load, not scanned), customers to load for a query while warming up, and the
        # instants and totals of the latest batches (the rate of events applied).
        self._sizes: dict[str, int] = {}
        self._loads: deque[_LoadRequest] = deque()
        self._applied: deque[tuple[int, int]] = deque()

    # What tests and operators may read -------------------------------------------------

    def customer(self, customer_id: str) -> Customer | None:
        """The actor of ``customer_id``, if the engine knows it (read it, don't change it)."""
        return self._customers.get(customer_id)

    @property
    def customer_count(self) -> int:
        """How many customers this engine holds in memory (after a restart, all of them once
        :attr:`warm`)."""
        return len(self._customers)

    @property
    def warm(self) -> bool:
        """Whether every customer is in memory (after a restart, customers whose deadlines
        are far off load from their snapshots while the engine already runs)."""
        return self._warm

    @property
    def buffered(self) -> int:
        """Deliveries received from the broker and not yet applied (at most
        ``max_in_flight``: the broker holds the rest)."""
        return self._feed.buffered if self._feed is not None else 0

    @property
    def unpublished(self) -> int:
        """Committed transitions not yet confirmed published (ingestion pauses at
        ``max_outbox``)."""
        return len(self._outbox)

    @property
    def pending_deadlines(self) -> int:
        """How many customers have a deadline armed."""
        return len(self._timers) + len(self._held) + self._preparing

    @property
    def segments(self) -> SegmentSet:
        """The definitions in force."""
        return self._segments

    @property
    def transition_counts(self) -> dict[tuple[str, str, str], int]:
        """Transitions committed since start, by (segment, change, cause kind)."""
        return {
            (segment, change, str(cause.__struct_config__.tag)): n
            for (segment, change, cause), n in self._transitions_by.items()
        }

    @property
    def rejection_counts(self) -> dict[str, int]:
        """Events rejected since start, by class of reason (``InvalidEvent.kind``)."""
        return self._rejections_by.copy()

    # What the query API reads (protocol.serve_api through actors.EngineApi) ---------------

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is under way."""
        return self._running

    @property
    def config(self) -> EngineConfig:
        return self._config

    def now(self) -> int:
        """The engine clock's instant."""
        return self._clock.now()

    async def load(self, customer_id: str) -> Customer | None:
        """The actor of ``customer_id`` (read it, don't change it), or None if the engine
        knows no such customer.

        While the engine warms up after a restart, a customer not loaded yet is loaded from
        its snapshot first, by the main loop between two batches, as for an event.
        """
        c = self._customers.get(customer_id)
        if c is not None or self._warm or not self._running:
            return c
        request = _LoadRequest(customer_id)
        self._loads.append(request)
        self._wake.set()
        await request.done.wait()
        return self._customers.get(customer_id)

    @property
    def segment_sizes(self) -> dict[str, int]:
        """How many customers are in each segment in force, in file order. Counted as
        memberships change, among the customers in memory (every one once :attr:`warm`)."""
        sizes = self._sizes
        return {name: sizes.get(name, 0) for name in self._segments.names}

    async def members(self, segment: str, *, after: str | None = None, limit: int) -> list[str]:
        """Up to ``limit`` ids of the segment's members in memory, in id order, after the id
        ``after``.

        It looks at every customer in memory, a slice at a time, letting the event loop run
        between slices (about 10 ms per slice).
        """
        ids = list(self._customers)
        page: list[str] = []
        for i in range(0, len(ids), _SCAN_SLICE):
            customers = self._customers  # a switch of definitions may replace it meanwhile
            found = [
                cid
                for cid in ids[i : i + _SCAN_SLICE]
                if (after is None or cid > after)
                and (c := customers.get(cid)) is not None
                and segment in c.members
            ]
            if found:
                page = heapq.nsmallest(limit, itertools.chain(page, found))
            await anyio.lowlevel.checkpoint()
        return page

    @property
    def next_deadline(self) -> int | None:
        """The earliest deadline armed, if any."""
        return self._next_due()

    @property
    def events_per_second(self) -> float:
        """Events applied per second over the last 10 s of the engine's clock."""
        now = self._clock.now()
        recent = [(at, before) for at, before in self._applied if at >= now - _RATE_WINDOW]
        if not recent:
            return 0.0
        since, before = recent[0]
        return (self.stats.events_applied - before) * SECOND / max(now - since, SECOND)

    def _note_applied(self, n: int) -> None:
        """Record a batch of ``n`` events applied now, for :attr:`events_per_second`."""
        now, applied = self._clock.now(), self._applied
        applied.append((now, self.stats.events_applied - n))
        while applied[0][0] < now - _RATE_WINDOW:
            applied.popleft()

    async def consumer_lag(self) -> int | None:
        """Events the broker holds for this engine's consumer, not yet acknowledged; None
        when not consuming or the broker does not answer."""
        return None if self._feed is None else await self._feed.lag()

    # Changing definitions while running ---------------------------------------------------

    async def apply_segments(self, segments: SegmentSet) -> int:
        """Switch the running engine to ``segments``; return how many transitions that made.

        The switch is made by the engine's main loop between two batches, and this waits for
        it. Every customer is evaluated under the new definitions at its watermark, with
        cause ``definition``: members of a new segment whose rule holds enter it, members of
        a removed segment exit it, and a changed rule gives the difference. The transitions
        are committed and published like any other, and deadlines are re-armed. When the new
        rules read facts the old ones did not (``SegmentSet.needs`` differs), the facts are
        first rebuilt from the event log, which takes as long as the rebuild at start. The
        customers of static lists the engine does not know yet are added, with no events.

        Requests are applied in the order made. A request whose caller is cancelled while
        it waits is still applied.

        Raises:
            ActorsError: the engine is not running, or it stopped before the switch was made.
        """
        if not self._running:
            raise ActorsError("the engine is not running")
        request = _SegmentsRequest(segments)
        self._requests.append(request)
        self._wake.set()
        await request.done.wait()
        if request.transitions is None:
            raise ActorsError("the engine stopped before the new segments were applied") from (
                request.error
            )
        return request.transitions

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
        self._settle_gc()
        changed = await self._load_all()
        if changed:
            await self._commit([], changed)
        self._recovered = True

    # Running ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Set up streams, rebuild from the log, then consume until cancelled.

        ``task_status.started()`` is called once the engine consumes. Raises
        :class:`protocol.BrokerError` or :class:`store.StoreError` when it cannot go on.
        """
        # From here on, apply_segments() requests queue up for the main loop.
        self._running = True
        try:
            await self._run(task_status)
        finally:
            self._running = False
            # Whoever still waits would wait forever: the loop that would apply it is gone.
            while self._requests:
                self._requests.popleft().done.set()
            while self._loads:
                self._loads.popleft().done.set()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        js = self._nc.jetstream()
        await ensure_streams(js, self._config.streams)
        self._publisher = Publisher(self._nc)
        await self._publisher.start()
        if not self._recovered:
            await self._rebuild()
            self._settle_gc()
        feed = EventFeed(
            self._nc,
            js,
            durable=self._config.consumer,
            filter_subject=self._config.filter_subject,
            max_in_flight=self._config.max_in_flight,
        )
        await feed.start()
        self._feed = feed
        self._catch_up = feed.pending_at_start
        if self._catch_up:
            # Hold deadlines until the backlog's first batch says how far it reaches.
            self._backlog_cap = 0
        self._logger.info(
            "engine started",
            customers=len(self._customers),
            rebuilt_events=self.stats.rebuilt_events,
            snapshots_loaded=self.stats.snapshots_loaded,
            snapshots_ignored=self.stats.snapshots_ignored,
            warm=self._warm,
            backlog=feed.pending_at_start,
            pending_deadlines=self.pending_deadlines,
            segments=list(self._segments.names),
        )
        task_status.started()
        stopped = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._publish_loop)
                self._tg = tg
                try:
                    await self._loop(feed)
                finally:
                    self._tg = None
        except anyio.get_cancelled_exc_class():
            stopped = True  # asked to stop, not failing
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await feed.stop()
                await self._publisher.close()
                # Record what was published meanwhile; if the store is what failed, the
                # original error matters, and unrecorded marks only mean a republish.
                with contextlib.suppress(StoreError):
                    await self._commit([], [])
                    if stopped:
                        # A clean stop leaves no tail: the next start loads snapshots only.
                        await self._flush_snapshots()

    async def _rebuild(self) -> None:
        """Make the actors ready: from snapshots plus the log tail after them when the stored
        snapshots fit these rules, else from the whole log."""
        self._confirmed_through = self._log.outbox.published_through
        async for outbox in self._log.outbox.unpublished():
            self._outbox.extend((o.seq, _transition_decoder.decode(o.body)) for o in outbox)
        marks = self._log.snapshots.marks
        self._round_started = self._clock.now()
        self._round_events = self._log.events.last_seq
        if self._config.use_snapshots and marks is not None and marks.needs == self._needs:
            await self._rebuild_from_snapshots(marks)
        else:
            await self._rebuild_from_log()
        self._recount()

    async def _rebuild_from_log(self) -> None:
        """Rebuild every actor: facts from the event log, memberships from the outbox."""
        segments = self._segments
        self.stats.rebuilt_events += await self._fold_log(segments, self._customers)

        # The outbox comes in (customer, version) order, so each entry is restored as it comes.
        async for outbox in self._log.outbox.by_customer():
            for o in outbox:
                self._actor(o.customer_id).restore((_transition_decoder.decode(o.body),))

        self._add_listed(segments, self._customers)

        # A customer's memberships differ from its rules only if the definitions changed.
        changed: list[Transition] = []
        for i, c in enumerate(list(self._customers.values())):
            changed += c.evaluate(segments, _DEFINITION)
            self._touch(c)
            await _breathe(i)
        self.stats.rebuilt_customers = len(self._customers)
        if self._config.use_snapshots:
            # No usable snapshots: take them now, or the next start rebuilds from the log too.
            self._round_started = -NEVER
        if changed:
            self._logger.info("definitions changed memberships", transitions=len(changed))
            await self._commit([], changed)

    async def _rebuild_from_snapshots(self, marks: SnapshotMarks) -> None:
        """Load the customers of the log tail (snapshot plus what came after it); then, if
        the definitions are the ones the snapshots were taken under, let the rest load in
        deadline order while the engine runs, else load them all and evaluate them."""
        tail_events: dict[str, list[LoggedEvent]] = defaultdict(list)
        async for chunk in self._log.events.read(after=marks.events_through):
            for e in chunk:
                tail_events[e.customer_id].append(e)
            self.stats.rebuilt_events += len(chunk)
        tail_outbox: dict[str, list[OutboxEntry]] = defaultdict(list)
        async for outbox in self._log.outbox.read(after=marks.outbox_through):
            for o in outbox:
                tail_outbox[o.customer_id].append(o)
        tail = sorted(tail_events.keys() | tail_outbox.keys())
        changed = await self._load(tail, tail_events, tail_outbox)
        for i, customer_id in enumerate(tail):
            c = self._customers[customer_id]
            changed += c.evaluate(self._segments, _DEFINITION)
            self._touch(c)
            await _breathe(i)

        self._warm, self._cursor, self._horizon = False, None, -NEVER
        await self._log.bulk_reads(True)  # until warm: pages come in random table order
        if marks.definitions == self._segments.fingerprint:
            # Overdue deadlines first: they fire at once, at their own instants.
            now = self._clock.now()
            while not self._warm and self._horizon <= now:
                changed += await self._page(self._config.page_batch)
        else:
            changed += await self._load_all()
            self._add_listed(self._segments, self._customers)
            for i, c in enumerate(list(self._customers.values())):
                changed += c.evaluate(self._segments, _DEFINITION)
                self._touch(c)
                await _breathe(i)
        self.stats.rebuilt_customers = len(self._customers)
        if changed:
            self._logger.info("definitions changed memberships", transitions=len(changed))
            await self._commit([], changed)

    def _from_snapshot(self, snap: Snapshot) -> Customer | None:
        """The actor a stored snapshot holds, or None if it must be rebuilt from the log."""
        if snap.format == SNAPSHOT_FORMAT and snap.needs == self._needs:
            try:
                c = Customer.from_snapshot(snap.customer_id, snap.body)
            except SnapshotError as e:
                self._logger.warning("snapshot ignored", customer_id=snap.customer_id, error=str(e))
            else:
                self.stats.snapshots_loaded += 1
                return c
        self.stats.snapshots_ignored += 1
        return None

    async def _load(
        self,
        customer_ids: Iterable[str],
        tail_events: Mapping[str, list[LoggedEvent]],
        tail_outbox: Mapping[str, list[OutboxEntry]],
    ) -> list[Transition]:
        """Load customers not in memory: each from its snapshot plus its ``tail_events`` and
        ``tail_outbox`` after it, or from the log when it has no usable snapshot. Returns the
        transitions of evaluating those rebuilt from the log (to commit)."""
        ids = [i for i in customer_ids if i not in self._customers]
        if not ids:
            return []
        segments = self._segments
        snaps = {s.customer_id: s for s in await self._log.snapshots.of(ids)}
        from_log: list[str] = []
        for customer_id in ids:
            snap = snaps.get(customer_id)
            c = self._from_snapshot(snap) if snap is not None else None
            if c is None:
                # No usable snapshot. Most often a new customer, but the log has the last
                # word (a snapshot may have been lost): rebuild from what it holds, if any.
                from_log.append(customer_id)
                continue
            for e in tail_events.get(customer_id, ()):
                if e.seq > snap.log_seq:  # type: ignore[union-attr]
                    c.fold(_event_decoder.decode(e.body), segments)
            for o in tail_outbox.get(customer_id, ()):
                if o.version > c.version:
                    c.restore((_transition_decoder.decode(o.body),))
            self._hold(c)
            self._touch(c)
        return await self._load_from_log(from_log, known=snaps.keys())

    async def _load_from_log(
        self, customer_ids: list[str], *, known: Collection[str] = ()
    ) -> list[Transition]:
        """Rebuild these customers from their events and transitions alone, evaluate them,
        and return the transitions that made (to commit).

        One with neither is left out (a new customer, which its first event creates), unless
        it is ``known`` (it had a snapshot: a static list's customer without events).
        """
        if not customer_ids:
            return []
        segments = self._segments
        fresh = {customer_id: Customer(customer_id) for customer_id in customer_ids}
        for e in await self._log.events.of_customers(customer_ids):
            fresh[e.customer_id].fold(_event_decoder.decode(e.body), segments)
            self.stats.rebuilt_events += 1
        for o in await self._log.outbox.of_customers(customer_ids):
            fresh[o.customer_id].restore((_transition_decoder.decode(o.body),))
        now = self._clock.now()
        changed: list[Transition] = []
        for c in fresh.values():
            if c.version == 0 and c.first_at() is None:
                if c.customer_id not in known:
                    continue
                c.watermark = now  # known from a static list only: as when it was added
            self._hold(c)
            changed += c.evaluate(segments, _DEFINITION)
            self._touch(c)
        return changed

    async def _page(self, limit: int) -> list[Transition]:
        """Load the next ``limit`` snapshots in deadline order; return the transitions of
        customers rebuilt from the log instead (to commit)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.after == self._cursor and ahead.limit == limit:
            await ahead.done.wait()
            rows = ahead.rows
        else:
            rows = await self._log.snapshots.page(self._cursor, limit)
        if len(rows) == limit and self._tg is not None:
            # SQLite reads the next page on its thread while this one decodes here (the
            # rows not loaded yet do not change meanwhile: only loaded customers change).
            ahead = self._ahead = _PageAhead((rows[-1].deadline, rows[-1].customer_id), limit)
            self._tg.start_soon(self._read_ahead, ahead)
            await anyio.lowlevel.cancel_shielded_checkpoint()  # lets it send the query
        bad: list[str] = []
        with self._loading_gc():
            for snap in rows:
                if snap.customer_id in self._customers:
                    continue  # loaded already: from the tail, or for an event
                c = self._from_snapshot(snap)
                if c is None:
                    bad.append(snap.customer_id)
                    continue
                self._hold(c)
                self._timers.set(c.customer_id, c.deadline)
        if len(rows) < limit:
            await self._log.bulk_reads(False)
            self._warm, self._cursor, self._horizon = True, None, NEVER
            self._logger.info("warm", customers=len(self._customers))
            self._settle_gc()
        else:
            self._cursor = (rows[-1].deadline, rows[-1].customer_id)
            self._horizon = rows[-1].deadline
        return await self._load_from_log(bad, known=bad)

    async def _read_ahead(self, ahead: _PageAhead) -> None:
        ahead.rows = await self._log.snapshots.page(ahead.after, ahead.limit)
        ahead.done.set()

    async def _load_all(self) -> list[Transition]:
        changed: list[Transition] = []
        while not self._warm:
            changed += await self._page(max(self._config.page_batch, 50_000))
        return changed

    def _hold(self, c: Customer) -> None:
        """Keep a customer loaded with its memberships so far (later ones are counted as
        they are committed)."""
        self._customers[c.customer_id] = c
        sizes = self._sizes
        for segment in c.members:
            sizes[segment] = sizes.get(segment, 0) + 1

    def _recount(self) -> None:
        """Count the members of each segment afresh (after a start or a switch, which look
        at every customer anyway)."""
        sizes = dict.fromkeys(self._segments.names, 0)
        for c in self._customers.values():
            for segment in c.members:
                sizes[segment] = sizes.get(segment, 0) + 1
        self._sizes = sizes

    def _touch(self, c: Customer) -> None:
        """Re-arm the customer's deadline and mark it for the next round of snapshots."""
        self._timers.set(c.customer_id, c.deadline)
        self._dirty.add(c.customer_id)

    async def _fold_log(self, segments: SegmentSet, customers: dict[str, Customer]) -> int:
        """Fold the whole event log into ``customers`` (adding actors as needed), keeping the
        facts ``segments`` reads; return how many events were read."""
        read = 0
        async for chunk in self._log.events.read():
            for entry in chunk:
                event = _event_decoder.decode(entry.body)
                c = customers.get(event.customer_id)
                if c is None:
                    c = customers[event.customer_id] = Customer(event.customer_id)
                c.fold(event, segments)
            read += len(chunk)
        return read

    def _add_listed(self, segments: SegmentSet, customers: dict[str, Customer]) -> int:
        """Add an actor for each customer of a static list not in ``customers``; return how
        many were added.

        Such a customer has no events, so nothing gives it an instant: it is evaluated from
        now on, the engine clock's now.
        """
        # getattr: works whether or not this SegmentSet has static lists.
        lists: Mapping[str, frozenset[str]] = getattr(segments, "lists", {})
        added = 0
        now = self._clock.now()
        for ids in lists.values():
            for customer_id in sorted(ids):  # sorted: a reproducible publishing order
                if customer_id not in customers:
                    c = customers[customer_id] = Customer(customer_id)
                    c.watermark = now
                    added += 1
        return added

    def _actor(self, customer_id: str) -> Customer:
        c = self._customers.get(customer_id)
        if c is None:
            c = self._customers[customer_id] = Customer(customer_id)
        return c

    async def _apply_requested(self) -> None:
        """Make the switches apply_segments() asked for, in order, and tell each caller."""
        if self._wake.is_set():
            self._wake = anyio.Event()
        if self._loads:
            loads, self._loads = self._loads, deque()
            try:
                changed = await self._load(sorted({r.customer_id for r in loads}), {}, {})
                if changed:
                    await self._commit([], changed)
            finally:
                for r in loads:
                    r.done.set()
        while self._requests:
            request = self._requests[0]
            try:
                request.transitions = await self._switch(request.segments)
            except Exception as e:
                # The engine stops with this error; the caller learns the switch failed.
                request.error = e
                raise
            finally:
                self._requests.popleft()
                request.done.set()

    async def _switch(self, new: SegmentSet) -> int:
        # Every customer is evaluated, so every customer must be in memory.
        loaded = await self._load_all()
        if loaded:
            await self._commit([], loaded)
        # A round under way would record the old definitions for snapshots of the new.
        self._round = None
        old = self._segments
        customers = self._customers
        refolded = 0
        if new.needs != old.needs:
            # Customers keep only the facts the old rules read: refold the log into fresh
            # actors that take over the memberships, version and watermark. They replace
            # the old ones only once complete, so a failed read changes nothing.
            customers = {}
            refolded = await self._fold_log(new, customers)
            for customer_id, before in self._customers.items():
                c = customers.get(customer_id)
                if c is None:  # known without events, from a static list
                    c = customers[customer_id] = Customer(customer_id)
                c.members = before.members
                c.version = before.version
                c.watermark = max(c.watermark, before.watermark)
        added = self._add_listed(new, customers)

        changed: list[Transition] = []
        for i, c in enumerate(list(customers.values())):
            changed += c.evaluate(new, _DEFINITION)
            self._timers.set(c.customer_id, c.deadline)
            await _breathe(i)
        self._segments, self._customers = new, customers
        self._needs = new.needs.fingerprint()
        self._dirty.update(customers)
        await self._commit([], changed)
        self._recount()  # segments removed, and customers refolded

        entered = sum(1 for t in changed if t.change == "entered")
        self._logger.info(
            "segments applied",
            source=new.source,
            segments=list(new.names),
            added=[n for n in new.names if n not in old.names],
            removed=[n for n in old.names if n not in new.names],
            customers=len(customers),
            new_customers=added,
            refolded_events=refolded,
            transitions=len(changed),
            entered=entered,
            exited=len(changed) - entered,
        )
        return len(changed)

    async def _loop(self, feed: EventFeed) -> None:
        while True:
            # Between turns the actors match the log: the place where a stop takes effect
            # (commits are shielded, so a busy loop might otherwise never offer one).
            await anyio.lowlevel.checkpoint()
            await self._apply_requested()
            while len(self._outbox) >= self._config.max_outbox:
                # Backpressure: the broker is not taking transitions as fast as we make them.
                self._outbox_space = anyio.Event()
                await self._outbox_space.wait()
            batch = feed.take(self._config.batch_size)
            if batch:
                await self._ingest(batch, feed)
            if feed.needs_restart:
                await self._resume_feed(feed)
            busy = bool(batch)
            if not self._warm:
                changed = await self._page(self._config.page_batch)
                if changed:
                    await self._commit([], changed)
                busy = True
            busy = await self._fire_due(feed) or busy
            busy = await self._snapshot_step() or busy
            if not busy and self._warm:
                busy = await self._prepare(feed)
            if not busy:
                if self._confirmed_through > self._log.outbox.published_through:
                    await self._commit([], [])
                await self._idle(feed)

    async def _ingest(self, batch: list[Delivery], feed: EventFeed) -> None:
        cfg, segments = self._config, self._segments
        fresh: list[Event] = []
        rejected: list[tuple[Delivery, InvalidEvent]] = []
        keys: set[tuple[str, str]] = set()
        for i, d in enumerate(batch):
            await _breathe(i, _SERVE_EVERY * 4)
            try:
                event = decode_event(
                    d.data,
                    d.subject,
                    received=d.received,
                    default_message_id=d.msg_id or f"js:{d.stream_sequence}@{d.received}",
                    max_bytes=cfg.max_event_bytes,
                )
            except InvalidEvent as e:
                rejected.append((d, e))
                continue
            key = (event.customer_id, event.message_id)
            if key in keys:
                self.stats.events_duplicate += 1
                continue
            keys.add(key)
            fresh.append(event)
        known = await self._log.events.known(keys) if keys else set()

        logged: list[LoggedEvent] = []
        transitions: list[Transition] = []
        if not self._warm:
            # Still warming up: these customers' snapshots load now, ahead of their turn.
            transitions += await self._load({e.customer_id for e in fresh}, {}, {})
        try:
            for i, event in enumerate(fresh):
                await _breathe(i, _SERVE_EVERY)
                if (event.customer_id, event.message_id) in known:
                    self.stats.events_duplicate += 1
                    continue
                c = self._actor(event.customer_id)
                transitions += c.apply(event, segments)
                self._touch(c)
                logged.append(
                    LoggedEvent(
                        customer_id=event.customer_id,
                        message_id=event.message_id,
                        at=event.at,
                        body=_event_encoder.encode(event),
                    )
                )
        except Exception:
            # The engine stops with this error; say which event it was.
            self._logger.error(
                "event could not be applied",
                customer_id=event.customer_id,
                message_id=event.message_id,
                exc_info=True,
            )
            raise
        await self._commit(logged, transitions)
        self.stats.events_applied += len(logged)
        self._applied_since_gc += len(logged)
        if self._applied_since_gc >= _FREEZE_EVENTS:
            # What the events added to the actors joins the frozen: otherwise every full
            # collection walks all that came since the last freeze.
            self._settle_gc()
        if logged:
            self._note_applied(len(logged))
        for d, invalid in rejected:
            await self._reject(d, invalid)
        # Acknowledged only now: every event of the batch is in the log or was rejected.
        await feed.ack_taken()
        last = batch[-1]
        # Behind while the broker holds more for us, or the backlog counted at start (some
        # of it possibly still on its way to the buffer) has not all been applied.
        self._catch_up -= len(batch)
        self._backlog_cap = last.received if last.pending or self._catch_up > 0 else None

    async def _reject(self, d: Delivery, invalid: InvalidEvent) -> None:
        reason = invalid.reason
        self.stats.events_rejected += 1
        self._rejections_by[invalid.kind] = self._rejections_by.get(invalid.kind, 0) + 1
        self._logger.warning(
            "event rejected",
            customer_id=invalid.customer_id,
            message_id=invalid.message_id,
            subject=d.subject,
            stream_sequence=d.stream_sequence,
            reason=reason,
            kind=invalid.kind,
        )
        assert self._publisher is not None
        delay = 0.1
        while True:
            try:
                await self._publisher.publish_rejection(
                    reason=reason,
                    subject=d.subject,
                    data=d.data,
                    received=d.received,
                    stream_sequence=d.stream_sequence,
                )
                return
            except PublishError as e:
                # Not acknowledging until it is out keeps the rejection from being lost.
                self._logger.warning("retrying rejection", error=str(e), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _time_floor(self, feed: EventFeed) -> int:
        """The latest instant up to which deadlines may fire: not past any event still
        waiting to be applied."""
        floor = self._clock.now()
        # Strictly before a waiting event: a deadline at its very instant is evaluated
        # together with it (SEGMENTS.md).
        oldest = feed.oldest_buffered_received()
        if oldest is not None and oldest - 1 < floor:
            floor = oldest - 1
        if self._backlog_cap is not None and self._backlog_cap - 1 < floor:
            floor = self._backlog_cap - 1
        if not self._warm and self._horizon - 1 < floor:
            # Customers whose deadline is past the horizon may not be loaded yet.
            floor = self._horizon - 1
        return floor

    def _confirmed(self, feed: EventFeed) -> int:
        """The latest instant before which no event can still be on its way to the feed.

        The broker stamps events in stream order, so one still on its way is stamped no
        earlier than the latest that arrived; and at the last successful fence, none was on
        its way at all. While events flow, the first bound moves with them, and no request
        is needed.
        """
        return max(self._fenced, feed.received_through) - 1

    async def _fire_due(self, feed: EventFeed) -> bool:
        floor = self._time_floor(feed)
        nxt = self._next_due()
        if nxt is None or nxt > floor:
            return False
        if self._backlog_cap is None and nxt > self._confirmed(feed):
            # Caught up as far as the feed knows, but an event stored by the broker just
            # before the deadline may still be on its way: ask the broker. (While behind,
            # the backlog cap already keeps deadlines before the next event to apply.)
            asked = self._clock.now()
            if await feed.fence():
                self._fenced = max(self._fenced, asked)
            # Deliveries that came in while the broker answered hold the floor back too.
            floor = min(self._time_floor(feed), self._confirmed(feed))
            if nxt > floor:
                return False
        due = self._pop_due(floor, self._config.fire_batch)
        if not due:
            return False
        transitions: list[Transition] = []
        due_at: list[int] = []
        customers, segments = self._customers, self._segments
        arm, dirty = self._timers.set, self._dirty
        for i, customer_id in enumerate(due):
            if i % _SERVE_EVERY == _SERVE_EVERY - 1:
                await anyio.lowlevel.cancel_shielded_checkpoint()  # as _breathe(), inline
            c = customers[customer_id]
            if c.deadline is not None:
                due_at.append(c.deadline)  # what the timer held: the deadline firing now
            transitions += c.advance(floor, segments)
            arm(customer_id, c.deadline)  # as _touch(c)
            dirty.add(customer_id)
        self.stats.deadlines_fired += len(due)
        self._applied_since_gc += len(due)
        if self._observer is not None:
            self._observer.deadlines_fired(self._clock.now(), due_at)
        if transitions:
            await self._commit([], transitions)
        if self._applied_since_gc >= _FREEZE_EVENTS:
            self._settle_gc()
        return True

    def _held_valid(self, deadline: int, customer_id: str) -> bool:
        c = self._customers.get(customer_id)
        return c is not None and c.deadline == deadline and self._timers.get(customer_id) is None

    def _next_due(self) -> int | None:
        """The earliest deadline armed, in the timer queue or held by :meth:`_prepare`."""
        nxt = self._timers.next()
        held = self._held
        while held:
            deadline, customer_id = held[0]
            if self._held_valid(deadline, customer_id):
                return deadline if nxt is None or deadline < nxt else nxt
            held.popleft()
        return nxt

    def _pop_due(self, until: int, limit: int) -> list[str]:
        """Remove and return up to ``limit`` customers whose deadline is at or before
        ``until``, earliest first, from the timer queue and the held deadlines."""
        held = self._held
        if not held:
            return self._timers.pop_due(until, limit)
        mine: list[tuple[int, str]] = []
        valid = self._held_valid
        while held and held[0][0] <= until and len(mine) < limit:
            entry = held.popleft()
            if valid(*entry):
                mine.append(entry)
        customers = self._customers
        queued = [(customers[i].deadline or 0, i) for i in self._timers.pop_due(until, limit)]
        if not queued:
            return [customer_id for _, customer_id in mine]
        both = list(heapq.merge(mine, queued))
        rest = both[limit:]  # still due: first in the next round
        if rest:
            if not held or rest[-1] <= held[0]:
                held.extendleft(reversed(rest))
            else:
                self._held = deque(heapq.merge(rest, held))
        return [customer_id for _, customer_id in both[:limit]]

    async def _prepare(self, feed: EventFeed) -> bool:
        """With nothing else to do, prepare the customers whose deadlines fall due within
        the next few seconds; return whether there were any.

        A customer's first evaluation after it is loaded from its snapshot builds what it
        keeps to evaluate quickly (the instants of its events by name, its score terms,
        when each segment must be looked at again): about three quarters of the cost of
        firing its deadline. Preparing it evaluates it once at its watermark, where it was
        last evaluated (so nothing changes), and takes its deadline out of the timer queue
        into a heap of its own, so that it is prepared only once. When the deadline falls
        due, firing costs a quarter as much, so a burst of deadlines is fired that much
        sooner.
        """
        if self._backlog_cap is not None or feed.buffered:
            return False
        due = self._timers.pop_due(self._clock.now() + _PREPARE_AHEAD, _PREPARE_SLICE)
        if not due:
            return False
        segments, customers, held = self._segments, self._customers, self._held
        changed: list[Transition] = []
        self._preparing = len(due)
        for i, customer_id in enumerate(due):
            await _breathe(i, _SERVE_EVERY)  # queries meanwhile count self._preparing
            self._preparing = len(due) - i - 1
            c = customers[customer_id]
            deadline = c.deadline
            if i % 50 == 49 and feed.buffered:
                # Events come first: the rest go back to the timer queue, for later.
                for rest in due[i:]:
                    self._timers.set(rest, customers[rest].deadline)
                self._preparing = 0
                break
            if deadline is None:
                continue  # in the timer queue, so it has one
            made = c.evaluate(segments, _TIME)
            if made:
                # Not what it was evaluated to when last changed (it should be): take
                # what evaluating at its watermark gives, as a time-based change.
                changed += made
                self._touch(c)
                continue
            if c.deadline != deadline:
                # A fresh evaluation can give an earlier next instant than the outcomes it
                # kept when last evaluated did (a rule's next instant can be only where to
                # look again). Unprepared, it would fire at the deadline it had: so it does,
                # with what it keeps dropped, as loaded.
                c.restore(())
                c.deadline = deadline
            if not held or held[-1][0] <= deadline:
                held.append((deadline, customer_id))
            else:
                bisect.insort(held, (deadline, customer_id))  # armed since the last ones
        self._applied_since_gc += len(due)
        if self._applied_since_gc >= _FREEZE_EVENTS or (
            len(due) < _PREPARE_SLICE and self._applied_since_gc >= _PREPARE_SLICE
        ):
            # What it keeps lives on (see EngineConfig.freeze_gc). Frozen too once all due
            # soon are prepared: else the first full collection, often while they fire,
            # walks it all (20-40 ms for 4,000 customers).
            self._settle_gc()
        if changed:
            await self._commit([], changed)
        return True

    async def _commit(self, events: list[LoggedEvent], transitions: Iterable[Transition]) -> None:
        # Transitions of a batch or a round of deadlines share few instants: parse each once.
        instants: dict[datetime, int] = {}
        entries = [
            OutboxEntry(
                customer_id=t.customer_id,
                version=t.version,
                segment=t.segment,
                at=instants.get(t.at) or instants.setdefault(t.at, to_instant(t.at)),
                body=_transition_encoder.encode(t),
            )
            for t in transitions
        ]
        obs = self._observer
        with obs.timing_commit() if obs is not None and (events or entries) else _NOT_TIMED:
            seqs = await self._log.commit(events, entries, self._confirmed_through)
        self.stats.transitions += len(entries)
        if entries:
            sizes = self._sizes
            for t in transitions:
                sizes[t.segment] = sizes.get(t.segment, 0) + (1 if t.change == "entered" else -1)
            counts = self._transitions_by
            for t in transitions:
                key = (t.segment, t.change, type(t.cause))
                counts[key] = counts.get(key, 0) + 1
            self._outbox.extend(zip(seqs, transitions, strict=True))
            self._outbox_ready.set()

    async def _snapshot_step(self) -> bool:
        """Start a round of snapshots when one is due, or write the next part of the round
        under way; return whether there was anything to do.

        A round takes the customers changed since the last one and snapshots them, a part
        per turn of the loop, each part in its own transaction. Only once all are written is
        the round's mark recorded: where the log and the outbox stood when it started.
        """
        cfg, log = self._config, self._log
        if self._round is None:
            if not self._dirty:
                return False
            now = self._clock.now()
            if (
                now - self._round_started < cfg.snapshot_interval * 1_000_000
                and log.events.last_seq - self._round_events < cfg.snapshot_events
            ):
                return False
            self._start_round(now)
        assert self._round is not None
        part = self._round[-cfg.snapshot_batch :]
        del self._round[-cfg.snapshot_batch :]
        await self._write_snapshots(part, done=not self._round)
        return True

    def _start_round(self, now: int) -> None:
        # Sorted: upserts in key order cost half as much as in set order (bench_restart).
        self._round, self._dirty = sorted(self._dirty), set()
        self._round_marks = SnapshotMarks(
            events_through=self._log.events.last_seq,
            outbox_through=self._log.outbox.last_seq,
            definitions=self._segments.fingerprint,
            needs=self._needs,
        )
        self._round_started, self._round_events = now, self._log.events.last_seq

    async def _write_snapshots(self, customer_ids: list[str], *, done: bool) -> None:
        # Taken between turns, so each reflects exactly what is committed up to here.
        needs, log_seq = self._needs, self._log.events.last_seq
        rows = [
            Snapshot(
                customer_id=c.customer_id,
                format=SNAPSHOT_FORMAT,
                needs=needs,
                log_seq=log_seq,
                deadline=NEVER if c.deadline is None else c.deadline,
                body=c.snapshot(),
            )
            for c in map(self._customers.__getitem__, customer_ids)
        ]
        await self._log.commit(
            [],
            [],
            self._confirmed_through,
            snapshots=rows,
            marks=self._round_marks if done else None,
        )
        self.stats.snapshots_written += len(rows)
        if done:
            self._round = None
            self.stats.snapshot_rounds += 1
            self._settle_gc()

    @contextlib.contextmanager
    def _loading_gc(self) -> Iterator[None]:
        """Around loading a page of customers (see :attr:`EngineConfig.freeze_gc`): the young
        garbage others left is collected first; while the page decodes, the collector is
        off (the actors it makes live as long as the engine, and young collections of a
        growing heap cost as much as the decoding); then what is alive is frozen, which
        costs nothing (``gc.freeze`` moves the generations' lists whole)."""
        if not self._config.freeze_gc:
            yield
            return
        gc.collect(1)
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            if enabled:
                gc.enable()

    def _settle_gc(self) -> None:
        """See :attr:`EngineConfig.freeze_gc`: young garbage collected (cheap), then all
        that is alive frozen, so full collections only walk what came since."""
        self._applied_since_gc = 0
        if self._config.freeze_gc:
            gc.collect(1)
            gc.freeze()

    async def _flush_snapshots(self) -> None:
        """Finish the round under way and snapshot every other changed customer."""
        if self._round is None and not self._dirty:
            return
        if self._round is not None:
            self._round = sorted(set(self._round) | self._dirty)
            self._dirty = set()
        else:
            self._start_round(self._clock.now())
        assert self._round is not None
        count = len(self._round)
        while self._round:
            part = self._round[-50_000:]
            del self._round[-50_000:]
            await self._write_snapshots(part, done=not self._round)
        self._logger.info("snapshots written", customers=count)

    async def _publish_loop(self) -> None:
        """Publish committed transitions in outbox order; on failure, retry the same ones."""
        assert self._publisher is not None
        delay = 0.1
        while True:
            if not self._outbox:
                self._outbox_ready = anyio.Event()
                await self._outbox_ready.wait()
            batch = list(itertools.islice(self._outbox, self._config.publish_batch))
            try:
                await self._publisher.publish_transitions([t for _, t in batch])
            except PublishError as e:
                self._logger.warning(
                    "publishing transitions failed; will retry", error=str(e), retry_in=delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for _ in batch:
                self._outbox.popleft()
            self._confirmed_through = batch[-1][0]
            self.stats.transitions_published += len(batch)
            self._outbox_space.set()

    async def _idle(self, feed: EventFeed) -> None:
        wake_at = self._next_due()
        unfenced = (
            wake_at is not None
            and self._backlog_cap is None
            and self._confirmed(feed) < wake_at <= self._clock.now()
        )
        with anyio.move_on_after(_FENCE_RETRY if unfenced else _MAX_IDLE) as quiet:
            async with anyio.create_task_group() as tg:

                async def on_delivery() -> None:
                    await feed.wait()
                    tg.cancel_scope.cancel()

                async def on_deadline(instant: int) -> None:
                    await self._clock.sleep_until(instant)
                    tg.cancel_scope.cancel()

                async def on_request() -> None:
                    await self._wake.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_delivery)
                tg.start_soon(on_request)
                if wake_at is not None and self._backlog_cap is None and not unfenced:
                    tg.start_soon(on_deadline, wake_at)
        if (
            quiet.cancelled_caught
            and not unfenced
            and not feed.buffered
            and self._backlog_cap is not None
        ):
            # A whole idle period without a delivery: nothing counted at start is still on
            # its way (deliveries take milliseconds), so deadlines need not wait any longer.
            self._catch_up = 0
            self._backlog_cap = None

    async def _resume_feed(self, feed: EventFeed) -> None:
        """Restart the consumer after a lost delivery or connection, once all taken is
        committed and acknowledged: what was on its way comes again at once, as backlog."""
        await feed.restart()
        self._catch_up = feed.pending_at_start
        if self._catch_up:
            # As at start: hold deadlines until the backlog's first batch says how far it
            # reaches.
            self._backlog_cap = 0
        self._logger.info("consumer resumed", backlog=feed.pending_at_start)
