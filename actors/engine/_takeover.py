"""Partitions changing hands: the cut an owner takes of a partition (its snapshot, for a
next owner), and a new owner's store made ready for a partition it takes over.

A partition's history is its events in ``SHOAL_EVENTS``; what this engine's store holds of
it may be stale (it owned the partition before, and another engine did since) or missing.
So taking a partition over starts from nothing of it in the store: the stale rows go, the
partition's events up to the snapshot's position are logged from the stream (the log holds
each customer's whole history: definitions switches and imports replay it), and the
snapshot's customers are written as the store's snapshots of them. The engine then starts
as after a restart: those customers load from their snapshots, and the partition's
consumer delivers what came after, as backlog.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from actors._customer import SNAPSHOT_FORMAT, Customer
from actors._retention import common_needs
from protocol import NEVER, Delivery, FormatTooNewError, PartitionSnapshot, partition
from store import CustomerBase, CutMark, Forgotten, Snapshot, SnapshotMarks, Store

from ._startup import RebuildReport, log_from_stream

MIXED_DEFINITIONS = "mixed"
"""The snapshot marks' definitions once a partition taken over brought snapshots taken
under other definitions than the store's: no fingerprint, so a start evaluates every
customer."""


@dataclass(frozen=True, slots=True)
class PartitionCut:
    """A partition's customers at a point between two turns of an engine's loop: every
    event of it up to stream position ``through`` applied, none after, and the transitions
    that made committed up to outbox position ``outbox_through``. Publish it as the
    partition's snapshot only once the broker confirmed the outbox that far: a next owner
    publishes only what comes after it."""

    partition: int
    through: int
    outbox_through: int
    taken_at: int
    needs: str
    definitions: str
    customers: list[tuple[str, int, bytes]]
    """Each customer's id, next deadline (``NEVER``: none) and stored form, in id order."""
    forgotten: list[tuple[str, int, int | None, int]] = field(default_factory=list)
    """The partition's forgotten customers (see ``PartitionSnapshot.forgotten``)."""
    caught_up: bool = True
    """False while transitions the broker already holds (the partition's previous owner's)
    are still to be made again: its snapshot must then bound its progress records by the
    snapshot this engine started the partition from, not by its own."""
    bases: list[tuple[str, int, bytes]] = field(default_factory=list)
    """With retention: the bases of the partition's customers (see
    ``PartitionSnapshot.bases``), as of :attr:`bases_through`."""
    bases_through: int = 0
    cut_at: int | None = None
    cut_needs: str | None = None

    def snapshot(
        self,
        *,
        partitions: int,
        progress: int,
        engine: str,
        claim: int,
        definitions_version: int | None = None,
    ) -> PartitionSnapshot:
        """The snapshot to upload, with what the claim's owner knows: ``progress``, the
        sequence of the partition's last progress record stored before the cut."""
        return PartitionSnapshot(
            partition=self.partition,
            partitions=partitions,
            through=self.through,
            progress=progress,
            needs=self.needs,
            definitions=self.definitions,
            definitions_version=definitions_version,
            taken_at=self.taken_at,
            engine=engine,
            claim=claim,
            customer_format=SNAPSHOT_FORMAT,
            customers=self.customers,
            forgotten=self.forgotten,
            bases=self.bases,
            bases_through=self.bases_through,
            cut_at=self.cut_at,
            cut_needs=self.cut_needs,
        )


