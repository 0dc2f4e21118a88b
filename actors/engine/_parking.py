"""Parking: setting aside a customer after an error no message can be blamed for, and trying
it again later.

An error while firing a customer's deadline, preparing it, writing its snapshot, loading it
or evaluating it under new definitions would otherwise stop the engine, and stop it again at
every restart. Instead the customer is *parked*: dropped from memory, recorded in the store
(``store.parked``) with the error, logged and counted. The engine goes on with everyone
else. A parked customer's later events are still appended to the log, never dropped.

It is tried again by an operator (:meth:`Parking.try_again`, ``shoal unpark``), after every
change of definitions, and at a start by a different version of shoal: rebuilt from the log
as it stood when it was parked, then the events logged since are applied in log order, as
they would have been (deadlines due in between fire first, each at its own instant). If that
raises too, it stays parked with the new error.
"""

from __future__ import annotations

import importlib.metadata
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import structlog

from actors._clock import Clock
from actors._customer import Customer
from actors._stored import event_of, snapshot_row, transition_of
from protocol import DefinitionCause, Transition
from store import ParkedCustomer, Snapshot, Store

from ._metrics import Counts
from ._outbox import Outbox
from ._partition import Failure, Partition
from ._published import Published
from ._retention import bases_of


def _version() -> str:
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SHOAL_VERSION = _version()
"""The version of shoal running: a customer parked by another is tried again at start."""
_REASON_CHARS = 500
"""The longest error text kept for a parked customer."""
_DEFINITION = DefinitionCause()


