"""``shoal serve`` among several engines: which partitions this one owns, and its engine
run over them, one *term* at a time.

Each term runs an :class:`actors.Engine` over the partitions claimed when it began. The
term ends when ownership should change: a lease was lost (or the broker fenced this engine
out of a partition), partitions are free and this engine owns fewer than its share, or it
owns more than its share while another engine owns fewer. The engine stops cleanly, the
partitions given up are handed over (their snapshot uploaded first, their leases
released), the store forgets them, and the next term starts over the new set: partitions
taken over from another engine start from their snapshot in ``SHOAL_SNAPSHOTS`` and the
events after it.

Each engine aims for an equal share: with N live engines (their heartbeats), P // N
partitions, one more for the first P % N engines in id order.

Every engine follows the definitions in force in ``SHOAL_DEFINITIONS``, whichever engine
stored them: it looks at the bucket's head every second, across terms, and switches the
engine of the current term to a newer version there (the same switch as a reload, between
two batches), storing it as that same version and marking the partitions it owns. A
version found between terms is switched to by the next term's engine once it runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from actors import (
    ActorsError,
    Clock,
    DefinitionsKeeper,
    Engine,
    EngineConfig,
    EngineObserver,
    EngineStats,
    PartitionCut,
    SegmentSet,
    take_over,
)
from protocol import (
    EVENTS_STREAM,
    SEGMENTS_STREAM,
    ApiError,
    BrokerError,
    Delivery,
    FencedOut,
    Ownership,
    PartitionLease,
    decode_forget_order,
    forget_hash,
    partition,
    to_instant,
)
from protocol.nats import (
    BrokerEraser,
    Claims,
    FeedClaim,
    Holder,
    LeaseBucket,
    Publisher,
    SnapshotStore,
    SnapshotUnusable,
    StreamSettings,
    cut_partition,
    erase_progress,
    jetstream_ports,
    published_versions,
    read_stream,
    rejected_positions,
)
from protocol.nats._partitioned import partition_filter
from store import Forgotten, Store

_CHECK = 2.0
"""Seconds between two looks at the other engines and the leases."""
_GIVE_UP = 60.0
"""Seconds terms may keep failing for want of the broker before the engine gives up."""
_FOLLOW = 1.0
"""Seconds between two looks at the definitions in ``SHOAL_DEFINITIONS``."""
_WAIT_ENGINE = 0.1
"""Seconds between two looks for the engine of a term, between terms."""
_logger = structlog.get_logger("shoal.serve")


def _broker_failure(e: BaseException) -> BrokerError | None:
    """The broker's transient failure ``e`` stands for (alone, or in a task group's errors
    with nothing but others like it), or None: anything else, cancellation included."""
    errors = list(_leaves(e))
    if not errors or not all(isinstance(x, BrokerError) and _transient(x) for x in errors):
        return None
    first = errors[0]
    assert isinstance(first, BrokerError)
    return first


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            yield from _leaves(inner)
    else:
        yield e


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error of a task group that failed with one (nested groups unwrapped);
    ``group`` itself otherwise."""
    errors = group.exceptions
    if len(errors) == 1:
        inner = errors[0]
        return _single(inner) if isinstance(inner, BaseExceptionGroup) else inner
    return group


def _transient(e: BaseException) -> bool:
    """Whether ``e`` is for want of the broker's answer (it may come back): a timeout, no
    responders, no stream leader to answer a publish, JetStream unavailable."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(
            seen,
            TimeoutError
            | nats.errors.TimeoutError
            | nats.errors.NoRespondersError
            | nats.js.errors.NoStreamResponseError
            | nats.js.errors.ServiceUnavailableError,
        ):
            return True
        seen = seen.__cause__
    return False


def share(engine_id: str, engines: Sequence[str], partitions: int) -> int:
    """How many of ``partitions`` ``engine_id`` aims to own among the live ``engines``
    (itself included): P // N, one more for the first P % N in id order."""
    ids = sorted({*engines, engine_id})
    n = len(ids)
    return partitions // n + (1 if ids.index(engine_id) < partitions % n else 0)