def cut(
    customers: Iterable[Customer],
    partitions_of: Collection[int],
    *,
    partitions: int,
    through: dict[int, int],
    outbox_through: int,
    taken_at: int,
    needs: str,
    definitions: str,
    stored: dict[str, int] | None = None,
    forgotten: Iterable[Forgotten] = (),
) -> dict[int, PartitionCut]:
    """The cuts of ``partitions_of`` (of ``partitions``) from ``customers`` (all in memory:
    the engine must be warm), each customer's stored form taken now.

    ``stored``: per customer, the last version the broker holds already (see
    ``Outbox.stored``); a customer made again that far is taken out of it, and a partition
    with one not yet is not :attr:`PartitionCut.caught_up`.
    """
    grouped: dict[int, list[tuple[str, int, bytes]]] = {p: [] for p in partitions_of}
    by_id: dict[str, Customer] = {}
    for c in customers:
        by_id[c.customer_id] = c
        mine = grouped.get(partition(c.customer_id, partitions))
        if mine is not None:
            deadline = c.deadline
            mine.append((c.customer_id, NEVER if deadline is None else deadline, c.snapshot()))
    erased: dict[int, list[tuple[str, int, int | None, int]]] = {}
    for f in forgotten:
        if f.partition in grouped:
            erased.setdefault(f.partition, []).append(
                (f.hash, f.floor, f.suppress_until, f.order_seq)
            )
    behind: set[int] = set()
    if stored:
        for customer_id, version in list(stored.items()):
            made = by_id.get(customer_id)
            if made is not None and made.version >= version:
                del stored[customer_id]
            else:
                behind.add(partition(customer_id, partitions))
    return {
        p: PartitionCut(
            partition=p,
            through=through.get(p, 0),
            outbox_through=outbox_through,
            taken_at=taken_at,
            needs=needs,
            definitions=definitions,
            customers=sorted(rows),
            forgotten=sorted(erased.get(p, [])),
            caught_up=p not in behind,
        )
        for p, rows in grouped.items()
    }


async def _adopt_bases(store: Store, partition_id: int, snapshot: PartitionSnapshot) -> None:
    """Make the bases a snapshot carries the store's (the previous owner cut its log, and
    maybe the stream: the partition's history up to ``bases_through`` is in them only), and
    the store's log cut one that holds them: the latest cut instant of the two, the facts
    both keep, and the partition's stream position."""
    if snapshot.cut_at is None or snapshot.cut_needs is None:
        raise ValueError(
            f"the snapshot of partition {partition_id} carries bases without their cut"
        )
    own = store.retention.cut
    mark = CutMark(
        through=0 if own is None else own.through,
        at=snapshot.cut_at if own is None else max(own.at, snapshot.cut_at),
        needs=snapshot.cut_needs if own is None else common_needs(own.needs, snapshot.cut_needs),
        partitions={
            **({} if own is None else own.partitions),
            partition_id: snapshot.bases_through,
        },
    )
    rows = [CustomerBase(customer_id=c, format=f, body=b) for c, f, b in snapshot.bases]
    await store.cut_log(rows, mark)


@dataclass(slots=True)
class TakeoverReport:
    """What :func:`take_over` did."""

    partition: int
    base: int
    """The stream position the partition's consumer starts after."""
    dropped: int = 0
    """Customers of the partition the store held (stale): removed."""
    customers: int = 0
    """Customers written from the snapshot."""
    logged: RebuildReport = field(default_factory=lambda: RebuildReport(through=0))
    """The partition's events logged from the stream, up to ``base``."""


