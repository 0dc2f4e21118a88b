"""The public view of a compiled rule's conditions, part by part: what explanations read.

A :class:`Rule` evaluates as one compiled function; :attr:`Rule.condition` shows the same
rule as a tree of :class:`Condition` (``and``, ``or``, ``not`` and single tests), each with
its text as written and its own value and next instant, and each test with its operator and
its sides (:class:`Operand`) in the order written. The views only read the rule: they hold
no state and change nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from ._compare import MIRROR, Compare
from ._facts import MISSING, Facts
from ._nodes import And, Const, Contains, Elapsed, Exists, In, InSegment, Node, Not, Or, walk
from ._scores import Decay

ConditionKind = Literal["and", "or", "not", "condition"]
OperandKind = Literal["duration", "instant", "score", "value"]


class Operand:
    """One side of a test, as written: a value of the customer's facts at an instant."""

    __slots__ = ("_node",)

    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def kind(self) -> OperandKind:
        """How to read :meth:`value`: ``duration`` (microseconds: an elapsed time such as
        ``since_last()``, a time remaining such as ``until(...)``, or a duration such as
        ``'14d'``), ``instant`` (microseconds since the epoch), ``score`` (a float), or
        ``value`` (a number, text, boolean or list, as it is)."""
        kind = self._node.kind
        if kind in ("elapsed", "duration"):
            return "duration"
        if kind == "decay":
            return "score"
        if kind == "instant":
            return "instant"
        return "value"

    def value(self, facts: Facts, now: int) -> Any:
        """The value at ``now``, read as :attr:`kind` says; :data:`MISSING` when the
        customer has none (no such trait, no such event)."""
        v, _ = self._node.eval(facts, now)
        if v is None or v is MISSING:
            return MISSING
        if isinstance(v, Elapsed):
            return v.sign * (now - v.anchor)
        if isinstance(v, Decay):
            return v.at(now)
        return v


class Condition:
    """One condition of a compiled rule: ``and``/``or`` of :attr:`children`, ``not`` of its
    one child, or a single test (kind ``condition``) such as a comparison."""

    __slots__ = ("_node",)

    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def text(self) -> str:
        """The condition as written in the rule (one link of a chained comparison)."""
        return self._node.text

    @property
    def kind(self) -> ConditionKind:
        """``and``, ``or``, ``not``, or ``condition`` for a single test."""
        node = self._node
        if isinstance(node, And):
            return "and"
        if isinstance(node, Or):
            return "or"
        if isinstance(node, Not):
            return "not"
        return "condition"

    @property
    def children(self) -> tuple[Condition, ...]:
        """The parts of an ``and`` or ``or`` in the order written, the negated condition of
        a ``not``; none for a test."""
        node = self._node
        if isinstance(node, And | Or):
            return tuple(Condition(p) for p in node.parts)
        if isinstance(node, Not):
            return (Condition(node.part),)
        return ()

    @property
    def op(self) -> str | None:
        """A test's operator between its :attr:`operands`, as written (``==`` also for
        ``=``): ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``,
        ``contains``, or ``exists`` (with one operand). None for other tests (such as
        ``in_segment(...)``) and for ``and``/``or``/``not``."""
        node = self._node
        if isinstance(node, Compare):
            return MIRROR[node.op] if node.mirrored else node.op
        if isinstance(node, In):
            return "not in" if node.negate else "in"
        if isinstance(node, Contains):
            return "contains"
        if isinstance(node, Exists):
            return "exists"
        return None

    @property
    def operands(self) -> tuple[Operand, ...]:
        """A test's sides in the order written (the list of an ``in`` is its right side);
        one for ``exists``, none where :attr:`op` is None."""
        node = self._node
        if isinstance(node, Compare):
            if node.mirrored:
                return Operand(node.right), Operand(node.left)
            return Operand(node.left), Operand(node.right)
        if isinstance(node, In):
            return Operand(node.left), Operand(Const(list(node.options)))
        if isinstance(node, Contains):
            return Operand(node.haystack), Operand(node.needle)
        if isinstance(node, Exists):
            return (Operand(node.inner),)
        return ()

    @property
    def refs(self) -> frozenset[str]:
        """The segments whose membership the condition reads (``in_segment``)."""
        return frozenset(n.name for n in walk(self._node) if isinstance(n, InSegment))

    def evaluate(self, facts: Facts, now: int) -> tuple[bool, int | None]:
        """Whether the condition holds at ``now``, and the next instant after ``now`` at
        which that can change with the same facts and memberships (None: never). The next
        instant may be early (the value is then the same) but never late."""
        value, nxt = self._node.eval(facts, now)
        return bool(value), nxt
