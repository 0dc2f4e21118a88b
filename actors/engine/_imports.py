"""Imports: history that ``shoal import`` publishes into the events stream, told apart from
live traffic, logged without per-event transitions, and applied at its end by rebuilding
and reconciling the customers it touched.

An import is framed by two markers on ``shoal.imports.<id>.begin`` and ``.end``, subjects
only the operator role may publish. Between them, its events come on the customers' usual
subjects with the header ``Shoal-Import: <id>`` and their original receive instant in
``Shoal-Received-At``. The engine believes those headers only while that import is open
(begun and not ended): an event claiming an import that is not open is rejected, never
taken for live traffic. The imports open are kept in the store, so a restart in the middle
of one goes on with it.
"""

from __future__ import annotations

import bisect
from array import array
from collections import defaultdict, deque

import structlog

from actors._clock import Clock
from actors._customer import Customer
from actors._reconcile import reconcile
from actors._stored import event_of, received_of, snapshot_row, transition_of
from protocol import (
    EARLIEST,
    IMPORTS_PREFIX,
    NEVER,
    DefinitionCause,
    Delivery,
    ImportCause,
    InvalidEvent,
    SubjectError,
    Transition,
    import_marker_of,
)
from store import LoggedEvent, Snapshot, Store

from ._config import EngineStats, breathe
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition

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
    """Whether a delivery is an import's marker rather than an event."""
    return d.subject.startswith(IMPORTS_PREFIX)


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
        if import_id not in self._store.open_imports:
            raise InvalidEvent(
                f"the event claims import {import_id[:80]!r}, which is not open (no begin "
                "marker, or it ended): imported events are published by `shoal import`",
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

    async def marker(self, d: Delivery) -> InvalidEvent | None:
        """Act on an import's marker (committed with its stream position): begin opens the
        import, end rebuilds and reconciles what it touched and closes it. Returns why it
        is refused, if it is."""
        try:
            import_id, stage = import_marker_of(d.subject)
        except SubjectError as e:
            return InvalidEvent(str(e), kind="subject")
        opened = self._store.open_imports
        if stage == "begin":
            if import_id in opened:
                await self._outbox.commit([], [], stream_through=d.stream_sequence)
                return None
            if len(opened) >= MAX_OPEN_IMPORTS:
                return InvalidEvent(
                    f"import {import_id!r} not begun: {MAX_OPEN_IMPORTS} imports are open "
                    "already (each ends with its end marker)",
                    kind="invalid",
                )
            await self._outbox.commit(
                [],
                [],
                stream_through=d.stream_sequence,
                imports={import_id: self._store.events.last_seq},
            )
            self._logger.info("import begun", import_id=import_id)
            return None
        if import_id not in opened:
            # An end seen again (redelivered after its commit), or one without a begin.
            self._logger.warning("import end marker of no open import", import_id=import_id)
            await self._outbox.commit([], [], stream_through=d.stream_sequence)
            return None
        customers, transitions = await self._end(opened[import_id])
        await self._outbox.commit(
            [], [], stream_through=d.stream_sequence, imports={import_id: None}
        )
        self._stats.imports_applied += 1
        self.applied.append(import_id)
        self._logger.info(
            "import applied", import_id=import_id, customers=customers, transitions=transitions
        )
        return None

    async def _end(self, begun: int) -> tuple[int, int]:
        """Rebuild and reconcile every customer with an event logged since ``begun`` (the
        import's, and live ones meanwhile: reconciling those changes nothing, as they are
        up to date), a batch at a time. Returns how many customers, and transitions."""
        touched: set[str] = set()
        async for chunk in self._store.events.read(after=begun):
            touched.update(e.customer_id for e in chunk)
        ids = sorted(i for i in touched if i not in self._parking)
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
        missing = [i for i in customer_ids if i not in p.customers]
        published: dict[str, Customer] = {}
        for o in await store.outbox.of_customers(missing):
            c = published.get(o.customer_id)
            if c is None:
                c = published[o.customer_id] = Customer(o.customer_id)
            c.restore((transition_of(o),))
        now = self._clock.now()
        transitions: list[Transition] = []
        rows: list[Snapshot] = []
        for i, customer_id in enumerate(customer_ids):
            current = p.customers.get(customer_id) or published.get(customer_id)
            try:
                mine = logged[customer_id]
                done = reconcile(
                    current,
                    customer_id,
                    [event_of(e) for e in mine],
                    p.segments,
                    now=now,
                    cause=cause,
                    clocks=[clocks.before(e.seq) for e in mine],
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
