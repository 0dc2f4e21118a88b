"""Decayed scores: score settings, a score's value over time, and its indexed terms."""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from protocol import DAY


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    """How the engagement score weighs events, and how fast it decays."""

    half_life: int = 14 * DAY
    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0

    def weight(self, name: str | None) -> float:
        """The weight of a track event named ``name``."""
        if name is not None and name in self.weights:
            return self.weights[name]
        return self.default_weight


class Decay:
    """``k * score(now - delta)`` with its terms (event instant, weight), in log order.

    ``top`` is the latest instant of the terms (None: no terms). ``estimator``, from
    :class:`ScoreTerms` when no weight is negative, is the sum of the terms'
    ``w * 2 ** ((te - ref) / half_life)``, ``ref``, how many terms, and the sum of weights.
    ``terms`` may be given as a function that makes them, called if they are needed.
    """

    __slots__ = ("k", "delta", "_terms", "half_life", "top", "estimator")

    def __init__(
        self,
        k: float,
        delta: int,
        terms: tuple[tuple[int, float], ...] | Callable[[], tuple[tuple[int, float], ...]],
        half_life: int,
        top: int | None = None,
        estimator: tuple[float, int | None, int, float] | None = None,
    ) -> None:
        self.k, self.delta, self._terms, self.half_life = k, delta, terms, half_life
        self.top, self.estimator = top, estimator

    @property
    def terms(self) -> tuple[tuple[int, float], ...]:
        terms = self._terms
        if callable(terms):
            terms = self._terms = terms()
        return terms

    def scaled(self, k: float) -> Decay:
        return Decay(k * self.k, self.delta, self._terms, self.half_life, self.top, self.estimator)

    def estimate(self, base: int, xmax: float) -> tuple[float, float] | None:
        """``k * sum(w * 2.0 ** ((te - base) / H))`` estimated in O(1), and a bound on its
        distance to the value computed exactly (as :meth:`at` does), or None.

        ``xmax`` bounds the exponents above (0 when ``base`` is after every term).
        Both the estimate and the exact sum are within ``u * (n + 350 + |z| + xmax)`` of
        the real number (relative; ``u`` the unit roundoff, ``z = (ref - base) / H``), plus
        far less than ``2 ** -60`` times the sum of weights for terms under ``2 ** -64``:
        rounding of the quotient, ``pow`` (within 1 ulp in glibc), products and sums of
        non-negative terms. The bound returned is twice that and then some.
        """
        ap = self.estimator
        if ap is None:
            return None
        total, ref, n, weights = ap
        return _estimate(self.k, total, ref, n, weights, base, self.half_life, xmax)

    def compare(self, t: int, b: float) -> tuple[int, float]:
        """The sign of ``at(t) - b``, as comparing them gives, and the value: estimated when
        that settles the sign, else exact."""
        est = self.estimate(t - self.delta, 0.0)
        if est is not None:
            v, m = est
            try:
                bf = float(b)
            except OverflowError:
                bf = math.nan
            m += abs(bf) * U  # b as a float
            if v - m > bf:
                return 1, v
            if v + m < bf:
                return -1, v
        v = self.at(t)
        return (v > b) - (v < b), v

    def at(self, t: int) -> float:
        """The value at ``t`` (see SEGMENTS.md for why it is computed exactly this way)."""
        total = 0.0
        base = t - self.delta
        h = self.half_life
        for te, w in self.terms:  # a plain loop: Python 3.12's sum() compensates
            total += w * 2.0 ** ((te - base) / h)
        return self.k * total

    def normalised(self, r: int) -> float:
        """The value relative to instant ``r`` instead of now (for score-vs-score)."""
        total = 0.0
        h = self.half_life
        for te, w in self.terms:
            total += w * 2.0 ** ((te - r + self.delta) / h)
        return self.k * total

    def compare_normalised(self, other: Decay, r: int) -> int:
        """The sign of ``normalised(r) - other.normalised(r)``: estimated when that settles
        it, else exact."""
        ea = self.estimate(r - self.delta, self.delta / self.half_life)
        eb = other.estimate(r - other.delta, other.delta / other.half_life)
        if ea is not None and eb is not None:
            if ea[0] - ea[1] > eb[0] + eb[1]:
                return 1
            if ea[0] + ea[1] < eb[0] - eb[1]:
                return -1
        x, y = self.normalised(r), other.normalised(r)
        return (x > y) - (x < y)


