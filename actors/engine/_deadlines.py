"""Deadlines: firing what is due, no earlier than every event received before it, and
preparing the customers due soon while the engine has nothing else to do.

A deadline fires only once every event received before it has been applied (the *time
floor*), so after downtime the backlog is applied first and a customer never enters a
segment that an event already waiting in the stream would have kept it out of.
"""

from __future__ import annotations

import anyio.lowlevel

from actors._clock import Clock
from protocol import NEVER, SECOND, EventSource, TimeCause, Transition

from ._config import SERVE_EVERY, EngineConfig, EngineObserver, EngineStats, breathe
from ._gc import FREEZE_EVENTS, Collector
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition
from ._recovery import Recovery

_TIME = TimeCause()
PREPARE_AHEAD = 10 * SECOND
"""How long before their deadlines customers are prepared, when the engine has nothing
else to do (see :meth:`Deadlines.prepare`)."""
_PREPARE_SLICE = 500
"""Customers prepared per turn of the loop (about 20 ms)."""


class Deadlines:
    """The scheduler's live side: when deadlines may fire, firing them, preparing them."""

    def __init__(
        self,
        partition: Partition,
        recovery: Recovery,
        outbox: Outbox,
        parking: Parking,
        stats: EngineStats,
        gc: Collector,
        clock: Clock,
        config: EngineConfig,
        observer: EngineObserver | None,
    ) -> None:
        self._partition = partition
        self._recovery = recovery
        self._outbox = outbox
        self._parking = parking
        self._stats = stats
        self._gc = gc
        self._clock = clock
        self._config = config
        self._observer = observer
        # While behind (a backlog counted at start, or the broker holding more for us), the
        # receive instant of the next event to apply: deadlines wait for it. The source
        # knows (with a consumer per partition, the earliest of theirs).
        self.backlog_cap: int | None = None
        # Every event the broker stored before this instant has reached the source (fence()).
        self._fenced = -NEVER
        self.behind = False
        """Whether, after the last firing, another deadline was due already: the loop is
        in a burst (see :meth:`Snapshots.step`)."""

    # The time floor ---------------------------------------------------------------------

    def started(self, source: EventSource) -> None:
        """The source (re)started: hold deadlines until its first batch says how far its
        backlog reaches."""
        self.backlog_cap = source.backlog_cap

    def ingested(self, source: EventSource) -> None:
        """A batch taken from ``source`` was applied and acknowledged."""
        self.backlog_cap = source.backlog_cap

    def caught_up(self, source: EventSource) -> None:
        """A whole idle period went by without a delivery: nothing counted at start is still
        on its way (deliveries take milliseconds), so deadlines need not wait any longer."""
        source.caught_up()
        self.backlog_cap = source.backlog_cap

    def _time_floor(self, source: EventSource) -> int:
        """The latest instant up to which deadlines may fire: not past any event still
        waiting to be applied."""
        floor = self._clock.now()
        # Strictly before a waiting event: a deadline at its very instant is evaluated
        # together with it (SEGMENTS.md).
        oldest = source.oldest_buffered_received()
        if oldest is not None and oldest - 1 < floor:
            floor = oldest - 1
        if self.backlog_cap is not None and self.backlog_cap - 1 < floor:
            floor = self.backlog_cap - 1
        recovery = self._recovery
        if not recovery.warm and recovery.horizon - 1 < floor:
            # Customers whose deadline is past the horizon may not be loaded yet.
            floor = recovery.horizon - 1
        return floor

    def confirmed(self, source: EventSource) -> int:
        """The latest instant before which no event can still be on its way to the source.

        The broker stamps events in stream order, so one still on its way is stamped no
        earlier than the latest that arrived; and at the last successful fence, none was on
        its way at all. While events flow, the first bound moves with them, and no request
        is needed.
        """
        return max(self._fenced, source.received_through) - 1

    # Firing -----------------------------------------------------------------------------

    async def fire_due(self, source: EventSource) -> bool:
        """Fire the deadlines due up to the time floor (a batch of them); return whether any
        were."""
        p = self._partition
        self.behind = False
        floor = self._time_floor(source)
        nxt = p.next_due()
        if nxt is None or nxt > floor:
            return False
        if self.backlog_cap is None and nxt > self.confirmed(source):
            # Caught up as far as the source knows, but an event stored by the broker just
            # before the deadline may still be on its way: ask the broker. (While behind,
            # the backlog cap already keeps deadlines before the next event to apply.)
            asked = self._clock.now()
            if await source.fence():
                self._fenced = max(self._fenced, asked)
            # Deliveries that came in while the broker answered hold the floor back too.
            floor = min(self._time_floor(source), self.confirmed(source))
            if nxt > floor:
                return False
        due = p.pop_due(floor, self._config.fire_batch)
        if not due:
            return False
        transitions: list[Transition] = []
        due_at: list[int] = []
        # Until committed, the fired deadlines still count as pending (Partition.firing): a
        # status read while they are written must not show the engine idle.
        p.firing = len(due)
        try:
            for i in range(0, len(due), SERVE_EVERY):
                if i:
                    await anyio.lowlevel.cancel_shielded_checkpoint()  # as breathe()
                transitions += p.fire(due[i : i + SERVE_EVERY], floor, due_at)
            await self._parking.settle()  # those whose deadline raised
            self._stats.deadlines_fired += len(due)
            self._gc.since += len(due)
            if self._observer is not None:
                self._observer.deadlines_fired(self._clock.now(), due_at)
            if transitions:
                await self._outbox.commit([], transitions)
        finally:
            p.firing = 0
        nxt = p.next_due()
        self.behind = nxt is not None and nxt <= self._clock.now()
        self._gc.worked(0)
        return True

    # Preparing --------------------------------------------------------------------------

    async def prepare(self, source: EventSource) -> bool:
        """With nothing else to do, prepare the customers whose deadlines fall due within
        the next few seconds; return whether there were any.

        A customer's first evaluation after it is loaded from its snapshot builds what it
        keeps to evaluate quickly (the instants of its events by name, its score terms,
        when each segment must be looked at again): about three quarters of the cost of
        firing its deadline. Preparing it evaluates it once at its watermark, where it was
        last evaluated (so nothing changes), and holds its deadline apart from the timer
        queue, so that it is prepared only once. When the deadline falls due, firing costs a
        quarter as much, so a burst of deadlines is fired that much sooner.
        """
        if self.backlog_cap is not None or source.buffered:
            return False
        p = self._partition
        due = p.pop_queued(self._clock.now() + PREPARE_AHEAD, _PREPARE_SLICE)
        if not due:
            return False
        segments, customers = p.segments, p.customers
        changed: list[Transition] = []
        p.preparing = len(due)
        for i, customer_id in enumerate(due):
            await breathe(i, SERVE_EVERY)  # queries meanwhile count p.preparing
            p.preparing = len(due) - i - 1
            c = customers[customer_id]
            deadline = c.deadline
            if i % 50 == 49 and source.buffered:
                # Events come first: the rest go back to the timer queue, for later.
                for rest in due[i:]:
                    p.arm(rest, customers[rest].deadline)
                p.preparing = 0
                break
            if deadline is None:
                continue  # in the timer queue, so it has one
            try:
                made = c.evaluate(segments, _TIME)
            except Exception as e:
                p.fail(customer_id, "deadline", e)
                continue
            if made:
                # Not what it was evaluated to when last changed (it should be): take
                # what evaluating at its watermark gives, as a time-based change.
                changed += made
                p.touch(c)
                continue
            if c.deadline != deadline:
                # A fresh evaluation can give an earlier next instant than the outcomes it
                # kept when last evaluated did (a rule's next instant can be only where to
                # look again). Unprepared, it would fire at the deadline it had: so it does,
                # with what it keeps dropped, as loaded.
                c.restore(())
                c.deadline = deadline
            p.hold(deadline, customer_id)
        gc = self._gc
        gc.since += len(due)
        if gc.since >= FREEZE_EVENTS or (len(due) < _PREPARE_SLICE and gc.since >= _PREPARE_SLICE):
            # What it keeps lives on (see EngineConfig.freeze_gc). Frozen too once all due
            # soon are prepared: else the first full collection, often while they fire,
            # walks it all (20-40 ms for 4,000 customers).
            gc.settle()
        await self._parking.settle()
        if changed:
            p.firing = len(changed)  # as in fire_due
            try:
                await self._outbox.commit([], changed)
            finally:
                p.firing = 0
        return True
