"""Explanations: why a customer is or is not in a segment, and when that next changes.

Pure: no I/O, no clock. The customer is not changed. Its next changes are found by running
a copy of it (from its snapshot) on with no new event, deadline after deadline, through the
engine's own :meth:`Customer.advance`: so ``next_change`` is the instant the engine changes
the membership (exit, ``min_dwell``, referenced segments and all), not merely the first
instant a rule may change. Each segment runs with only the segments it reads. A condition's
next change is found the same way, stepping its own "next instant it may change" with the
same facts (and memberships from that run) until its value differs.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

import msgspec

from actors._errors import UnknownSegmentError
from protocol import DAY, HOUR, MINUTE, SECOND, format_instant, to_instant
from protocol._explain import ConditionExplanation, SegmentExplanation

from ._conditions import Condition, Operand
from ._dates import LocalFilter
from ._facts import MISSING, Indexed, Tracked, earliest
from ._scores import ScoreConfig, ScoreTerms
from ._segments import Segment, SegmentSet

if TYPE_CHECKING:
    # Only for annotations: the customer module imports the rules, not the other way.
    from actors._customer import Customer

MAX_STEPS = 10_000
"""How many instants a search for a next change looks at (per segment: deadlines the copy
fires; per condition: its own next instants) before it gives up and says how far it looked
(``horizon``). Each is an evaluation, a few microseconds to a few tens; a customer needs
that many only when that many events leave a window one by one without changing anything."""


def explain(
    customer: Customer,
    segments: SegmentSet,
    now: int,
    segment: str | None = None,
    *,
    max_steps: int = MAX_STEPS,
) -> list[SegmentExplanation]:
    """Explain a customer's membership of one segment, or of each (in file order).

    For each segment: whether the customer is a member (``customer.members``), the value of
    each condition of its rule and exit at ``now`` and which of them decide, the state of
    ``min_dwell``, and the exact next instant the membership changes if no new event comes.

    Args:
        customer: the actor (read only: it is not changed).
        segments: the definitions the customer is evaluated under.
        now: the instant to evaluate at, in microseconds since the epoch; the customer's
            watermark when that is later (its facts are as of its watermark).
        segment: the segment to explain; None: every segment.
        max_steps: how many instants a search for a next change may look at. When one
            stops short, the explanation's ``horizon`` says how far it looked.

    Raises:
        UnknownSegmentError: ``segment`` is not defined in ``segments``.
    """
    if segment is not None and segment not in segments.names:
        raise UnknownSegmentError(segment, segments.names)
    chosen = [s for s in segments.segments if segment is None or s.name == segment]
    at = max(now, customer.watermark)
    state = customer.snapshot()
    out = []
    for seg in chosen:
        # Each segment on its own (with those it reads): a segment whose deadlines come thick
        # and fast does not use up the steps of the others.
        watch = {seg.name, *seg.refs}
        future = _Future.run(customer, state, _needed(segments, watch), watch, max_steps)
        out.append(_Explainer(future, at, max_steps).segment(seg, customer))
    return out


def _needed(segments: SegmentSet, names: set[str]) -> SegmentSet:
    """The segments of ``names`` and those they reference, transitively: all that decides
    their memberships. Running only these skips the other segments' deadlines, which
    change nothing for them (a segment's own next instants are never late)."""
    by_name = {s.name: s for s in segments.segments}
    todo, keep = list(names), set()
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].refs)
    if len(keep) == len(by_name):
        return segments
    return SegmentSet.of(
        [s for s in segments.segments if s.name in keep],
        source=segments.source,
        score=segments.score,
        lists=segments.lists,
    )


