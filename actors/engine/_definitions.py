"""Definitions: switching a running engine to new segment definitions between two batches,
so no event is ever applied under a mix of old and new rules.

Every customer is rebuilt from its log under the new rules (:func:`actors.reconcile`), so
a membership the change brings begins when the new rule says it became true, not at the
instant the customer was last evaluated; the catch-up transitions are stamped with the
instant of the change (``at``) and carry that instant (``true_since``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import anyio
import structlog

from actors._errors import DefinitionsConflict
from actors.rules import SegmentSet
from protocol import (
    DefinitionCause,
    DefinitionsMarker,
    Origin,
    PublishError,
    StoredDefinitions,
    TransitionSink,
    definitions_marker_subject,
    encode_marker,
)
from store import Store

from ._imports import RECONCILE_BATCH, Imports
from ._metrics import Counts
from ._outbox import Outbox
from ._parking import Parking
from ._partition import Partition
from ._recovery import Recovery
from ._snapshots import Snapshots
from ._stored_definitions import DefinitionsKeeper

_DEFINITION = DefinitionCause()
_MAX_RETRY_DELAY = 5.0
"""Seconds at most between two attempts to publish the same definitions markers."""


def definitions_markers(
    d: StoredDefinitions, partitions: int, owned: Collection[int] | None = None
) -> list[tuple[str, bytes, str]]:
    """The definitions markers of ``d``: (subject, body, message id), one per partition;
    none for definitions that replaced none (see ``StoredDefinitions.applied_through``).

    ``owned``: the partitions of the engine that publishes them (None: every one). Among
    them, only those ``d`` holds a position for: the partitions this engine switched (one
    it took over since, from another engine's snapshot, was marked by that engine)."""
    through = d.applied_through
    if through is None:
        return []
    marked = range(partitions) if owned is None else sorted(p for p in owned if p in through)
    return [
        (
            definitions_marker_subject(p, d.version),
            encode_marker(
                DefinitionsMarker(
                    version=d.version,
                    fingerprint=d.fingerprint,
                    applied_at=d.applied_at,
                    applied_through=through.get(p, 0),
                )
            ),
            f"shoal-definitions:{d.version}:{p}",
        )
        for p in marked
    ]


class Markers:
    """Publishes, into each partition of the events stream the engine owns (``owned``;
    None: every one), where it switched to new definitions (see
    :class:`~protocol.DefinitionsMarker`): so that a partition can be rebuilt from the
    stream alone. Each engine marks its own partitions at its own switch, with its own
    positions (the record its store holds). The store records the last version marked, so
    a start publishes the markers a stop (or crash) left unpublished."""

    def __init__(
        self,
        store: Store,
        sink: TransitionSink,
        partitions: int,
        owned: Collection[int] | None = None,
    ) -> None:
        self._store = store
        self._sink = sink
        self._partitions = partitions
        self._owned = None if owned is None else frozenset(owned)
        self._logger = structlog.get_logger("shoal.engine")

    async def publish(self, d: StoredDefinitions) -> None:
        """Publish ``d``'s markers, trying again until the broker confirms them all, then
        record them published.

        Raises:
            StoreError: the store cannot be written.
        """
        markers = definitions_markers(d, self._partitions, self._owned)
        delay = 0.1
        while markers:
            try:
                await self._sink.publish_markers(markers)
                break
            except PublishError as e:
                # Recorded only once out: a partition's history must not miss the switch.
                self._logger.warning("retrying definitions markers", error=str(e), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
        await self._store.definitions.set_marked(d.version)

    async def publish_missing(self, d: StoredDefinitions | None) -> None:
        """Publish the markers of the definitions in force, unless recorded published.

        Raises:
            StoreError: the store cannot be read or written.
        """
        if d is not None and await self._store.definitions.marked() != d.version:
            await self.publish(d)


@dataclass(slots=True)
class SegmentsRequest:
    segments: SegmentSet
    origin: Origin | None = None
    record: StoredDefinitions | None = None
    """Another engine's version, read from the shared copy: followed, not proposed."""
    done: anyio.Event = field(default_factory=anyio.Event)
    transitions: int | None = None
    error: BaseException | None = None


class Definitions:
    """Switches to new definitions, in the order asked, on the engine's main loop.

    New definitions (a reload, the API) are proposed to the shared copy first, as the next
    version (:meth:`DefinitionsKeeper.propose`): when another engine stored that version
    first, they are not applied, and the caller gets :class:`~actors.DefinitionsConflict`
    (the engine follows the winner, as every engine does). Another engine's version is
    switched to as it is (``record``), unless already in force.
    """

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
        markers: Markers | None = None,
        owned: Collection[int] | None = None,
    ) -> None:
        self._owned = owned
        self._markers = markers
        self._imports = imports
        self._partition = partition
        self._recovery = recovery
        self._snapshots = snapshots
        self._outbox = outbox
        self._parking = parking
        self._counts = counts
        self._keeper = keeper
        self._requests: deque[SegmentsRequest] = deque()
        self._logger = structlog.get_logger("shoal.engine")

    def ask(
        self,
        segments: SegmentSet,
        origin: Origin | None = None,
        record: StoredDefinitions | None = None,
    ) -> SegmentsRequest:
        """Queue a switch for the main loop; wait on the request's ``done``. ``record``:
        another engine's version that ``segments`` were read from."""
        request = SegmentsRequest(segments, origin, record)
        self._requests.append(request)
        return request

    async def serve(self) -> None:
        """Make the switches asked for, in order, and tell each caller."""
        keeper = self._keeper
        while self._requests:
            request = self._requests[0]
            record = request.record
            try:
                proposed: StoredDefinitions | None = None
                if record is not None:
                    current = None if keeper is None else keeper.current
                    if current is not None and record.version <= current.version:
                        request.transitions = 0  # in force already (proposed here, say)
                        continue
                elif keeper is not None and keeper.followed_already(
                    request.segments, request.origin
                ):
                    assert keeper.current is not None
                    self._logger.info(
                        "segments unchanged: another engine applied this file first",
                        source=request.segments.source,
                        version=keeper.current.version,
                    )
                    request.transitions = 0
                    continue
                elif keeper is not None:
                    try:
                        proposed = await keeper.propose(
                            request.segments, request.origin, self._owned
                        )
                    except DefinitionsConflict as e:
                        request.error = e  # the caller's to hear; the engine goes on
                        continue
                transitions = await self._switch(request.segments)
                if keeper is not None:  # stored once in force: a restart resumes them
                    if record is not None:
                        await keeper.adopted(record, self._owned)
                    elif proposed is not None:
                        await keeper.in_force(proposed)
                    if self._markers is not None and keeper.current is not None:
                        await self._markers.publish(keeper.current)
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