U = 2.0**-53
TINY = 2.0**-60


def _estimate(
    k: float,
    total: float,
    ref: int | None,
    n: int,
    weights: float,
    base: int,
    half_life: int,
    xmax: float,
) -> tuple[float, float] | None:
    """See :meth:`Decay.estimate`: ``k * total * 2 ** ((ref - base) / half_life)`` and the
    bound, for ``n`` terms whose weights add up to at most ``weights``."""
    if ref is None:
        return 0.0, 0.0  # no terms: the exact sum is 0.0 too
    z = (ref - base) / half_life
    if not -1000.0 < z < 1000.0:
        return None
    v = k * total * 2.0**z
    if not math.isfinite(v):
        return None
    bound = v * U * (8 * n + 1024 + 4 * abs(z) + 4 * xmax)
    return v, bound + k * weights * TINY + 1e-300


class ScoreTerms:
    """A customer's score terms under one :class:`ScoreConfig`, kept as its events come.

    The terms are ``(instant, weight)`` of the track events of non-zero weight. The exact
    sum runs over them in log order (SEGMENTS.md): :attr:`terms`. The estimates read them in
    time order: ``times`` and ``weights``, and when no weight is negative, ``prefix`` holds
    prefix sums in time order of ``w * 2 ** ((t - ref) / H)``: they estimate any score at
    any instant in O(1), closely enough to settle most comparisons without the exact sum
    (see :meth:`Decay.estimate`).

    With a ``source`` of the terms in log order (a customer's retained events), the oldest
    terms can be folded (:meth:`fold_old`): the first ``off`` in time order, every term at
    or before ``cut``, leave ``times`` and ``weights`` and are only in ``prefix[0]``, their
    latest instant in ``top0``. No score reads an instant at or before ``cut`` as its
    present again, so every score holds all of them: the estimates are the same floats,
    and the exact sum still reads every term from ``source``.
    """

    __slots__ = (
        "config",
        "log",
        "times",
        "weights",
        "prefix",
        "ref",
        "total",
        "source",
        "upto",
        "ordered",
        "cut",
        "off",
        "top0",
    )

    def __init__(
        self,
        config: ScoreConfig,
        source: Callable[[int], Iterable[tuple[int, float]]] | None = None,
    ) -> None:
        self.config = config
        self.log: list[tuple[int, float]] | None = None
        """Without a source: the terms in log order, once that is not time order."""
        self.times: array[int] = array("q")
        self.weights: array[float] = array("d")  # in time order, beside ``times``
        self.prefix: array[float] | None = array("d", (0.0,))
        """prefix[i]: the sum over the folded terms and the first i in ``times`` (None: not
        kept, as a negative weight makes the estimate's bound invalid)."""
        self.ref: int | None = None
        self.total = 0.0  # sum of the weights
        self.source = source
        """The first n terms in log order, for n up to ``upto``."""
        self.upto = 0
        """How many entries of the source's log the terms cover (set by the caller)."""
        self.ordered = True  # log order is ``times``'s order, and nothing is folded
        self.cut: int | None = None
        self.off = 0
        self.top0: int | None = None
        if config.default_weight < 0 or any(w < 0 for w in config.weights.values()):
            self.prefix = None

    @property
    def terms(self) -> list[tuple[int, float]]:
        """The terms in log order."""
        if self.ordered:
            return list(zip(self.times, self.weights, strict=True))
        if self.source is not None:
            return list(self.source(self.upto))
        assert self.log is not None
        return self.log

    def add(self, at: int, w: float) -> None:
        """The next track event in the log, of non-zero weight ``w``."""
        times, weights = self.times, self.weights
        end = len(times)
        folded = self.cut is not None and at <= self.cut
        self.total += w
        if folded:
            # Late, and before any instant a score reads as its present: folded at once.
            # It is only in prefix[0] then, so the exact sum reads the source from now on
            # (as after fold_old), not ``times``.
            self.off += 1
            self.ordered = False
            if self.top0 is None or at > self.top0:
                self.top0 = at
            pos = 0
        elif times and at < times[-1]:
            if self.ordered and self.source is None:
                self.log = list(zip(times, weights, strict=True))
            self.ordered = False
            pos = bisect_right(times, at)
            times.insert(pos, at)
            weights.insert(pos, w)
        else:
            pos = end
            times.append(at)
            weights.append(w)
        if self.log is not None:
            self.log.append((at, w))
        prefix = self.prefix
        if prefix is None:
            return
        h = self.config.half_life
        if self.ref is None or (at - self.ref) / h > 400:
            # Rebase, so the terms stay far from overflow: they are at most 2 ** 400.
            self.ref = at
            # (Without this term: a folded one is added to prefix[0] below.)
            prefix[0] = self._folded_sum(at) if self.off > folded else 0.0
            pos = 0
        ref = self.ref
        if pos == end and not folded:
            prefix.append(prefix[-1] + w * 2.0 ** ((at - ref) / h))
            return
        if folded:
            prefix[0] += w * 2.0 ** ((at - ref) / h)
        del prefix[pos + 1 :]
        acc = prefix[pos]
        for t, wt in zip(times[pos:], weights[pos:], strict=True):
            acc += wt * 2.0 ** ((t - ref) / h)
            prefix.append(acc)

    def _folded_sum(self, ref: int) -> float:
        """The folded terms' part of the prefix sums relative to ``ref``, in time order."""
        assert self.source is not None and self.cut is not None
        cut, h = self.cut, self.config.half_life
        acc = 0.0
        for t, w in sorted((x for x in self.source(self.upto) if x[0] <= cut), key=_at):
            acc += w * 2.0 ** ((t - ref) / h)
        return acc

    def fold_old(self, cut: int) -> None:
        """Fold the terms at or before ``cut`` (see the class); only with a source."""
        assert self.source is not None
        if self.cut is not None and cut <= self.cut:
            return
        self.cut = cut
        times = self.times
        k = bisect_right(times, cut)
        if not k:
            return
        top = times[k - 1]
        if self.top0 is None or top > self.top0:
            self.top0 = top
        self.off += k
        self.ordered = False
        del times[:k]
        del self.weights[:k]
        if self.prefix is not None:
            del self.prefix[:k]  # prefix[k] is prefix[0] now: the same floats

    def decay(self, cutoff: int, delta: int) -> tuple[Decay, int | None]:
        """``score(now - delta)`` for ``cutoff = now - delta``, and the next instant an
        event enters it. ``cutoff`` is never before the folded terms' ``cut``."""
        times = self.times
        k = bisect_right(times, cutoff)
        nxt = times[k] + delta if delta and k < len(times) else None
        kept: Callable[[], tuple[tuple[int, float], ...]]
        if self.ordered:  # in time order: those at or before the cutoff come first
            weights = self.weights

            def kept() -> tuple[tuple[int, float], ...]:
                return tuple(zip(times[:k], weights[:k], strict=True))

        elif self.source is not None:
            source, upto = self.source, self.upto

            def kept() -> tuple[tuple[int, float], ...]:
                return tuple(t for t in source(upto) if t[0] <= cutoff)

        else:
            log = self.log
            assert log is not None

            def kept() -> tuple[tuple[int, float], ...]:
                return tuple(t for t in log if t[0] <= cutoff)

        prefix = self.prefix
        off = self.off
        estimator = None if prefix is None else (prefix[k], self.ref, off + k, self.total)
        top = times[k - 1] if k else self.top0
        return Decay(1.0, delta, kept, self.config.half_life, top, estimator), nxt


def _at(term: tuple[int, float]) -> int:
    return term[0]