class _Future(Indexed):
    """A copy of a customer run on with no new event: its facts (the same as the
    customer's), and each segment's membership at any instant up to ``known_until``."""

    __slots__ = (
        "customer_id",
        "_copy",
        "_start",
        "_segments",
        "_steps_left",
        "changes",
        "known_until",
        "t",
    )

    def __init__(
        self,
        copy: Customer,
        start: dict[str, int],
        segments: SegmentSet,
        steps_left: int,
        changes: dict[str, list[int]],
    ) -> None:
        self.customer_id: str = copy.customer_id
        self._copy = copy
        self._start = start
        self._segments = segments
        self._steps_left = steps_left
        self.changes = changes
        """Segment -> the instants its membership changes, in order."""
        self.known_until = _known_until(copy)
        """Memberships are known up to this instant (None: for good)."""
        self.t = 0
        """The instant :meth:`member` answers for."""

    def extend(self) -> bool:
        """Run the copy on by one more deadline (memberships become known further); False
        when the search may look at no more instants, or all is known already."""
        copy = self._copy
        if self.known_until is None or self._steps_left <= 0:
            return False
        assert copy.deadline is not None
        for t in copy.advance(copy.deadline, self._segments):
            self.changes.setdefault(t.segment, []).append(to_instant(t.at))
        self._steps_left -= 1
        self.known_until = _known_until(copy)
        return True

    @classmethod
    def run(
        cls,
        customer: Customer,
        state: bytes,
        segments: SegmentSet,
        watch: set[str],
        max_steps: int,
    ) -> _Future:
        """Run a copy of ``customer`` (made from its snapshot ``state``) on, deadline after
        deadline, until each segment of ``watch`` has changed, no deadline is left, or
        ``max_steps`` deadlines have fired."""
        copy = type(customer).from_snapshot(customer.customer_id, state)
        future = cls(copy, dict(customer.members), segments, max_steps, {})
        while not watch <= future.changes.keys() and future.extend():
            pass
        return future

    def next_member_change(self, names: Iterable[str], after: int) -> int | None:
        """The first instant after ``after`` at which one of ``names`` changes (known)."""
        nxt: int | None = None
        for name in names:
            ats = self.changes.get(name, ())
            i = bisect_right(ats, after)
            if i < len(ats):
                nxt = earliest(nxt, ats[i])
        return nxt

    # Facts, as the rules read them: the copy's, and memberships as of ``t``.

    def first_at(self) -> int | None:
        return self._copy.first_at()

    def last_at(self, name: str | None) -> int | None:
        return self._copy.last_at(name)

    def count(self, name: str | None) -> int:
        return self._copy.count(name)

    def trait(self, key: str) -> Any:
        return self._copy.trait(key)

    def tracked(self) -> Sequence[Tracked]:
        return self._copy.tracked()

    def member(self, segment: str) -> bool:
        flips = bisect_right(self.changes.get(segment, ()), self.t)
        return (segment in self._start) != (flips % 2 == 1)

    def instants(self, name: str | None) -> Sequence[int]:
        return self._copy.instants(name)

    def local_counts(self, name: str | None, zone: tzinfo, where: LocalFilter) -> Sequence[int]:
        return self._copy.local_counts(name, zone, where)

    def score_terms(self, config: ScoreConfig) -> ScoreTerms:
        return self._copy.score_terms(config)


