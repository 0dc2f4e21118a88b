"""Forgetting customers: the orders of ``shoal forget``, acted on in stream order.

An order (``shoal.events.<partition>.ctl.forget``, see ``protocol.ForgetOrder``) is taken
by ingest like an import's marker, between the events before it and those after it. Acting
on it, in one store transaction:

1. the customer's due deadlines fire up to the order's receive instant, then it exits every
   segment it is in (cause ``forgotten``), and the actor is dropped;
2. its events, snapshot and parking are deleted from the store, and its erasure recorded
   by the hash of its id, pending (:class:`store.Forgotten`).

Then :meth:`Forgetting.erase_loop`, beside the main loop, finishes each pending erasure once
the outbox is published through it (its exits are out): the broker's copies first (its
events in ``SHOAL_EVENTS``, its rejections, its transitions but the exits, erased one
message at a time, see ``protocol.nats.BrokerEraser``), then what :data:`Erased` does (the
partition's snapshot replaced), then its order (whose absence tells the requester it is
done), and last its rows of the outbox and the id in the record, with a checkpoint that
truncates SQLite's write-ahead log. Redone after a crash: every step finds what is left.

What is kept: the hash, the customer's last version (``floor``: an id that comes back
continues from it), when, who asked, which request, and until when its events are refused
(``--suppress``). Those refusals name the hash only, and their messages are erased too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import structlog

from actors._clock import Clock
from actors._customer import Customer
from actors._stored import transition_of
from protocol import (
    SECOND,
    ApiError,
    BrokerError,
    Delivery,
    Event,
    ForgottenCause,
    InvalidEvent,
    Transition,
    decode_forget_order,
    forget_hash,
    format_instant,
    partition,
)
from store import Forgotten, Store, StoreError

from ._outbox import Outbox, positions
from ._parking import Parking
from ._partition import Partition
from ._recovery import Recovery

_RETRY = 5.0
"""Seconds before trying a failed erasure again."""


class Eraser(Protocol):
    """Where the broker's copies of a forgotten customer are erased (``protocol.nats``'s
    ``BrokerEraser``); without one (tests of the engine's logic), only the store's are."""

    async def erase_customers(self, erasures: Sequence[tuple[str, int, int]]) -> None:
        """Erase each (customer id, partition, order position): its events before the
        order, its rejections, and its transitions but the ``forgotten`` exits."""
        ...

    async def erase_events(self, sequences: Sequence[int]) -> None:
        """Erase these messages of the events stream (orders done, refused events of
        suppressed ids)."""
        ...


Erased = Callable[[dict[int, set[str]]], Awaitable[None]]
"""Told, per partition, the customers whose erasure just finished (to replace the
partition's snapshot in the Object Store, and erase the progress records naming them)."""


class Forgetting:
    """The forgotten customers of an engine: acting on orders, refusing suppressed ids,
    finishing erasures."""

    def __init__(
        self,
        store: Store,
        partition_: Partition,
        recovery: Recovery,
        outbox: Outbox,
        parking: Parking,
        partitions: int,
        clock: Clock,
        eraser: Eraser | None = None,
        on_erased: Erased | None = None,
    ) -> None:
        self._store = store
        self._partition = partition_
        self._recovery = recovery
        self._outbox = outbox
        self._parking = parking
        self._partitions = partitions
        self._clock = clock
        self._eraser = eraser
        self._on_erased = on_erased
        self._suppressed: dict[str, int] = {}
        self._refused: list[int] = []
        self._wake = anyio.Event()
        self._logger = structlog.get_logger("shoal.engine")
        for f in store.forgotten.all():
            self._partition.floors[f.hash] = f.floor
            if f.suppress_until is not None:
                self._suppressed[f.hash] = f.suppress_until

    # Refusing suppressed ids -------------------------------------------------------------

    def refusal(self, event: Event) -> tuple[InvalidEvent, str] | None:
        """Why ``event`` is refused (its customer was forgotten with a suppression that
        lasts past its receive instant), with the subject its rejection is published under
        (``forgotten:<hash>``: never the id); None when it is not."""
        if not self._suppressed:
            return None
        digest = forget_hash(event.customer_id)
        until = self._suppressed.get(digest)
        if until is None or event.received >= until:
            return None
        refused = InvalidEvent(
            f"the customer was forgotten with its events refused until {format_instant(until)} "
            f"(id hash sha256:{digest})",
            kind="suppressed",
        )
        return refused, f"forgotten:{digest}"

    def erase_later(self, sequence: int) -> None:
        """Erase this refused message of a suppressed id from the events stream, once its
        batch is acknowledged."""
        self._refused.append(sequence)
        self._wake.set()

    # Acting on an order ------------------------------------------------------------------

    async def order(self, d: Delivery) -> InvalidEvent | None:
        """Act on an order to forget (see the module's documentation); the reason it is
        refused (not an order, or not for this partition), or None once done."""
        try:
            order = decode_forget_order(d.data)
        except ApiError as e:
            return InvalidEvent(e.message, kind="forget")
        customer_id = order.customer_id
        actual = partition(customer_id, self._partitions)
        if d.partition is not None and d.partition != actual:
            return InvalidEvent(
                f"an order to forget a customer of partition {actual} was published in "
                f"partition {d.partition}",
                kind="forget",
            )
        digest = forget_hash(customer_id)
        p, store, at = self._partition, self._store, d.received
        known = store.forgotten.get(digest)
        if known is not None and known.order_seq == d.stream_sequence:
            # Acted on already (delivered again after a restart): only its position.
            await self._outbox.commit(
                [], [], stream_through=d.stream_sequence, partitions_through=positions((d,))
            )
            return None
        transitions: list[Transition] = []
        c: Customer | None
        if customer_id in self._parking:
            # Parked: its memberships are the ones published.
            c = Customer(customer_id)
            c.restore(transition_of(o) for o in await store.outbox.of_customers([customer_id]))
        else:
            if customer_id not in p.customers and not self._recovery.warm:
                transitions += await self._recovery.load([customer_id], {}, {})
            c = p.customers.get(customer_id)
        exits: list[Transition] = []
        if c is not None:
            exits = c.forget(at, p.segments)
            floor = c.version
        else:
            floor = p.floors.get(digest, 0)
        p.drop(customer_id)
        transitions += exits
        suppress = order.suppress_seconds
        record = Forgotten(
            hash=digest,
            customer_id=customer_id,
            partition=actual,
            floor=floor,
            exits=sum(1 for t in exits if isinstance(t.cause, ForgottenCause)),
            at=at,
            by=order.by,
            request=order.request,
            suppress_until=None if suppress is None else at + suppress * SECOND,
            order_seq=d.stream_sequence,
            outbox_through=0,
        )
        await self._outbox.commit(
            [],
            transitions,
            stream_through=d.stream_sequence,
            partitions_through=positions((d,)),
            forget=[record],
        )
        p.floors[digest] = floor
        if record.suppress_until is not None:
            self._suppressed[digest] = record.suppress_until
        self._logger.info(
            "customer forgotten: its data is being erased",
            id_hash=digest,
            request=order.request,
            by=order.by,
            exits=record.exits,
            version=floor,
            suppressed_until=None
            if record.suppress_until is None
            else format_instant(record.suppress_until),
        )
        self._wake.set()
        return None

    # Finishing erasures ------------------------------------------------------------------

    async def erase_loop(self) -> None:
        """Finish pending erasures once their transitions are published, and erase refused
        messages, until cancelled."""
        while True:
            self._wake = anyio.Event()
            try:
                await self._step()
            except (BrokerError, StoreError) as e:
                self._logger.warning("erasure not finished; will retry", error=str(e))
                with anyio.move_on_after(_RETRY):
                    await self._wake.wait()
                continue
            with anyio.move_on_after(1.0):
                await self._wake.wait()

    async def _step(self) -> None:
        if self._refused:
            refused = list(self._refused)
            if self._eraser is not None:  # none: the source keeps no events (in memory)
                await self._eraser.erase_events(refused)
            del self._refused[: len(refused)]
        published = self._outbox.confirmed_through
        ready = [f for f in self._store.forgotten.pending() if f.outbox_through <= published]
        if not ready:
            return
        if self._eraser is not None:
            await self._eraser.erase_customers(
                [(f.customer_id or "", f.partition, f.order_seq) for f in ready]
            )
        if self._on_erased is not None:
            by_partition: dict[int, set[str]] = {}
            for f in ready:
                by_partition.setdefault(f.partition, set()).add(f.customer_id or "")
            await self._on_erased(by_partition)
        if self._eraser is not None:
            # The orders last: one gone tells the requester its erasure is done.
            await self._eraser.erase_events([f.order_seq for f in ready])
        await self._store.erase(ready)
        self._logger.info("customers erased", id_hashes=[f.hash for f in ready])

    @property
    def pending(self) -> int:
        """How many erasures are under way."""
        return len(self._store.forgotten.pending())
