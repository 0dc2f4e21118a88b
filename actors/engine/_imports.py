"""Imports: history that ``shoal import`` publishes into the events stream, told apart from
live traffic, logged without per-event transitions, and applied at its end by rebuilding
and reconciling the customers it touched.

An import is framed, in each partition, by two markers on
``shoal.events.<partition>.ctl.import.<id>.begin`` and ``.end``, subjects only the operator
role may publish. Between them, its events come on the customers' usual subjects with the
header ``Shoal-Import: <id>`` and their original receive instant in ``Shoal-Received-At``.
The engine believes those headers only while that import is open in the event's partition
(begun and not ended there): an event claiming an import that is not open is rejected,
never taken for live traffic. At a partition's end marker, the customers of that partition
the import touched are rebuilt and reconciled; the import is applied once every partition's
end has been. The imports open are kept in the store, by import and partition, so a restart
in the middle of one goes on with it.
"""

from __future__ import annotations

import bisect
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

import structlog

from actors._clock import Clock
from actors._customer import Customer
from actors._reconcile import reconcile
from actors._stored import event_of, received_of, snapshot_row, transition_of
from protocol import (
    EARLIEST,
    NEVER,
    DefinitionCause,
    Delivery,
    ImportCause,
    InvalidEvent,
    SubjectError,
    Transition,
    customer_of_stored_subject,
    import_marker_of,
    is_control_subject,
    partition,
)
from store import LoggedEvent, Snapshot, Store

from ._config import EngineStats, breathe
from ._outbox import Outbox, positions
from ._parking import Parking
from ._partition import Partition
from ._published import Published
from ._retention import bases_of

MAX_OPEN_IMPORTS = 16
"""Imports open at once at most: a begin marker beyond them is rejected."""
APPLIED_SHOWN = 64
"""The latest imports applied that the status lists (``shoal import --wait`` looks there)."""
RECONCILE_BATCH = 1_000
"""Customers rebuilt per commit at the end of an import (between two, the engine's other
tasks and the query service run)."""
_IMPORT = ImportCause()


class Clocks:
    """The clock a replay of the whole log stands at before each event of some customers,
    by log position (see :meth:`Imports.clocks`)."""

    __slots__ = ("_seqs", "_before")

    def __init__(self, seqs: array[int], before: array[int]) -> None:
        self._seqs = seqs
        self._before = before

    def before(self, seq: int) -> int:
        """The clock before the event at log position ``seq`` (one of theirs)."""
        i = bisect.bisect_left(self._seqs, seq)
        if i < len(self._seqs) and self._seqs[i] == seq:
            return self._before[i]
        # Logged after the pass (not possible on the engine's loop): the latest clock.
        return self._before[-1] if self._before else -NEVER


def is_marker(d: Delivery) -> bool:
    """Whether a delivery is a control message (an import's marker) rather than an event."""
    return is_control_subject(d.subject)


def open_key(import_id: str, in_partition: int) -> str:
    """The store's key of an import open in one partition (import ids have no ``@``)."""
    return f"{import_id}@{in_partition}"


def open_ids(keys: Iterable[str]) -> list[str]:
    """The import ids of these keys (:func:`open_key`), each once, sorted."""
    return sorted({k.partition("@")[0] for k in keys})