class _Explainer:
    def __init__(self, future: _Future, at: int, max_steps: int) -> None:
        self.future = future
        self.at = at
        self.max_steps = max_steps
        self.horizon: int | None = None  # the earliest instant a search stopped short at

    def segment(self, seg: Segment, customer: Customer) -> SegmentExplanation:
        self.horizon = None
        at = self.at
        entered = customer.members.get(seg.name)
        member = entered is not None
        rule_value = self.value(seg.rule.condition)
        exit_value = self.value(seg.exit.condition) if seg.exit is not None else None
        earliest_exit: int | None = None
        held = False
        if entered is not None:
            # The leave condition decides: the exit, or else the rule not holding.
            rule_decides = seg.exit is None
            exit_decides = seg.exit is not None
            leave = exit_value if exit_value is not None else not rule_value
            first_out = entered + max(1, seg.min_dwell)  # never out the instant it came in
            if at < first_out:
                earliest_exit = first_out
                held = leave
        else:
            # Out while the rule is false, or while it holds but so does the exit.
            rule_decides = True
            exit_decides = bool(rule_value and exit_value)
        rule = self.condition(seg.rule.condition, rule_decides)
        exit_ = self.condition(seg.exit.condition, exit_decides) if seg.exit is not None else None
        changes = self.future.changes.get(seg.name)
        nxt = changes[0] if changes else None
        if nxt is None and self.future.known_until is not None:
            self.note_horizon(self.future.known_until)
        return SegmentExplanation(
            segment=seg.name,
            member=member,
            entered_at=_instant(entered),
            evaluated_at=format_instant(at),
            rule=rule,
            exit=exit_,
            min_dwell=_duration(seg.min_dwell) if seg.min_dwell else None,
            earliest_exit=_instant(earliest_exit),
            held_by_min_dwell=held,
            next_change=_instant(nxt),
            horizon=_instant(self.horizon),
            reason=_reason(
                member,
                entered,
                rule,
                exit_,
                held,
                seg.min_dwell,
                earliest_exit,
                nxt,
                self.horizon,
                at,
            ),
        )

    def note_horizon(self, t: int) -> None:
        self.horizon = t if self.horizon is None else min(self.horizon, t)

    def value(self, c: Condition) -> bool:
        self.future.t = self.at
        return c.evaluate(self.future, self.at)[0]

    def condition(self, c: Condition, decides: bool) -> ConditionExplanation:
        value = self.value(c)
        nxt = self.next_flip(c, value)
        kind = c.kind
        if kind == "and" or kind == "or":
            # A part decides if its own value settles the result (false in an and, true in
            # an or), or when none does and so every part is needed.
            settling = kind == "or"
            parts = c.children
            values = [self.value(p) for p in parts]
            any_settles = settling in values
            children = tuple(
                self.condition(p, decides and (v == settling or not any_settles))
                for p, v in zip(parts, values, strict=True)
            )
            return ConditionExplanation(
                text=c.text,
                kind=kind,
                value=value,
                decides=decides,
                next_change=_instant(nxt),
                children=children,
            )
        if kind == "not":
            return ConditionExplanation(
                text=c.text,
                kind="not",
                value=value,
                decides=decides,
                next_change=_instant(nxt),
                children=(self.condition(c.children[0], decides),),
            )
        op, left, right = self.sides(c)
        return ConditionExplanation(
            text=c.text,
            kind="condition",
            value=value,
            decides=decides,
            op=op,
            left=left,
            right=right,
            next_change=_instant(nxt),
        )

    def sides(self, c: Condition) -> tuple[str | None, str | None, str | None]:
        """A test's operator and its two sides' values as shown, in the order written."""
        f, at = self.future, self.at
        f.t = at
        op = c.op
        if op is None:
            return None, None, None
        operands = c.operands
        if op in ("in", "not in"):
            return op, _shown(operands[0], f, at), _json(operands[1].value(f, at))
        if op == "exists":
            return op, _shown(operands[0], f, at), None
        return op, _shown(operands[0], f, at), _shown(operands[1], f, at)

    def next_flip(self, c: Condition, value: bool) -> int | None:
        """The first instant after ``at`` at which ``c``'s value is not ``value``, with
        the same facts: stepping from one "may change" instant to the next, and through the
        known membership changes of the segments it reads."""
        f = self.future
        refs = c.refs
        t = self.at
        f.t = t
        nxt = c.evaluate(f, t)[1]
        for _ in range(self.max_steps):
            while refs:
                # The next membership change of a segment it reads, known that far: run
                # the copy on while the next instant is past what is known.
                cand = earliest(nxt, f.next_member_change(refs, t))
                known = f.known_until
                if known is None or (cand is not None and cand <= known):
                    nxt = cand
                    break
                if not f.extend():
                    self.note_horizon(known)
                    return None
            if nxt is None:
                return None
            t = max(nxt, t + 1)
            f.t = t
            v, nxt = c.evaluate(f, t)
            if v != value:
                return t
        self.note_horizon(t)
        return None


