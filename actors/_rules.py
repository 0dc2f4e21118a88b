"""The segment rule language: parsing, checking and exact-time evaluation.

A rule is an expression in Python syntax, parsed with :mod:`ast` and checked against a
whitelist of nodes and functions (never ``eval``). SQL habits are accepted: ``=`` means
``==`` and ``AND``/``OR``/``NOT`` may be upper case.

Every node evaluates to ``(value, next_change)``: its value at ``now`` and the earliest
instant after ``now`` at which that value can change without a new event (``None``: never).
A customer's deadline is the earliest ``next_change`` over its segments, which is what lets
shoal fire a time-based change at its exact instant instead of in a periodic sweep. A
``next_change`` may be early (the engine then re-evaluates and finds nothing changed) but
never late.

Functions (this issue's subset; the language grows by adding node classes here):
    since_last() / since_last('Visit')   time since the last track event (of that name)
    since_first()                        time since the customer's first event of any kind
    count() / count('Visit')             number of track events (of that name), all time
    trait('plan')                        the latest value of an identify trait

Elapsed times compare with durations written as text: ``'90s'``, ``'15m'``, ``'14d'``,
``'1d12h'``. ``since_last('Visit') >= '14d'`` is true from the last visit + 14 days inclusive.
Anything compared with a missing value (no such event, no such trait) is false.
"""

from __future__ import annotations

import ast
import io
import operator
import re
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from ._errors import DefinitionError

_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


class Facts(Protocol):
    """What a rule may read of a customer."""

    def first_at(self) -> int | None: ...
    def last_at(self, name: str | None) -> int | None: ...
    def count(self, name: str | None) -> int: ...
    def trait(self, key: str) -> Any: ...


MISSING: Any = object()
"""The value of a trait the customer does not have."""

Value = tuple[Any, int | None]


def parse_duration(text: str) -> int:
    """Microseconds of a duration such as ``'90s'``, ``'14d'`` or ``'1d12h'``.

    Raises:
        ValueError: the text is not a duration.
    """
    compact = text.replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration: write numbers with units s, m, h or d, "
            "like '90s', '14d' or '1d12h'"
        )
    units = [u for _, u in parts]
    if units != sorted(set(units), key="dhms".index):
        raise ValueError(f"{text!r}: give each unit once, largest first, like '1d12h'")
    total = sum((Decimal(n) * _US[u] for n, u in parts), Decimal(0))
    if total != total.to_integral_value():
        raise ValueError(f"{text!r} is finer than a microsecond")
    return int(total)


# --- nodes ---------------------------------------------------------------------------------
# ``kind`` drives checking at parse time: "bool", "elapsed" (a time that grows with now;
# its value is the anchor instant it is measured from), "duration", or "value".


class _Node:
    kind = "value"

    def eval(self, f: Facts, now: int) -> Value:
        raise NotImplementedError


class _Const(_Node):
    def __init__(self, value: Any) -> None:
        self.value = value
        self.kind = "bool" if isinstance(value, bool) else "value"

    def eval(self, f: Facts, now: int) -> Value:
        return self.value, None


class _DurationConst(_Node):
    kind = "duration"

    def __init__(self, us: int) -> None:
        self.us = us

    def eval(self, f: Facts, now: int) -> Value:
        return self.us, None


class _SinceLast(_Node):
    kind = "elapsed"

    def __init__(self, name: str | None) -> None:
        self.name = name

    def eval(self, f: Facts, now: int) -> Value:
        return f.last_at(self.name), None


class _SinceFirst(_Node):
    kind = "elapsed"

    def eval(self, f: Facts, now: int) -> Value:
        return f.first_at(), None


class _Count(_Node):
    def __init__(self, name: str | None) -> None:
        self.name = name

    def eval(self, f: Facts, now: int) -> Value:
        return f.count(self.name), None


class _Trait(_Node):
    def __init__(self, key: str) -> None:
        self.key = key

    def eval(self, f: Facts, now: int) -> Value:
        return f.trait(self.key), None


