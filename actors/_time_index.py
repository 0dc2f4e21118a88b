"""A customer's retained track events (:class:`RetainedLog`), and what windows and scores
read of them indexed by instant (:class:`TimeIndex`).

The log is state: every retained event, in log order, in a few bytes each (its instant and
its name's code; its properties only when a window reads them). The index is derived,
never stored: a customer builds it when a rule first reads it, brings it up to date with
the log, which only grows, and prunes it (:meth:`TimeIndex.prune`) of what no rule can
read again, so that it stays bounded however long the customer's history.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from datetime import tzinfo
from itertools import accumulate
from typing import Any

from .rules import LocalFilter, Needs, ScoreConfig, ScoreTerms, local_time

_TABLES: dict[tuple[str | None, ...], tuple[str | None, ...]] = {}
"""Name tables shared between customers (most have the same few names, from the rules)."""
_SHARED_TABLE = 16  # longer tables (rules retaining any name) are a customer's own


class RetainedLog:
    """A customer's retained track events in log order: ``ats[i]`` is the instant of the
    i-th, ``names[codes[i]]`` its name, ``props[i]`` its properties (None: no window reads
    properties, and none are kept)."""

    __slots__ = ("ats", "codes", "names", "props")

    def __init__(self, keep_properties: bool) -> None:
        self.ats: array[int] = array("q")
        self.codes: array[int] = array("B")
        self.names: tuple[str | None, ...] = ()
        self.props: list[dict[str, Any]] | None = [] if keep_properties else None

    def __len__(self) -> int:
        return len(self.ats)

    def __eq__(self, other: object) -> bool:
        """The same events: instants, names and properties (none kept reads as empty)."""
        if not isinstance(other, RetainedLog):
            return NotImplemented
        return (
            self.ats == other.ats
            and [self.names[c] for c in self.codes] == [other.names[c] for c in other.codes]
            and self._properties() == other._properties()
        )

    __hash__ = None  # type: ignore[assignment]

    def _properties(self) -> list[dict[str, Any]]:
        return [{}] * len(self.ats) if self.props is None else self.props

    def code(self, name: str | None) -> int:
        """The code of ``name``, given one if it has none."""
        names = self.names
        try:
            return names.index(name)
        except ValueError:
            pass
        if type(name) is str:
            name = sys.intern(name)
        names = (*names, name)
        if len(names) <= _SHARED_TABLE:
            names = _TABLES.setdefault(names, names)
        self.names = names
        code = len(names) - 1
        if code > 255 and self.codes.typecode == "B":
            self.codes = array("L", self.codes)
        return code

    def add(self, at: int, name: str | None, properties: dict[str, Any]) -> None:
        self.ats.append(at)
        self.codes.append(self.code(name))
        if self.props is not None:
            self.props.append(properties)

    def terms(self, config: ScoreConfig, upto: int, start: int = 0) -> Iterator[tuple[int, float]]:
        """The score terms ``(instant, weight)`` of events ``start`` to ``upto``, in log
        order (events of weight 0 have none)."""
        weights = [float(config.weight(n)) for n in self.names]
        for at, c in zip(self.ats[start:upto], self.codes[start:upto], strict=True):
            w = weights[c]
            if w != 0:
                yield at, w


class LocalTimes:
    """Local times (``weekday * 24 + hour``) of some instants in one zone, and for each
    filter asked about, how many of the first i instants it lets in."""

    __slots__ = ("zone", "codes", "counts")

    def __init__(self, zone: tzinfo, ats: Sequence[int]) -> None:
        self.zone = zone
        self.codes = bytearray(local_time(at, zone) for at in ats)
        self.counts: dict[LocalFilter, array[int]] = {}

    def insert(self, pos: int, at: int) -> None:
        code = local_time(at, self.zone)
        codes = self.codes
        codes.insert(pos, code)
        if pos == len(codes) - 1:
            for flt, counts in self.counts.items():
                counts.append(counts[-1] + flt.ok[code])
        else:
            self.counts.clear()

    def drop_first(self, k: int) -> None:
        """Leave out the first ``k`` instants (pruned): their local times go, and the counts
        are made again when read (from the local times kept: no zone is consulted)."""
        del self.codes[:k]
        self.counts.clear()

    def count(self, flt: LocalFilter) -> array[int]:
        counts = self.counts.get(flt)
        if counts is None:
            ok = flt.ok
            counts = self.counts[flt] = array(
                "I", accumulate((ok[c] for c in self.codes), initial=0)
            )
        return counts


NO_INSTANTS: tuple[int, ...] = ()
NO_COUNTS = (0,)
_EMPTY_TERMS: list[ScoreTerms] = []
PRUNE_FROM = 17
"""A customer's index is pruned once its log holds this many events, then each time the log
has grown by as many as the index kept at the last pruning (amortised: a few operations per
event). Below it nothing is pruned, so rules read on a small customer at any instant, as
before any pruning (the tests compare the ways of evaluating at earlier instants too)."""


def empty_terms(config: ScoreConfig) -> ScoreTerms:
    """The score terms of no event, shared by the customers without track events (they
    are only read), so that such a customer keeps no index: a few hundred bytes each."""
    if not _EMPTY_TERMS or _EMPTY_TERMS[0].config is not config:
        _EMPTY_TERMS[:] = [ScoreTerms(config)]
    return _EMPTY_TERMS[0]


class TimeIndex:
    """What windows and scores read of a customer's :class:`RetainedLog`, brought up to date
    with the log when it is read.

    ``times[name]``: the instants of the events named ``name`` (None: all), sorted, but
    those at or before ``cut``; ``terms``: the score terms, those at or before
    ``terms.cut`` folded (:meth:`ScoreTerms.fold_old`). Pruning (:meth:`prune`) moves
    the cuts to what the rules can no longer read, given the customer's watermark.
    """

    __slots__ = (
        "upto",
        "times",
        "local",
        "terms",
        "terms_upto",
        "cut",
        "needs",
        "next_prune",
        "events",
        "weights",
    )

    def __init__(self) -> None:
        self.upto = 0  # how many logged events ``times`` and ``local`` have seen
        self.times: dict[str | None, array[int]] = {}
        self.local: dict[str | None, LocalTimes] = {}
        self.terms: ScoreTerms | None = None
        self.terms_upto = 0  # how many logged events ``terms`` has seen
        self.cut: int | None = None
        """No window reads an instant at or before it: ``times`` leave them out."""
        self.needs: Needs | None = None
        """What the cuts were made for (None: not pruned yet)."""
        self.next_prune = PRUNE_FROM
        """The length of the log at which to prune again."""
        self.events: list[Any] | None = None
        self.weights: tuple[tuple[str | None, ...], list[float]] | None = None
        """The score weight of each name of the log's table (the table, the weights)."""
        """Every logged event as rules read it (``Customer.tracked``), once asked for."""

    def instants(self, log: RetainedLog, name: str | None) -> array[int]:
        if self.upto < len(log.ats):
            self.catch_up(log)
        ats = self.times.get(name)
        if ats is None:
            cut = self.cut
            names = log.names
            if name is None:
                found: Iterator[int] = iter(log.ats)
            elif name in names:
                code = names.index(name)
                found = (at for at, c in zip(log.ats, log.codes, strict=True) if c == code)
            else:
                found = iter(())
            if cut is not None:
                found = (at for at in found if at > cut)
            ats = self.times[name] = array("q", sorted(found))
        return ats

    def catch_up(self, log: RetainedLog) -> None:
        times, local, cut, names = self.times, self.local, self.cut, log.names
        ats, codes = log.ats, log.codes
        n = len(ats)
        for i in range(self.upto, n):  # most often one event
            at = ats[i]
            if cut is not None and at <= cut:
                continue  # late, and older than any window reads
            name = names[codes[i]]
            for key in (None,) if name is None else (None, name):
                keyed = times.get(key)
                if keyed is None:
                    continue
                if not keyed or keyed[-1] <= at:
                    pos = len(keyed)
                    keyed.append(at)
                else:  # a late event
                    pos = bisect_right(keyed, at)
                    keyed.insert(pos, at)
                loc = local.get(key)
                if loc is not None:
                    loc.insert(pos, at)
        self.upto = n

    def score_terms(self, log: RetainedLog, config: ScoreConfig) -> ScoreTerms:
        terms = self.terms
        if terms is None or terms.config is not config:
            terms = self.terms = ScoreTerms(config, lambda upto: log.terms(config, upto))
            self.terms_upto = 0
            self.weights = None
        ats = log.ats
        n = len(ats)
        start = self.terms_upto
        if start < n:
            table = self.weights
            if table is None or table[0] is not log.names:
                table = self.weights = (log.names, [float(config.weight(k)) for k in log.names])
            weights, codes = table[1], log.codes
            for i in range(start, n):
                w = weights[codes[i]]
                if w != 0:
                    terms.upto = i  # what the source gives: the terms before this one
                    terms.add(ats[i], w)
            self.terms_upto = terms.upto = n
        return terms

    def prune(self, log: RetainedLog, watermark: int, needs: Needs) -> None:
        """Leave out what no rule of ``needs`` reads at or after ``watermark`` (the
        customer's, which never goes back): window instants at or before ``watermark -
        window``, and score terms at or before ``watermark - delay``, folded."""
        kept = 0
        window = needs.window
        if window is not None:
            cut = watermark - window
            if self.cut is None or cut > self.cut:
                self.cut = cut
                for key, ats in self.times.items():
                    k = bisect_right(ats, cut)
                    if k:
                        del ats[:k]
                        loc = self.local.get(key)
                        if loc is not None:
                            loc.drop_first(k)
            kept += sum(len(ats) for ats in self.times.values())
        terms = self.terms
        if terms is not None:
            terms.fold_old(watermark - needs.delay)
            kept += len(terms.times)
        self.needs = needs
        self.next_prune = len(log.ats) + max(PRUNE_FROM, kept)

    def fits(self, needs: Needs) -> bool:
        """Whether rules of ``needs`` read nothing it pruned (no longer window or delay)."""
        done = self.needs
        if done is None or done is needs:
            return True
        terms = self.terms
        if terms is not None and terms.cut is not None and done.delay < needs.delay:
            return False
        if self.cut is None:
            return True
        return done.window is not None and needs.window is not None and done.window >= needs.window
