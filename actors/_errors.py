"""The exceptions raised by :mod:`actors`."""

from __future__ import annotations


class ActorsError(Exception):
    """Root of every error raised by :mod:`actors`."""


class DefinitionError(ActorsError, ValueError):
    """A segments file or rule cannot be used; the message says where and why."""

    def __init__(self, problem: str, *, source: str, segment: str | None = None) -> None:
        where = source if segment is None else f"{source}: segment {segment!r}"
        super().__init__(f"{where}: {problem}")
        self.problem = problem
        self.source = source
        self.segment = segment
