"""The engine side of the query service: :class:`EngineApi` answers the requests
:func:`protocol.nats.serve_api` decodes, from the engine's in-memory actors.

Everything here reads; only :meth:`EngineApi.definitions` with ``apply`` changes anything,
and it goes through :meth:`Engine.apply_segments` like a reload of the served file, and
:meth:`EngineApi.unpark`, an operator's request to try parked customers again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from anyio import to_thread

from protocol import (
    DAY,
    ApiOrigin,
    CustomerParked,
    CustomerReply,
    DefinitionsReply,
    DefinitionsRequest,
    DefinitionsSuperseded,
    EngineUnavailable,
    EventCounter,
    ExplainReply,
    ExplainRequest,
    InvalidRequest,
    Membership,
    MembersReply,
    MembersRequest,
    Ownership,
    ParkedInfo,
    SearchReply,
    SearchRequest,
    SegmentInfo,
    SegmentSize,
    SegmentsReply,
    StatusReply,
    UnknownCustomer,
    UnknownSegment,
    UnparkReply,
    UnparkRequest,
    format_instant,
    from_instant,
    to_instant,
)
from protocol._api import MAX_PARKED_SHOWN
from store import ParkedCustomer

from ._customer import Customer
from ._errors import ActorsError, DefinitionError, DefinitionsConflict, UnknownSegmentError
from .engine import Engine
from .rules import MISSING, SegmentSet, explain, parse_segments

_SECOND = 1_000_000
_LAST = to_instant(datetime.max.replace(tzinfo=UTC))
"""The last instant a reply can hold: a deadline after it (a trait dated 9999-12-31 plus a
duration) never comes."""


def _definition(s: Any) -> tuple[Any, ...]:
    return (s.rule.text, s.exit.text if s.exit else None, s.min_dwell)


def customer_state(c: Customer, segments: SegmentSet, now: int) -> CustomerReply:
    """What the ``customer`` endpoint answers for actor ``c`` under ``segments`` at ``now``.

    Only the facts the rules read are kept, so those are what it shows: the traits they
    read, and the track events they count or keep (all of them for a score or a window over
    every event). The score is shown when the events it weighs are kept.
    """
    order = {name: i for i, name in enumerate(segments.names)}
    members = sorted(c.members.items(), key=lambda m: (order.get(m[0], len(order)), m[0]))
    needs = segments.needs
    traits: dict[str, Any] = {}
    for key in sorted(needs.trait_keys):
        value = c.trait(key)
        if value is not MISSING:
            traits[key] = value
    tracked = c.tracked()
    counters: list[EventCounter] = []
    for name in sorted(needs.event_names | needs.retained, key=lambda n: (n is not None, n)):
        if None in needs.retained or name in needs.retained:
            ats = [e.at for e in tracked if name is None or e.name == name]
            last = max(ats, default=None)
            counters.append(
                EventCounter(
                    event=name,
                    count=len(ats),
                    last_at=None if last is None else from_instant(last),
                    within_7d=sum(1 for at in ats if now - 7 * DAY < at <= now),
                    within_30d=sum(1 for at in ats if now - 30 * DAY < at <= now),
                )
            )
        else:
            last = c.last_at(name)
            counters.append(
                EventCounter(
                    event=name,
                    count=c.count(name),
                    last_at=None if last is None else from_instant(last),
                )
            )
    first, watermark = c.first_at(), c.watermark
    return CustomerReply(
        customer_id=c.customer_id,
        at=from_instant(now),
        evaluated_at=from_instant(watermark) if first is not None or c.version else None,
        first_seen_at=None if first is None else from_instant(first),
        version=c.version,
        segments=[Membership(segment=s, entered_at=from_instant(at)) for s, at in members],
        score=_score(c, segments, now),
        traits=traits,
        events=counters,
        next_deadline=None
        if c.deadline is None or c.deadline > _LAST
        else from_instant(c.deadline),
    )


def _score(c: Customer, segments: SegmentSet, now: int) -> float | None:
    """The engagement score at ``now`` as SEGMENTS.md defines it, or None when the rules do
    not keep every event it weighs."""
    config, retained = segments.score, segments.needs.retained
    if None not in retained and (
        config.default_weight != 0
        or any(w != 0 and name not in retained for name, w in config.weights.items())
    ):
        return None
    total, half_life = 0.0, config.half_life
    for e in c.tracked():  # in log order, as the rules sum it
        w = config.weight(e.name)
        if w != 0 and e.at <= now:
            total += w * 2.0 ** ((e.at - now) / half_life)
    return total


class EngineApi:
    """Answers the query service's requests from a running :class:`Engine`: it implements
    :class:`protocol.QueryHandler`. Start it with
    ``await tg.start(protocol.nats.serve_api, nc, EngineApi(engine), partitions=...,
    owned=...)``."""

    def __init__(self, engine: Engine, ownership: Callable[[], Ownership] | None = None) -> None:
        """``ownership``: what the engine owns among several, for its status."""
        self._engine = engine
        self._ownership = ownership

    async def _actor(self, customer_id: str) -> Customer:
        engine = self._engine
        c = await engine.load(customer_id) if engine.running else None
        if not engine.running:
            raise EngineUnavailable("the engine is not running (starting or stopping)")
        if c is None:
            parked = engine.parked(customer_id)
            if parked is not None:
                since = format_instant(parked.at)
                raise CustomerParked(customer_id, f"{parked.reason} ({parked.during})", since)
            raise UnknownCustomer(customer_id)
        return c

    def _segment(self, name: str) -> None:
        names = self._engine.segments.names
        if name not in names:
            raise UnknownSegment(name, names)

    async def customer(self, customer_id: str) -> CustomerReply:
        c = await self._actor(customer_id)
        return customer_state(c, self._engine.segments, self._engine.now())

    async def explain(self, customer_id: str, request: ExplainRequest) -> ExplainReply:
        if request.segment is not None:
            self._segment(request.segment)
        c = await self._actor(customer_id)
        now = self._engine.now()
        try:
            explained = explain(c, self._engine.segments, now, request.segment)
        except UnknownSegmentError as e:  # the definitions changed while it loaded
            raise UnknownSegment(e.segment, e.known) from e
        return ExplainReply(customer_id=customer_id, at=from_instant(now), segments=explained)

    async def segments(self) -> SegmentsReply:
        engine = self._engine
        segments, sizes = engine.segments, engine.segment_sizes
        return SegmentsReply(
            source=segments.source,
            fingerprint=segments.fingerprint,
            customers=engine.customer_count,
            complete=engine.warm,
            segments=[
                SegmentInfo(
                    name=s.name,
                    description=s.description,
                    rule=s.rule.text,
                    exit=s.exit.text if s.exit else None,
                    min_dwell_seconds=s.min_dwell / _SECOND,
                    size=sizes[s.name],
                )
                for s in segments.segments
            ],
        )

    async def members(self, request: MembersRequest) -> MembersReply:
        self._segment(request.segment)
        engine = self._engine
        page: list[tuple[str, int]] = []
        more = False
        if not request.count_only:
            page = await engine.members_since(
                request.segment, after=request.cursor, limit=request.limit + 1
            )
            more = len(page) > request.limit
            del page[request.limit :]
        return MembersReply(
            segment=request.segment,
            count=engine.segment_sizes.get(request.segment, 0),
            complete=engine.warm,
            members=[cid for cid, _ in page],
            next_cursor=page[-1][0] if more else None,
            true_since=[from_instant(at) for _, at in page],
        )

    async def search(self, request: SearchRequest) -> SearchReply:
        engine = self._engine
        if not engine.running:
            raise EngineUnavailable("the engine is not running (starting or stopping)")
        found = await engine.search(request.prefix, limit=request.limit + 1)
        return SearchReply(
            prefix=request.prefix,
            customers=found[: request.limit],
            more=len(found) > request.limit,
            complete=engine.warm,
        )

    async def definitions(
        self, request: DefinitionsRequest, *, client: str | None = None
    ) -> DefinitionsReply:
        try:
            # In a worker thread: parsing a file at the limits takes a while; the engine's
            # loop goes on meanwhile. No base_dir: definitions from the network are data, and
            # one naming a list file is refused before anything is read (an old client's
            # base_dir is ignored).
            parse = functools.partial(parse_segments, source=request.source)
            new = await to_thread.run_sync(parse, request.toml)
            # What a cut event log (retention) cannot serve is refused, dry run or not.
            self._engine.check_segments(new)
        except DefinitionError as e:
            raise InvalidRequest(str(e)) from e
        engine = self._engine
        old = engine.segments
        before = {s.name: _definition(s) for s in old.segments}
        transitions: int | None = None
        if request.apply:
            try:
                origin = ApiOrigin(source=request.source, client=client)
                transitions = await engine.apply_segments(new, origin=origin)
            except DefinitionsConflict as e:
                # Not retried on top of the winner: the requester decides, knowing it.
                raise DefinitionsSuperseded(str(e)) from e
            except ActorsError as e:
                raise EngineUnavailable(f"the segments were not applied: {e}") from e
        return DefinitionsReply(
            source=new.source,
            fingerprint=new.fingerprint,
            segments=list(new.names),
            added=[s.name for s in new.segments if s.name not in before],
            removed=[name for name in old.names if name not in new.names],
            changed=[
                s.name
                for s in new.segments
                if s.name in before and before[s.name] != _definition(s)
            ],
            refolds=new.needs != old.needs,
            applied=request.apply,
            transitions=transitions,
        )

    async def status(self) -> StatusReply:
        engine = self._engine
        stats, segments = engine.stats, engine.segments
        nxt = engine.next_deadline
        parked = engine.parked_customers
        return StatusReply(
            at=from_instant(engine.now()),
            consumer=engine.consumer,
            filter_subject=engine.filter_subject,
            warm=engine.warm,
            customers=engine.customer_count,
            events_applied=stats.events_applied,
            events_duplicate=stats.events_duplicate,
            events_rejected=stats.events_rejected,
            events_per_second=round(engine.events_per_second, 1),
            consumer_lag=await engine.consumer_lag(),
            buffered=engine.buffered,
            transitions=stats.transitions,
            unpublished=engine.unpublished,
            deadlines_fired=stats.deadlines_fired,
            pending_deadlines=engine.pending_deadlines,
            next_deadline=None if nxt is None else from_instant(nxt),
            definitions=segments.source,
            fingerprint=segments.fingerprint,
            segments=[SegmentSize(name=n, size=s) for n, s in engine.segment_sizes.items()],
            events_quarantined=stats.events_quarantined,
            parked=len(parked),
            parked_customers=[_parked_info(r) for r in parked[:MAX_PARKED_SHOWN]],
            paused=engine.paused,
            definitions_applied=engine.definitions_applied,
            ownership=None if self._ownership is None else self._ownership(),
            imports_open=engine.open_imports,
            imports_applied=engine.applied_imports,
        )

    async def unpark(self, request: UnparkRequest) -> UnparkReply:
        engine = self._engine
        if not engine.running:
            raise EngineUnavailable("the engine is not running (starting or stopping)")
        ids = list(dict.fromkeys(request.customer_ids))
        not_parked = [i for i in ids if engine.parked(i) is None]
        try:
            unparked = await engine.unpark([i for i in ids if i not in not_parked])
        except ActorsError as e:
            raise EngineUnavailable(f"the customers were not tried again: {e}") from e
        still = [r for r in (engine.parked(i) for i in ids) if r is not None]
        return UnparkReply(
            unparked=unparked,
            parked=[_parked_info(r) for r in still],
            not_parked=not_parked,
        )


def _parked_info(r: ParkedCustomer) -> ParkedInfo:
    return ParkedInfo(
        customer_id=r.customer_id,
        reason=r.reason,
        during=r.during,
        parked_at=from_instant(r.at),
    )