_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _instant_compare(now: int, op: str, t: int) -> Value:
    """``now OP t`` and the next instant its value changes."""
    if op == ">=":
        return now >= t, (t if now < t else None)
    if op == ">":
        return now > t, (t + 1 if now <= t else None)
    if op == "<":
        return now < t, (t if now < t else None)
    if op == "<=":
        return now <= t, (t + 1 if now <= t else None)
    nxt = t if now < t else (t + 1 if now == t else None)
    return (now == t) == (op == "=="), nxt


def _comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b) and isinstance(a, str)


class _Compare(_Node):
    kind = "bool"

    def __init__(self, left: _Node, op: str, right: _Node) -> None:
        # Keep an elapsed time on the left, so evaluation has one shape to handle.
        if right.kind == "elapsed" and left.kind != "elapsed":
            left, right, op = right, left, _MIRROR[op]
        self.left, self.op, self.right = left, op, right

    def eval(self, f: Facts, now: int) -> Value:
        a, _ = self.left.eval(f, now)
        b, _ = self.right.eval(f, now)
        if a is None or b is None or a is MISSING or b is MISSING:
            return False, None
        if self.left.kind == "elapsed":
            if self.right.kind == "elapsed":
                # (now - a) OP (now - b) does not depend on now.
                return _OPS[self.op](b, a), None
            # now - a OP d  <=>  now OP a + d
            return _instant_compare(now, self.op, a + b)
        if not _comparable(a, b):
            return self.op == "!=", None
        return _OPS[self.op](a, b), None


class _In(_Node):
    kind = "bool"

    def __init__(self, left: _Node, options: tuple[Any, ...], negate: bool) -> None:
        self.left, self.options, self.negate = left, options, negate

    def eval(self, f: Facts, now: int) -> Value:
        a, _ = self.left.eval(f, now)
        if a is None or a is MISSING:
            return False, None
        found = any(_comparable(a, o) and a == o for o in self.options)
        return found != self.negate, None


