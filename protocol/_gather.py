"""Gathered replies: ``segments``, ``members``, ``search`` and ``status`` reach every engine,
and each engine answers for the partitions it owns. This module merges their replies into
one answer; it knows nothing of NATS (:class:`protocol.nats.ApiClient` collects them).

A reply says which partitions it covers and how many there are (``partition_count``, P).
The answer is complete once every partition ``0..P-1`` is covered; the partitions no engine
answered for are reported (``missing_partitions``), and the answer is then marked incomplete.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Generic, Protocol, TypeVar

import msgspec

from ._api import (
    MAX_PARKED_SHOWN,
    GatheredStatus,
    MembersReply,
    SearchReply,
    SegmentSize,
    SegmentsReply,
    StatusReply,
    UnparkReply,
)
from ._errors import ApiError, EnginesDisagree
from ._partitions import partition


class _Covering(Protocol):
    @property
    def partition_count(self) -> int | None: ...

    @property
    def partitions(self) -> list[int]: ...


_C = TypeVar("_C", bound=_Covering)


def partition_ranges(partitions: Iterable[int]) -> str:
    """``partitions`` as runs, for people: ``[0, 1, 2, 5, 7, 8]`` gives ``0-2, 5, 7-8``."""
    runs: list[list[int]] = []
    for p in sorted(set(partitions)):
        if runs and runs[-1][1] == p - 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Gathering(Generic[_C]):
    """The replies to one gathered request, as they come in.

    :meth:`add` takes each reply; :attr:`done` says whether every partition is covered.
    A reply from an engine older than API 1.2 (no ``partition_count``) covers every
    partition: such an engine owns them all. A reply that covers no partition not already
    covered (two engines answering for the same partitions, while one takes over from the
    other) is left out, so that nothing is counted twice.
    """

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.replies: list[_C] = []
        self.partition_count: int | None = None
        self._covered: set[int] = set()
        self._everything = False

    def add(self, reply: _C) -> None:
        """Take one engine's reply.

        Raises:
            ApiError: the engines disagree on the number of partitions.
        """
        count = reply.partition_count
        if count is None:
            self.replies = [reply]
            self._everything = True
            return
        if self.partition_count is not None and count != self.partition_count:
            raise ApiError(
                f"the engines answering on {self.subject} disagree on the number of "
                f"partitions ({self.partition_count} and {count}): each must serve the same "
                "SHOAL_EVENTS"
            )
        self.partition_count = count
        new = set(reply.partitions) - self._covered
        if not new:
            return
        self._covered |= new
        self.replies.append(reply)

    @property
    def done(self) -> bool:
        """Whether every partition has been answered for."""
        if self._everything:
            return True
        count = self.partition_count
        return count is not None and len(self._covered & set(range(count))) == count

    @property
    def covered(self) -> list[int]:
        """The partitions answered for, in order."""
        if self._everything:
            return []
        return sorted(self._covered)

    @property
    def missing(self) -> list[int]:
        """The partitions no engine answered for, in order."""
        if self._everything or self.partition_count is None:
            return []
        return sorted(set(range(self.partition_count)) - self._covered)

    def ordered(self) -> list[_C]:
        """The replies kept, in the order of their lowest partition."""
        return sorted(self.replies, key=lambda r: min(r.partitions, default=-1))


def merge_segments(g: Gathering[SegmentsReply]) -> SegmentsReply:
    """One ``segments`` answer from every engine's: the definitions of any one (they must
    agree), the sizes and customers summed.

    Raises:
        EnginesDisagree: the engines hold different definitions (an apply reaches them one
            at a time: ask again).
    """
    replies = g.ordered()
    by_fingerprint: dict[str, list[int]] = {}
    for r in replies:
        by_fingerprint.setdefault(r.fingerprint, []).extend(r.partitions)
    if len(by_fingerprint) > 1:
        raise EnginesDisagree(
            {f: partition_ranges(ps) for f, ps in by_fingerprint.items()}, g.subject
        )
    first = replies[0]
    sizes: dict[str, int] = {}
    for r in replies:
        for s in r.segments:
            sizes[s.name] = sizes.get(s.name, 0) + s.size
    return msgspec.structs.replace(
        first,
        customers=sum(r.customers for r in replies),
        complete=all(r.complete for r in replies) and not g.missing,
        segments=[msgspec.structs.replace(s, size=sizes[s.name]) for s in first.segments],
        partition_count=g.partition_count,
        partitions=g.covered,
        missing_partitions=g.missing,
    )


def _frontier(ends: Sequence[str | None]) -> str | None:
    """The last id below which every engine's page is whole: the least of the last ids of
    the pages that stopped short (None when none did). An id above it may come after ids
    an engine left for its next page, so it waits for the next page too."""
    cut = [e for e in ends if e is not None]
    return min(cut) if cut else None


def merge_members(g: Gathering[MembersReply], limit: int) -> MembersReply:
    """One page of members from every engine's page of the same request: each engine sent
    its first ``limit`` members after the cursor, in id order; the page keeps the first
    ``limit`` of them all (and none past the end of a page that stopped short), and its
    ``next_cursor`` is the last id kept when any engine has more."""
    replies = g.ordered()
    frontier = _frontier([r.members[-1] if r.next_cursor is not None else None for r in replies])
    rows: list[tuple[str, datetime | None]] = []
    for r in replies:
        # An engine older than API 1.1 sends no true_since.
        since: list[datetime | None] = [*r.true_since] or [None] * len(r.members)
        rows += [
            (cid, at)
            for cid, at in zip(r.members, since, strict=True)
            if frontier is None or cid <= frontier
        ]
    rows.sort(key=lambda row: row[0])
    more = frontier is not None or len(rows) > limit
    del rows[limit:]
    first = replies[0]
    return msgspec.structs.replace(
        first,
        count=sum(r.count for r in replies),
        complete=all(r.complete for r in replies) and not g.missing,
        members=[cid for cid, _ in rows],
        true_since=[since for _, since in rows if since is not None],
        next_cursor=rows[-1][0] if more and rows else None,
        partition_count=g.partition_count,
        partitions=g.covered,
        missing_partitions=g.missing,
    )


def merge_search(g: Gathering[SearchReply], limit: int) -> SearchReply:
    """One search answer from every engine's: the first ``limit`` ids of them all in id
    order (and none past the last id of an engine that has more), ``more`` when any
    engine or the merge left ids out."""
    replies = g.ordered()
    frontier = _frontier([r.customers[-1] if r.more and r.customers else None for r in replies])
    ids = sorted(cid for r in replies for cid in r.customers if frontier is None or cid <= frontier)
    more = frontier is not None or any(r.more for r in replies) or len(ids) > limit
    return msgspec.structs.replace(
        replies[0],
        customers=ids[:limit],
        more=more,
        complete=all(r.complete for r in replies) and not g.missing,
        partition_count=g.partition_count,
        partitions=g.covered,
        missing_partitions=g.missing,
    )


def merge_status(g: Gathering[StatusReply]) -> GatheredStatus:
    """Every engine's status, and their counts combined (see :class:`GatheredStatus`)."""
    replies = g.ordered()
    first = replies[0]
    sizes: dict[str, int] = {}
    for r in replies:
        for s in r.segments:
            sizes[s.name] = sizes.get(s.name, 0) + s.size
    lags = [r.consumer_lag for r in replies]
    deadlines = [r.next_deadline for r in replies if r.next_deadline is not None]
    parked = sorted((p for r in replies for p in r.parked_customers), key=lambda p: p.customer_id)
    fields = {f: getattr(first, f) for f in first.__struct_fields__}
    fields.update(
        warm=all(r.warm for r in replies),
        customers=sum(r.customers for r in replies),
        events_applied=sum(r.events_applied for r in replies),
        events_duplicate=sum(r.events_duplicate for r in replies),
        events_rejected=sum(r.events_rejected for r in replies),
        events_per_second=round(sum(r.events_per_second for r in replies), 1),
        consumer_lag=None if None in lags else sum(lag for lag in lags if lag is not None),
        buffered=sum(r.buffered for r in replies),
        transitions=sum(r.transitions for r in replies),
        unpublished=sum(r.unpublished for r in replies),
        deadlines_fired=sum(r.deadlines_fired for r in replies),
        pending_deadlines=sum(r.pending_deadlines for r in replies),
        next_deadline=min(deadlines, default=None),
        segments=[SegmentSize(name=n, size=s) for n, s in sizes.items()],
        events_quarantined=sum(r.events_quarantined for r in replies),
        parked=sum(r.parked for r in replies),
        parked_customers=parked[:MAX_PARKED_SHOWN],
        paused=next((r.paused for r in replies if r.paused), None),
        imports_open=sorted({i for r in replies for i in r.imports_open}),
        imports_applied=list(dict.fromkeys(i for r in replies for i in r.imports_applied)),
        partition_count=g.partition_count,
        partitions=g.covered,
        missing_partitions=g.missing,
    )
    return GatheredStatus(**fields, engines=replies, complete=not g.missing)


def merge_unpark(g: Gathering[UnparkReply], customer_ids: Sequence[str]) -> UnparkReply:
    """One ``unpark`` answer from every engine's (each tried the ids of its partitions):
    the lists joined, in the order of ``customer_ids``; the ids of the partitions no engine
    answered for are ``unanswered``."""
    replies = g.ordered()
    order = {c: i for i, c in reversed(list(enumerate(customer_ids)))}

    def ordered(ids: Iterable[str]) -> list[str]:
        return sorted(set(ids), key=lambda c: order.get(c, len(order)))

    parked = {p.customer_id: p for r in replies for p in r.parked}
    missing = set(g.missing)
    count = g.partition_count
    return UnparkReply(
        unparked=ordered(c for r in replies for c in r.unparked),
        parked=[parked[c] for c in ordered(parked)],
        not_parked=ordered(c for r in replies for c in r.not_parked),
        partition_count=count,
        partitions=g.covered,
        missing_partitions=g.missing,
        unanswered=[]
        if count is None or not missing
        else ordered(c for c in customer_ids if partition(c, count) in missing),
    )
