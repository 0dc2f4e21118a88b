"""Definitions: switching a running engine to new segment definitions between two batches,
so no event is ever applied under a mix of old and new rules."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio
import structlog

from actors._customer import Customer
from actors.rules import SegmentSet
from protocol import DefinitionCause, Origin, Transition

from ._config import breathe
from ._metrics import Counts
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition
from ._recovery import Recovery
from ._snapshots import Snapshots
from ._stored_definitions import DefinitionsKeeper

_DEFINITION = DefinitionCause()


@dataclass(slots=True)
class _SegmentsRequest:
    segments: SegmentSet
    origin: Origin | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    transitions: int | None = None
    error: BaseException | None = None


class Definitions:
    """Switches to new definitions, in the order asked, on the engine's main loop."""

    def __init__(
        self,
        partition: Partition,
        recovery: Recovery,
        snapshots: Snapshots,
        outbox: Outbox,
        parking: Parking,
        counts: Counts,
        keeper: DefinitionsKeeper | None = None,
    ) -> None:
        self._partition = partition
        self._recovery = recovery
        self._snapshots = snapshots
        self._outbox = outbox
        self._parking = parking
        self._counts = counts
        self._keeper = keeper
        self._requests: deque[_SegmentsRequest] = deque()
        self._logger = structlog.get_logger("shoal.engine")

    def ask(self, segments: SegmentSet, origin: Origin | None = None) -> _SegmentsRequest:
        """Queue a switch for the main loop; wait on the request's ``done``."""
        request = _SegmentsRequest(segments, origin)
        self._requests.append(request)
        return request

    async def serve(self) -> None:
        """Make the switches asked for, in order, and tell each caller."""
        while self._requests:
            request = self._requests[0]
            try:
                transitions = await self._switch(request.segments)
                if self._keeper is not None:  # stored once in force: a restart resumes them
                    await self._keeper.applied(request.segments, request.origin)
                request.transitions = transitions
            except Exception as e:
                # The engine stops with this error; the caller learns the switch failed.
                request.error = e
                raise
            finally:
                self._requests.popleft()
                request.done.set()

    def release(self) -> None:
        """The engine stopped: whoever still waits would wait forever."""
        while self._requests:
            self._requests.popleft().done.set()

    async def _switch(self, new: SegmentSet) -> int:
        p, recovery = self._partition, self._recovery
        # Every customer is evaluated, so every customer must be in memory.
        loaded = await recovery.load_all()
        if loaded:
            await self._outbox.commit([], loaded)
        self._snapshots.abandon()
        old = p.segments
        customers = p.customers
        refolded = 0
        failed: dict[str, BaseException] = {}
        if new.needs != old.needs:
            # Customers keep only the facts the old rules read: refold the log into fresh
            # actors that take over the memberships, version and watermark. They replace
            # the old ones only once complete, so a failed read changes nothing.
            customers = {}
            refolded, failed = await recovery.fold_log(new, customers)
            for customer_id, before in p.customers.items():
                if customer_id in failed:
                    continue
                c = customers.get(customer_id)
                if c is None:  # known without events, from a static list
                    c = customers[customer_id] = Customer(customer_id)
                c.members = before.members
                c.version = before.version
                c.watermark = max(c.watermark, before.watermark)
        added = recovery.add_listed(new, customers)

        changed: list[Transition] = []
        for i, c in enumerate(list(customers.values())):
            try:
                changed += c.evaluate(new, _DEFINITION)
            except Exception as e:
                failed[c.customer_id] = e
            else:
                p.arm(c.customer_id, c.deadline)
            await breathe(i)
        p.segments, p.customers = new, customers
        if p.changed is not None:
            p.changed.update(customers)
        for customer_id, error in failed.items():
            p.fail(customer_id, "definitions", error)
        await self._parking.settle()
        await self._outbox.commit([], changed)
        self._counts.recount(new.names, customers.values())  # segments removed, refolded

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
            parked=len(failed),
        )
        # Customers parked before, under other definitions, are tried under these.
        parked = [r.customer_id for r in self._parking.all() if r.customer_id not in failed]
        if parked:
            await self._parking.try_again(parked, why="definitions changed")
        return len(changed)