@dataclass(slots=True)
class _Term:
    """Why a term ends, and what to do then."""

    lost: dict[int, str] = field(default_factory=dict)
    give: list[int] = field(default_factory=list)
    """Partitions handed over (their snapshots uploaded): released once the engine stops."""
    reason: str = ""
    done: anyio.Event = field(default_factory=anyio.Event)

    def end(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.done.set()


class _CurrentEngine:
    """The engine of the current term, for the metrics endpoint that outlives terms: zeros
    between terms (what it counts starts again with each term's engine)."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        # What the engines of the terms before counted: the counters go on from there.
        self._before = EngineStats()
        self._transitions: Counter[tuple[str, str, str]] = Counter()
        self._rejections: Counter[str] = Counter()

    def ended(self, engine: Engine) -> None:
        """``engine``'s term ended: what it counted is kept."""
        for f in dataclasses.fields(EngineStats):
            total = getattr(self._before, f.name) + getattr(engine.stats, f.name)
            setattr(self._before, f.name, total)
        self._transitions.update(engine.transition_counts)
        self._rejections.update(engine.rejection_counts)

    @property
    def stats(self) -> EngineStats:
        if self.engine is None:
            return dataclasses.replace(self._before)
        now = self.engine.stats
        return EngineStats(
            **{
                f.name: getattr(self._before, f.name) + getattr(now, f.name)
                for f in dataclasses.fields(EngineStats)
            }
        )

    @property
    def transition_counts(self) -> Mapping[tuple[str, str, str], int]:
        if self.engine is None:
            return dict(self._transitions)
        return dict(self._transitions + Counter(self.engine.transition_counts))

    @property
    def rejection_counts(self) -> Mapping[str, int]:
        if self.engine is None:
            return dict(self._rejections)
        return dict(self._rejections + Counter(self.engine.rejection_counts))

    @property
    def segment_sizes(self) -> Mapping[str, int]:
        return {} if self.engine is None else self.engine.segment_sizes

    @property
    def pending_deadlines(self) -> int:
        return 0 if self.engine is None else self.engine.pending_deadlines

    @property
    def unpublished(self) -> int:
        return 0 if self.engine is None else self.engine.unpublished

    @property
    def buffered(self) -> int:
        return 0 if self.engine is None else self.engine.buffered

    @property
    def customer_count(self) -> int:
        return 0 if self.engine is None else self.engine.customer_count

    @property
    def warm(self) -> bool:
        return self.engine is not None and self.engine.warm

    @property
    def parked_count(self) -> int:
        return 0 if self.engine is None else self.engine.parked_count

    async def consumer_lag(self) -> int | None:
        return None if self.engine is None else await self.engine.consumer_lag()

    def not_ready(self) -> list[str]:
        if self.engine is None:
            return ["between terms: no engine runs (claiming partitions)"]
        return self.engine.not_ready()


@dataclass(slots=True)
class Serving:
    """This engine's terms: see the module's documentation."""

    nc: Client
    store: Store
    clock: Clock
    streams: StreamSettings
    partitions: int
    claims: Claims
    leases: LeaseBucket
    snapshots: SnapshotStore
    keeper: DefinitionsKeeper
    segments: SegmentSet
    consumers: str
    config: EngineConfig
    observer: EngineObserver | None
    snapshot_every: float
    serve_queries: Callable[..., Coroutine[Any, Any, None]]
    """Runs the query service for an engine over the partitions given (``owned=``)."""
    on_started: Callable[[Engine], Awaitable[None]]
    """Called once each term's engine consumes (the first: apply a changed segments file)."""
    current: _CurrentEngine = field(default_factory=_CurrentEngine)
    _term: _Term | None = None
    _floors: dict[int, int] = field(default_factory=dict)
    """Per partition, the progress position its snapshots are bounded by until it is caught
    up (taken over: the one of the snapshot it started from)."""
    _skip: dict[str, int] = field(default_factory=dict)
    _unerased: dict[int, set[str]] = field(default_factory=dict)
    """Per partition, forgotten customers its progress records may still name: erased once
    a snapshot of the partition stands for those records."""
    _prepared: set[tuple[int, int]] = field(default_factory=set)
    _unready: set[int] = field(default_factory=set)
    """The partitions whose taking over began and did not finish (the store may hold part
    of them, and what the broker holds of them is not known yet)."""
    _claimed: set[int] = field(default_factory=set)
    """The partitions a term of this process claimed (served or not)."""
    _served: set[int] = field(default_factory=set)
    """The partitions a term of this process served (its engine started with them): the
    store holds them, events or not, until it forgets them."""
    _counts: Counter[str] = field(default_factory=Counter)
    """The (partition, claim) taken over whose store is ready: not taken over again."""
    _stream_cut: dict[int, int] = field(default_factory=dict)
    """Per partition, the stream position before which this process removed its messages
    from ``SHOAL_EVENTS`` (retention)."""

    @property
    def engine(self) -> Engine | None:
        """The engine of the current term (None between terms)."""
        return self.current.engine

    def ownership(self) -> Ownership:
        """What this engine owns, and how often partitions changed hands, for its status."""
        ages = self.claims.lease_ages()
        return Ownership(
            engine_id=self.claims.engine_id,
            leases=[
                PartitionLease(
                    partition=p,
                    claim=claim.seq,
                    lease_age=round(ages.get(p, 0.0), 3),
                    taken_over=(p, claim.seq) in self._prepared,
                )
                for p, claim in sorted(self.claims.owned.items())
            ],
            lease_ttl=self.claims.ttl,
            takeovers=self._counts["takeovers"],
            handovers=self._counts["handovers"],
            lost=self._counts["lost"],
            terms=self._counts["terms"],
        )

    # The terms ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Claim a share of the partitions and serve them, term after term, until
        cancelled.

        Raises:
            BrokerError: the broker refused, or stopped answering.
            StoreError: the store cannot be read or written.
        """
        started = False
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(self.claims.keep, self._lost))
            tg.start_soon(self._follow_definitions)
            failing_since: float | None = None
            while True:
                term = self._term = _Term()
                try:
                    await self._claim_share()
                    await self._serve(term, task_status if not started else None)
                except BaseException as e:
                    # A replicated broker is unavailable for moments (a leader elected, a
                    # node lost): the term starts again, unless it has failed for long.
                    # Cancellation and any other failure go on up.
                    failure = _broker_failure(e)
                    now = anyio.current_time()
                    failing_since = failing_since if failing_since is not None else now
                    if failure is None or now - failing_since > _GIVE_UP:
                        raise
                    _logger.warning("term failed; starting it again", error=str(failure))
                    await anyio.sleep(1.0)
                    continue
                failing_since = None
                started = True
                await self._close(term)

    def _lost(self, lost: dict[int, str]) -> None:
        term = self._term
        if term is not None:
            term.lost.update(lost)
            term.end("lost partitions")

    async def _claim_share(self) -> None:
        """Claim free partitions up to this engine's share; with none owned, wait for one."""
        told = False
        while True:
            engines = list(await self.leases.engines())
            target = share(self.claims.engine_id, engines, self.partitions)
            held = await self.leases.holders()
            owned = self.claims.owned
            me = self.claims.engine_id
            for p in self._order(engines):
                if len(owned) >= target:
                    break
                # A lease under this engine's own id is an earlier run's: taken over at once.
                if p in owned or (p in held and held[p].engine != me):
                    continue
                got = await self.claims.claim(p)
                if isinstance(got, Holder):
                    continue
            if owned:
                return
            if not told:
                told = True
                _logger.info("waiting for a partition to own", engines=sorted(engines))
            await anyio.sleep(_CHECK)

    def _order(self, engines: Sequence[str]) -> list[int]:
        """The partitions in the order this engine tries them: from its own place in the
        ring of engines on, so that engines starting together claim apart."""
        ids = sorted({*engines, self.claims.engine_id})
        start = ids.index(self.claims.engine_id) * self.partitions // len(ids)
        return [(start + i) % self.partitions for i in range(self.partitions)]

    async def _serve(self, term: _Term, task_status: anyio.abc.TaskStatus[None] | None) -> None:
        owned = dict(self.claims.owned)
        feeds: dict[int | None, FeedClaim] = {}
        # What the broker holds of partitions taken over, kept across the claim's terms
        # (a term may end before its engine made it all again).
        self._skip = {c: v for c, v in self._skip.items() if partition(c, self.partitions) in owned}
        rejected: set[int] | None = None
        # Another engine's last, or this one's store forgot it since (given or lost), or
        # never held it: claimed from another engine by a term that failed before the store
        # was made ready, then claimed again (over this engine's own claim).
        fresh = {
            p: claim.taken_over
            or p in self.store.dropped
            or (claim.previous is not None and not self._holds(p))
            for p, claim in owned.items()
        }
        self._claimed.update(owned)
        held: dict[int, list[str]] | None = None
        for p, claim in sorted(owned.items()):
            afresh = fresh[p]
            if afresh and (p, claim.seq) not in self._prepared:
                if rejected is None:
                    rejected = await rejected_positions(self.nc)
                if held is None:
                    # Once for all the partitions taken over: a takeover changes only its own.
                    held = await self._held_by_partition()
                self._unready.add(p)
                feeds[p] = claim.feed(
                    await self._take_over(p, rejected, held.get(p, [])), taken_over=True
                )
                self._unready.discard(p)
                self._counts["takeovers"] += 1
                # Once: the next terms of this claim go on from the store as it is then.
                self._prepared.add((p, claim.seq))
            elif afresh:
                through = self.store.partitions_through
                feeds[p] = claim.feed(through.get(p, 0), taken_over=True)
            else:
                through = self.store.partitions_through
                feeds[p] = claim.feed(through.get(p, self.store.stream_through or 0))
                self._floors.pop(p, None)
        await self._forget_unowned(owned)
        if 0 in owned:
            feeds[None] = owned[0].strays()
        source, sink = await jetstream_ports(
            self.nc, consumer=self.consumers, streams=self.streams, claims=feeds
        )
        for p, claim in owned.items():
            sink.claim(p, claim.seq)

        async def erased(by_partition: dict[int, set[str]]) -> None:
            # The partitions' snapshots in the Object Store still hold the customers: replaced
            # now (the old chunks erased), then the progress records naming them erased.
            for p, ids in by_partition.items():
                self._unerased.setdefault(p, set()).update(ids)
            try:
                await self._upload(engine, sink, sorted(by_partition))
            except BrokerError as e:
                _logger.warning(
                    "partition snapshots not replaced after an erasure; the next upload will",
                    error=str(e),
                )

        engine = Engine(
            source,
            sink,
            self.store,
            self.segments,
            clock=self.clock,
            config=self.config,
            observer=self.observer,
            keeper=self.keeper,
            owned=sorted(owned),
            eraser=BrokerEraser(self.nc, self.partitions),
            on_erased=erased,
        )
        engine.skip_stored(self._skip)
        self.current.engine = engine
        self._counts["terms"] += 1
        _logger.info(
            "term begins",
            partitions=sorted(owned),
            taken_over=sorted(p for p, c in owned.items() if c.taken_over),
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self._run_engine, engine, term)
                self._served.update(owned)
                await tg.start(self.serve_queries, engine, sorted(owned))
                await self.on_started(engine)
                if task_status is not None:
                    task_status.started()
                tg.start_soon(self._watch, engine, sink, term)
                tg.start_soon(self._upload_now_and_then, engine, sink)
                await term.done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.segments = engine.segments
            self.current.engine = None
            self.current.ended(engine)

    async def _run_engine(
        self, engine: Engine, term: _Term, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        try:
            try:
                await engine.run(task_status=task_status)
            except BaseExceptionGroup as group:
                raise _single(group) from None
        except FencedOut as e:
            # Another engine claimed these since: they are its now.
            for p in e.partitions:
                self.claims.owned.pop(p, None)
            term.lost.update(e.partitions)
            term.end("fenced out")

    async def _close(self, term: _Term) -> None:
        """After a term's engine stopped: hand over what it gave, and forget it. What it
        lost is kept: reclaimed with no other claim since, it is still current; not claimed
        again, the next term forgets it (:meth:`_forget_unowned`), and claiming it later
        takes it over afresh."""
        for p in term.give:
            await self.claims.release(p)
        self._counts["handovers"] += len(term.give)
        self._counts["lost"] += len(term.lost)
        gone = sorted(term.give)
        ids: list[str] = []
        if gone:
            dropped = set(gone)
            ids = [
                c
                for c in await self.store.customer_ids()
                if partition(c, self.partitions) in dropped
            ]
            await self.store.drop_customers(ids, partitions=gone)
            self._served.difference_update(gone)
        _logger.info(
            "term ended",
            why=term.reason,
            handed_over=sorted(term.give),
            lost=sorted(term.lost),
            customers_dropped=len(ids),
        )

    def _holds(self, p: int) -> bool:
        """Whether this engine's store holds partition ``p`` as of its last term: it recorded
        a position in it, or a term of this process served it (a partition with no events
        yet). Not when its taking over began and did not finish, nor when a term of this
        process claimed it and failed before serving it (its store never got it ready); a
        first claim of this process goes by the store (which the start-up check compares
        with the partition's consumers)."""
        if p in self._unready:
            return False
        if p in self.store.partitions_through or p in self._served:
            return True
        return p not in self._claimed

    async def _forget_unowned(self, owned: Mapping[int, Any]) -> None:
        """Drop from the store the partitions it holds and this term does not own (another
        engine holds them now, or this one lost them and did not claim them again): its
        engine must not load their customers, nor fire their deadlines. Claimed again
        later, they are taken over afresh (:attr:`store.Store.dropped`)."""
        stale = {p for p in self.store.partitions_through if p not in owned}
        if not stale:
            return
        ids = [c for c in await self.store.customer_ids() if partition(c, self.partitions) in stale]
        await self.store.drop_customers(ids, partitions=sorted(stale))
        self._served.difference_update(stale)
        _logger.info("partitions not owned forgotten", partitions=sorted(stale), customers=len(ids))

    async def running_engine(self) -> Engine:
        """The engine of the current term once it runs (waiting between terms)."""
        while True:
            engine = self.current.engine
            if engine is not None and engine.running:
                return engine
            await anyio.sleep(_WAIT_ENGINE)

    # Definitions ------------------------------------------------------------------------

    async def _follow_definitions(self) -> None:
        """Switch to each newer version of the definitions another engine stores (see the
        module's documentation); a version that cannot be read or parsed is logged by the
        keeper and not applied."""
        while True:
            await anyio.sleep(_FOLLOW)
            found = await self.keeper.newer()
            if found is None:
                continue
            record, segments = found
            while True:
                engine = await self.running_engine()
                try:
                    made = await engine.follow_definitions(record, segments)
                except ActorsError as e:
                    # The term ended first: the next term's engine switches.
                    _logger.info("definitions to follow wait for the next term", error=str(e))
                    await anyio.sleep(_WAIT_ENGINE)
                    continue
                _logger.info(
                    "definitions followed",
                    version=record.version,
                    fingerprint=record.fingerprint,
                    source=record.source,
                    transitions=made,
                )
                break

    # Taking over ------------------------------------------------------------------------

    async def _held_by_partition(self) -> dict[int, list[str]]:
        """The customers the store holds, by partition."""
        held: dict[int, list[str]] = {}
        for c in await self.store.customer_ids():
            held.setdefault(partition(c, self.partitions), []).append(c)
        return held

    async def _take_over(self, p: int, rejected: set[int], held: list[str]) -> int:
        """Make the store ready for partition ``p`` from its snapshot; the stream position
        its consumer starts after."""
        try:
            snapshot = await self.snapshots.get(p)
        except SnapshotUnusable as e:
            _logger.warning(
                "snapshot not used: the partition is rebuilt from its events", error=str(e)
            )
            snapshot = None

        async def events() -> AsyncIterator[Sequence[Delivery]]:
            if snapshot is None:
                return
            async for chunk in read_stream(
                self.nc,
                EVENTS_STREAM,
                partition_filter(p),
                through=snapshot.through,
                # What its bases hold is not logged again (and may be cut from the stream).
                after=snapshot.bases_through or None,
            ):
                yield chunk

        report = await take_over(
            self.store,
            p,
            self.partitions,
            snapshot,
            events(),
            max_event_bytes=self.config.max_event_bytes,
            rejected=rejected,
            held=held,
        )
        if snapshot is not None and snapshot.forgotten:
            await unfinished_erasures(self.nc, self.store, p, snapshot.forgotten)
        floor = 0 if snapshot is None else snapshot.progress
        self._floors[p] = floor
        stored = await published_versions(self.nc, SEGMENTS_STREAM, p, after=floor)
        for customer_id, version in stored.items():
            if version > self._skip.get(customer_id, 0):
                self._skip[customer_id] = version
        _logger.info(
            "partition taken over",
            partition=p,
            snapshot=None if snapshot is None else snapshot.through,
            customers=report.customers,
            events_logged=report.logged.logged,
            stale_customers_dropped=report.dropped,
            published_after_snapshot=len(stored),
        )
        return report.base

    # Snapshots --------------------------------------------------------------------------

    async def _upload(self, engine: Engine, sink: Publisher, ps: Sequence[int]) -> bool:
        """Cut ``ps``, wait until the broker holds every transition before the cut, and
        upload their snapshots; False while the engine warms up (nothing uploaded)."""
        noted: dict[int, int] = {}
        cuts = await engine.cut(ps, at_cut=lambda: noted.update(sink.progress))
        if cuts is None:
            return False
        await engine.wait_published(max(c.outbox_through for c in cuts.values()))
        for p, c in cuts.items():
            claim = self.claims.owned.get(p)
            if claim is None:
                continue  # lost meanwhile
            snapshot = self._snapshot(c, claim.seq, noted.get(p, 0))
            await self.snapshots.put(snapshot)
            if snapshot.bases_through:
                await self._cut_stream(p, snapshot.bases_through)
            ids = self._unerased.get(p)
            if ids:
                # Forgotten customers named by progress records this snapshot now stands for.
                await erase_progress(self.nc, p, ids, through=snapshot.progress)
                del self._unerased[p]
        return True

    async def _cut_stream(self, p: int, through: int) -> None:
        """Remove ``p``'s messages up to ``through`` from the events stream, once the
        partition's snapshot in the Object Store carries the bases that hold its events to
        there (a new owner logs only what follows). An erasure order not yet carried out
        stays, and what follows it: a new owner finishes the erasure from the stream."""
        before = through + 1
        for f in self.store.forgotten.pending():
            if f.partition == p and f.order_seq < before:
                before = f.order_seq
        if before <= self._stream_cut.get(p, 1):
            return
        try:
            await cut_partition(self.nc, p, before)
        except BrokerError as e:
            _logger.warning("events stream not cut; the next snapshot tries again", error=str(e))
            return
        self._stream_cut[p] = before
        _logger.info("events stream cut", partition=p, before=before)

    def _snapshot(self, c: PartitionCut, claim: int, progress: int) -> Any:
        if c.caught_up:
            self._floors.pop(c.partition, None)
            bound = max(claim, progress)
        else:
            bound = self._floors.get(c.partition, 0)
        info = self.keeper.applied_info()
        return c.snapshot(
            partitions=self.partitions,
            progress=bound,
            engine=self.claims.engine_id,
            claim=claim,
            definitions_version=None if info is None else info.version,
        )

    async def _upload_now_and_then(self, engine: Engine, sink: Publisher) -> None:
        while True:
            await anyio.sleep(self.snapshot_every)
            try:
                await self._upload(engine, sink, sorted(self.claims.owned))
            except BrokerError as e:
                _logger.warning("partition snapshots not uploaded", error=str(e))

    # Balancing --------------------------------------------------------------------------

    async def _watch(self, engine: Engine, sink: Publisher, term: _Term) -> None:
        """End the term when ownership should change (see the module's documentation)."""
        me = self.claims.engine_id
        while True:
            await anyio.sleep(_CHECK)
            try:
                engines = await self.leases.engines()
                held = await self.leases.holders()
            except BrokerError as e:
                _logger.warning("cannot see the other engines", error=str(e))
                continue
            target = share(me, list(engines), self.partitions)
            owned = sorted(self.claims.owned)
            free = [p for p in range(self.partitions) if p not in held and p not in owned]
            if len(owned) < target and free:
                term.end(f"{len(free)} partitions free, owning {len(owned)} of a share of {target}")
                return
            if len(owned) > target:
                counts: dict[str, int] = dict.fromkeys(engines, 0)
                for h in held.values():
                    counts[h.engine] = counts.get(h.engine, 0) + 1
                short = [
                    e
                    for e in engines
                    if e != me and counts.get(e, 0) < share(e, list(engines), self.partitions)
                ]
                if short:
                    give = owned[target:]
                    try:
                        uploaded = await self._upload(engine, sink, give)
                    except BrokerError as e:
                        # Handed over once their snapshots are stored: at the next look.
                        _logger.warning("partition snapshots not uploaded", error=str(e))
                        continue
                    if uploaded:
                        term.give = give
                        term.end(
                            f"handing {len(give)} partitions over to {', '.join(sorted(short))}"
                        )
                        return


async def unfinished_erasures(
    nc: Client, store: Store, p: int, forgotten: Sequence[tuple[str, int, int | None, int]]
) -> list[Forgotten]:
    """Record in ``store``, pending, the erasures of partition ``p`` that its previous owner
    began and did not finish (``forgotten``: the records its snapshot carries), so that this
    engine finishes them; return them. One is unfinished while its order (erased last) is
    still in the stream: the order names the customer.

    Raises:
        BrokerError: the stream cannot be read.
        StoreError: the store cannot be written.
    """
    js = nc.jetstream()
    unfinished: list[Forgotten] = []
    for digest, floor, until, order_seq in forgotten:
        try:
            msg = await js.get_msg(EVENTS_STREAM, order_seq)
        except nats.js.errors.NotFoundError:
            continue  # finished: the order is erased
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot read order {order_seq} of {EVENTS_STREAM}: {e}") from e
        try:
            order = decode_forget_order(msg.data or b"")
        except ApiError:
            continue
        if forget_hash(order.customer_id) != digest:
            continue
        unfinished.append(
            Forgotten(
                hash=digest,
                customer_id=order.customer_id,
                partition=p,
                floor=floor,
                exits=0,
                at=0 if msg.time is None else to_instant(msg.time),
                by=order.by,
                request=order.request,
                suppress_until=until,
                order_seq=order_seq,
                outbox_through=0,
            )
        )
    if unfinished:
        _logger.info(
            "erasures the previous owner did not finish are finished here",
            partition=p,
            id_hashes=[f.hash for f in unfinished],
        )
        await store.remember_forgotten(unfinished)
    return unfinished


def metrics_view(serving: Serving) -> _CurrentEngine:
    """What the metrics endpoint reads: the current term's engine."""
    return serving.current
