"""The engine's use of the cyclic garbage collector: what is alive is frozen as it settles.

See :attr:`EngineConfig.freeze_gc` for why: a million actors are tens of millions of objects
that live as long as the engine, and each full collection walked them all.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

FREEZE_EVENTS = 20_000
"""Events applied (or customers prepared or fired) between two freezes of the collector."""


class Collector:
    """Freezes the collector's view after loading and every :data:`FREEZE_EVENTS` of work."""

    __slots__ = ("_enabled", "since")

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self.since = 0
        """Events applied (or customers prepared or fired) since the last freeze."""

    def worked(self, n: int) -> None:
        """Count ``n`` events applied or customers prepared or fired; freeze when due."""
        self.since += n
        if self.since >= FREEZE_EVENTS:
            # What they added to the actors joins the frozen: otherwise every full
            # collection walks all that came since the last freeze.
            self.settle()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around loading a page of customers: the young garbage others left is collected
        first; while the page decodes, the collector is off (the actors it makes live as
        long as the engine, and young collections of a growing heap cost as much as the
        decoding); then what is alive is frozen, which costs nothing (``gc.freeze`` moves
        the generations' lists whole)."""
        if not self._enabled:
            yield
            return
        gc.collect(1)
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            if enabled:
                gc.enable()

    def settle(self) -> None:
        """Young garbage collected (cheap), then all that is alive frozen, so full
        collections only walk what came since."""
        self.since = 0
        if self._enabled:
            gc.collect(1)
            gc.freeze()
