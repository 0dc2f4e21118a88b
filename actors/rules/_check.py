"""Checking a parsed rule: the whitelist of syntax and functions, and the nodes it builds."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from actors._errors import DefinitionError

from ._compare import Compare, ElapsedCompare
from ._dates import DAYS, parse_duration, to_instant_value
from ._limits import MAX_RULE_NUMBER, MAX_RULE_YEAR, MIN_RULE_YEAR, rule_date_range
from ._nodes import (
    And,
    Const,
    Contains,
    DateOf,
    DurationConst,
    ElapsedNode,
    Exists,
    In,
    InList,
    InSegment,
    InstantConst,
    Node,
    Not,
    Or,
    Relative,
    Scale,
    Score,
    SinceFirst,
    SinceLast,
    Trait,
)
from ._parse import Rewrite
from ._score_compare import ScoreCompare, score_of
from ._scores import ScoreConfig
from ._windows import NumberCompare, Window


@dataclass(frozen=True, slots=True)
class Env:
    """What rules of one segments file may refer to besides a customer's facts."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    lists: Mapping[str, frozenset[str]] = field(default_factory=dict)
    segments: frozenset[str] = frozenset()
    """Names of the file's segments, for ``in_segment`` (empty: references not checked)."""


def _always_number(node: Node) -> bool:
    if isinstance(node, Window):
        return node.func in ("count", "sum")
    return isinstance(node, Const) and node.kind == "numconst"


def _make_compare(left: Node, op: str, right: Node) -> Compare:
    """The comparison, specialised for the common shapes (each evaluates exactly as
    :class:`Compare` would)."""
    if isinstance(left, ElapsedNode) and isinstance(right, DurationConst):
        return ElapsedCompare(left, op, right)
    if isinstance(right, ElapsedNode) and isinstance(left, DurationConst):
        return ElapsedCompare(left, op, right)  # mirrored into place
    if (
        _always_number(left)
        and _always_number(right)
        and not (isinstance(left, Const) and isinstance(right, Const))
    ):
        return NumberCompare(left, op, right)
    a, b = score_of(left), score_of(right)
    numconst = isinstance(right, Const) and right.kind == "numconst"
    if a is not None and (b is not None or numconst):
        return ScoreCompare(left, op, right)
    if b is not None and isinstance(left, Const) and left.kind == "numconst":
        return ScoreCompare(left, op, right)  # mirrored into place
    return Compare(left, op, right)


# --- checking ------------------------------------------------------------------------------

_CMP = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FUNCTIONS = {
    "since_last": "since_last() or since_last('Event')",
    "since_first": "since_first()",
    "since": "since(trait('date_key'))",
    "until": "until(trait('date_key'))",
    "trait": "trait('key')",
    "date": "date(trait('key')) or date('2027-01-01')",
    "exists": "exists(trait('key'))",
    "contains": "contains(trait('key'), 'text')",
    "count": "count('Event', within='30d', where={...}, days=[...], hours=[...])",
    "sum": "sum('Event', 'property', within='30d', ...)",
    "min": "min('Event', 'property', within='30d', ...)",
    "max": "max('Event', 'property', within='30d', ...)",
    "score": "score()",
    "score_at": "score_at('7d')",
    "in_segment": "in_segment('segment')",
    "in_list": "in_list('list')",
}
_NUMERIC = ("number", "numconst", "value", "decay")


