"""Startup checks: an engine refuses to start from a store that is behind its events stream
(a missing or emptied ``shoal.db`` beside a stream full of events), and
:func:`rebuild_from_stream` brings such a store level with the stream again.

Started from such a store, an engine would begin with every customer empty and restart
transition versions at 1, so subscribers that drop repeats by version would drop what it
publishes; and the events its consumer acknowledged would be missing from the log for good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, Collection, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from actors._errors import ActorsError
from actors._stored import logged_event
from protocol import (
    DEFAULT_MAX_EVENT_BYTES,
    EARLIEST,
    EVENTS_WILDCARD,
    SEGMENTS_STREAM,
    Delivery,
    EventSource,
    InvalidEvent,
    StreamState,
    Transition,
    forget_hash,
    is_control_subject,
    partition_consumer,
    to_instant,
)
from store import LoggedEvent, OutboxEntry, Store

from ._config import breathe

REBUILD_COMMAND = "shoal rebuild --from-stream"
"""The command that rebuilds a store from the events stream (:func:`rebuild_from_stream`)."""

_transition_decoder = msgspec.json.Decoder(Transition)


class StoreBehindError(ActorsError):
    """The store holds less than its events stream says was committed: starting from it would
    lose events and restart transition versions. Rebuild it from the stream."""

    def __init__(self, store: Store, state: StreamState, consumer: str) -> None:
        recorded = store.stream_through
        if state.ack_floor:
            name, floor, mine = consumer, state.ack_floor, recorded
            through = store.partitions_through
            names = state.partition_consumers
            for p, f in sorted(state.partition_floors.items()):
                # The first partition behind (the furthest floor when none is: the store
                # recorded nothing).
                if recorded is not None and f > through.get(p, recorded):
                    name = names.get(p) or partition_consumer(consumer, p)
                    floor, mine = f, through.get(p, recorded)
                    break
                if f == state.ack_floor:
                    name = names.get(p) or partition_consumer(consumer, p)
            else:
                strays = state.strays_floor
                if strays is not None and recorded is not None and strays > recorded:
                    name = state.strays_consumer or partition_consumer(consumer, "unpartitioned")
                    floor = strays
            holds = "nothing" if mine is None else f"messages through position {mine}"
            why = (
                f"consumer {name!r} acknowledged messages through position "
                f"{floor}, the store recorded {holds}"
            )
        else:
            why = (
                f"the store is empty, while {SEGMENTS_STREAM} holds {state.published} "
                "transitions an engine published"
            )
        command = f"{REBUILD_COMMAND} --data-dir {store.path.parent}"
        if consumer != "shoal-engine":
            command += f" --consumer {consumer}"
        super().__init__(
            f"{store.path} is behind stream {state.stream} ({state.messages} messages): "
            f"{why}. Starting would lose those events and restart transition versions. With "
            f"the engine stopped, rebuild the store from the stream: {command}"
        )
        self.path = store.path
        self.state = state
        self.recorded = recorded


async def check_store(store: Store, source: EventSource) -> None:
    """Refuse to start from a store that is behind ``source``'s stream.

    It is behind when the consumer acknowledged messages past the stream position the store
    recorded at its last commit; or, when the store recorded none, when it is empty while
    the consumer acknowledged any, or while there is no consumer but the transitions stream
    holds transitions (asked only of an engine that reads every customer: with a partition
    of them, those may be another engine's). A store written by a shoal that did not record
    the position, but holding anything, is trusted. A first start (no consumer yet, nothing
    published) against a stream that already holds events is fine: the engine reads it from
    its start.

    Raises:
        StoreBehindError: the store is behind.
        BrokerError: the broker does not answer.
    """
    state = await _without_gaps(store, await source.stream_state(), source)
    if _behind(store, state, source.filter_subject):
        raise StoreBehindError(store, state, source.consumer)


async def _without_gaps(store: Store, state: StreamState, source: EventSource) -> StreamState:
    """``state`` with each partition floor past the store's position lowered to it when
    the stream holds none of the partition's messages in between: a purge of the
    partition's oldest messages (retention) moves its consumer's floor past positions
    that hold none of them, up to the stream's last message when none is left."""
    recorded = store.stream_through
    if recorded is None:
        return state
    through = store.partitions_through
    floors = dict(state.partition_floors)
    for p, floor in state.partition_floors.items():
        mine = through.get(p, recorded)
        if floor > mine and not await source.holds(p, mine, floor):
            floors[p] = mine
    if floors == state.partition_floors:
        return state
    rest = [] if state.strays_floor is None else [state.strays_floor]
    return dataclasses.replace(
        state, partition_floors=floors, ack_floor=max([*floors.values(), *rest], default=None)
    )


def _behind(store: Store, state: StreamState, filter_subject: str) -> bool:
    recorded = store.stream_through
    empty = recorded is None and not (
        store.events.last_seq or store.outbox.last_seq or store.snapshots.marks is not None
    )
    if state.ack_floor:
        if recorded is None:
            return empty
        # Each partition against its own position; one the store has none for (it never
        # committed a message of it, or recorded only the overall one) against the overall.
        through = store.partitions_through
        if any(floor > through.get(p, recorded) for p, floor in state.partition_floors.items()):
            return True
        if state.partition_floors or state.strays_floor is not None:
            # Not the furthest floor against the overall position: a partition taken over
            # starts after its snapshot's position, which can be past every message this
            # store committed (its consumer's floor is that position until it acknowledges
            # one: the last message in the stream, in a CI run).
            return state.strays_floor is not None and state.strays_floor > recorded
        return state.ack_floor > recorded
    return empty and state.published > 0 and filter_subject == EVENTS_WILDCARD


@dataclass(slots=True)
class RebuildReport:
    """What :func:`rebuild_from_stream` did."""

    through: int
    """The stream position the store is level with now."""
    read: int = 0
    """Event messages read from the stream."""
    logged: int = 0
    """Events added to the log (those not there already)."""
    rejected: int = 0
    """Messages the engine rejected (invalid): not logged, as by the engine."""
    transitions: int = 0
    """Published transitions added to the outbox, as published."""
    cut: int = 0
    """Events received at or before the log's cut (retention): not logged, their customers'
    bases hold them already."""


def _imported_received(d: Delivery) -> int | None:
    """An imported event's original receive instant, as the engine took it (one it refused
    is in ``SHOAL_REJECTED``, so left out before this is asked); None for live traffic.

    Raises:
        InvalidEvent: the header is not one the engine would have taken.
    """
    if d.import_id is None:
        return None
    text = d.received_at or ""
    if not (text.isdigit() and len(text) <= 20 and EARLIEST <= int(text) <= d.received):
        raise InvalidEvent(f"imported event with header Shoal-Received-At {text[:40]!r}")
    return int(text)


async def log_from_stream(
    store: Store,
    deliveries: AsyncIterable[Sequence[Delivery]],
    report: RebuildReport,
    *,
    through: int | None,
    max_event_bytes: int,
    rejected: Collection[int],
    customers: set[str] | None = None,
    cut: int | None = None,
    forgotten: Mapping[str, int] | None = None,
    after: int = 0,
) -> None:
    """Add to the log the valid events of ``deliveries`` (in stream order, up to position
    ``through``) it does not hold, decoded as the engine decodes them; count in ``report``
    (and, without ``through``, move ``report.through`` to the last read); add their
    customers to ``customers``. ``forgotten``: the hashes of forgotten customers' ids, with
    their orders' positions: their events before those are left out. Events received at or
    before ``cut`` are left out too (the log's cut: folded into the bases already, and no
    longer in the log to be found repeats), and those at or before stream position
    ``after`` (folded into the bases a partition taken over brought)."""
    async for chunk in deliveries:
        events: list[LoggedEvent] = []
        for i, d in enumerate(chunk):
            # A partition taken over logs its events while the engine's leases are renewed
            # on this event loop.
            await breathe(i)
            if through is not None and d.stream_sequence > through:
                break
            if through is None:
                report.through = d.stream_sequence
            if d.stream_sequence <= after:
                continue
            if is_control_subject(d.subject):
                # An import's marker: what its end made of the customers is in
                # SHOAL_SEGMENTS; the events are logged here.
                continue
            report.read += 1
            if d.stream_sequence in rejected:
                report.rejected += 1
                continue
            try:
                event = d.event(max_event_bytes, received=_imported_received(d))
            except InvalidEvent:
                report.rejected += 1
                continue
            if cut is not None and event.received <= cut:
                report.cut += 1
                continue
            if forgotten and forgotten.get(forget_hash(event.customer_id), 0) > d.stream_sequence:
                continue
            events.append(logged_event(event, d.stream_sequence))
        if customers is not None:
            customers.update(e.customer_id for e in events)
        report.logged += await store.import_events(events)


async def rebuild_from_stream(
    store: Store,
    deliveries: AsyncIterable[Sequence[Delivery]],
    published: AsyncIterable[Sequence[Delivery]],
    *,
    through: int | None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    rejected: Collection[int] = (),
) -> RebuildReport:
    """Bring ``store`` level with the events stream, up to position ``through`` (the
    consumer's acknowledgement floor: what the engine had committed; None, when there is no
    consumer: all of it, and the engine's new consumer finds those events logged).

    Each message is decoded exactly as the engine decodes it (the same default message id,
    the same receive instant: an imported event's original one), and the valid events are
    added to the log in stream order, skipping those it holds. The transitions the broker
    holds (``published``, the messages of ``SHOAL_SEGMENTS``) are added to the outbox as
    published, so a start rebuilds each customer's memberships and version from them and goes
    on from the last version published
    rather than from 1, and publishes none of them again. The position is recorded last.

    Args:
        store: the store, open for writing (the engine stopped).
        deliveries: the events stream's messages up to ``through``, in stream order.
        published: ``SHOAL_SEGMENTS``' messages, in stream order.
        through: the stream position the store is to be level with (None: the last of
            ``deliveries``).
        max_event_bytes: the engine's limit on an event's size.
        rejected: stream positions the engine rejected (those ``SHOAL_REJECTED`` holds): not
            logged, even if they decode (an event quarantined because it raised when
            applied).

    Raises:
        StoreError: the store cannot be written (what was written before stays: running it
            again adds only what is missing).
    """
    report = RebuildReport(through=through or 0)
    await log_from_stream(
        store,
        deliveries,
        report,
        through=through,
        max_event_bytes=max_event_bytes,
        rejected=rejected,
        cut=None if store.retention.cut is None else store.retention.cut.at,
    )

    entries: dict[tuple[str, int], OutboxEntry] = {}
    async for chunk in published:
        for d in chunk:
            try:
                t = _transition_decoder.decode(d.data)
            except msgspec.DecodeError:
                continue  # not shoal's: nothing to restore from it
            entries.setdefault(
                (t.customer_id, t.version),
                OutboxEntry(
                    customer_id=t.customer_id,
                    version=t.version,
                    segment=t.segment,
                    at=to_instant(t.at),
                    body=d.data,  # the very payload published
                ),
            )
    held = await store.outbox.of_customers(sorted({c for c, _ in entries}))
    for o in held:
        entries.pop((o.customer_id, o.version), None)
    new = list(entries.values())
    last = store.outbox.last_seq + len(new)
    await store.commit([], new, last, stream_through=report.through or None)
    report.transitions = len(new)
    return report
