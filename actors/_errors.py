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


class DefinitionsConflict(ActorsError):
    """New definitions were not applied: another engine sharing the broker stored a version
    of its own first (the versions of ``SHOAL_DEFINITIONS`` are one sequence, written with
    a compare-and-set). Every engine follows the winner; apply again on top of it if still
    wanted.

    Attributes:
        version: the version these definitions would have been.
        winner: the version stored instead (None when it could not be read).
        winner_source: the winner's name (its file's path, or the name its request gave).
    """

    def __init__(self, version: int, winner: int | None, winner_source: str | None) -> None:
        won = (
            "another engine stored definitions first"
            if winner is None
            else f"version {winner} ({winner_source}) was stored first by another engine"
        )
        super().__init__(
            f"the definitions were not applied as version {version}: {won}; every engine "
            "follows it: check it (shoal status) and apply again if still wanted"
        )
        self.version = version
        self.winner = winner
        self.winner_source = winner_source