def reason_of(error: BaseException) -> str:
    """One line saying what ``error`` was, for a person (its type and message, cut)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


@dataclass(slots=True)
class _UnparkRequest:
    customer_ids: list[str]
    done: anyio.Event = field(default_factory=anyio.Event)
    unparked: list[str] | None = None


class Parking:
    """The parked customers of an engine: parking those the partition dropped, and trying
    them again."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        outbox: Outbox,
        counts: Counts,
        clock: Clock,
    ) -> None:
        assert partition.failed is not None, "the engine's partition collects failures"
        self._store = store
        self._partition = partition
        self._outbox = outbox
        self._counts = counts
        self._clock = clock
        self._requests: deque[_UnparkRequest] = deque()
        self._logger = structlog.get_logger("shoal.engine")

    def __contains__(self, customer_id: object) -> bool:
        """Whether the customer is parked (or dropped and about to be)."""
        failed = self._partition.failed
        return customer_id in self._store.parked or bool(
            failed and any(f.customer_id == customer_id for f in failed)
        )

    def __len__(self) -> int:
        return len(self._store.parked)

    def get(self, customer_id: str) -> ParkedCustomer | None:
        """Why the customer is parked, or None if it is not."""
        return self._store.parked.get(customer_id)

    def all(self) -> list[ParkedCustomer]:
        """Every parked customer, in id order."""
        return self._store.parked.all()

    async def settle(self) -> None:
        """Park the customers the partition dropped since the last call: log each with its
        error, record it in the store, recount the segments' members.

        Called right after whatever may have dropped one, before any event is applied: an
        event for a dropped customer must find it parked, not start it afresh.

        Raises:
            StoreError: the store cannot record them.
        """
        p = self._partition
        failed = p.failed
        if not failed:
            return
        now, log_seq = self._clock.now(), self._store.events.last_seq
        rows: dict[str, ParkedCustomer] = {}
        for f in failed:
            reason = reason_of(f.error)
            self._logger.error(
                "customer parked",
                customer_id=f.customer_id,
                during=f.during,
                error=reason,
                exc_info=f.error,
            )
            rows[f.customer_id] = ParkedCustomer(
                customer_id=f.customer_id,
                reason=reason,
                during=f.during,
                at=now,
                log_seq=log_seq,
                definitions=p.segments.fingerprint,
                shoal_version=SHOAL_VERSION,
            )
        self._counts.stats.customers_parked += len(rows)
        await self._store.parked.put(list(rows.values()))
        failed.clear()
        self._counts.recount(p.segments.names, p.customers.values())

    async def try_again(self, customer_ids: Iterable[str], *, why: str) -> list[str]:
        """Try these parked customers again; return those unparked (the others stay parked,
        with the error of this attempt). Ids not parked are ignored.

        Each is rebuilt from its events logged up to where it was parked and its committed
        transitions, evaluated under the definitions in force, then the events logged since
        are applied in log order. The transitions that makes are committed and published.

        Raises:
            StoreError: the store cannot be read or written.
        """
        store, p = self._store, self._partition
        rows = [r for r in (store.parked.get(i) for i in sorted(set(customer_ids))) if r]
        if not rows:
            return []
        ids = [r.customer_id for r in rows]
        events = await store.events.of_customers(ids)
        outbox = await store.outbox.of_customers(ids)
        # The log is never cut past a parked customer's position: what was cut of its
        # events (retention) is in its base.
        bases, unreadable = await bases_of(store, ids)
        now, segments = self._clock.now(), p.segments
        failed = p.failed
        assert failed is not None
        unparked: list[str] = []
        snaps: list[Snapshot] = []
        made: list[Transition] = []
        for row in rows:
            customer_id = row.customer_id
            mine = [e for e in events if e.customer_id == customer_id]
            c = bases.get(customer_id) or Customer(customer_id)
            try:
                if customer_id in unreadable:
                    raise unreadable[customer_id]
                for e in mine:
                    if e.seq <= row.log_seq:
                        c.fold(event_of(e), segments)
                published = Published(store)
                for o in outbox:
                    if o.customer_id == customer_id:
                        published.add(c, transition_of(o))
                await published.finish({customer_id: c})
                out: list[Transition] = []
                if c.version or c.first_at() is not None or _listed(p, customer_id):
                    if c.first_at() is None and not c.version:
                        c.watermark = now  # known from a static list only: as when added
                    out += c.evaluate(segments, _DEFINITION)
                for e in mine:
                    if e.seq > row.log_seq:
                        out += c.apply(event_of(e), segments)
                snap = snapshot_row(c, needs=p.needs, log_seq=store.events.last_seq)
            except Exception as e:
                failed.append(Failure(customer_id, "unpark", e))
                continue
            unparked.append(customer_id)
            snaps.append(snap)
            made += out
            p.customers[customer_id] = c
            p.touch(c)
        await self.settle()  # those that failed again, with the new error
        if unparked:
            # In one transaction: its transitions, no longer parked, and a snapshot (the one
            # it had is from before it was parked, and the snapshot marks no longer cover
            # it), so that a restart at any point finds it as it is.
            await self._outbox.commit([], made, snaps, unparked=unparked)
            self._logger.info("customers unparked", why=why, customers=unparked)
            self._counts.recount(p.segments.names, p.customers.values())
        return unparked

    def ask(self, customer_ids: Iterable[str]) -> _UnparkRequest:
        """Queue an operator's unpark for the main loop; wait on the request's ``done``."""
        request = _UnparkRequest(list(customer_ids))
        self._requests.append(request)
        return request

    async def serve(self) -> None:
        """Try again the customers operators asked for, in order, and tell each caller."""
        while self._requests:
            request = self._requests[0]
            try:
                request.unparked = await self.try_again(request.customer_ids, why="operator")
            finally:
                self._requests.popleft()
                request.done.set()

    def release(self) -> None:
        """The engine stopped: whoever still waits would wait forever."""
        while self._requests:
            self._requests.popleft().done.set()

    async def on_start(self) -> None:
        """At a start: try again the customers parked by another version of shoal."""
        stale = [r.customer_id for r in self.all() if r.shoal_version != SHOAL_VERSION]
        if stale:
            await self.try_again(stale, why="shoal upgraded")


def _listed(p: Partition, customer_id: str) -> bool:
    return any(customer_id in ids for ids in p.segments.lists.values())
