"""Recovery: making the actors ready after a start, from snapshots plus the log tail after
them (or from the whole log), then loading the rest in deadline order while the engine runs.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from actors._clock import Clock
from actors._customer import SNAPSHOT_FORMAT, Customer, SnapshotError
from actors._stored import customer_of, event_of, transition_of
from actors.rules import SegmentSet
from protocol import NEVER, DefinitionCause, FormatTooNewError, Transition
from store import LoggedEvent, OutboxEntry, Snapshot, SnapshotMarks, Store

from ._config import EngineConfig, breathe
from ._gc import Collector
from ._metrics import Counts
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition
from ._published import Published
from ._retention import bases_of

_DEFINITION = DefinitionCause()


@dataclass(slots=True)
class _PageAhead:
    """A page of snapshots being read on SQLite's thread while the previous one decodes."""

    after: tuple[int, str] | None
    limit: int
    rows: list[Snapshot] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(slots=True)
class _LoadRequest:
    customer_id: str
    done: anyio.Event = field(default_factory=anyio.Event)


class Recovery:
    """Loads customers into the partition: at start, while warming up, and on demand.

    After a restart, customers whose deadlines are far off load from their snapshots in
    deadline order while the engine already runs; until all have (:attr:`warm`),
    :attr:`horizon` is the deadline up to which all are loaded.
    """

    def __init__(
        self,
        store: Store,
        partition: Partition,
        outbox: Outbox,
        parking: Parking,
        counts: Counts,
        gc: Collector,
        clock: Clock,
        config: EngineConfig,
    ) -> None:
        self._store = store
        self._partition = partition
        self._outbox = outbox
        self._parking = parking
        self._counts = counts
        self._stats = counts.stats
        self._gc = gc
        self._clock = clock
        self._config = config
        self.warm = True
        self.horizon = NEVER
        self._cursor: tuple[int, str] | None = None
        self._ahead: _PageAhead | None = None
        self.tg: anyio.abc.TaskGroup | None = None  # the main loop's, while it runs
        self._loads: deque[_LoadRequest] = deque()
        self.owns: Callable[[str], bool] = lambda customer_id: True
        """Whether a customer is this engine's (its partition owned): a static list's
        customer is added only by its owner."""
        self._logger = structlog.get_logger("shoal.engine")

    # At start -------------------------------------------------------------------------

    async def rebuild(self, use_snapshots: bool) -> bool:
        """Make the actors ready: from snapshots plus the log tail after them when the
        stored snapshots fit these rules, else from the whole log. Returns whether snapshots
        must be taken at once (there were none usable).

        Raises:
            FormatTooNewError: the store holds customer snapshots of a later format than
                this shoal's (a newer shoal wrote them).
        """
        store, p = self._store, self._partition
        await self._check_snapshot_formats()
        entries: list[tuple[int, Transition]] = []
        async for outbox in store.outbox.unpublished():
            entries.extend((o.seq, transition_of(o)) for o in outbox)
        self._outbox.restore(entries, store.outbox.published_through)
        marks = store.snapshots.marks
        snapshot_now = False
        if use_snapshots and marks is not None and marks.needs == p.needs:
            await self._rebuild_from_snapshots(marks)
        else:
            await self._rebuild_from_log()
            # No usable snapshots: take them now, or the next start rebuilds from the log too.
            snapshot_now = use_snapshots
        self._counts.recount(p.segments.names, p.customers.values())
        await self._parking.settle()
        return snapshot_now

    async def _check_snapshot_formats(self) -> None:
        """Refuse customer snapshots of a later format (a newer shoal's: they would be
        rebuilt over from a log that retention may have cut); say when some are of an older
        one (each such customer is rebuilt from the log and snapshotted again in this one)."""
        store = self._store
        # One scan of the snapshots (0.3 s a million): the start reads them all anyway.
        formats = await store.snapshots.formats()
        newest = max(formats, default=SNAPSHOT_FORMAT)
        if newest > SNAPSHOT_FORMAT:
            raise FormatTooNewError(f"a customer snapshot in {store.path}", newest, SNAPSHOT_FORMAT)
        for found, count in sorted(formats.items()):
            if found < SNAPSHOT_FORMAT:
                self._logger.info(
                    "upgraded in place",
                    what=f"the customer snapshots in {store.path}",
                    from_format=found,
                    to_format=SNAPSHOT_FORMAT,
                    customers=count,
                    how="rebuilt from the log, then snapshotted again",
                )

    async def _rebuild_from_log(self) -> None:
        """Rebuild every actor: facts from the event log, memberships from the outbox."""
        p = self._partition
        segments = p.segments
        read, failed = await self.fold_log(segments, p.customers)
        self._stats.rebuilt_events += read

        # The outbox comes in (customer, version) order, so each entry is restored as it comes
        # (but for a customer taken over from another engine: after its snapshot's state).
        parked = self._parking
        published = Published(self._store)
        async for outbox in self._store.outbox.by_customer():
            for o in outbox:
                if o.customer_id not in parked and o.customer_id not in failed:
                    published.add(p.actor(o.customer_id), transition_of(o))
        await published.finish(p.customers)
        p.raise_to_floors(p.customers.values())
        for customer_id, error in failed.items():
            p.fail(customer_id, "load", error)

        self.add_listed(segments, p.customers)

        # A customer's memberships differ from its rules only if the definitions changed.
        await self._ready(await self._evaluate(list(p.customers.values())))

    async def _rebuild_from_snapshots(self, marks: SnapshotMarks) -> None:
        """Load the customers of the log tail (snapshot plus what came after it); then, if
        the definitions are the ones the snapshots were taken under, let the rest load in
        deadline order while the engine runs, else load them all and evaluate them."""
        store, p = self._store, self._partition
        tail_events: dict[str, list[LoggedEvent]] = defaultdict(list)
        async for chunk in store.events.read(after=marks.events_through):
            for e in chunk:
                tail_events[e.customer_id].append(e)
            self._stats.rebuilt_events += len(chunk)
        tail_outbox: dict[str, list[OutboxEntry]] = defaultdict(list)
        async for outbox in store.outbox.read(after=marks.outbox_through):
            for o in outbox:
                tail_outbox[o.customer_id].append(o)
        tail = sorted(i for i in tail_events.keys() | tail_outbox.keys() if i not in self._parking)
        as_stored: set[str] = set()
        changed = await self.load(tail, tail_events, tail_outbox, as_stored=as_stored)
        # One its snapshot reflects all of (a partition taken over: its events are logged up
        # to the snapshot's position, after the marks) is as if paged in: nothing to evaluate.
        changed += await self._evaluate(
            [p.customers[i] for i in tail if i in p.customers and i not in as_stored]
        )

        self.warm, self._cursor, self.horizon = False, None, -NEVER
        await store.bulk_reads(True)  # until warm: pages come in random table order
        if marks.definitions == p.segments.fingerprint:
            # Overdue deadlines first: they fire at once, at their own instants.
            now = self._clock.now()
            while not self.warm and self.horizon <= now:
                changed += await self.page(self._config.page_batch)
        else:
            changed += await self.load_all()
            self.add_listed(p.segments, p.customers)
            changed += await self._evaluate(list(p.customers.values()))
        await self._ready(changed)

    async def _evaluate(self, customers: list[Customer]) -> list[Transition]:
        """Evaluate customers under the definitions in force, at their watermarks, with cause
        ``definition``; re-arm them; return the transitions."""
        p = self._partition
        segments = p.segments
        changed: list[Transition] = []
        for i, c in enumerate(customers):
            try:
                changed += c.evaluate(segments, _DEFINITION)
            except Exception as e:
                p.fail(c.customer_id, "load", e)
            else:
                p.touch(c)
            await breathe(i)
        return changed

    async def _ready(self, changed: list[Transition]) -> None:
        """The customers loaded at start are ready: commit what evaluating them changed."""
        self._stats.rebuilt_customers = len(self._partition.customers)
        if changed:
            self._logger.info("definitions changed memberships", transitions=len(changed))
            await self._outbox.commit([], changed)

    # Loading customers ------------------------------------------------------------------

    def _from_snapshot(self, snap: Snapshot) -> Customer | None:
        """The actor a stored snapshot holds, or None if it must be rebuilt from the log."""
        try:
            c = customer_of(snap, needs=self._partition.needs)
        except SnapshotError as e:
            self._logger.warning("snapshot ignored", customer_id=snap.customer_id, error=str(e))
            c = None
        except Exception as e:
            # Not a format it knows how to refuse: the log still has the last word.
            self._logger.warning(
                "snapshot ignored", customer_id=snap.customer_id, error=repr(e), exc_info=e
            )
            c = None
        if c is None:
            self._stats.snapshots_ignored += 1
        else:
            self._stats.snapshots_loaded += 1
        return c

    def _hold(self, c: Customer) -> None:
        """Keep a customer loaded with its memberships so far (later ones are counted as
        they are committed)."""
        self._partition.customers[c.customer_id] = c
        self._counts.held(c)

    async def load(
        self,
        customer_ids: Iterable[str],
        tail_events: Mapping[str, list[LoggedEvent]],
        tail_outbox: Mapping[str, list[OutboxEntry]],
        *,
        as_stored: set[str] | None = None,
    ) -> list[Transition]:
        """Load customers not in memory: each from its snapshot plus its ``tail_events`` and
        ``tail_outbox`` after it, or from the log when it has no usable snapshot. Returns the
        transitions of evaluating those rebuilt from the log (to commit). Those whose
        snapshot reflects all of their tail are added to ``as_stored``."""
        p = self._partition
        parked = self._parking
        ids = [i for i in customer_ids if i not in p.customers and i not in parked]
        if not ids:
            return []
        segments = p.segments
        snaps = {s.customer_id: s for s in await self._store.snapshots.of(ids)}
        from_log: list[str] = []
        for i, customer_id in enumerate(ids):
            # A large tail (a partition just taken over) must not hold the event loop: the
            # leases are renewed on it.
            await breathe(i)
            snap = snaps.get(customer_id)
            c = self._from_snapshot(snap) if snap is not None else None
            if c is None or snap is None:
                # No usable snapshot. Most often a new customer, but the log has the last
                # word (a snapshot may have been lost): rebuild from what it holds, if any.
                from_log.append(customer_id)
                continue
            applied = False
            try:
                for e in tail_events.get(customer_id, ()):
                    if e.seq > snap.log_seq:
                        c.fold(event_of(e), segments)
                        applied = True
                for o in tail_outbox.get(customer_id, ()):
                    if o.version > c.version:
                        c.restore((transition_of(o),))
                        applied = True
            except Exception as e:
                p.fail(customer_id, "load", e)
                continue
            self._hold(c)
            if applied:
                p.touch(c)
            else:
                # As stored: armed as a page loads it, its snapshot not written again.
                p.arm(customer_id, c.deadline)
                if as_stored is not None:
                    as_stored.add(customer_id)
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
        p = self._partition
        segments = p.segments
        # From each one's base, when the log was cut (retention), else from nothing.
        fresh, failed = await bases_of(self._store, customer_ids)
        for customer_id in customer_ids:
            if customer_id not in fresh:  # (one whose base is unreadable fails below)
                fresh[customer_id] = Customer(customer_id)
        for e in await self._store.events.of_customers(customer_ids):
            if e.customer_id not in failed:
                try:
                    fresh[e.customer_id].fold(event_of(e), segments)
                except Exception as folding:
                    failed[e.customer_id] = folding
            self._stats.rebuilt_events += 1
        published = Published(self._store)
        for o in await self._store.outbox.of_customers(customer_ids):
            published.add(fresh[o.customer_id], transition_of(o))
        await published.finish(fresh)
        p.raise_to_floors(fresh.values())
        now = self._clock.now()
        changed: list[Transition] = []
        for c in fresh.values():
            if c.customer_id in failed:
                p.fail(c.customer_id, "load", failed[c.customer_id])
                continue
            if c.version == 0 and c.first_at() is None:
                if c.customer_id not in known:
                    continue
                c.watermark = now  # known from a static list only: as when it was added
            try:
                made = c.evaluate(segments, _DEFINITION)
            except Exception as e:
                p.fail(c.customer_id, "load", e)
                continue
            self._hold(c)
            changed += made
            p.touch(c)
        return changed

    async def reload(self, customer_id: str) -> list[Transition]:
        """Load a customer not in memory afresh from the log and the outbox: as committed.
        Returns the transitions of evaluating it (to commit: none, unless its committed
        state and its rules disagree). If that raises, the partition drops it as failed."""
        listed = any(customer_id in ids for ids in self._partition.segments.lists.values())
        return await self._load_from_log([customer_id], known=(customer_id,) if listed else ())

    async def page(self, limit: int) -> list[Transition]:
        """Load the next ``limit`` snapshots in deadline order; return the transitions of
        customers rebuilt from the log instead (to commit)."""
        store, p = self._store, self._partition
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.after == self._cursor and ahead.limit == limit:
            await ahead.done.wait()
            rows = ahead.rows
        else:
            rows = await store.snapshots.page(self._cursor, limit)
        if len(rows) == limit and self.tg is not None:
            # SQLite reads the next page on its thread while this one decodes here (the
            # rows not loaded yet do not change meanwhile: only loaded customers change).
            ahead = self._ahead = _PageAhead((rows[-1].deadline, rows[-1].customer_id), limit)
            self.tg.start_soon(self._read_ahead, ahead)
            await anyio.lowlevel.cancel_shielded_checkpoint()  # lets it send the query
        bad: list[str] = []
        with self._gc.loading():
            for snap in rows:
                if snap.customer_id in p.customers or snap.customer_id in self._parking:
                    continue  # loaded already (from the tail, or for an event), or parked
                c = self._from_snapshot(snap)
                if c is None:
                    bad.append(snap.customer_id)
                    continue
                self._hold(c)
                p.arm(c.customer_id, c.deadline)
        if len(rows) < limit:
            await store.bulk_reads(False)
            self.warm, self._cursor, self.horizon = True, None, NEVER
            self._logger.info("warm", customers=len(p.customers))
            self._gc.settle()
        else:
            self._cursor = (rows[-1].deadline, rows[-1].customer_id)
            self.horizon = rows[-1].deadline
        return await self._load_from_log(bad, known=bad)

    async def _read_ahead(self, ahead: _PageAhead) -> None:
        ahead.rows = await self._store.snapshots.page(ahead.after, ahead.limit)
        ahead.done.set()

    async def load_all(self) -> list[Transition]:
        """Load every customer not loaded yet; return the transitions to commit."""
        changed: list[Transition] = []
        while not self.warm:
            changed += await self.page(max(self._config.page_batch, 50_000))
        return changed

    async def fold_log(
        self, segments: SegmentSet, customers: dict[str, Customer]
    ) -> tuple[int, dict[str, BaseException]]:
        """Fold the whole event log into ``customers`` (adding actors as needed, from their
        bases when the log was cut), keeping the facts ``segments`` reads, but for parked
        customers; return how many events were read, and the customers whose base is
        unreadable or whose events raised (taken out of ``customers``: the caller parks
        them)."""
        read = 0
        parked = self._parking
        # The log after the cut (retention) folds into each customer's base.
        bases, failed = await bases_of(self._store)
        for customer_id, base in bases.items():
            if customer_id not in parked and customer_id not in customers:
                customers[customer_id] = base
        async for chunk in self._store.events.read():
            for entry in chunk:
                customer_id = entry.customer_id
                c = customers.get(customer_id)
                if c is None:
                    if customer_id in parked or customer_id in failed:
                        continue
                    c = customers[customer_id] = Customer(customer_id)
                try:
                    c.fold(event_of(entry), segments)
                except Exception as e:
                    failed[customer_id] = e
                    del customers[customer_id]
            read += len(chunk)
        return read, failed

    def add_listed(self, segments: SegmentSet, customers: dict[str, Customer]) -> int:
        """Add an actor for each customer of a static list not in ``customers``; return how
        many were added.

        Such a customer has no events, so nothing gives it an instant: it is evaluated from
        now on, the engine clock's now.
        """
        added = 0
        now = self._clock.now()
        for ids in segments.lists.values():
            for customer_id in sorted(ids):  # sorted: a reproducible publishing order
                if (
                    customer_id not in customers
                    and customer_id not in self._parking
                    and self.owns(customer_id)
                ):
                    c = customers[customer_id] = Customer(customer_id)
                    c.watermark = now
                    added += 1
        return added

    # Loads asked for by queries ---------------------------------------------------------

    def ask_load(self, customer_id: str) -> anyio.Event:
        """Ask the main loop to load a customer between two batches; the event is set once
        it is done (or the engine stopped)."""
        request = _LoadRequest(customer_id)
        self._loads.append(request)
        return request.done

    async def serve_loads(self) -> None:
        """Load the customers queries asked for, commit what that changed, tell each."""
        if not self._loads:
            return
        loads, self._loads = self._loads, deque()
        try:
            changed = await self.load(sorted({r.customer_id for r in loads}), {}, {})
            await self._parking.settle()
            if changed:
                await self._outbox.commit([], changed)
        finally:
            for r in loads:
                r.done.set()

    def release_loads(self) -> None:
        """The engine stopped: whoever waits for a load would wait forever."""
        while self._loads:
            self._loads.popleft().done.set()
