"""Rebuild and reconcile: bring one customer to what a replay of its log says, publishing
one catch-up transition per membership that differs.

Used when the engine's live state cannot be trusted to equal a replay: after an import
(history arrived out of its time, so the live actor saw it late) and after a definitions
change (the new rules never saw the past). It does no I/O and reads no clock: the caller
gives the customer's logged events, the definitions and the instant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol import DefinitionCause, Event, ImportCause, Transition, from_instant, to_instant

from ._customer import Customer
from ._replay import Replay
from .rules import SegmentSet


@dataclass(frozen=True, slots=True)
class Reconciled:
    """A customer rebuilt from its log, and the catch-up transitions that bring what was
    published to it."""

    customer: Customer
    """The rebuilt actor: its facts, memberships (with the instants they truly began) and
    deadline are a replay's at the instant; its version continues the published one."""
    transitions: list[Transition]
    """One per membership that differs from what was published, in the definitions' order
    (segments no longer defined last, by name): cause as given, ``at`` the instant,
    ``true_since`` from the replay, versions continuing gap-free."""


def reconcile(
    current: Customer | None,
    customer_id: str,
    events: Iterable[Event],
    segments: SegmentSet,
    *,
    now: int,
    cause: ImportCause | DefinitionCause,
    clocks: Iterable[int] | None = None,
    base: Customer | None = None,
) -> Reconciled:
    """Replay a customer's logged events under ``segments`` up to ``now`` (deadlines fired
    up to it, as :class:`Replay` fires them) and reconcile the result with ``current``, the
    customer as the engine published it.

    Args:
        current: the live actor (None: nothing published yet). Only its memberships and
            version are read.
        customer_id: whose log ``events`` is.
        events: every logged event of the customer, in log order.
        segments: the definitions in force.
        now: the instant the reconciliation takes effect (microseconds since the epoch):
            the catch-up transitions' ``at``. An event received after it moves it on to
            its receive instant, so no transition is stamped before what it reports.
        cause: ``ImportCause()`` or ``DefinitionCause()``.
        clocks: for each event, up to which instant a replay of the whole log fired
            deadlines since the customer's previous event (the latest receive instant, less
            1, of the log's entries in between): a log out of receive order (a later import
            of older history) fires the customer's deadlines up to there first, as the
            whole replay does. None: the customer's log alone decides.
        base: the customer's state as of the log's cut (retention), when it has one:
            ``events`` are then those after the cut, and the replay starts from it
            (:meth:`Replay.start_from`: memberships begun before the cut are dated at its
            last event before the cut).

    Returns:
        The rebuilt actor and the catch-up transitions.
    """
    replay = Replay(segments)
    # The last instant each segment stopped holding by the replay: an exit's true_since.
    left: dict[str, int] = {}
    clock_of = iter(clocks) if clocks is not None else None
    if base is not None:
        replay.start_from(base)
    for event in events:
        fired = replay.advance(next(clock_of)) if clock_of is not None else []
        for t in fired + replay.apply(event):
            if t.change == "exited":
                left[t.segment] = _instant(t)
    at = max(now, replay.now or now)
    for t in replay.advance(at):
        if t.change == "exited":
            left[t.segment] = _instant(t)
    rebuilt = replay.customer(customer_id)
    if rebuilt is None:
        rebuilt = Customer(customer_id)
        rebuilt.watermark = at
        rebuilt.evaluate(segments, cause)  # a static list's member, with no events
    was = current.members if current is not None else {}
    version = current.version if current is not None else 0
    now_in = rebuilt.members
    order = list(segments.names) + sorted(s for s in was if s not in segments.names)
    out: list[Transition] = []
    when = from_instant(at)
    for segment in order:
        inside, before = segment in now_in, segment in was
        if inside == before:
            continue
        version += 1
        since = now_in[segment] if inside else left.get(segment, at)
        out.append(
            Transition(
                customer_id=customer_id,
                segment=segment,
                change="entered" if inside else "exited",
                at=when,
                cause=cause,
                version=version,
                true_since=from_instant(since),
            )
        )
    rebuilt.version = version
    return Reconciled(rebuilt, out)


def _instant(t: Transition) -> int:
    return to_instant(t.true_since)