async def take_over(
    store: Store,
    partition_id: int,
    partitions: int,
    snapshot: PartitionSnapshot | None,
    deliveries: AsyncIterable[Sequence[Delivery]],
    *,
    max_event_bytes: int,
    rejected: Collection[int] = (),
    held: Collection[str] | None = None,
) -> TakeoverReport:
    """Make the stopped engine's ``store`` ready to own partition ``partition_id`` from
    ``snapshot`` (None: from the partition's first event).

    The store's rows of the partition's customers are removed, ``deliveries`` (the
    partition's events up to the snapshot's position, in stream order) are logged as the
    engine logs them, and the snapshot's customers become the store's snapshots of them,
    reflecting all of it. The partition's position is the snapshot's: its consumer starts
    after it. ``held``: the customers of the partition the store holds, when the caller
    knows them already (several partitions taken over at once: the store is read once).

    Raises:
        FormatTooNewError: the snapshot's customers are of a later format than this
            shoal's (a newer shoal took it): nothing is changed.
        StoreError: the store cannot be written (run it again: it starts over).
    """
    if snapshot is not None and snapshot.customer_format > SNAPSHOT_FORMAT:
        raise FormatTooNewError(
            f"a customer in the snapshot of partition {partition_id}",
            snapshot.customer_format,
            SNAPSHOT_FORMAT,
        )
    newest = max((f for _, f, _ in snapshot.bases), default=0) if snapshot is not None else 0
    if newest > SNAPSHOT_FORMAT:
        raise FormatTooNewError(
            f"a customer's base in the snapshot of partition {partition_id}",
            newest,
            SNAPSHOT_FORMAT,
        )
    if held is None:
        held = [c for c in await store.customer_ids() if partition(c, partitions) == partition_id]
    stale = sorted(held)
    await store.drop_customers(stale, partitions=[partition_id])
    base = 0 if snapshot is None else snapshot.through
    report = TakeoverReport(partition=partition_id, base=base, dropped=len(stale))
    report.logged.through = base
    if snapshot is None:
        await store.restored(partition_id)
        return report
    # Where the log and the outbox stood: with nothing after the snapshot marks then, the
    # marks can move past what is logged here (see below).
    level = (store.events.last_seq, store.outbox.last_seq)
    logged: set[str] = set()
    orders = {h: order for h, _, _, order in snapshot.forgotten}
    await log_from_stream(
        store,
        deliveries,
        report.logged,
        through=base,
        max_event_bytes=max_event_bytes,
        rejected=rejected,
        customers=logged,
        # A forgotten customer's events before its order: being erased, not its history.
        forgotten=orders,
        # The events the bases hold (the stream may be cut there): not logged again.
        after=snapshot.bases_through,
    )
    if snapshot.bases_through:
        await _adopt_bases(store, partition_id, snapshot)
    if snapshot.forgotten:
        await store.remember_forgotten(
            [
                Forgotten(
                    hash=h,
                    customer_id=None,
                    partition=partition_id,
                    floor=floor,
                    exits=0,
                    at=0,
                    by="",
                    request="",
                    suppress_until=until,
                    order_seq=order,
                    outbox_through=0,
                )
                for h, floor, until, order in snapshot.forgotten
            ]
        )
    log_seq = store.events.last_seq
    rows = [
        Snapshot(
            customer_id=customer_id,
            format=snapshot.customer_format,
            needs=snapshot.needs,
            log_seq=log_seq,
            deadline=deadline,
            body=body,
        )
        for customer_id, deadline, body in snapshot.customers
    ]
    marks = store.snapshots.marks
    if marks is None:
        # A start loads snapshots only after a complete round: a first one, that makes the
        # whole log the tail (what came before it, nothing).
        marks = SnapshotMarks(
            events_through=0,
            outbox_through=0,
            definitions=snapshot.definitions,
            needs=snapshot.needs,
        )
    elif (
        (marks.events_through, marks.outbox_through) == level
        and (marks.definitions, marks.needs) == (snapshot.definitions, snapshot.needs)
        and logged.issubset(r.customer_id for r in rows)
    ):
        # No tail before this partition's events, and the snapshot's customers reflect all
        # of them (a customer with events and no snapshot, one the previous owner parked,
        # must be in the tail: it is rebuilt from the log): no tail after either. A start
        # then loads these customers in deadline order while the engine runs, rather than
        # all of them (and their events) first.
        marks = SnapshotMarks(
            events_through=log_seq,
            outbox_through=marks.outbox_through,
            definitions=marks.definitions,
            needs=marks.needs,
        )
    elif marks.definitions != snapshot.definitions:
        # These rows were taken under other definitions than the store's others: a start
        # must evaluate every customer (it skips those its snapshot reflects all of).
        marks = SnapshotMarks(
            events_through=marks.events_through,
            outbox_through=marks.outbox_through,
            definitions=MIXED_DEFINITIONS,
            needs=marks.needs,
        )
    else:
        marks = None
    await store.commit(
        [],
        [],
        snapshots=rows,
        marks=marks,
        partitions_through={partition_id: base} if base else None,
    )
    await store.restored(partition_id)
    report.customers = len(rows)
    return report
