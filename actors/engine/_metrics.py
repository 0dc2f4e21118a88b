"""What an engine counts: its stats, transitions and rejections by kind, members per segment,
and the rate of events applied."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import msgspec

from actors._customer import Customer
from protocol import SECOND, Transition

from ._config import EngineStats

_RATE_WINDOW = 10 * SECOND
"""The span over which :attr:`Counts.events_per_second` is measured."""


class Counts:
    """The engine's counters. Members per segment are counted on transitions and as
    customers load, never by scanning."""

    def __init__(self) -> None:
        self.stats = EngineStats()
        # Committed transitions by (segment, change, cause type), and rejections by class.
        self._transitions_by: dict[tuple[str, str, type[msgspec.Struct]], int] = {}
        self._rejections_by: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        # (instant, events applied before it) of the latest batches.
        self._applied: deque[tuple[int, int]] = deque()

    @property
    def transition_counts(self) -> dict[tuple[str, str, str], int]:
        """Transitions committed since start, by (segment, change, cause kind)."""
        return {
            (segment, change, str(cause.__struct_config__.tag)): n
            for (segment, change, cause), n in self._transitions_by.items()
        }

    @property
    def rejection_counts(self) -> dict[str, int]:
        """Events rejected since start, by class of reason."""
        return self._rejections_by.copy()

    def committed(self, transitions: Iterable[Transition]) -> None:
        """Count committed transitions: members per segment, and by kind."""
        sizes = self.sizes
        counts = self._transitions_by
        for t in transitions:
            sizes[t.segment] = sizes.get(t.segment, 0) + (1 if t.change == "entered" else -1)
            key = (t.segment, t.change, type(t.cause))
            counts[key] = counts.get(key, 0) + 1

    def rejected(self, kind: str) -> None:
        self.stats.events_rejected += 1
        self._rejections_by[kind] = self._rejections_by.get(kind, 0) + 1

    def held(self, c: Customer) -> None:
        """Count the memberships of a customer just loaded."""
        sizes = self.sizes
        for segment in c.members:
            sizes[segment] = sizes.get(segment, 0) + 1

    def released(self, c: Customer) -> None:
        """Stop counting the memberships of a customer (counted by :meth:`held`)."""
        sizes = self.sizes
        for segment in c.members:
            sizes[segment] = sizes.get(segment, 0) - 1

    def recount(self, names: Iterable[str], customers: Iterable[Customer]) -> None:
        """Count the members of each segment afresh (after a start or a switch, which look
        at every customer anyway)."""
        sizes = dict.fromkeys(names, 0)
        for c in customers:
            for segment in c.members:
                sizes[segment] = sizes.get(segment, 0) + 1
        self.sizes = sizes

    def applied(self, n: int, now: int) -> None:
        """Record a batch of ``n`` events applied at ``now``, for :meth:`events_per_second`."""
        applied = self._applied
        applied.append((now, self.stats.events_applied - n))
        while applied[0][0] < now - _RATE_WINDOW:
            applied.popleft()

    def events_per_second(self, now: int) -> float:
        """Events applied per second over the last 10 s before ``now``."""
        recent = [(at, before) for at, before in self._applied if at >= now - _RATE_WINDOW]
        if not recent:
            return 0.0
        since, before = recent[0]
        return (self.stats.events_applied - before) * SECOND / max(now - since, SECOND)
