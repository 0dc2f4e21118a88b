"""Ingest: one micro-batch of inbound messages, from decoding to acknowledgement.

Each batch is decoded and validated; messages the log already holds (by customer and message
id) are dropped; the rest are applied to their actors; events and transitions are committed
to the store in one transaction; each invalid message is published as a rejection with its
reason; then the whole batch is acknowledged with one message.
"""

from __future__ import annotations

import anyio
import structlog

from actors._clock import Clock
from actors._stored import logged_event
from protocol import (
    Delivery,
    Event,
    EventSource,
    InvalidEvent,
    PublishError,
    Transition,
    TransitionSink,
    decode_event,
)
from store import LoggedEvent, Store

from ._config import SERVE_EVERY, EngineConfig, breathe
from ._deadlines import Deadlines
from ._gc import Collector
from ._metrics import Counts
from ._outbox import Outbox
from ._partition import Partition
from ._recovery import Recovery

_MAX_RETRY_DELAY = 5.0
"""Seconds at most between two attempts to publish the same rejection."""


class Ingest:
    """Applies batches of deliveries to the partition, durably and exactly once."""

    def __init__(
        self,
        store: Store,
        partition: Partition,
        recovery: Recovery,
        deadlines: Deadlines,
        outbox: Outbox,
        sink: TransitionSink,
        counts: Counts,
        gc: Collector,
        clock: Clock,
        config: EngineConfig,
    ) -> None:
        self._store = store
        self._partition = partition
        self._recovery = recovery
        self._deadlines = deadlines
        self._outbox = outbox
        self._sink = sink
        self._counts = counts
        self._gc = gc
        self._clock = clock
        self._config = config
        self._logger = structlog.get_logger("shoal.engine")

    async def batch(self, batch: list[Delivery], source: EventSource) -> None:
        """Apply, commit, reject and acknowledge one batch taken from ``source``."""
        stats = self._counts.stats
        fresh: list[Event] = []
        rejected: list[tuple[Delivery, InvalidEvent]] = []
        keys: set[tuple[str, str]] = set()
        max_bytes = self._config.max_event_bytes
        for i, d in enumerate(batch):
            await breathe(i, SERVE_EVERY * 4)
            try:
                event = decode_event(
                    d.data,
                    d.subject,
                    received=d.received,
                    default_message_id=d.msg_id or f"js:{d.stream_sequence}@{d.received}",
                    max_bytes=max_bytes,
                )
            except InvalidEvent as e:
                rejected.append((d, e))
                continue
            key = (event.customer_id, event.message_id)
            if key in keys:
                stats.events_duplicate += 1
                continue
            keys.add(key)
            fresh.append(event)
        known = await self._store.events.known(keys) if keys else set()

        p = self._partition
        logged: list[LoggedEvent] = []
        transitions: list[Transition] = []
        if not self._recovery.warm:
            # Still warming up: these customers' snapshots load now, ahead of their turn.
            transitions += await self._recovery.load({e.customer_id for e in fresh}, {}, {})
        try:
            for i, event in enumerate(fresh):
                await breathe(i, SERVE_EVERY)
                if (event.customer_id, event.message_id) in known:
                    stats.events_duplicate += 1
                    continue
                transitions += p.apply(event)
                logged.append(logged_event(event))
        except Exception:
            # The engine stops with this error; say which event it was.
            self._logger.error(
                "event could not be applied",
                customer_id=event.customer_id,
                message_id=event.message_id,
                exc_info=True,
            )
            raise
        await self._outbox.commit(logged, transitions, batch[-1].stream_sequence)
        stats.events_applied += len(logged)
        self._gc.worked(len(logged))
        if logged:
            self._counts.applied(len(logged), self._clock.now())
        for d, invalid in rejected:
            await self._reject(d, invalid)
        # Acknowledged only now: every event of the batch is in the log or was rejected.
        await source.ack(batch[-1].stream_sequence)
        self._deadlines.ingested(batch)

    async def _reject(self, d: Delivery, invalid: InvalidEvent) -> None:
        reason = invalid.reason
        self._counts.rejected(invalid.kind)
        self._logger.warning(
            "event rejected",
            customer_id=invalid.customer_id,
            message_id=invalid.message_id,
            subject=d.subject,
            stream_sequence=d.stream_sequence,
            reason=reason,
            kind=invalid.kind,
        )
        delay = 0.1
        while True:
            try:
                await self._sink.publish_rejection(
                    reason=reason,
                    subject=d.subject,
                    data=d.data,
                    received=d.received,
                    stream_sequence=d.stream_sequence,
                )
                return
            except PublishError as e:
                # Not acknowledging until it is out keeps the rejection from being lost.
                self._logger.warning("retrying rejection", error=str(e), retry_in=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
