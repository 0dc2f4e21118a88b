"""Clocks: time is an input to shoal.

Instants are ``int`` microseconds since the epoch, UTC. The engine reads time only through a
:class:`Clock`; customer actors never read it at all, they are handed instants.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where the engine gets the current instant, and how it waits for a future one."""

    def now(self) -> int:
        """The current instant (microseconds since the epoch, UTC)."""
        ...

    async def sleep_until(self, instant: int) -> None:
        """Return once :meth:`now` has reached ``instant`` (at once if it has)."""
        ...


class SystemClock:
    """The real wall clock, for ``shoal serve``."""

    def now(self) -> int:
        return time.time_ns() // 1000

    async def sleep_until(self, instant: int) -> None:
        delay = (instant - self.now()) / 1e6
        if delay > 0:
            await anyio.sleep(delay)


class VirtualClock:
    """A clock that moves only when told to, for replay and tests."""

    def __init__(self, start: int) -> None:
        self._now = start
        self._moved = anyio.Event()

    def now(self) -> int:
        return self._now

    def set(self, instant: int) -> None:
        """Move the clock to ``instant`` (never backwards) and wake whoever waits.

        Raises:
            ValueError: ``instant`` is before the current instant.
        """
        if instant < self._now:
            raise ValueError(f"a clock cannot go back from {self._now} to {instant}")
        self._now = instant
        moved, self._moved = self._moved, anyio.Event()
        moved.set()

    def advance(self, delta: int) -> None:
        """Move the clock forward by ``delta`` microseconds."""
        self.set(self._now + delta)

    async def sleep_until(self, instant: int) -> None:
        while self._now < instant:
            await self._moved.wait()