def _shown(side: Operand, f: _Future, at: int) -> str:
    """A value as a person reads it."""
    v = side.value(f, at)
    if v is MISSING:
        return "missing"
    kind = side.kind
    if kind == "duration":
        return _duration(v)
    if kind == "score":
        return _score(v)
    if kind == "instant":
        return format_instant(v)
    if isinstance(v, float) and not isinstance(v, bool):
        return repr(v)
    return _json(v)


def _json(v: Any) -> str:
    try:
        return msgspec.json.encode(v).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(v)


def _score(v: float) -> str:
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _duration(us: int) -> str:
    """A duration as rules write it: ``'3d4h'``, ``'90.5s'``, ``'-1d'``, ``'0s'``."""
    sign = "-" if us < 0 else ""
    rest = abs(us)
    parts = []
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    s, frac = divmod(rest, SECOND)
    if frac:
        parts.append(f"{s}.{frac:06d}".rstrip("0") + "s")
    elif s:
        parts.append(f"{s}s")
    return sign + ("".join(parts) or "0s")


_LAST = to_instant(datetime.max.replace(tzinfo=UTC))


def _known_until(copy: Customer) -> int | None:
    # A deadline after the last instant a date can hold (a trait dated 9999-12-31 plus a
    # duration) never comes: memberships are known for good.
    at = copy.deadline
    return None if at is None or at > _LAST else at - 1


def _instant(at: int | None) -> str | None:
    # A condition can flip after the last instant a date can hold (a trait dated
    # 9999-12-31 plus a duration): that never comes.
    return None if at is None or at > _LAST else format_instant(at)


def _deciding(c: ConditionExplanation) -> list[ConditionExplanation]:
    """The tests a decision rests on (a ``not`` counts as one)."""
    if not c.decides:
        return []
    if c.kind in ("and", "or"):
        return [d for child in c.children for d in _deciding(child)]
    return [c]


def _why(cs: Sequence[ConditionExplanation]) -> str:
    out = []
    for c in cs[:3]:
        text = f"`{c.text}` is {'true' if c.value else 'false'}"
        if c.op is not None and c.left is not None and c.right is not None:
            text += f" ({c.left} {c.op} {c.right})"
        out.append(text)
    if len(cs) > 3:
        out.append(f"{len(cs) - 3} more")
    return ", ".join(out)


def _reason(
    member: bool,
    entered: int | None,
    rule: ConditionExplanation,
    exit_: ConditionExplanation | None,
    held: bool,
    min_dwell: int,
    earliest_exit: int | None,
    nxt: int | None,
    horizon: int | None,
    at: int,
) -> str:
    deciding = _deciding(rule) + (_deciding(exit_) if exit_ is not None else [])
    if member:
        state = f"member since {_instant(entered)}: "
        if exit_ is not None:
            state += f"exit condition {'holds' if exit_.value else 'is false'}"
        else:
            state += f"rule {'holds' if rule.value else 'is false'}"
        state += f", as {_why(deciding)}"
        if held:
            keeper = f"min_dwell {_duration(min_dwell)}" if min_dwell else "entering just now"
            state += f"; {keeper} keeps it in until {_instant(earliest_exit)}"
    elif rule.value and exit_ is not None and exit_.value:
        state = f"not a member: the rule holds but so does the exit condition, as {_why(deciding)}"
    else:
        state = f"not a member: rule {'holds' if rule.value else 'is false'}, as {_why(deciding)}"
    if nxt is None:
        if horizon is None:
            return state + "; no change without a new event"
        return state + f"; no change found up to {_instant(horizon)} without a new event"
    when = _instant(nxt)
    verb = "leave" if member else "enter"
    if nxt <= at:
        return state + f"; due to {verb} at {when}, which the engine has not reached yet"
    cause = ""
    if member and nxt == earliest_exit:
        cause = " when min_dwell ends" if min_dwell else ""
    else:
        flipping = [c for c in deciding if c.next_change == when]
        if flipping:
            c = flipping[0]
            cause = f" when `{c.text}` turns {'false' if c.value else 'true'}"
    return state + f"; {verb}s at {when}{cause}"
