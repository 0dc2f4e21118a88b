"""A customer's retained track events indexed by instant: what windows and scores read.

The index is derived, never stored: a customer builds it when a rule first reads it and
brings it up to date with the retained events, which only grow (see :class:`Indexed`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import tzinfo
from itertools import accumulate

from .rules import LocalFilter, ScoreConfig, ScoreTerms, Tracked, local_time


class LocalTimes:
    """Local times (``weekday * 24 + hour``) of some instants in one zone, and for each
    filter asked about, how many of the first i instants it lets in."""

    __slots__ = ("zone", "codes", "counts")

    def __init__(self, zone: tzinfo, ats: Sequence[int]) -> None:
        self.zone = zone
        self.codes = [local_time(at, zone) for at in ats]
        self.counts: dict[LocalFilter, list[int]] = {}

    def insert(self, pos: int, at: int) -> None:
        code = local_time(at, self.zone)
        codes = self.codes
        codes.insert(pos, code)
        if pos == len(codes) - 1:
            for flt, counts in self.counts.items():
                counts.append(counts[-1] + flt.ok[code])
        else:
            self.counts.clear()

    def count(self, flt: LocalFilter) -> list[int]:
        counts = self.counts.get(flt)
        if counts is None:
            ok = flt.ok
            counts = self.counts[flt] = list(accumulate((ok[c] for c in self.codes), initial=0))
        return counts


NO_INSTANTS: tuple[int, ...] = ()
NO_COUNTS = (0,)
_EMPTY_TERMS: list[ScoreTerms] = []


def empty_terms(config: ScoreConfig) -> ScoreTerms:
    """The score terms of no event, shared by the customers without track events (they
    are only read), so that such a customer keeps no index: a few hundred bytes each."""
    if not _EMPTY_TERMS or _EMPTY_TERMS[0].config is not config:
        _EMPTY_TERMS[:] = [ScoreTerms(config)]
    return _EMPTY_TERMS[0]


class TimeIndex:
    """A customer's retained track events by instant (see :class:`Indexed`), brought up to
    date with the retained events, which only grow, when it is read."""

    __slots__ = ("upto", "times", "local", "terms", "terms_upto")

    def __init__(self) -> None:
        self.upto = 0  # how many retained events ``times`` and ``local`` hold
        self.times: dict[str | None, list[int]] = {}
        self.local: dict[str | None, LocalTimes] = {}
        self.terms: ScoreTerms | None = None
        self.terms_upto = 0  # how many retained events ``terms`` has seen

    def catch_up(self, tracked: Sequence[Tracked]) -> None:
        times, local = self.times, self.local
        for e in tracked[self.upto :]:
            at = e.at
            for key in (None,) if e.name is None else (None, e.name):
                ats = times.get(key)
                if ats is None:
                    continue
                if not ats or ats[-1] <= at:
                    pos = len(ats)
                    ats.append(at)
                else:  # a late event
                    pos = bisect_right(ats, at)
                    ats.insert(pos, at)
                loc = local.get(key)
                if loc is not None:
                    loc.insert(pos, at)
        self.upto = len(tracked)

    def score_terms(self, tracked: Sequence[Tracked], config: ScoreConfig) -> ScoreTerms:
        terms = self.terms
        if terms is None or terms.config is not config:
            terms = self.terms = ScoreTerms(config)
            self.terms_upto = 0
        if self.terms_upto < len(tracked):
            weight = config.weight
            for e in tracked[self.terms_upto :]:
                w = weight(e.name)
                if w != 0:
                    terms.add(e.at, float(w))
            self.terms_upto = len(tracked)
        return terms
