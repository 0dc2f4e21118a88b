"""A partition: the customers an engine owns, the definitions in force and their deadlines.

This is the one synchronous core of the live engine and of replay: apply an event, fire what
is due up to an instant. It does no I/O and reads no clock; the engine wraps it with its
ports and the store, replay with a virtual clock and nothing else. Today one engine owns one
partition holding every customer.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from actors._customer import Customer
from actors._timers import TimerQueue
from actors.rules import SegmentSet
from protocol import Event, Transition, forget_hash


class Failure(NamedTuple):
    """A customer dropped from the partition after an error no message can be blamed for."""

    customer_id: str
    during: str
    """What was being done: ``deadline``, ``snapshot``, ``definitions``, ``load``, ..."""
    error: BaseException


class Partition:
    """Customers, the :class:`SegmentSet` in force, and one shared deadline structure.

    A customer has at most one pending deadline, in the timer queue or *held*: taken out of
    the queue ahead of time by the engine's preparation (:meth:`hold`), in deadline order.
    A held deadline is valid only while the customer's deadline is still that one and the
    timer queue has not been given one again.

    With ``track_changes``, every customer applied or fired is added to :attr:`changed`
    (the engine snapshots those), and a customer whose deadline raises is dropped and added
    to :attr:`failed` (the engine parks those) instead of the error stopping everything;
    replay does without either.
    """

    __slots__ = (
        "customers",
        "changed",
        "failed",
        "preparing",
        "firing",
        "_segments",
        "_needs",
        "_timers",
        "_held",
        "floors",
    )

    def __init__(self, segments: SegmentSet, *, track_changes: bool = False) -> None:
        self.customers: dict[str, Customer] = {}
        self._segments = segments
        self._needs = segments.needs.fingerprint()
        self.changed: set[str] | None = set() if track_changes else None
        self.failed: list[Failure] | None = [] if track_changes else None
        """Customers dropped after an error, with what was being done and the error."""
        self.preparing = 0
        """Customers taken out of the timer queue by the engine's preparation, not yet held."""
        self.firing = 0
        """Customers whose deadline the engine fired and whose transitions it has not yet
        committed: still pending, so that nobody sees the engine idle meanwhile."""
        self._timers = TimerQueue()
        # (deadline, customer) in order: taken in order, so appending keeps it sorted but for
        # rare entries armed meanwhile (see hold()).
        self._held: deque[tuple[int, str]] = deque()
        self.floors: dict[str, int] = {}
        """Forgotten customers' last versions, by the hash of the id
        (``protocol.forget_hash``): one that comes back continues from there."""

    @property
    def segments(self) -> SegmentSet:
        """The definitions in force."""
        return self._segments

    @segments.setter
    def segments(self, segments: SegmentSet) -> None:
        self._segments = segments
        self._needs = segments.needs.fingerprint()

    @property
    def needs(self) -> str:
        """What the facts of these rules' customers are kept for: a snapshot is usable only
        if taken for the same (``Needs.fingerprint``)."""
        return self._needs

    # Customers ------------------------------------------------------------------------

    def actor(self, customer_id: str) -> Customer:
        """The customer's actor, made new (no events) if the partition has none."""
        c = self.customers.get(customer_id)
        if c is None:
            c = self.customers[customer_id] = self._new(customer_id)
        return c

    def _new(self, customer_id: str) -> Customer:
        c = Customer(customer_id)
        if self.floors:
            c.version = self.floors.get(forget_hash(customer_id), 0)
        return c

    def raise_to_floors(self, customers: Iterable[Customer]) -> None:
        """Give each of ``customers`` that was forgotten before at least the version it had
        then (rebuilt from the log, it has only what it published since)."""
        floors = self.floors
        if not floors:
            return
        for c in customers:
            floor = floors.get(forget_hash(c.customer_id), 0)
            if c.version < floor:
                c.version = floor

    def touch(self, c: Customer) -> None:
        """Re-arm the customer's deadline (and note it changed)."""
        self._timers.set(c.customer_id, c.deadline)
        if self.changed is not None:
            self.changed.add(c.customer_id)

    def drop(self, customer_id: str) -> Customer | None:
        """Take the customer out of the partition: no deadline, no snapshot, not in memory."""
        c = self.customers.pop(customer_id, None)
        self._timers.set(customer_id, None)
        if self.changed is not None:
            self.changed.discard(customer_id)
        return c

    def fail(self, customer_id: str, during: str, error: BaseException) -> None:
        """Drop a customer after ``error`` and note it in :attr:`failed`; without
        ``track_changes`` (replay), raise ``error`` instead."""
        if self.failed is None:
            raise error
        self.drop(customer_id)
        self.failed.append(Failure(customer_id, during, error))

    def arm(self, customer_id: str, deadline: int | None) -> None:
        """Make ``deadline`` the customer's pending deadline in the timer queue."""
        self._timers.set(customer_id, deadline)

    def apply(self, event: Event) -> list[Transition]:
        """Apply one event to its customer (made new if needed); return the transitions.

        Deadlines of that customer due before the event's instant fire first, each at its own
        instant (:meth:`Customer.apply`); other customers' deadlines are the caller's to fire
        first (:meth:`fire_due`).
        """
        c = self.customers.get(event.customer_id)
        if c is None:
            c = self.customers[event.customer_id] = self._new(event.customer_id)
        out = c.apply(event, self.segments)
        self._timers.set(c.customer_id, c.deadline)
        if self.changed is not None:
            self.changed.add(c.customer_id)
        return out

    # Deadlines ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many customers have a deadline armed or being fired (held ones may count twice
        for a while)."""
        return len(self._timers) + len(self._held) + self.preparing + self.firing

    def fire(
        self, customer_ids: Iterable[str], until: int, due_at: list[int] | None = None
    ) -> list[Transition]:
        """Fire the deadlines of ``customer_ids`` (popped by :meth:`pop_due`): each customer
        fires every deadline at or before ``until``, each at its own instant, and is re-armed.
        The instant each was due is appended to ``due_at``, if given. A customer whose
        deadline raises is dropped (:meth:`fail`), with none of its transitions."""
        out: list[Transition] = []
        customers, segments, arm, changed = (
            self.customers,
            self.segments,
            self._timers.set,
            self.changed,
        )
        for customer_id in customer_ids:
            c = customers[customer_id]
            if due_at is not None and c.deadline is not None:
                due_at.append(c.deadline)  # what the timer held: the deadline firing now
            try:
                out += c.advance(until, segments)
            except Exception as e:
                self.fail(customer_id, "deadline", e)
                continue
            arm(customer_id, c.deadline)
            if changed is not None:
                changed.add(customer_id)
        return out

    def fire_due(self, until: int) -> list[Transition]:
        """Fire every deadline at or before ``until``, one instant at a time, so that the
        transitions of different customers come in time order."""
        out: list[Transition] = []
        while (instant := self.next_due()) is not None and instant <= until:
            out += self.fire(self.pop_due(instant, len(self.customers)), instant)
        return out

    def next_due(self) -> int | None:
        """The earliest deadline armed, in the timer queue or held."""
        nxt = self._timers.next()
        held = self._held
        while held:
            deadline, customer_id = held[0]
            if self._held_valid(deadline, customer_id):
                return deadline if nxt is None or deadline < nxt else nxt
            held.popleft()
        return nxt

    def pop_due(self, until: int, limit: int) -> list[str]:
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
        customers = self.customers
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

    def pop_queued(self, until: int, limit: int) -> list[str]:
        """Remove and return up to ``limit`` customers of the timer queue (not held) due at or
        before ``until``, earliest first: the ones to prepare."""
        return self._timers.pop_due(until, limit)

    def hold(self, deadline: int, customer_id: str) -> None:
        """Keep a prepared customer's deadline out of the timer queue, in deadline order."""
        held = self._held
        if not held or held[-1][0] <= deadline:
            held.append((deadline, customer_id))
        else:
            bisect.insort(held, (deadline, customer_id))  # armed since the last ones: rare

    def _held_valid(self, deadline: int, customer_id: str) -> bool:
        c = self.customers.get(customer_id)
        return c is not None and c.deadline == deadline and self._timers.get(customer_id) is None