class Imports:
    """The imports open, what an imported event's receive instant is, and the end of an
    import: every customer it touched rebuilt from the log and reconciled."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        outbox: Outbox,
        parking: Parking,
        stats: EngineStats,
        clock: Clock,
    ) -> None:
        self._stats = stats
        self._store = store
        self._partition = partition
        self._outbox = outbox
        self._parking = parking
        self._clock = clock
        self._logger = structlog.get_logger("shoal.engine")
        self.applied: deque[str] = deque(maxlen=APPLIED_SHOWN)
        """The ids of the imports applied since the engine started, the latest last."""
        # Of the imports ended in some partitions and not yet in all: customers and
        # transitions so far, for the log line once applied.
        self._customers: dict[str, int] = {}
        self._transitions: dict[str, int] = {}

    def received(self, d: Delivery) -> int | None:
        """The receive instant of an event delivery: None for live traffic (the broker's
        stamp), its original one for an event of an open import.

        Raises:
            InvalidEvent: it claims an import that is not open, or its receive instant is
                missing, not a number, or not between the earliest instant and its stamp.
        """
        import_id = d.import_id
        if import_id is None:
            return None
        try:
            in_partition = customer_of_stored_subject(d.subject)[0]
        except SubjectError:
            in_partition = -1  # not stored under a partition: no import is open there
        if open_key(import_id, in_partition) not in self._store.open_imports:
            raise InvalidEvent(
                f"the event claims import {import_id[:80]!r}, which is not open in its "
                "partition (no begin marker, or it ended): imported events are published "
                "by `shoal import`",
                kind="invalid",
            )
        text = d.received_at or ""
        try:
            received = int(text) if len(text) <= 20 else None
        except ValueError:
            received = None
        # An import cannot claim to have been received after the broker stored it.
        if received is None or not EARLIEST <= received <= d.received:
            raise InvalidEvent(
                f"imported event with header Shoal-Received-At {text[:40]!r}: expected "
                "microseconds since the epoch, not after the broker stored the event",
                kind="invalid",
            )
        return received

    async def marker(self, d: Delivery, partitions: int) -> InvalidEvent | None:
        """Act on an import's marker in one partition (committed with its stream position):
        begin opens the import there, end rebuilds and reconciles the customers of that
        partition it touched and closes it there. ``partitions``: how many the stream has.
        Returns why it is refused, if it is."""
        try:
            in_partition, import_id, stage = import_marker_of(d.subject)
        except SubjectError as e:
            return InvalidEvent(str(e), kind="subject")
        if in_partition >= partitions:
            return InvalidEvent(
                f"import marker for partition {in_partition}, but the stream has "
                f"{partitions} partitions",
                kind="subject",
            )
        opened = self._store.open_imports
        key = open_key(import_id, in_partition)
        if stage == "begin":
            if key in opened:
                await self._outbox.commit(
                    [], [], stream_through=d.stream_sequence, partitions_through=positions((d,))
                )
                return None
            ids = open_ids(opened)
            if import_id not in ids and len(ids) >= MAX_OPEN_IMPORTS:
                return InvalidEvent(
                    f"import {import_id!r} not begun: {MAX_OPEN_IMPORTS} imports are open "
                    "already (each ends with its end markers)",
                    kind="invalid",
                )
            await self._outbox.commit(
                [],
                [],
                stream_through=d.stream_sequence,
                partitions_through=positions((d,)),
                imports={key: self._store.events.last_seq},
            )
            if import_id not in ids:
                self._logger.info("import begun", import_id=import_id)
            return None
        if key not in opened:
            # An end seen again (redelivered after its commit), or one without a begin.
            self._logger.warning(
                "import end marker of no open import",
                import_id=import_id,
                partition=in_partition,
            )
            await self._outbox.commit(
                [], [], stream_through=d.stream_sequence, partitions_through=positions((d,))
            )
            return None
        customers, transitions = await self._end(
            opened[key], lambda c: partition(c, partitions) == in_partition
        )
        await self._outbox.commit(
            [],
            [],
            stream_through=d.stream_sequence,
            partitions_through=positions((d,)),
            imports={key: None},
        )
        self._customers[import_id] = self._customers.get(import_id, 0) + customers
        self._transitions[import_id] = self._transitions.get(import_id, 0) + transitions
        if import_id not in open_ids(self._store.open_imports):
            # Ended in every partition it was open in.
            self._stats.imports_applied += 1
            self.applied.append(import_id)
            self._logger.info(
                "import applied",
                import_id=import_id,
                customers=self._customers.pop(import_id),
                transitions=self._transitions.pop(import_id),
            )
        return None

    async def _end(self, begun: int, mine: Callable[[str], bool]) -> tuple[int, int]:
        """Rebuild and reconcile every customer ``mine`` says is of this partition with an
        event logged since ``begun`` (the import's, and live ones meanwhile: reconciling
        those changes nothing, as they are up to date), a batch at a time. Returns how many
        customers, and transitions."""
        touched: set[str] = set()
        async for chunk in self._store.events.read(after=begun):
            touched.update(e.customer_id for e in chunk)
        ids = sorted(i for i in touched if i not in self._parking and mine(i))
        if not ids:
            return 0, 0
        clocks = await self.clocks(set(ids))
        made = 0
        for start in range(0, len(ids), RECONCILE_BATCH):
            made += len(await self.rebuild(ids[start : start + RECONCILE_BATCH], _IMPORT, clocks))
        return len(ids), made

    async def clocks(self, customer_ids: set[str]) -> Clocks:
        """For each logged event of these customers, how far a replay of the whole log has
        fired deadlines since the customer's previous event (:func:`actors.reconcile`'s
        ``clocks``): before each entry, a replay fires every deadline up to that entry's
        receive instant less 1, so what fired of this customer's meanwhile is up to the
        largest of those over the entries in between. One pass over the log; a stack of the
        entries whose receive instant no later one exceeds answers each in O(log n) (it
        stays short: a log is mostly in receive order)."""
        seqs, before = array("q"), array("q")
        stack_seq, stack_max = array("q"), array("q")  # receive instants - 1, decreasing
        last: dict[str, int] = {}
        i = 0
        async for chunk in self._store.events.read():
            for e in chunk:
                customer_id = e.customer_id
                if customer_id in customer_ids:
                    previous = last.get(customer_id)
                    clock = -NEVER
                    if previous is not None:
                        j = bisect.bisect_right(stack_seq, previous)
                        if j < len(stack_seq):
                            clock = stack_max[j]
                    seqs.append(e.seq)
                    before.append(clock)
                    last[customer_id] = e.seq
                received = received_of(e) - 1
                while stack_max and stack_max[-1] <= received:
                    stack_max.pop()
                    stack_seq.pop()
                stack_seq.append(e.seq)
                stack_max.append(received)
                i += 1
                await breathe(i, 50_000)
        return Clocks(seqs, before)

    async def rebuild(
        self, customer_ids: list[str], cause: ImportCause | DefinitionCause, clocks: Clocks
    ) -> list[Transition]:
        """Rebuild these customers from the log under the definitions in force, reconcile
        each with what was published, and commit the catch-up transitions with their
        snapshots; return the transitions."""
        store, p = self._store, self._partition
        logged: dict[str, list[LoggedEvent]] = defaultdict(list)
        for e in await store.events.of_customers(customer_ids):
            logged[e.customer_id].append(e)
        # Replayed from their bases when the log was cut (retention).
        bases, unreadable = await bases_of(store, customer_ids)
        missing = [i for i in customer_ids if i not in p.customers]
        # What was published of those not in memory (taken over from another engine: the
        # first of it is in their snapshots).
        published = {i: Customer(i) for i in missing}
        restoring = Published(store)
        for o in await store.outbox.of_customers(missing):
            restoring.add(published[o.customer_id], transition_of(o))
        await restoring.finish(published)
        now = self._clock.now()
        transitions: list[Transition] = []
        rows: list[Snapshot] = []
        for i, customer_id in enumerate(customer_ids):
            current = p.customers.get(customer_id) or published.get(customer_id)
            try:
                if customer_id in unreadable:
                    raise unreadable[customer_id]
                mine = logged[customer_id]
                done = reconcile(
                    current,
                    customer_id,
                    [event_of(e) for e in mine],
                    p.segments,
                    now=now,
                    cause=cause,
                    clocks=[clocks.before(e.seq) for e in mine],
                    base=bases.get(customer_id),
                )
            except Exception as e:
                p.fail(customer_id, "import", e)
                continue
            p.customers[customer_id] = done.customer
            p.touch(done.customer)
            transitions += done.transitions
            rows.append(snapshot_row(done.customer, needs=p.needs, log_seq=store.events.last_seq))
            # A customer is replayed whole: let the query service in every few.
            await breathe(i, 20)
        await self._parking.settle()
        # The snapshots too: one taken during the import holds its customer without the
        # imported events, and a restart must not load that one.
        await self._outbox.commit([], transitions, rows)
        return transitions
