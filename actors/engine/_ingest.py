"""Ingest: one micro-batch of inbound messages, from decoding to acknowledgement.

Each batch is decoded and validated (an import's markers split it: :mod:`._imports`);
messages the log already holds (by customer and message id) are dropped; the rest are
applied to their actors; events and transitions are committed to the store in one
transaction; each invalid message is published as a rejection with its reason; then the
whole batch is acknowledged with one message.
"""

from __future__ import annotations

import anyio
import structlog

from actors._clock import Clock
from actors._retention import before_cut
from actors._stored import logged_event
from protocol import (
    Delivery,
    Event,
    EventSource,
    InvalidEvent,
    PublishError,
    Transition,
    TransitionSink,
    is_definitions_marker,
    is_fence_probe,
    is_forget_order,
)
from store import LoggedEvent, Store

from ._config import SERVE_EVERY, EngineConfig, breathe
from ._deadlines import Deadlines
from ._forget import Forgetting
from ._gc import Collector
from ._imports import Imports, is_marker
from ._metrics import Counts
from ._outbox import Outbox, positions
from ._parking import Parking, reason_of
from ._partition import Partition
from ._recovery import Recovery

_MAX_RETRY_DELAY = 5.0
"""Seconds at most between two attempts to publish the same rejection."""


def _quarantined(event: Event, error: Exception) -> InvalidEvent:
    return InvalidEvent(
        f"the event raised an error while applied and was quarantined: {reason_of(error)}",
        kind="quarantined",
        customer_id=event.customer_id,
        message_id=event.message_id,
    )