class Parser:
    def __init__(self, rewrite: Rewrite, fail: Callable[[str], DefinitionError], env: Env) -> None:
        self.rewrite = rewrite
        self.fail = fail
        self.env = env
        self.names: set[str | None] = set()
        self.traits: set[str] = set()
        self.retained: set[str | None] = set()
        self.refs: set[str] = set()
        self.first = False
        self.reach: int | None = 0  # the longest `within` of a window on retained events
        self.delay = 0  # the longest `score_at` delay
        self.properties = False  # a window reads properties

    def snippet(self, node: ast.AST) -> str:
        return self.rewrite.snippet(node)

    def node(self, n: ast.AST) -> Node:
        made = self.make(n)
        if not made.text:
            made.text = self.snippet(n)
        return made

    def make(self, n: ast.AST) -> Node:
        if isinstance(n, ast.BoolOp):
            parts = [self.condition(v) for v in n.values]
            return And(parts) if isinstance(n.op, ast.And) else Or(parts)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return Not(self.condition(n.operand))
        if isinstance(n, ast.Compare):
            pairs: list[Node] = []
            left = n.left
            for op, right in zip(n.ops, n.comparators, strict=True):
                pair = self.compare(left, op, right)
                pair.text = self.rewrite.snippet(left, right)  # one link of a chain
                pairs.append(pair)
                left = right
            return pairs[0] if len(pairs) == 1 else And(pairs)
        if isinstance(n, ast.Call):
            return self.call(n)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
            return self.scale(n)
        if isinstance(n, ast.Constant) and isinstance(n.value, str | int | float | bool):
            return self.const(n.value, n)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            inner = n.operand
            if isinstance(inner, ast.Constant) and isinstance(inner.value, int | float):
                if not isinstance(inner.value, bool):
                    return self.const(-inner.value, n)
        if isinstance(n, ast.Name):
            raise self.fail(
                f"unknown name {n.id!r}: write text in quotes ('{n.id}'), or call a function "
                "such as " + ", ".join(list(_FUNCTIONS.values())[:4]) + " (see SEGMENTS.md)"
            )
        raise self.fail(f"`{self.snippet(n)}` is not allowed in a rule")

    def const(self, value: str | float | bool, n: ast.AST) -> Const:
        """A constant; a number must be finite and at most ``MAX_RULE_NUMBER`` in size."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not (math.isfinite(value) and abs(value) <= MAX_RULE_NUMBER):
                raise self.fail(
                    f"`{self.snippet(n)}`: a number in a rule is at most {MAX_RULE_NUMBER:,} "
                    "in size"
                )
        return Const(value)

    def condition(self, n: ast.AST) -> Node:
        node = self.node(n)
        if node.kind != "bool":
            raise self.fail(f"`{self.snippet(n)}` is not a condition (true or false)")
        return node

    def scale(self, n: ast.BinOp) -> Node:
        left, right = self.node(n.left), self.node(n.right)
        if isinstance(left, Const) and left.kind == "numconst":
            k, inner, inner_ast = left.value, right, n.right
        elif isinstance(right, Const) and right.kind == "numconst":
            k, inner, inner_ast = right.value, left, n.left
        else:
            raise self.fail(f"`{self.snippet(n)}`: only a number constant can multiply")
        if inner.kind not in ("number", "value", "decay", "numconst"):
            raise self.fail(f"`{self.snippet(inner_ast)}` is not a number that can be multiplied")
        if inner.kind == "decay" and not k > 0:
            raise self.fail(
                f"`{self.snippet(n)}`: a score can only be multiplied by a positive number"
            )
        if isinstance(inner, Const):
            return self.const(k * inner.value, n)
        return Scale(float(k), inner)

    def compare(self, left_ast: ast.expr, op: ast.cmpop, right_ast: ast.expr) -> Node:
        left = self.node(left_ast)
        if isinstance(op, ast.In | ast.NotIn):
            if not isinstance(right_ast, ast.List | ast.Tuple | ast.Set):
                raise self.fail(
                    f"`in` needs a list of values, like ['gold', 'platinum'], "
                    f"not `{self.snippet(right_ast)}`"
                )
            options = []
            for elt in right_ast.elts:
                item = self.node(elt)
                if not isinstance(item, Const):
                    raise self.fail(f"list items must be plain values, not `{self.snippet(elt)}`")
                options.append(item.value)
            return In(left, tuple(options), isinstance(op, ast.NotIn))
        symbol = _CMP.get(type(op))
        if symbol is None:
            raise self.fail(f"comparison `{type(op).__name__}` is not allowed in a rule")
        right = self.node(right_ast)
        left, right = self.typed(left, left_ast, right, right_ast)
        if left.kind == "bool" or right.kind == "bool":
            if not (isinstance(left, Const) or isinstance(right, Const)):
                raise self.fail(f"compare conditions with and/or/not, not `{symbol}`")
        return _make_compare(left, symbol, right)

    def typed(
        self, left: Node, left_ast: ast.expr, right: Node, right_ast: ast.expr
    ) -> tuple[Node, Node]:
        """Check that two sides can be compared; turn text into durations or instants."""
        for a, b, b_ast, swap in (
            (left, right, right_ast, False),
            (right, left, left_ast, True),
        ):
            if a.kind == "elapsed":
                if b.kind == "elapsed":
                    if getattr(a, "sign", 1) != getattr(b, "sign", 1):
                        raise self.fail(
                            "a time since and a time until cannot be compared with each other"
                        )
                    return left, right
                d = self.duration(b, b_ast)
                return (d, a) if swap else (a, d)
            if a.kind == "instant":
                if b.kind == "instant":
                    return left, right
                i = self.instant(b, b_ast)
                return (i, a) if swap else (a, i)
            if a.kind == "decay":
                if b.kind not in _NUMERIC:
                    raise self.fail(
                        f"a score compares with a number or another score, "
                        f"not `{self.snippet(b_ast)}`"
                    )
                return left, right
        if left.kind == "duration" or right.kind == "duration":
            raise self.fail("a duration compares with an elapsed time such as since_last()")
        for a, b, b_ast in ((left, right, right_ast), (right, left, left_ast)):
            if a.kind == "number" and isinstance(b, Const) and isinstance(b.value, str):
                raise self.fail(
                    f"a count, sum, min or max compares with a number, not `{self.snippet(b_ast)}`"
                )
        return left, right

    def duration(self, node: Node, where: ast.expr) -> Node:
        if isinstance(node, Const) and isinstance(node.value, str):
            try:
                return DurationConst(parse_duration(node.value))
            except ValueError as e:
                raise self.fail(str(e)) from None
        raise self.fail(
            f"an elapsed time compares with a duration in quotes like '14d', "
            f"not `{self.snippet(where)}`"
        )

    def instant(self, node: Node, where: ast.expr) -> Node:
        if isinstance(node, Const) and isinstance(node.value, str):
            at = to_instant_value(node.value)
            if at is None:
                raise self.fail(f"{node.value!r} is not an ISO-8601 date or date and time")
            first, last = rule_date_range()
            if not first <= at <= last:
                raise self.fail(
                    f"{node.value!r}: a date in a rule is in the years {MIN_RULE_YEAR} to "
                    f"{MAX_RULE_YEAR}"
                )
            return InstantConst(at)
        raise self.fail(
            f"a date compares with another date, like date('2027-01-01'), "
            f"not `{self.snippet(where)}`"
        )

    def text_arg(self, n: ast.Call, a: ast.expr) -> str:
        if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value:
            return a.value
        raise self.fail(f"`{self.snippet(n)}` takes a name in quotes, not `{self.snippet(a)}`")

    def call(self, n: ast.Call) -> Node:
        name = n.func.id if isinstance(n.func, ast.Name) else None
        if name is None or name not in _FUNCTIONS:
            raise self.fail(
                f"unknown function in `{self.snippet(n)}`: see SEGMENTS.md for the functions "
                "rules can use"
            )
        usage = f"write it as {_FUNCTIONS[name]}"
        if name in ("count", "sum", "min", "max"):
            return self.window(n, name)
        if n.keywords:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        args = n.args
        if name in ("since_first", "score"):
            if args:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            if name == "score":
                self.score_needs()
                return Score(self.env.score, 0)
            self.first = True
            return SinceFirst()
        if len(args) != 1 and not (name == "since_last" and not args) and name != "contains":
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        if name == "since_last":
            event = self.text_arg(n, args[0]) if args else None
            self.names.add(event)
            return SinceLast(event)
        if name == "trait":
            key = self.text_arg(n, args[0])
            self.traits.add(key)
            return Trait(key)
        if name == "score_at":
            d = self.duration(self.node(args[0]), args[0])
            assert isinstance(d, DurationConst)
            if d.us <= 0:
                raise self.fail(f"`{self.snippet(n)}`: the duration must be positive")
            self.score_needs()
            self.delay = max(self.delay, d.us)
            return Score(self.env.score, d.us)
        if name in ("in_segment", "in_list"):
            target = self.text_arg(n, args[0])
            if name == "in_list":
                if target not in self.env.lists:
                    raise self.fail(f"`{self.snippet(n)}`: no list {target!r} ([lists.{target}])")
                return InList(self.env.lists[target])
            if self.env.segments and target not in self.env.segments:
                raise self.fail(f"`{self.snippet(n)}`: no segment {target!r}")
            self.refs.add(target)
            return InSegment(target)
        inner = self.node(args[0]) if args else None
        if name in ("since", "until", "date"):
            assert inner is not None
            if isinstance(inner, Const) and isinstance(inner.value, str) and name == "date":
                return self.instant(inner, args[0])
            if isinstance(inner, Trait):
                inner = DateOf(inner)
            if inner.kind != "instant":
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            if name == "date":
                return inner
            return Relative(inner, 1 if name == "since" else -1)
        if name == "exists":
            if not isinstance(inner, Trait):
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            return Exists(inner)
        # contains
        if len(args) != 2:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        needle = self.node(args[1])
        if not isinstance(needle, Const) or inner is None:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        return Contains(inner, needle)

    def score_needs(self) -> None:
        config = self.env.score
        if config.default_weight != 0:
            self.retained.add(None)
        else:
            self.retained.update(k for k, w in config.weights.items() if w != 0)

    def window(self, n: ast.Call, func: str) -> Node:
        usage = f"write it as {_FUNCTIONS[func]}"
        args = [self.text_arg(n, a) for a in n.args]
        if func == "count":
            if len(args) > 1:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            event, prop = (args[0] if args else None), None
        else:
            if len(args) != 2:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            event, prop = args
        within: int | None = None
        where: dict[str, Any] = {}
        days: frozenset[int] | None = None
        hours: frozenset[int] | None = None
        for kw in n.keywords:
            value = kw.value
            if kw.arg == "within":
                d = self.duration(self.node(value), value)
                assert isinstance(d, DurationConst)
                if d.us <= 0:
                    raise self.fail(f"`{self.snippet(n)}`: `within` must be positive")
                within = d.us
            elif kw.arg == "where" and isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values, strict=True):
                    key = self.node(k) if k is not None else None
                    val = self.node(v)
                    if not (isinstance(key, Const) and isinstance(key.value, str)):
                        raise self.fail(f"`{self.snippet(n)}`: `where` keys are property names")
                    if not isinstance(val, Const):
                        raise self.fail(f"`{self.snippet(n)}`: `where` values are plain values")
                    where[key.value] = val.value
            elif kw.arg in ("days", "hours") and isinstance(value, ast.List | ast.Tuple):
                items = [self.node(e) for e in value.elts]
                consts = [i.value for i in items if isinstance(i, Const)]
                if kw.arg == "days":
                    if len(consts) != len(items) or any(c not in DAYS for c in consts):
                        raise self.fail(
                            f"`{self.snippet(n)}`: `days` lists 'mon', 'tue', 'wed', 'thu', "
                            "'fri', 'sat', 'sun'"
                        )
                    days = frozenset(DAYS.index(c) for c in consts)
                else:
                    if len(consts) != len(items) or not all(
                        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 23
                        for c in consts
                    ):
                        raise self.fail(f"`{self.snippet(n)}`: `hours` lists whole hours 0 to 23")
                    hours = frozenset(consts)
            else:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
        node = Window(func, event, prop, within, where, days, hours)
        if node.simple:
            self.names.add(event)
        else:
            self.retained.add(event)
            if self.reach is not None:
                self.reach = None if within is None else max(self.reach, within)
            if where or prop is not None:
                self.properties = True
            if days or hours:
                self.traits.add("timezone")
        return node
