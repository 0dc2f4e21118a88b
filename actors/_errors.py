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


class UnknownSegmentError(ActorsError, LookupError):
    """A segment was asked about that the definitions do not have."""

    def __init__(self, segment: str, known: tuple[str, ...]) -> None:
        shown = ", ".join(known[:10]) if known else "none"
        if len(known) > 10:
            shown += f" and {len(known) - 10} more"
        super().__init__(f"unknown segment {segment!r}; the segments defined are: {shown}")
        self.segment = segment
        self.known = known
