"""A customer's membership history: when it was in each segment, and why.

A customer's transitions, from the outbox (what the engine published) or from a replay of
its events in the log, become membership intervals per segment: entered at, exited at (or
still a member), and the cause of each end. "Was X in S at T" is answered by reading them.
:func:`membership_intervals` and :func:`memberships_at` are pure; :func:`outbox_history`,
:func:`replayed_history` and :func:`known_customer` read a store.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from protocol import Cause, Transition
from store import Store

from ._replay import Replay, replay
from ._retention import base_of
from ._stored import event_of, transition_of
from .rules import SegmentSet


class Interval(msgspec.Struct, frozen=True, kw_only=True):
    """One stay of a customer in a segment: from ``entered_at`` until just before
    ``exited_at`` (None: still a member when the history ends)."""

    customer_id: str
    segment: str
    entered_at: datetime
    entered_by: Cause
    entered_version: int
    exited_at: datetime | None = None
    exited_by: Cause | None = None
    exited_version: int | None = None

    def holds(self, at: datetime) -> bool:
        """Whether the customer was a member at ``at`` (an aware datetime): in from the
        instant it entered, out from the instant it left."""
        return self.entered_at <= at and (self.exited_at is None or at < self.exited_at)


class MembershipAt(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a customer was in a segment at an instant, and the stay that covers it."""

    customer_id: str
    segment: str
    at: datetime
    member: bool
    interval: Interval | None
    """The stay ``at`` falls in (None when not a member)."""


def membership_intervals(transitions: Iterable[Transition]) -> list[Interval]:
    """The membership intervals that transitions describe.

    Args:
        transitions: each customer's transitions, complete from its version 1 (an outbox,
            or a replay); in any order, as they are taken in version order per customer.

    Returns:
        The intervals, ordered by customer, segment and entry.

    Raises:
        ValueError: they are not a consistent history (an entry into a segment the customer
            is in, or an exit from one it is not in).
    """
    current: dict[tuple[str, str], Interval] = {}
    out: list[Interval] = []
    for t in sorted(transitions, key=lambda t: (t.customer_id, t.version)):
        key = (t.customer_id, t.segment)
        stay = current.pop(key, None)
        if t.change == "entered":
            if stay is not None:
                raise ValueError(
                    f"customer {t.customer_id!r} enters {t.segment!r} at version {t.version} "
                    f"but is in it since version {stay.entered_version}"
                )
            current[key] = Interval(
                customer_id=t.customer_id,
                segment=t.segment,
                entered_at=t.at,
                entered_by=t.cause,
                entered_version=t.version,
            )
        else:
            if stay is None:
                raise ValueError(
                    f"customer {t.customer_id!r} leaves {t.segment!r} at version {t.version} "
                    "but is not in it"
                )
            out.append(
                msgspec.structs.replace(
                    stay, exited_at=t.at, exited_by=t.cause, exited_version=t.version
                )
            )
    out += current.values()
    out.sort(key=lambda i: (i.customer_id, i.segment, i.entered_version))
    return out


def memberships_at(intervals: Iterable[Interval], at: datetime) -> list[MembershipAt]:
    """Whether each customer was in each of its segments at ``at`` (an aware datetime).

    Returns:
        One answer per customer and segment that has an interval, ordered by customer and
        segment. A segment the customer was never in has none: the answer there is no.
    """
    found: dict[tuple[str, str], Interval | None] = {}
    for i in intervals:
        key = (i.customer_id, i.segment)
        if i.holds(at):
            found[key] = i
        else:
            found.setdefault(key, None)
    return [
        MembershipAt(customer_id=c, segment=s, at=at, member=i is not None, interval=i)
        for (c, s), i in sorted(found.items())
    ]


async def outbox_history(store: Store, customer_id: str) -> list[Transition]:
    """What the engine published for ``customer_id`` (its outbox), in version order.

    Raises:
        StoreError: the outbox cannot be read.
    """
    return [transition_of(o) for o in await store.outbox.of_customers([customer_id])]


async def replayed_history(
    store: Store, customer_id: str, segments: SegmentSet, *, until: int
) -> list[Transition]:
    """The transitions of replaying ``customer_id``'s events from the log under
    ``segments`` (:func:`actors.replay`), events received after ``until`` left out, and
    deadlines fired up to ``until``.

    Customers are independent, so one customer replayed alone gives the transitions a
    replay of the whole log gives it: for a log a live engine wrote, those the engine
    published (except for definition changes, and static-list customers without events).

    When the log was cut (retention), the replay starts from the customer's base, its state
    then (:meth:`Replay.start_from`): its memberships then come first, as entries (cause
    ``definition``) at its last event before the cut.

    Raises:
        StoreError: the log cannot be read.
        SnapshotError: the customer's base cannot be read.
    """
    events = [event_of(e) for e in await store.events.of_customers([customer_id])]
    if store.retention.cut is None:
        return list(replay((e for e in events if e.received <= until), segments, until=until))
    r = Replay(segments)
    out: list[Transition] = []
    for row in await store.retention.of([customer_id]):
        # The memberships at the cut, as entries (cause ``definition``) at its last event
        # before the cut: the exits after them then close them.
        out += r.start_from(base_of(row))
    for e in events:
        if e.received <= until:
            out += r.apply(e)
    out += r.advance(until)
    return out


async def known_customer(store: Store, customer_id: str) -> bool:
    """Whether the store holds an event or a transition of ``customer_id``."""
    return bool(
        await store.outbox.of_customers([customer_id])
        or await store.events.of_customers([customer_id])
        or (store.retention.cut is not None and await store.retention.of([customer_id]))
    )
