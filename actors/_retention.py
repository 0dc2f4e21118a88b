"""Retention: what a cut event log can still serve, and the customers' *bases*.

With a retention policy (``shoal serve --retain 400d``) the engine cuts the log's events
received longer ago than the retention. Each customer's facts as of the cut are kept first,
as its base (``store.retention``): the customer folded (:meth:`Customer.fold`, no evaluation)
from every event of its own up to the cut. Memberships and versions are not in it: they come
from the outbox, which retention leaves whole, exactly as a rebuild from the whole log takes
them. So a customer rebuilt from its base plus the log after the cut has the facts and the
published state a rebuild from the whole log would give.

The facts a base keeps are those the rules read when the log was first cut (its *needs*,
recorded with the cut), for all time: counts and last instants of event names, traits,
the first instant, the retained track events (windows and scores). What the log no longer
holds cannot be folded again, so definitions that need a fact for all time that the bases
do not keep are refused (:func:`actors.rules.unserved`). A window (``within``) reads only
events received after the cut when it is no longer than the retention, so it needs nothing
of the bases; a longer one is refused whatever the bases keep
(:func:`actors.rules.check_retention`).

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import msgspec

from protocol import Event, InvalidEvent, format_instant
from store import CustomerBase, LoggedEvent, Store

from ._customer import SNAPSHOT_FORMAT, Customer, SnapshotError
from ._stored import event_of
from .rules import Needs, SegmentSet

# The bases' needs ---------------------------------------------------------------------------


class _NeedsRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The facts bases keep, as recorded with the cut (``None`` names: any track event)."""

    event_names: list[str | None]
    trait_keys: list[str]
    retained: list[str | None]
    properties: bool


def _sorted(names: Iterable[str | None]) -> list[str | None]:
    return sorted(names, key=lambda n: (n is not None, n or ""))


def encode_needs(needs: Needs) -> str:
    """The record of the facts bases folded under ``needs`` keep (for ``CutMark.needs``)."""
    return msgspec.json.encode(
        _NeedsRecord(
            event_names=_sorted(needs.event_names),
            trait_keys=sorted(needs.trait_keys),
            retained=_sorted(needs.retained),
            properties=needs.properties,
        )
    ).decode()


def decode_needs(text: str) -> Needs:
    """The needs :func:`encode_needs` recorded.

    Raises:
        ValueError: ``text`` is not such a record.
    """
    try:
        r = msgspec.json.decode(text, type=_NeedsRecord)
    except msgspec.DecodeError as e:
        raise ValueError(f"the facts the retention bases keep cannot be read: {e}") from e
    return Needs(
        event_names=frozenset(r.event_names),
        trait_keys=frozenset(r.trait_keys),
        retained=frozenset(r.retained),
        properties=r.properties,
    )


def common_needs(a: str, b: str) -> str:
    """The record of the facts both bases recorded by ``a`` and by ``b`` keep: the store's
    own bases and those a partition taken over brought (both usually the same, from the
    rules in force at each engine's first cut).

    Raises:
        ValueError: one is not such a record.
    """
    if a == b:
        return a
    x, y = decode_needs(a), decode_needs(b)

    def both(m: frozenset[str | None], n: frozenset[str | None]) -> frozenset[str | None]:
        # None stands for every track event: what the other keeps, when only one has it.
        if None in m and None in n:
            return m | n
        if None in m:
            return n
        if None in n:
            return m
        return m & n

    return encode_needs(
        Needs(
            event_names=both(x.event_names, y.event_names),
            trait_keys=x.trait_keys & y.trait_keys,
            retained=both(x.retained, y.retained),
            properties=x.properties and y.properties,
        )
    )


# Bases ----------------------------------------------------------------------------------------


def base_of(row: CustomerBase) -> Customer:
    """The customer a stored base holds (facts as of the cut; no memberships, version 0).

    Raises:
        SnapshotError: it is of another format, or unreadable.
    """
    if row.format != SNAPSHOT_FORMAT:
        raise SnapshotError(row.customer_id, f"base of format {row.format}")
    return Customer.from_snapshot(row.customer_id, row.body)


def base_row(customer: Customer) -> CustomerBase:
    """The stored base of a customer folded up to the cut."""
    return CustomerBase(
        customer_id=customer.customer_id, format=SNAPSHOT_FORMAT, body=customer.snapshot()
    )


def fold_bases(
    bases: dict[str, Customer], entries: Iterable[LoggedEvent], kept: Needs
) -> dict[str, Customer]:
    """Fold log entries (in log order) into ``bases`` (a customer made for one that has
    none), keeping the facts of ``kept``; return ``bases``.

    Raises:
        StoreError: an entry cannot be read.
        Exception: folding an event raised (nothing says which state is then right).
    """
    segments = SegmentSet((), kept)
    for e in entries:
        c = bases.get(e.customer_id)
        if c is None:
            c = bases[e.customer_id] = Customer(e.customer_id)
        c.fold(event_of(e), segments)
    return bases


def before_cut(event: Event, cut: int) -> InvalidEvent:
    """The rejection of an event stamped at or before the log's cut instant ``cut``: the
    history there is only in the customers' bases, where a repeat of an event cut (a
    producer publishing it again, an import run twice) cannot be told from a new one, so
    taking it could count it twice."""
    return InvalidEvent(
        f"timestamp {format_instant(event.at)} is at or before the event log's cut "
        f"({format_instant(cut)}, retention): history before it is kept only as each "
        "customer's state, where a repeat of an event cut cannot be told from a new one",
        kind="timestamp",
        customer_id=event.customer_id,
        message_id=event.message_id,
    )


async def read_bases(store: Store, *, chunk: int = 10_000) -> AsyncIterator[list[Customer]]:
    """Every customer's base (its facts as of the log's cut; none when the log was never
    cut), in customer order, in lists of up to ``chunk``: what a replay of the log starts
    from (:meth:`actors.Replay.start_from`).

    Raises:
        StoreError: the store cannot be read.
        SnapshotError: a base cannot be read.
    """
    if store.retention.cut is None:
        return
    async for rows in store.retention.read(chunk=chunk):
        yield [base_of(row) for row in rows]
