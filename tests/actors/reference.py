"""A brute-force reference evaluator of the segment language, written from SEGMENTS.md alone.

It shares no evaluation code with ``actors``: it reads the TOML with :mod:`tomllib`, parses
rules with :mod:`ast` into its own small interpreter, and simulates each customer in time
order, re-evaluating EVERY segment at EVERY instant where anything could change:

- each event instant (each event is applied and evaluated on its own, in log order);
- window edges ``t_e + within`` and score_at edges ``t_e + D`` of every track event;
- elapsed-time thresholds: each comparison of elapsed times is linear in ``now``, so its exact
  crossing point is computed and the microseconds around it are candidates;
- the end of ``min_dwell`` and the +1 µs after an entry, for every member, and the +1 µs
  after the latest change;
- score crossings against anything constant between candidates, found by bisection over
  integer microseconds (the score never rises between candidates, so ``score <= c`` and
  ``score < c`` each flip at most once there).

Extra candidates are harmless (nothing changes there); the point is that none is missing.
It is slow on purpose: no incremental state, every value is recomputed from the events.
"""

from __future__ import annotations

import ast
import io
import json
import math
import operator
import re
import tokenize
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from protocol import Event

UNIT_US = {"d": 86_400_000_000, "h": 3_600_000_000, "m": 60_000_000, "s": 1_000_000}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
AST_OPS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}