class Ingest:
    """Applies batches of deliveries to the partition, durably and exactly once."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        recovery: Recovery,
        deadlines: Deadlines,
        outbox: Outbox,
        parking: Parking,
        imports: Imports,
        sink: TransitionSink,
        counts: Counts,
        gc: Collector,
        clock: Clock,
        config: EngineConfig,
        forgetting: Forgetting,
    ) -> None:
        self._forgetting = forgetting
        self._refused: list[int] = []
        self._placeholders: dict[int, str] = {}
        self._store = store
        self._partition = partition
        self._recovery = recovery
        self._deadlines = deadlines
        self._outbox = outbox
        self._parking = parking
        self._imports = imports
        self._sink = sink
        self._counts = counts
        self._gc = gc
        self._clock = clock
        self._config = config
        self._logger = structlog.get_logger("shoal.engine")

    async def batch(self, batch: list[Delivery], source: EventSource) -> None:
        """Apply, commit, reject and acknowledge one batch taken from ``source``.

        An import's marker splits the batch: what comes before it is committed first, then
        the marker acted on (:class:`Imports`), in stream order.
        """
        run: list[Delivery] = []
        for d in batch:
            if is_marker(d):
                if run:
                    await self._run(run)
                    run = []
                if is_forget_order(d.subject):
                    refused = await self._forgetting.order(d)
                    if refused is not None:
                        await self._reject(d, refused)
                    continue
                if is_definitions_marker(d.subject) or is_fence_probe(d.subject):
                    # The engine's own record of a switch (for a rebuild from the stream),
                    # or its probe of a replicated stream (for the deadline barrier):
                    # nothing to apply, but its position is committed like any message's.
                    await self._outbox.commit(
                        [],
                        [],
                        stream_through=d.stream_sequence,
                        partitions_through=positions((d,)),
                    )
                    continue
                refused = await self._imports.marker(d, source.partitions)
                if refused is not None:
                    await self._reject(d, refused)
            else:
                run.append(d)
        if run:
            await self._run(run)
        # Acknowledged only now: every event of the batch is in the log or was rejected.
        await source.ack(batch[-1].stream_sequence)
        if self._refused:
            # Refused events of forgotten ids hold the id: erased once acknowledged (erased
            # before, the consumer's floor could pass what the store committed).
            for seq in self._refused:
                self._forgetting.erase_later(seq)
            self._refused = []
        self._deadlines.ingested(source)

    async def _run(self, batch: list[Delivery]) -> None:
        """Apply, commit and reject deliveries of events (no marker among them). Imported
        events are logged, not applied: the end of their import applies them."""
        stats = self._counts.stats
        fresh: list[tuple[Event, Delivery]] = []
        rejected: list[tuple[Delivery, InvalidEvent]] = []
        keys: set[tuple[str, str]] = set()
        imported: set[int] = set()
        max_bytes = self._config.max_event_bytes
        cut = self._store.retention.cut
        for i, d in enumerate(batch):
            await breathe(i, SERVE_EVERY * 4)
            try:
                received = self._imports.received(d)
                event = d.event(max_bytes, received=received)
            except InvalidEvent as e:
                rejected.append((d, e))
                continue
            if cut is not None and event.at <= cut.at:
                rejected.append((d, before_cut(event, cut.at)))
                continue
            refusal = self._forgetting.refusal(event)
            if refusal is not None:
                rejected.append((d, refusal[0]))
                self._refused.append(d.stream_sequence)
                self._placeholders[d.stream_sequence] = refusal[1]
                continue
            if received is not None:
                imported.add(d.stream_sequence)
            key = (event.customer_id, event.message_id)
            if key in keys:
                stats.events_duplicate += 1
                continue
            keys.add(key)
            fresh.append((event, d))
        known = await self._store.events.known(keys) if keys else set()

        p, parking = self._partition, self._parking
        logged: list[LoggedEvent] = []
        transitions: list[Transition] = []
        if not self._recovery.warm:
            # Still warming up: these customers' snapshots load now, ahead of their turn.
            transitions += await self._recovery.load({e.customer_id for e, _ in fresh}, {}, {})
            await parking.settle()
        applied: list[Event] = []  # in this batch, before the one being applied
        for i, (event, d) in enumerate(fresh):
            await breathe(i, SERVE_EVERY)
            if (event.customer_id, event.message_id) in known:
                stats.events_duplicate += 1
                continue
            if d.stream_sequence in imported:
                # Applied when its import ends, by rebuilding its customer from the log.
                logged.append(logged_event(event, d.stream_sequence))
                stats.imported_events += 1
                continue
            if event.customer_id in parking:
                # Kept for when it is tried again, not applied now.
                logged.append(logged_event(event, d.stream_sequence))
                stats.events_parked += 1
                continue
            try:
                transitions += p.apply(event)
            except Exception as e:
                transitions = await self._quarantine(event, d, e, applied, transitions)
                rejected.append((d, _quarantined(event, e)))
                continue
            logged.append(logged_event(event, d.stream_sequence))
            applied.append(event)
        await self._outbox.commit(
            logged,
            transitions,
            stream_through=batch[-1].stream_sequence,
            partitions_through=positions(batch),
        )
        # Parked customers' events are logged, not applied (yet).
        stats.events_applied += len(applied)
        self._gc.worked(len(applied))
        if applied:
            self._counts.applied(len(applied), self._clock.now())
        for d, invalid in rejected:
            await self._reject(d, invalid)

    async def _quarantine(
        self,
        event: Event,
        d: Delivery,
        error: Exception,
        applied: list[Event],
        transitions: list[Transition],
    ) -> list[Transition]:
        """An event raised while applied: restore its customer to its state before it (as
        committed, then the batch's earlier events of that customer applied again); return
        the batch's transitions so far. If restoring raises too, the customer is parked and
        its transitions of this batch are dropped (its events are applied when unparked)."""
        customer_id = event.customer_id
        self._counts.stats.events_quarantined += 1
        self._logger.error(
            "event quarantined: it raised while applied",
            customer_id=customer_id,
            message_id=event.message_id,
            stream_sequence=d.stream_sequence,
            error=reason_of(error),
            exc_info=error,
        )
        p, parking = self._partition, self._parking
        p.drop(customer_id)
        restored = await self._recovery.reload(customer_id)
        reloaded = p.customers.get(customer_id)
        if reloaded is not None:
            # Loading counted its memberships, which were counted before it was dropped.
            self._counts.released(reloaded)
        mine = [e for e in applied if e.customer_id == customer_id]
        if mine and customer_id not in parking:
            c = p.actor(customer_id)
            try:
                # The same transitions as the first time, which the batch has already.
                for earlier in mine:
                    c.apply(earlier, p.segments)
            except Exception as e:
                p.fail(customer_id, "quarantine", e)
            else:
                p.touch(c)
        if customer_id in parking:
            # Restoring it raised: parked, its events of this batch applied when unparked.
            await parking.settle()
            return [t for t in transitions if t.customer_id != customer_id]
        return transitions + restored

    async def _reject(self, d: Delivery, invalid: InvalidEvent) -> None:
        reason = invalid.reason
        subject, data = d.subject, d.data
        placeholder = self._placeholders.pop(d.stream_sequence, None)
        if placeholder is not None:
            # A forgotten id's: the rejection names its hash only, and keeps no payload.
            subject, data = placeholder, b""
        self._counts.rejected(invalid.kind)
        self._logger.warning(
            "event rejected",
            customer_id=invalid.customer_id,
            message_id=invalid.message_id,
            subject=subject,
            stream_sequence=d.stream_sequence,
            reason=reason,
            kind=invalid.kind,
        )
        delay = 0.1
        while True:
            try:
                await self._sink.publish_rejection(
                    reason=reason,
                    subject=subject,
                    data=data,
                    received=d.received,
                    stream_sequence=d.stream_sequence,
                )
                return
            except PublishError as e:
                # Not acknowledging until it is out keeps the rejection from being lost.
                self._logger.warning("retrying rejection", error=str(e), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
