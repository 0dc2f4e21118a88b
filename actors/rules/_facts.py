"""What rules read: the facts of a customer (the Facts protocol) and evaluation values."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, Protocol

from ._dates import LocalFilter
from ._scores import ScoreConfig, ScoreTerms


class Tracked(Protocol):
    """A retained track event, as rules read it."""

    @property
    def at(self) -> int: ...
    @property
    def name(self) -> str | None: ...
    @property
    def properties(self) -> Mapping[str, Any]: ...


class Facts(Protocol):
    """What a rule may read of a customer."""

    customer_id: str

    def first_at(self) -> int | None: ...
    def last_at(self, name: str | None) -> int | None: ...
    def count(self, name: str | None) -> int: ...
    def trait(self, key: str) -> Any: ...
    def tracked(self) -> Sequence[Tracked]: ...
    def member(self, segment: str) -> bool: ...


class Indexed:
    """Facts that also keep their retained track events indexed by instant, so windows and
    scores need not scan them all (:class:`actors.Customer` does). Rules read any
    :class:`Facts` alike; these give the same answers, faster."""

    __slots__ = ()

    def instants(self, name: str | None) -> Sequence[int]:
        """The instants of the retained track events named ``name`` (None: all), sorted."""
        raise NotImplementedError

    def local_counts(self, name: str | None, zone: tzinfo, where: LocalFilter) -> Sequence[int]:
        """For each i, how many of the first i :meth:`instants` ``where`` lets in, by their
        weekday and hour in ``zone`` (so element 0 is 0)."""
        raise NotImplementedError

    def score_terms(self, config: ScoreConfig) -> ScoreTerms:
        """The score terms of the retained track events under ``config``, up to date."""
        raise NotImplementedError


MISSING: Any = object()
"""The value of anything the customer does not have (a trait, min of no events...)."""

Value = tuple[Any, int | None]


def earliest(a: int | None, b: int | None) -> int | None:
    """The earlier of two optional instants (``None``: never)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


@dataclass(frozen=True, slots=True)
class Needs:
    """The facts a set of rules reads, so customers keep only those."""

    event_names: frozenset[str | None] = frozenset()
    """Track event names whose last instant and count are read (``None``: any track)."""
    trait_keys: frozenset[str] = frozenset()
    retained: frozenset[str | None] = frozenset()
    """Track event names whose events are kept for windows and scores (``None``: all)."""
    window: int | None = 0
    """How far back from the instant of evaluation a window reads retained events: the
    longest ``within`` (None: a window reads all time; 0: no window reads them). Evaluation
    is never before a customer's watermark, so its windows never read an event at or before
    ``watermark - window`` again."""
    delay: int = 0
    """The longest ``score_at`` delay: a score never reads an instant before
    ``watermark - delay`` as its present again."""
    properties: bool = False
    """Whether a window reads events' properties (``where``, ``sum``, ``min``, ``max``)."""

    def __or__(self, other: Needs) -> Needs:
        a, b = self.window, other.window
        return Needs(
            self.event_names | other.event_names,
            self.trait_keys | other.trait_keys,
            self.retained | other.retained,
            None if a is None or b is None else max(a, b),
            max(self.delay, other.delay),
            self.properties or other.properties,
        )

    def fingerprint(self) -> str:
        """A short text equal for equal needs, to tell whether stored facts still fit."""

        def names(keys: frozenset[str | None]) -> list[str]:
            # "*" cannot clash with an event name: None (any track) has no name.
            return sorted("*" if k is None else "=" + k for k in keys)

        parts: tuple[object, ...] = (
            names(self.event_names),
            sorted(self.trait_keys),
            names(self.retained),
        )
        if self.properties:
            # Kept facts differ only there: events' properties are kept (a customer keeps
            # every retained event; windows and delays change only what is derived).
            parts += ("properties",)
        text = repr(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