class _And(_Node):
    kind = "bool"

    def __init__(self, parts: Sequence[_Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        results = [p.eval(f, now) for p in self.parts]
        value = all(v for v, _ in results)
        # While false, only a false part changing can change the result; a part that is
        # false for good keeps it false for good.
        relevant = results if value else [r for r in results if not r[0]]
        if not value and any(n is None for _, n in relevant):
            return False, None
        return value, min((n for _, n in relevant if n is not None), default=None)


class _Or(_Node):
    kind = "bool"

    def __init__(self, parts: Sequence[_Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        results = [p.eval(f, now) for p in self.parts]
        value = any(v for v, _ in results)
        relevant = results if not value else [r for r in results if r[0]]
        if value and any(n is None for _, n in relevant):
            return True, None
        return value, min((n for _, n in relevant if n is not None), default=None)


class _Not(_Node):
    kind = "bool"

    def __init__(self, part: _Node) -> None:
        self.part = part

    def eval(self, f: Facts, now: int) -> Value:
        v, n = self.part.eval(f, now)
        return not v, n


# --- parsing -------------------------------------------------------------------------------

_CMP = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FUNCTIONS = {
    "since_last": "since_last() or since_last('Event name')",
    "since_first": "since_first()",
    "count": "count() or count('Event name')",
    "trait": "trait('key')",
}


@dataclass(frozen=True, slots=True)
class Needs:
    """The facts a set of rules reads, so customers keep only those."""

    event_names: frozenset[str | None]
    """Track event names whose last instant and count are read (``None``: any track)."""
    trait_keys: frozenset[str]


class _Parser:
    def __init__(self, rewrite: _Rewrite, fail: Callable[[str], DefinitionError]) -> None:
        self.rewrite = rewrite
        self.fail = fail
        self.names: set[str | None] = set()
        self.traits: set[str] = set()

    def snippet(self, node: ast.AST) -> str:
        return self.rewrite.snippet(node)

    def node(self, n: ast.AST) -> _Node:
        if isinstance(n, ast.BoolOp):
            parts = [self.condition(v) for v in n.values]
            return _And(parts) if isinstance(n.op, ast.And) else _Or(parts)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return _Not(self.condition(n.operand))
        if isinstance(n, ast.Compare):
            pairs: list[_Node] = []
            left = n.left
            for op, right in zip(n.ops, n.comparators, strict=True):
                pairs.append(self.compare(left, op, right))
                left = right
            return pairs[0] if len(pairs) == 1 else _And(pairs)
        if isinstance(n, ast.Call):
            return self.call(n)
        if isinstance(n, ast.Constant) and isinstance(n.value, str | int | float | bool):
            return _Const(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            inner = n.operand
            if isinstance(inner, ast.Constant) and isinstance(inner.value, int | float):
                if not isinstance(inner.value, bool):
                    return _Const(-inner.value)
        if isinstance(n, ast.Name):
            raise self.fail(
                f"unknown name {n.id!r}: write text in quotes ('{n.id}'), or call one of "
                + ", ".join(_FUNCTIONS.values())
            )
        raise self.fail(f"`{self.snippet(n)}` is not allowed in a rule")

    def condition(self, n: ast.AST) -> _Node:
        node = self.node(n)
        if node.kind != "bool":
            raise self.fail(f"`{self.snippet(n)}` is not a condition (true or false)")
        return node

    def compare(self, left_ast: ast.expr, op: ast.cmpop, right_ast: ast.expr) -> _Node:
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
                if not isinstance(item, _Const):
                    raise self.fail(f"list items must be plain values, not `{self.snippet(elt)}`")
                options.append(item.value)
            return _In(left, tuple(options), isinstance(op, ast.NotIn))
        symbol = _CMP.get(type(op))
        if symbol is None:
            raise self.fail(f"comparison `{type(op).__name__}` is not allowed in a rule")
        right = self.node(right_ast)
        left, right = self.durations(left, left_ast, right, right_ast)
        return _Compare(left, symbol, right)

    def durations(
        self, left: _Node, left_ast: ast.expr, right: _Node, right_ast: ast.expr
    ) -> tuple[_Node, _Node]:
        """An elapsed time compares with another one or with a duration written as text."""
        if (left.kind == "elapsed") == (right.kind == "elapsed"):
            return left, right
        if left.kind == "elapsed":
            return left, self.duration(right, right_ast)
        return self.duration(left, left_ast), right

    def duration(self, node: _Node, where: ast.expr) -> _Node:
        if isinstance(node, _Const) and isinstance(node.value, str):
            try:
                return _DurationConst(parse_duration(node.value))
            except ValueError as e:
                raise self.fail(str(e)) from None
        raise self.fail(
            f"an elapsed time compares with a duration in quotes like '14d', "
            f"not `{self.snippet(where)}`"
        )

    def call(self, n: ast.Call) -> _Node:
        name = n.func.id if isinstance(n.func, ast.Name) else None
        if name not in _FUNCTIONS or n.keywords:
            raise self.fail(
                f"unknown function in `{self.snippet(n)}`: use one of "
                + ", ".join(_FUNCTIONS.values())
            )
        args: list[str] = []
        for a in n.args:
            if not (isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value):
                raise self.fail(f"`{self.snippet(n)}` takes a name in quotes")
            args.append(a.value)
        wanted = {"since_last": (0, 1), "count": (0, 1), "since_first": (0,), "trait": (1,)}
        if len(args) not in wanted[name]:
            raise self.fail(f"`{self.snippet(n)}`: write it as {_FUNCTIONS[name]}")
        if name == "since_first":
            return _SinceFirst()
        if name == "trait":
            self.traits.add(args[0])
            return _Trait(args[0])
        event = args[0] if args else None
        self.names.add(event)
        return _SinceLast(event) if name == "since_last" else _Count(event)


class _Rewrite:
    """A rule as Python can parse it, with columns mapped back to the text as written.

    SQL and spreadsheet habits are accepted: ``=`` for ``==`` (not a keyword argument's
    ``=``) and upper-case ``AND``/``OR``/``NOT``. The rewrite splices into the original text,
    so spacing is kept and messages can quote exactly what the user wrote.
    """

    def __init__(self, text: str) -> None:
        self.original = text
        lines = text.splitlines(keepends=True) or [""]
        inserted: dict[int, list[int]] = {}  # row -> rewritten columns of added '=' signs
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, SyntaxError):
            tokens = []  # ast.parse reports the problem with its position
        edits: list[tuple[int, int, str, str]] = []
        for i, tok in enumerate(tokens):
            if tok.type == tokenize.OP and tok.string == "=":
                before = tokens[i - 2].string if i >= 2 else ""
                if not (tokens[i - 1].type == tokenize.NAME and before in ("(", ",")):
                    edits.append((tok.start[0], tok.start[1], "=", "=="))
            elif tok.type == tokenize.NAME and tok.string in ("AND", "OR", "NOT"):
                edits.append((tok.start[0], tok.start[1], tok.string, tok.string.lower()))
        for row, col, old, new in sorted(edits, reverse=True):
            line = lines[row - 1]
            lines[row - 1] = line[:col] + new + line[col + len(old) :]
        shifts: dict[int, int] = {}
        for row, col, old, new in sorted(edits):
            if len(new) > len(old):
                at = col + shifts.get(row, 0) + len(old)
                inserted.setdefault(row, []).append(at)
                shifts[row] = shifts.get(row, 0) + len(new) - len(old)
        self.text = "".join(lines)
        self._inserted = inserted
        self._lines: list[str] = text.splitlines(keepends=True) or [""]

    def column(self, row: int, col: int) -> int:
        """The original column of rewritten column ``col`` (0-based) on line ``row``."""
        return col - sum(1 for c in self._inserted.get(row, ()) if c < col)

    def snippet(self, node: ast.AST) -> str:
        """The text of ``node`` as the user wrote it."""
        keys = ("lineno", "end_lineno", "col_offset", "end_col_offset")
        pos: list[int] = [p for k in keys if isinstance(p := getattr(node, k, None), int)]
        if len(pos) != len(keys):
            return ast.unparse(node)
        r0, r1, c0, c1 = pos
        start, end = self.column(r0, c0), self.column(r1, c1)
        if r0 == r1:
            return self._lines[r0 - 1][start:end]
        parts = [self._lines[r0 - 1][start:], *self._lines[r0 : r1 - 1], self._lines[r1 - 1][:end]]
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    """A checked rule, ready to evaluate."""

    text: str
    needs: Needs
    _root: _Node

    def evaluate(self, facts: Facts, now: int) -> tuple[bool, int | None]:
        """Whether the rule holds at ``now``, and the next instant that can change."""
        value, nxt = self._root.eval(facts, now)
        return bool(value), nxt


def parse_rule(text: str, *, source: str = "<rule>", segment: str | None = None) -> Rule:
    """Parse and check one rule.

    Raises:
        DefinitionError: the rule is not valid; the message says where and why.
    """

    def fail(problem: str) -> DefinitionError:
        return DefinitionError(problem, source=source, segment=segment)

    if not text.strip():
        raise fail("the rule is empty")
    rewrite = _Rewrite(text)
    try:
        tree = ast.parse(rewrite.text, mode="eval")
    except SyntaxError as e:
        col = ""
        if e.offset:
            col = f" at column {rewrite.column(e.lineno or 1, e.offset - 1) + 1}"
        raise fail(f"rule `{text}` is not valid syntax{col}: {e.msg}") from None
    parser = _Parser(rewrite, fail)
    root = parser.condition(tree.body)
    return Rule(
        text=text,
        needs=Needs(event_names=frozenset(parser.names), trait_keys=frozenset(parser.traits)),
        _root=root,
    )
