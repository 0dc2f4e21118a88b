"""Definitions: switching a running engine to new segment definitions between two batches,
so no event is ever applied under a mix of old and new rules.

Every customer is rebuilt from its log under the new rules (:func:`actors.reconcile`), so
a membership the change brings begins when the new rule says it became true, not at the
instant the customer was last evaluated; the catch-up transitions are stamped with the
instant of the change (``at``) and carry that instant (``true_since``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio
import structlog

from actors.rules import SegmentSet
from protocol import DefinitionCause, Origin

from ._imports import RECONCILE_BATCH, Imports
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
        imports: Imports,
        counts: Counts,
        keeper: DefinitionsKeeper | None = None,
    ) -> None:
        self._imports = imports
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
        """Rebuild every customer from its log under ``new`` and publish one catch-up
        transition per membership that differs (cause ``definition``, ``at`` now,
        ``true_since`` from the replay), a batch of customers per commit."""
        p, recovery = self._partition, self._recovery
        # Every customer is rebuilt, so every customer must be in memory.
        loaded = await recovery.load_all()
        if loaded:
            await self._outbox.commit([], loaded)
        self._snapshots.abandon()
        old = p.segments
        before = len(p.customers)
        added = recovery.add_listed(new, p.customers)
        # The new rules from here on: the customers not rebuilt yet are replaced before the
        # main loop applies anything (the batches below run on it).
        p.segments = new
        ids = sorted(i for i in p.customers if i not in self._parking)
        clocks = await self._imports.clocks(set(ids))
        changed = 0
        entered = 0
        for start in range(0, len(ids), RECONCILE_BATCH):
            made = await self._imports.rebuild(
                ids[start : start + RECONCILE_BATCH], _DEFINITION, clocks
            )
            changed += len(made)
            entered += sum(1 for t in made if t.change == "entered")
        if p.changed is not None:
            p.changed.update(p.customers)
        self._counts.recount(new.names, p.customers.values())  # segments removed, refolded

        self._logger.info(
            "segments applied",
            source=new.source,
            segments=list(new.names),
            added=[n for n in new.names if n not in old.names],
            removed=[n for n in old.names if n not in new.names],
            customers=len(p.customers),
            new_customers=added,
            rebuilt_customers=len(ids),
            transitions=changed,
            entered=entered,
            exited=changed - entered,
            parked=before + added - len(p.customers),
        )
        # Customers parked before, under other definitions, are tried under these.
        parked = [r.customer_id for r in self._parking.all() if r.customer_id not in ids]
        if parked:
            await self._parking.try_again(parked, why="definitions changed")
        return changed
