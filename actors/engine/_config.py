"""How an engine is configured, what it counts, and what it tells an observer as it goes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio.lowlevel

from protocol import DEFAULT_MAX_EVENT_BYTES


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine batches, snapshots and warms up.

    Which customers an engine owns is said by its event source (for NATS, the consumer and
    its filter subject: see ``protocol.nats.JetStreamSource``).
    """

    batch_size: int = 2_000
    fire_batch: int = 5_000
    publish_batch: int = 16_000
    """At most this many committed transitions published at once (when as many wait). Fenced,
    each partition's share is one atomic batch (up to 999), and the broker's cost is per batch
    more than per message: at the default 32 partitions, 2,000 at once cost it 66-81 us of CPU
    per transition and 16,000 cost it 16 (``python -m scripts.bench.publish``)."""
    max_outbox: int = 50_000
    """Committed transitions waiting to be published beyond which ingestion pauses."""
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    snapshot_interval: float = 60.0
    """Seconds (of the engine's clock) after which changed customers are snapshotted."""
    snapshot_events: int = 200_000
    """Events appended since the last round of snapshots that start the next one sooner."""
    snapshot_batch: int = 5_000
    """At most this many snapshots encoded and written per turn of the loop while a round is
    under way (fewer when writing them would hold the loop for more than about 20 ms)."""
    page_batch: int = 5_000
    """Snapshots loaded per turn of the loop while the engine warms up after a restart."""
    retain: int | None = None
    """Retention (microseconds): events received longer ago than this are cut from the log,
    their customers' facts kept in bases (``store.retention``). None: the log keeps
    everything."""
    retention_interval: float = 600.0
    """Seconds (of the engine's clock) between two moves of the log cut (each moves it as
    far as the retention allows, a part per turn)."""
    retention_batch: int = 1_000
    """Events folded into bases and cut per turn of the loop while the cut moves: each part
    decodes and encodes the bases of its customers, 15-100 us an event on the test machine
    (more for customers with long retained histories), so a part holds the loop for
    15-100 ms."""
    use_snapshots: bool = True
    """False: ignore stored snapshots at start and rebuild every customer from the log."""
    freeze_gc: bool = True
    """Take the objects alive out of the cyclic garbage collector's view (``gc.freeze``)
    once the customers are loaded, after each page loaded while warming up (the collector
    is off while a page decodes), every 20,000 events applied or customers prepared or fired
    (their deadlines), and after each round of snapshots. A million actors are tens of
    millions of objects that live as long as the engine; each full collection walked them
    all: 28 % of ingest time at 1M customers, and pauses of seconds
    (scripts/bench/results/bench/gc-stalls). The cost: cyclic garbage alive at those instants
    (rare: actors hold no cycles) is never collected. Process-wide, as the collector is."""


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started."""

    events_applied: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    events_quarantined: int = 0
    """Events that raised while applied: rejected with the error, their customer restored
    (counted in :attr:`events_rejected` too)."""
    events_parked: int = 0
    """Events logged for a parked customer, to apply when it is unparked."""
    customers_parked: int = 0
    """Customers parked since start (see ``store.parked`` for those parked now)."""
    transitions: int = 0
    transitions_published: int = 0
    deadlines_fired: int = 0
    rebuilt_events: int = 0
    """Events read from the log to rebuild customers (at start: only the tail after the
    snapshots; everything without them)."""
    rebuilt_customers: int = 0
    """Customers made ready at start (the rest load from their snapshots afterwards)."""
    snapshots_loaded: int = 0
    snapshots_ignored: int = 0
    """Snapshots of another format, for other facts, or unreadable: rebuilt from the log."""
    snapshots_written: int = 0
    snapshot_rounds: int = 0
    imports_applied: int = 0
    """Imports whose end marker was applied (their customers rebuilt and reconciled)."""
    imported_events: int = 0
    """Events of imports logged (applied at their import's end)."""


class EngineObserver(Protocol):
    """What an engine tells as it goes, for metrics (``protocol.metrics``).

    Called on the engine's event loop: each call must be quick and must not block. What the
    engine counts anyway (:attr:`Engine.stats`, :attr:`Engine.transition_counts`, ...) is
    not told: read it when wanted.
    """

    def timing_commit(self) -> contextlib.AbstractContextManager[object]:
        """Entered around each store transaction that commits events or transitions."""
        ...

    def deadlines_fired(self, fired_at: int, due: Sequence[int]) -> None:
        """A round of deadlines fired when the engine's clock read ``fired_at``; ``due``
        holds the instant each one was due."""
        ...


SERVE_EVERY = 200
"""Events (or fired customers) of a batch between two turns of the event loop, so queries
wait for a slice of a batch (about 20 ms at 100 us an event), not the whole of it."""


async def breathe(i: int, every: int = 2_000) -> None:
    """Every ``every`` customers (or events) of a long evaluation, let the event loop run:
    nats-py answers the server's pings (a client silent for minutes is dropped) and the
    query service answers. No stop is offered there: the actors are ahead of the log until
    the commit that follows."""
    if i % every == every - 1:
        await anyio.lowlevel.cancel_shielded_checkpoint()


class Wake:
    """Wakes the engine's idle main loop when a request (definitions, a load) arrives."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def reset(self) -> None:
        """Forget a wake already seen (the loop is about to look at every request)."""
        if self._event.is_set():
            self._event = anyio.Event()