class SpecError(ValueError):
    """The segments file or a rule is not valid for the reference."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Change(NamedTuple):
    segment: str
    change: str  # "entered" | "exited"
    at: int
    cause: str | None  # the message_id of the event, or None when time passing caused it


# --- values ------------------------------------------------------------------------------


def duration(text: Any) -> int:
    """Microseconds of duration text: ``'90s'``, ``'1d12h'``, ``'0.5d'``, ``'-1d'``."""
    if not isinstance(text, str):
        raise SpecError(f"{text!r} is not a duration")
    body, sign = (text[1:], -1) if text.startswith("-") else (text, 1)
    pos, last, total = 0, -1, Fraction(0)
    for m in re.finditer(r"(\d+(?:\.\d+)?)([dhms])", body):
        unit = "dhms".index(m.group(2))
        if m.start() != pos or unit <= last:
            raise SpecError(f"{text!r} is not a duration")
        last, pos = unit, m.end()
        total += Fraction(m.group(1)) * UNIT_US[m.group(2)]
    if last < 0 or pos != len(body) or total.denominator != 1:
        raise SpecError(f"{text!r} is not a duration")
    return sign * int(total)


def iso_instant(value: Any) -> Any:
    """The instant of ISO-8601 text (naive means UTC), or MISSING."""
    if not isinstance(value, str):
        return MISSING
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return MISSING
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "text"
    return "other"


def is_number(v: Any) -> bool:
    return kind(v) == "number"


def same(a: Any, b: Any) -> bool:
    """Equality where values of different kinds are unequal."""
    return kind(a) == kind(b) and a == b


def plain_compare(op: str, a: Any, b: Any) -> bool:
    if a is MISSING or b is MISSING:
        return False
    ka, kb = kind(a), kind(b)
    if ka != kb or ka == "other":
        return op == "!="
    if ka == "bool" and op not in ("==", "!="):
        return False
    return OPS[op](a, b)


@dataclass(frozen=True)
class Lin:
    """An elapsed time (or a duration): ``slope * now + offset`` microseconds."""

    slope: int
    offset: int

    def at(self, now: int) -> int:
        return self.slope * now + self.offset


@dataclass(frozen=True)
class ScoreVal:
    delay: int  # 0 for score(), D for score_at(D)
    mults: tuple[float, ...] = ()  # applied innermost first: k * (k' * score)


# --- customer context ---------------------------------------------------------------------


@dataclass
class Spec:
    half_life: int
    weights: dict[str, float]
    default_weight: float
    lists: dict[str, frozenset[str]]
    segments: list[Segment]
    order: list[Segment]  # evaluation order: file order, referenced segments first


@dataclass
class Cx:
    """A customer as of ``now``: the events applied so far (log order) and memberships."""

    spec: Spec
    customer: str
    events: list[Event]
    members: dict[str, int]
    now: int

    def at(self, now: int) -> Cx:
        return Cx(self.spec, self.customer, self.events, self.members, now)

    def tracks(self) -> Iterator[Event]:
        return (e for e in self.events if e.kind == "track" and e.at <= self.now)

    def trait(self, key: str) -> Any:
        best: tuple[int, Any] | None = None
        for e in self.events:
            if e.kind == "identify" and e.at <= self.now and key in e.traits:
                if best is None or e.at >= best[0]:  # ties: the later in the log wins
                    best = (e.at, e.traits[key])
        if best is None or best[1] is None:
            return MISSING
        return best[1]

    def zone(self) -> tzinfo:
        name = self.trait("timezone")
        if isinstance(name, str):
            try:
                return ZoneInfo(name)
            except Exception:  # unknown or malformed zone name
                pass
        return UTC

    def score(self, at: int) -> float:
        """score(at) = sum over track events with t_e <= at of w * 2 ** ((t_e - at) / H)."""
        return self.score_relative(at, at, 0)

    def score_relative(self, upto: int, ref: int, delta: int) -> float:
        """sum(w * 2.0 ** ((t_e - ref + delta) / H)) over track events with t_e <= upto."""
        acc = 0.0
        for e in self.events:
            if e.kind == "track" and e.at <= upto:
                w = self.spec.weights.get(e.name or "", self.spec.default_weight)
                acc += w * 2.0 ** ((e.at - ref + delta) / self.spec.half_life)
        return acc


# --- rule nodes ---------------------------------------------------------------------------
# typ: "cond" (true/false), "elapsed" (a Lin), "instant" (int), "score" (a ScoreVal),
# "number" (count/sum/min/max or a product), "value" (a trait), "const".


class Node:
    typ = "value"

    def val(self, cx: Cx) -> Any:
        raise NotImplementedError

    def children(self) -> Iterable[Node]:
        return ()

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children():
            yield from c.walk()


class Const(Node):
    typ = "const"

    def __init__(self, value: Any) -> None:
        self.value = value

    def val(self, cx: Cx) -> Any:
        return self.value


class DurationConst(Node):
    typ = "elapsed"

    def __init__(self, us: int) -> None:
        self.us = us

    def val(self, cx: Cx) -> Any:
        return Lin(0, self.us)


class SinceLast(Node):
    typ = "elapsed"

    def __init__(self, name: str | None) -> None:
        self.name = name

    def val(self, cx: Cx) -> Any:
        ts = [e.at for e in cx.tracks() if self.name is None or e.name == self.name]
        return Lin(1, -max(ts)) if ts else MISSING


class SinceFirst(Node):
    typ = "elapsed"

    def val(self, cx: Cx) -> Any:
        ts = [e.at for e in cx.events if e.at <= cx.now]
        return Lin(1, -min(ts)) if ts else MISSING


class Trait(Node):
    def __init__(self, key: str) -> None:
        self.key = key

    def val(self, cx: Cx) -> Any:
        return cx.trait(self.key)


class DateOf(Node):
    typ = "instant"

    def __init__(self, arg: Node) -> None:
        self.arg = arg

    def children(self) -> Iterable[Node]:
        return (self.arg,)

    def val(self, cx: Cx) -> Any:
        return iso_instant(self.arg.val(cx))


class SinceUntil(Node):
    """since(x) = now - d; until(x) = d - now."""

    typ = "elapsed"

    def __init__(self, arg: Node, until: bool) -> None:
        self.arg, self.until = arg, until

    def children(self) -> Iterable[Node]:
        return (self.arg,)

    def val(self, cx: Cx) -> Any:
        d = self.arg.val(cx) if self.arg.typ == "instant" else iso_instant(self.arg.val(cx))
        if d is MISSING:
            return MISSING
        return Lin(-1, d) if self.until else Lin(1, -d)


class Aggregate(Node):
    typ = "number"

    def __init__(
        self,
        fn: str,
        name: str | None,
        prop: str | None,
        within: int | None,
        where: dict[str, Any] | None,
        days: list[str] | None,
        hours: list[int] | None,
    ) -> None:
        self.fn, self.name, self.prop, self.within = fn, name, prop, within
        self.where, self.days, self.hours = where, days, hours

    def matching(self, cx: Cx) -> Iterator[Event]:
        zone = cx.zone() if self.days is not None or self.hours is not None else UTC
        for e in cx.tracks():
            if self.name is not None and e.name != self.name:
                continue
            if self.within is not None and not (cx.now - self.within < e.at):
                continue
            if self.where is not None and not all(
                k in e.properties and same(e.properties[k], v) for k, v in self.where.items()
            ):
                continue
            if self.days is not None or self.hours is not None:
                local = (EPOCH + timedelta(microseconds=e.at)).astimezone(zone)
                if self.days is not None and WEEKDAYS[local.weekday()] not in self.days:
                    continue
                if self.hours is not None and local.hour not in self.hours:
                    continue
            yield e

    def val(self, cx: Cx) -> Any:
        events = list(self.matching(cx))
        if self.fn == "count":
            return len(events)
        assert self.prop is not None
        values = [e.properties[self.prop] for e in events if is_number(e.properties.get(self.prop))]
        if self.fn == "sum":
            acc: Any = 0
            for v in values:
                acc = acc + v
            return acc
        if not values:
            return MISSING
        return min(values) if self.fn == "min" else max(values)


class Score(Node):
    typ = "score"

    def __init__(self, delay: int) -> None:
        self.delay = delay

    def val(self, cx: Cx) -> Any:
        return ScoreVal(self.delay)


class Mul(Node):
    def __init__(self, k: float, arg: Node) -> None:
        self.k, self.arg = k, arg
        self.typ = "score" if arg.typ == "score" else "number"

    def children(self) -> Iterable[Node]:
        return (self.arg,)

    def val(self, cx: Cx) -> Any:
        v = self.arg.val(cx)
        if isinstance(v, ScoreVal):
            return ScoreVal(v.delay, (*v.mults, self.k))
        if not is_number(v):
            return MISSING
        return self.k * v


def score_value(cx: Cx, s: ScoreVal) -> float:
    v = cx.score(cx.now - s.delay)
    for k in s.mults:
        v = k * v
    return v


class Cond(Node):
    typ = "cond"

    def test(self, cx: Cx) -> bool:
        raise NotImplementedError

    def val(self, cx: Cx) -> Any:
        return self.test(cx)


class Compare(Cond):
    def __init__(self, op: str, left: Node, right: Node) -> None:
        self.op, self.left, self.right = op, left, right

    def children(self) -> Iterable[Node]:
        return (self.left, self.right)

    @property
    def score_sides(self) -> int:
        return (self.left.typ == "score") + (self.right.typ == "score")

    def test(self, cx: Cx) -> bool:
        a, b = self.left.val(cx), self.right.val(cx)
        if a is MISSING or b is MISSING:
            return False
        if isinstance(a, Lin) and isinstance(b, Lin):
            return OPS[self.op](a.at(cx.now), b.at(cx.now))
        if self.left.typ == "instant" and self.right.typ == "instant":
            return OPS[self.op](a, b)
        if isinstance(a, ScoreVal) and isinstance(b, ScoreVal):
            return OPS[self.op](*relative_scores(cx, a, b))
        if isinstance(a, ScoreVal):
            a = score_value(cx, a)
        if isinstance(b, ScoreVal):
            b = score_value(cx, b)
        return plain_compare(self.op, a, b)

    def crossings(self, cx: Cx) -> Iterator[int]:
        """Instants around which an elapsed-time comparison can flip (given the facts)."""
        if self.left.typ != "elapsed":
            return
        a, b = self.left.val(cx), self.right.val(cx)
        if not (isinstance(a, Lin) and isinstance(b, Lin)) or a.slope == b.slope:
            return
        x = Fraction(b.offset - a.offset, a.slope - b.slope)
        yield from range(math.floor(x) - 1, math.ceil(x) + 2)

    def score_flip(self, cx: Cx, hi: int) -> int | None:
        """The first instant in (cx.now, hi) where this score-vs-constant comparison can flip.

        Facts are those of ``cx`` throughout; the other side is constant there and the score
        side does not rise, so ``score <= c`` and ``score < c`` each turn true at most once.
        """
        if self.score_sides != 1:
            return None
        score_node, other_node = (
            (self.left, self.right) if self.left.typ == "score" else (self.right, self.left)
        )
        other = other_node.val(cx)
        if not is_number(other):
            return None
        s = score_node.val(cx)

        def g(t: int) -> float:
            return score_value(cx.at(t), s)

        lo, best = cx.now, None
        for strict in (False, True):

            def pred(t: int, strict: bool = strict) -> bool:
                return bool(g(t) < other) if strict else bool(g(t) <= other)

            if hi - 1 <= lo or pred(lo) or not pred(hi - 1):
                continue
            a, b = lo, hi - 1  # pred(a) is false, pred(b) is true
            while b - a > 1:
                m = (a + b) // 2
                if pred(m):
                    b = m
                else:
                    a = m
            best = b if best is None else min(best, b)
        return best


def relative_scores(cx: Cx, a: ScoreVal, b: ScoreVal) -> tuple[float, float]:
    """Both sides relative to r, the latest event instant in either side."""
    ts = [e.at for e in cx.tracks() if e.at <= cx.now - min(a.delay, b.delay)]
    ts_a = [t for t in ts if t <= cx.now - a.delay]
    ts_b = [t for t in ts if t <= cx.now - b.delay]
    if not ts_a and not ts_b:
        return 0.0, 0.0
    r = max(ts_a + ts_b)
    out = []
    for s in (a, b):
        v = cx.score_relative(cx.now - s.delay, r, s.delay)
        for k in s.mults:
            v = k * v
        out.append(v)
    return out[0], out[1]


class In(Cond):
    def __init__(self, left: Node, options: list[Any], negate: bool) -> None:
        self.left, self.options, self.negate = left, options, negate

    def children(self) -> Iterable[Node]:
        return (self.left,)

    def test(self, cx: Cx) -> bool:
        a = self.left.val(cx)
        if a is MISSING:
            return False
        return any(same(a, o) for o in self.options) != self.negate


class Contains(Cond):
    def __init__(self, left: Node, item: Any) -> None:
        self.left, self.item = left, item

    def children(self) -> Iterable[Node]:
        return (self.left,)

    def test(self, cx: Cx) -> bool:
        a = self.left.val(cx)
        if isinstance(a, str):
            return isinstance(self.item, str) and self.item in a
        if isinstance(a, list):
            return any(same(x, self.item) for x in a)
        return False


class Exists(Cond):
    def __init__(self, arg: Node) -> None:
        self.arg = arg

    def children(self) -> Iterable[Node]:
        return (self.arg,)

    def test(self, cx: Cx) -> bool:
        return self.arg.val(cx) is not MISSING


class InSegment(Cond):
    def __init__(self, name: str) -> None:
        self.name = name

    def test(self, cx: Cx) -> bool:
        return self.name in cx.members


class InList(Cond):
    def __init__(self, name: str) -> None:
        self.name = name

    def test(self, cx: Cx) -> bool:
        return cx.customer in cx.spec.lists[self.name]


class BoolOp(Cond):
    def __init__(self, op: str, parts: list[Cond]) -> None:
        self.op, self.parts = op, parts

    def children(self) -> Iterable[Node]:
        return self.parts

    def test(self, cx: Cx) -> bool:
        if self.op == "and":
            return all(p.test(cx) for p in self.parts)
        if self.op == "or":
            return any(p.test(cx) for p in self.parts)
        return not self.parts[0].test(cx)


# --- parsing ------------------------------------------------------------------------------


def pythonize(text: str) -> str:
    """SQL habits to Python: ``=`` (not a keyword argument's) to ``==``, AND/OR/NOT lowered."""
    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    out: list[str] = []
    for i, tok in enumerate(toks):
        s = tok.string
        if tok.type == tokenize.OP and s == "=":
            keyword = (
                i >= 2 and toks[i - 1].type == tokenize.NAME and toks[i - 2].string in ("(", ",")
            )
            if not keyword:
                s = "=="
        elif tok.type == tokenize.NAME and s in ("AND", "OR", "NOT"):
            s = s.lower()
        out.append(s)
    return " ".join(out)


def literal(n: ast.AST) -> Any:
    if isinstance(n, ast.Constant) and isinstance(n.value, str | int | float | bool):
        return n.value
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
        v = literal(n.operand)
        if is_number(v):
            return -v
    if isinstance(n, ast.List | ast.Tuple):
        return [literal(e) for e in n.elts]
    if isinstance(n, ast.Dict):
        return {literal(k): literal(v) for k, v in zip(n.keys, n.values, strict=True) if k}
    raise SpecError(f"not a literal: {ast.dump(n)}")


class Compiler:
    def __init__(self, segment_names: set[str], list_names: set[str]) -> None:
        self.segment_names, self.list_names = segment_names, list_names
        self.refs: set[str] = set()

    def rule(self, text: str) -> Cond:
        tree = ast.parse(pythonize(text), mode="eval")
        return self.cond(tree.body)

    def cond(self, n: ast.AST) -> Cond:
        node = self.node(n)
        if not isinstance(node, Cond):
            raise SpecError(f"not a condition: {ast.unparse(n)}")
        return node

    def node(self, n: ast.AST) -> Node:
        if isinstance(n, ast.BoolOp):
            which = "and" if isinstance(n.op, ast.And) else "or"
            return BoolOp(which, [self.cond(v) for v in n.values])
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return BoolOp("not", [self.cond(n.operand)])
        if isinstance(n, ast.Compare):
            pairs: list[Cond] = []
            left = n.left
            for op, right in zip(n.ops, n.comparators, strict=True):
                pairs.append(self.compare(left, op, right))
                left = right
            return pairs[0] if len(pairs) == 1 else BoolOp("and", pairs)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
            for k_ast, x_ast in ((n.left, n.right), (n.right, n.left)):
                try:
                    k = literal(k_ast)
                except SpecError:
                    continue
                if is_number(k):
                    x = self.node(x_ast)
                    if x.typ not in ("number", "value", "score"):
                        raise SpecError(f"cannot multiply {ast.unparse(x_ast)}")
                    if x.typ == "score" and not k > 0:
                        raise SpecError("a score's multiplier must be positive")
                    return Mul(k, x)
            raise SpecError(f"unsupported product {ast.unparse(n)}")
        if isinstance(n, ast.Call):
            return self.call(n)
        return Const(literal(n))

    def compare(self, left_ast: ast.expr, op: ast.cmpop, right_ast: ast.expr) -> Cond:
        left = self.node(left_ast)
        if isinstance(op, ast.In | ast.NotIn):
            options = literal(right_ast)
            if not isinstance(options, list):
                raise SpecError("`in` needs a list")
            return In(left, options, isinstance(op, ast.NotIn))
        right = self.node(right_ast)
        symbol = AST_OPS[type(op)]
        if left.typ == "elapsed" or right.typ == "elapsed":
            left, right = self.as_duration(left), self.as_duration(right)
        elif (left.typ == "instant") != (right.typ == "instant"):
            raise SpecError("instants compare with instants")
        return Compare(symbol, left, right)

    @staticmethod
    def as_duration(n: Node) -> Node:
        if n.typ == "elapsed":
            return n
        if isinstance(n, Const):
            return DurationConst(duration(n.value))
        raise SpecError("an elapsed time compares with a duration or another elapsed time")

    def call(self, n: ast.Call) -> Node:
        if not isinstance(n.func, ast.Name):
            raise SpecError("unknown function")
        fn = n.func.id
        kw = {k.arg: k.value for k in n.keywords}
        args = n.args

        def texts() -> list[str]:
            vals = [literal(a) for a in args]
            if not all(isinstance(v, str) for v in vals):
                raise SpecError(f"{fn} takes names in quotes")
            return vals

        if (
            fn
            in ("since_last", "since_first", "trait", "score", "score_at", "in_segment", "in_list")
            and kw
        ):
            raise SpecError(f"{fn} takes no keywords")
        if fn == "since_last":
            names = texts()
            return SinceLast(names[0] if names else None)
        if fn == "since_first":
            return SinceFirst()
        if fn == "trait":
            (key,) = texts()
            return Trait(key)
        if fn in ("since", "until", "date", "exists"):
            (arg_ast,) = args
            arg = self.node(arg_ast)
            if fn == "exists":
                if not isinstance(arg, Trait):
                    raise SpecError("exists takes a trait")
                return Exists(arg)
            if fn == "date":
                if not (isinstance(arg, Trait) or isinstance(arg, Const)):
                    raise SpecError("date takes a trait or text")
                return DateOf(arg)
            if not (isinstance(arg, Trait) or arg.typ == "instant"):
                raise SpecError(f"{fn} takes a date")
            return SinceUntil(arg, fn == "until")
        if fn == "contains":
            left_ast, item_ast = args
            return Contains(self.node(left_ast), literal(item_ast))
        if fn in ("count", "sum", "min", "max"):
            names = texts()
            if fn == "count":
                if len(names) > 1:
                    raise SpecError("count takes at most a name")
                name, prop = (names[0] if names else None), None
            else:
                if len(names) != 2:
                    raise SpecError(f"{fn} takes an event name and a property")
                name, prop = names
            unknown = set(kw) - {"within", "where", "days", "hours"}
            if unknown:
                raise SpecError(f"unknown keyword(s) {unknown}")
            within = duration(literal(kw["within"])) if "within" in kw else None
            where = literal(kw["where"]) if "where" in kw else None
            days = literal(kw["days"]) if "days" in kw else None
            hours = literal(kw["hours"]) if "hours" in kw else None
            if days is not None and not set(days) <= set(WEEKDAYS):
                raise SpecError(f"bad days {days}")
            if hours is not None and not all(isinstance(h, int) and 0 <= h < 24 for h in hours):
                raise SpecError(f"bad hours {hours}")
            return Aggregate(fn, name, prop, within, where, days, hours)
        if fn == "score":
            if args:
                raise SpecError("score() takes nothing")
            return Score(0)
        if fn == "score_at":
            (d,) = texts()
            return Score(duration(d))
        if fn == "in_segment":
            (name,) = texts()
            if name not in self.segment_names:
                raise SpecError(f"no segment {name!r}")
            self.refs.add(name)
            return InSegment(name)
        if fn == "in_list":
            (name,) = texts()
            if name not in self.list_names:
                raise SpecError(f"no list {name!r}")
            return InList(name)
        raise SpecError(f"unknown function {fn}")


@dataclass
class Segment:
    name: str
    rule: Cond
    exit: Cond | None
    min_dwell: int
    refs: set[str] = field(default_factory=set)

    def nodes(self) -> Iterator[Node]:
        yield from self.rule.walk()
        if self.exit is not None:
            yield from self.exit.walk()


def load(text: str, base_dir: Path | None = None) -> Spec:
    doc = tomllib.loads(text)
    score = doc.get("score", {})
    half_life = duration(score.get("half_life", "14d"))
    if half_life <= 0:
        raise SpecError("half_life must be positive")
    weights = dict(score.get("weights", {}))
    default_weight = score.get("default_weight", 1.0)
    lists: dict[str, frozenset[str]] = {}
    for name, body in doc.get("lists", {}).items():
        ids = set(body.get("customers", []))
        if "file" in body:
            if base_dir is None:
                raise SpecError("a list file needs the segments file's directory")
            for line in (base_dir / body["file"]).read_text("utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    ids.add(line)
        lists[name] = frozenset(ids)
    table = doc["segments"]
    segments: list[Segment] = []
    for name, body in table.items():
        if not NAME.fullmatch(name):
            raise SpecError(f"bad segment name {name!r}")
        rc = Compiler(set(table), set(lists))
        rule = rc.rule(body["rule"])
        exit_rule = rc.rule(body["exit"]) if "exit" in body else None
        dwell = duration(body.get("min_dwell", "0s"))
        segments.append(Segment(name, rule, exit_rule, dwell, rc.refs))
    by_name = {s.name: s for s in segments}
    order: list[Segment] = []
    state: dict[str, str] = {}

    def visit(s: Segment) -> None:
        if state.get(s.name) == "done":
            return
        if state.get(s.name) == "active":
            raise SpecError(f"segment references form a cycle through {s.name!r}")
        state[s.name] = "active"
        for ref in sorted(s.refs, key=list(by_name).index):
            visit(by_name[ref])
        state[s.name] = "done"
        order.append(s)

    for s in segments:
        visit(s)
    return Spec(half_life, weights, default_weight, lists, segments, order)


def file_order_is_topological(spec: Spec) -> bool:
    """Whether file order already puts referenced segments first (then the evaluation order
    is file order under any reading of SEGMENTS.md)."""
    seen: set[str] = set()
    for s in spec.segments:
        if not s.refs <= seen:
            return False
        seen.add(s.name)
    return True


# --- simulation ---------------------------------------------------------------------------


class Simulator:
    def __init__(self, spec: Spec, customer: str) -> None:
        self.spec = spec
        self.customer = customer
        self.events: list[Event] = []
        self.members: dict[str, int] = {}
        self.out: list[Change] = []
        nodes = [n for s in spec.segments for n in s.nodes()]
        self.elapsed_cmps = [n for n in nodes if isinstance(n, Compare) and n.left.typ == "elapsed"]
        self.score_cmps = [n for n in nodes if isinstance(n, Compare) and n.score_sides == 1]
        self.edges = sorted(
            {n.within for n in nodes if isinstance(n, Aggregate) and n.within is not None}
            | {n.delay for n in nodes if isinstance(n, Score) and n.delay != 0}
        )

    def cx(self, now: int) -> Cx:
        return Cx(self.spec, self.customer, self.events, self.members, now)

    def evaluate(self, now: int, cause: str | None) -> None:
        """Every segment at ``now``, in evaluation order."""
        cx = self.cx(now)
        for seg in self.spec.order:
            if seg.name not in self.members:
                # In when the rule holds and the exit condition (if any) does not.
                if seg.rule.test(cx) and not (seg.exit is not None and seg.exit.test(cx)):
                    self.members[seg.name] = now
                    self.out.append(Change(seg.name, "entered", now, cause))
            elif now - self.members[seg.name] >= max(seg.min_dwell, 1):
                leave = seg.exit.test(cx) if seg.exit is not None else not seg.rule.test(cx)
                if leave:
                    del self.members[seg.name]
                    self.out.append(Change(seg.name, "exited", now, cause))

    def candidates(self, now: int) -> set[int]:
        """Instants after ``now`` where something could change without a new event."""
        cx = self.cx(now)
        out: set[int] = set()
        for c in self.elapsed_cmps:
            out.update(c.crossings(cx))
        for d in self.edges:
            out.update(e.at + d for e in self.events if e.kind == "track")
        for seg in self.spec.segments:
            entered = self.members.get(seg.name)
            if entered is not None:
                out.update((entered + 1, entered + seg.min_dwell))
        if self.out:
            # One change per segment and instant: one who left because the rule stopped
            # holding may be back in at the next microsecond.
            out.add(self.out[-1].at + 1)
        return {t for t in out if t > now}

    def run(self, events: list[Event], end: int) -> list[Change]:
        """The changes of ``events`` (this customer's, in log order) up to ``end``.

        As SEGMENTS.md says: before an event, time runs on to just before its receive
        instant. The event then takes effect at its own instant, unless that is before the
        customer's latest instant (the latest of its earlier events' own instants, those not
        late, and of its membership changes): then it is late, and takes effect at its
        receive instant (or that latest instant, should it be later).
        """
        now: int | None = None  # the sweep's clock: everything up to here is evaluated
        latest: int | None = None  # the customer's latest instant
        for e in events:
            if now is not None:
                self.sweep(now, e.received)
            if self.out and (latest is None or self.out[-1].at > latest):
                latest = self.out[-1].at
            late = latest is not None and e.at < latest
            effect = max(e.received, latest) if late and latest is not None else e.at
            if not late:
                latest = e.at  # a late event moves it only by the changes it makes
            self.events.append(e)
            self.evaluate(effect, e.message_id)
            now = effect
        if now is not None:
            self.sweep(now, end + 1)
        return self.out

    def sweep(self, now: int, horizon: int) -> None:
        """Evaluate every candidate instant after ``now`` and before ``horizon``."""
        while True:
            nxt = min((t for t in self.candidates(now) if t < horizon), default=horizon)
            cx = self.cx(now)
            for c in self.score_cmps:
                flip = c.score_flip(cx, nxt)
                if flip is not None and flip < nxt:
                    nxt = flip
            if nxt >= horizon:
                return
            self.evaluate(nxt, None)
            now = nxt


def reference_changes(
    segments_toml: str, events: Iterable[Event], end: int, *, base_dir: Path | None = None
) -> dict[str, list[Change]]:
    """Per customer, every membership change (with its cause) in publish order."""
    spec = load(segments_toml, base_dir)
    by_customer: dict[str, list[Event]] = {}
    for e in events:
        by_customer.setdefault(e.customer_id, []).append(e)
    return {cid: Simulator(spec, cid).run(evs, end) for cid, evs in by_customer.items()}


def reference_timelines(
    segments_toml: str, events: Iterable[Event], end: int, *, base_dir: Path | None = None
) -> dict[str, list[tuple[str, str, int]]]:
    """Per customer, the full timeline [(segment, change, at)] of membership changes."""
    changes = reference_changes(segments_toml, events, end, base_dir=base_dir)
    return {cid: [(c.segment, c.change, c.at) for c in cs] for cid, cs in changes.items()}


def toml_text(value: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML escapes)."""
    return json.dumps(value)
