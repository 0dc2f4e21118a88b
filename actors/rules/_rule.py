"""A rule: parse, check and compile its text, and evaluate it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from actors._errors import DefinitionError

from ._check import Env, Parser
from ._compare import Compare
from ._compile import compile_rule
from ._conditions import Condition
from ._facts import Facts, Needs
from ._nodes import Node, walk
from ._parse import parse_syntax


@dataclass(frozen=True, slots=True)
class Rule:
    """A checked rule, ready to evaluate."""

    text: str
    needs: Needs
    refs: frozenset[str]
    """Segments the rule reads the membership of."""
    _root: Node
    reads_first: bool = False
    """Whether it reads the instant of the first event (``since_first()``)."""
    cacheable: bool = True
    """Whether :meth:`evaluate_until`'s answer may be kept until its ``until`` while the
    facts it reads stay the same: false when the rule reads memberships, or searches a score
    of negative weights (whose crossing found depends on where the search starts)."""

    evaluator: Callable[[Facts, int], tuple[bool, int | None, int | None]] = field(
        init=False, repr=False, compare=False
    )
    """:meth:`evaluate_until` as one compiled function (what customers call)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "evaluator", compile_rule(self._root))

    @property
    def condition(self) -> Condition:
        """The rule's conditions, part by part, as written (what explanations read)."""
        return Condition(self._root)

    def evaluate(self, facts: Facts, now: int) -> tuple[bool, int | None]:
        """Whether the rule holds at ``now``, and the next instant that can change."""
        value, nxt, _ = self.evaluator(facts, now)
        return value, nxt

    def evaluate_until(self, facts: Facts, now: int) -> tuple[bool, int | None, int | None]:
        """:meth:`evaluate`, and the earliest instant after ``now`` at which its answer
        (value or next) can differ while the facts stay the same (``None``: never).

        Facts here are as of ``now``: no event the rule reads is after ``now``.
        """
        return self.evaluator(facts, now)


def parse_rule(
    text: str, *, source: str = "<rule>", segment: str | None = None, env: Env | None = None
) -> Rule:
    """Parse and check one rule.

    Args:
        text: the rule.
        source, segment: where it comes from, for error messages.
        env: the score settings, static lists and segment names it may refer to.

    Raises:
        DefinitionError: the rule is not valid; the message says where and why.
    """

    def fail(problem: str) -> DefinitionError:
        return DefinitionError(problem, source=source, segment=segment)

    rewrite, tree = parse_syntax(text, fail)
    parser = Parser(rewrite, fail, env or Env())
    root = parser.condition(tree.body)
    return Rule(
        text=text,
        needs=Needs(
            event_names=frozenset(parser.names),
            trait_keys=frozenset(parser.traits),
            retained=frozenset(parser.retained),
            window=parser.reach,
            delay=parser.delay,
            properties=parser.properties,
        ),
        refs=frozenset(parser.refs),
        _root=root,
        reads_first=parser.first,
        cacheable=not parser.refs and all(n.monotone for n in walk(root) if isinstance(n, Compare)),
    )
