"""The nodes of a checked rule: values, tests and connectives, each evaluated at an instant."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._dates import to_instant_value
from ._facts import MISSING, Facts, Indexed, Value, earliest
from ._scores import Decay, ScoreConfig

# --- values that move with time ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Elapsed:
    """``sign * (now - anchor)``: an elapsed time (sign 1) or a time remaining (sign -1)."""

    anchor: int
    sign: int


# --- nodes ---------------------------------------------------------------------------------
# ``kind`` drives checking at parse time: "bool", "elapsed", "duration", "instant",
# "number" (a number-valued function of the facts), "decay" (a score) or "value".


class Node:
    kind = "value"
    text = ""
    """The node as written in the rule (set by the parser; for explanations only)."""

    def eval(self, f: Facts, now: int) -> Value:
        raise NotImplementedError

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        """``eval``, and the earliest instant at which ``eval``'s answer (value *and* next)
        can differ with the same facts (``None``: never). For a node that combines
        conditions, that is earlier than its next when a part it ignores changes: ``a and
        b`` false because of ``a`` does not change when ``b`` does, but its next may."""
        value, nxt = self.eval(f, now)
        return value, nxt, nxt

    def children(self) -> tuple[Node, ...]:
        return tuple(
            n
            for v in vars(self).values()
            for n in (v if isinstance(v, tuple) else (v,))
            if isinstance(n, Node)
        )


class Const(Node):
    def __init__(self, value: Any) -> None:
        self.value = value
        if isinstance(value, bool):
            self.kind = "bool"
        elif isinstance(value, int | float):
            self.kind = "numconst"

    def eval(self, f: Facts, now: int) -> Value:
        return self.value, None


class DurationConst(Node):
    kind = "duration"

    def __init__(self, us: int) -> None:
        self.us = us

    def eval(self, f: Facts, now: int) -> Value:
        return self.us, None


class InstantConst(Node):
    kind = "instant"

    def __init__(self, us: int) -> None:
        self.us = us

    def eval(self, f: Facts, now: int) -> Value:
        return self.us, None


class ElapsedNode(Node):
    """``sign * (now - anchor)``; its value is an :class:`Elapsed`, or None (missing)."""

    kind = "elapsed"
    sign = 1

    def anchor(self, f: Facts, now: int) -> int | None:
        raise NotImplementedError

    def eval(self, f: Facts, now: int) -> Value:
        at = self.anchor(f, now)
        return (None if at is None else Elapsed(at, self.sign)), None


class SinceLast(ElapsedNode):
    def __init__(self, name: str | None) -> None:
        self.name = name

    def anchor(self, f: Facts, now: int) -> int | None:
        return f.last_at(self.name)


class SinceFirst(ElapsedNode):
    def anchor(self, f: Facts, now: int) -> int | None:
        return f.first_at()


class Relative(ElapsedNode):
    """``since(instant)`` (sign 1) or ``until(instant)`` (sign -1)."""

    def __init__(self, inner: Node, sign: int) -> None:
        self.inner, self.sign = inner, sign

    def anchor(self, f: Facts, now: int) -> int | None:
        at, _ = self.inner.eval(f, now)
        return None if at is None or at is MISSING else at


class Trait(Node):
    def __init__(self, key: str) -> None:
        self.key = key

    def eval(self, f: Facts, now: int) -> Value:
        return f.trait(self.key), None


class DateOf(Node):
    kind = "instant"

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def eval(self, f: Facts, now: int) -> Value:
        v, _ = self.inner.eval(f, now)
        at = to_instant_value(v)
        return (MISSING if at is None else at), None


class Exists(Node):
    kind = "bool"

    def __init__(self, inner: Node) -> None:
        self.inner = inner

    def eval(self, f: Facts, now: int) -> Value:
        v, _ = self.inner.eval(f, now)
        return (v is not MISSING and v is not None), None


class Contains(Node):
    kind = "bool"

    def __init__(self, haystack: Node, needle: Node) -> None:
        self.haystack, self.needle = haystack, needle

    def eval(self, f: Facts, now: int) -> Value:
        h, _ = self.haystack.eval(f, now)
        n, _ = self.needle.eval(f, now)
        if h is MISSING or n is MISSING or h is None or n is None:
            return False, None
        if isinstance(h, str):
            return (isinstance(n, str) and n in h), None
        if isinstance(h, list):
            return any(comparable(x, n) and x == n for x in h), None
        return False, None


class Score(Node):
    kind = "decay"

    def __init__(self, config: ScoreConfig, delta: int) -> None:
        self.config, self.delta = config, delta

    def eval(self, f: Facts, now: int) -> Value:
        cutoff = now - self.delta
        if isinstance(f, Indexed):
            return self._indexed(f, cutoff)
        terms = []
        nxt: int | None = None
        weight = self.config.weight
        for e in f.tracked():
            w = weight(e.name)
            if w == 0:
                continue
            if e.at <= cutoff:
                terms.append((e.at, float(w)))
            elif self.delta:
                nxt = earliest(nxt, e.at + self.delta)  # when it enters score(now - delta)
        top = max((te for te, _ in terms), default=None)
        return Decay(1.0, self.delta, tuple(terms), self.config.half_life, top), nxt

    def _indexed(self, f: Indexed, cutoff: int) -> Value:
        return f.score_terms(self.config).decay(cutoff, self.delta)


class Scale(Node):
    def __init__(self, k: float, inner: Node) -> None:
        self.k, self.inner = k, inner
        self.kind = inner.kind

    def eval(self, f: Facts, now: int) -> Value:
        v, nxt = self.inner.eval(f, now)
        if isinstance(v, Decay):
            return v.scaled(self.k), nxt
        if isinstance(v, int | float) and not isinstance(v, bool):
            return self.k * v, nxt
        return MISSING, nxt


class InSegment(Node):
    kind = "bool"

    def __init__(self, name: str) -> None:
        self.name = name

    def eval(self, f: Facts, now: int) -> Value:
        return f.member(self.name), None


class InList(Node):
    kind = "bool"

    def __init__(self, members: frozenset[str]) -> None:
        self.members = members

    def eval(self, f: Facts, now: int) -> Value:
        return f.customer_id in self.members, None


def comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b) and isinstance(a, str)


class In(Node):
    kind = "bool"

    def __init__(self, left: Node, options: tuple[Any, ...], negate: bool) -> None:
        self.left, self.options, self.negate = left, options, negate

    def eval(self, f: Facts, now: int) -> Value:
        a, nxt = self.left.eval(f, now)
        if a is None or a is MISSING:
            return False, nxt
        found = any(comparable(a, o) and a == o for o in self.options)
        return found != self.negate, nxt


class And(Node):
    kind = "bool"

    def __init__(self, parts: Sequence[Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        value, nxt, _ = self.test(f, now)
        return value, nxt

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        # While false, only a false part changing can change the result; a part that is
        # false for good keeps it false for good: then the answer is (false, no next) until
        # a fact changes, whatever the other parts say, and they are not looked at.
        until: int | None = None
        nxt_all: int | None = None  # over all parts: the next while they all hold
        nxt_false: int | None = None  # over the false parts
        value = True
        for p in self.parts:
            v, n, u = p.test(f, now)
            if not v:
                if n is None:
                    return False, None, None
                value = False
                if nxt_false is None or n < nxt_false:
                    nxt_false = n
            if u is not None and (until is None or u < until):
                until = u
            if n is not None and (nxt_all is None or n < nxt_all):
                nxt_all = n
        if value:
            return True, nxt_all, until
        return False, nxt_false, until


class Or(Node):
    kind = "bool"

    def __init__(self, parts: Sequence[Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        value, nxt, _ = self.test(f, now)
        return value, nxt

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        # While true, only a true part changing can change the result; a part true for
        # good decides it until a fact changes (as And's part false for good).
        until: int | None = None
        nxt_all: int | None = None
        nxt_true: int | None = None
        value = False
        for p in self.parts:
            v, n, u = p.test(f, now)
            if v:
                if n is None:
                    return True, None, None
                value = True
                if nxt_true is None or n < nxt_true:
                    nxt_true = n
            if u is not None and (until is None or u < until):
                until = u
            if n is not None and (nxt_all is None or n < nxt_all):
                nxt_all = n
        if not value:
            return False, nxt_all, until
        return True, nxt_true, until


class Not(Node):
    kind = "bool"

    def __init__(self, part: Node) -> None:
        self.part = part

    def eval(self, f: Facts, now: int) -> Value:
        v, n = self.part.eval(f, now)
        return not v, n

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        v, n, u = self.part.test(f, now)
        return not v, n, u


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children():
        yield from walk(child)
