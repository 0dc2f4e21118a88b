"""Decayed scores: score settings, a score's value over time, and its indexed terms."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping
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

    The terms are ``(instant, weight)`` of the track events of non-zero weight: in time
    order in ``times`` and ``weights``, and in log order (what the exact sum runs over,
    SEGMENTS.md) in :attr:`terms`. When no weight is negative, ``prefix`` holds prefix sums
    in time order of ``w * 2 ** ((t - ref) / H)``: they estimate any score at any instant in
    O(1), closely enough to settle most comparisons without the exact sum (see
    :meth:`Decay.estimate`).
    """

    __slots__ = ("config", "log", "times", "weights", "prefix", "ref", "total")

    def __init__(self, config: ScoreConfig) -> None:
        self.config = config
        self.log: list[tuple[int, float]] | None = None
        """The terms in log order, once that is not time order (None while it is)."""
        self.times: list[int] = []
        self.weights: list[float] = []  # in time order, beside ``times``
        self.prefix: list[float] | None = [0.0]
        """prefix[i]: the sum over the first i terms in time order (None: not kept, as a
        negative weight makes the estimate's bound invalid)."""
        self.ref: int | None = None
        self.total = 0.0  # sum of the weights
        if config.default_weight < 0 or any(w < 0 for w in config.weights.values()):
            self.prefix = None

    @property
    def terms(self) -> list[tuple[int, float]]:
        """The terms in log order."""
        return list(zip(self.times, self.weights, strict=True)) if self.log is None else self.log

    def add(self, at: int, w: float) -> None:
        """The next track event in the log, of non-zero weight ``w``."""
        times, weights = self.times, self.weights
        end = len(times)
        if times and at < times[-1]:
            if self.log is None:
                self.log = list(zip(times, weights, strict=True))
            pos = bisect_right(times, at)
            times.insert(pos, at)
            weights.insert(pos, w)
        else:
            pos = end
            times.append(at)
            weights.append(w)
        if self.log is not None:
            self.log.append((at, w))
        self.total += w
        prefix = self.prefix
        if prefix is None:
            return
        h = self.config.half_life
        if self.ref is None or (at - self.ref) / h > 400:
            # Rebase, so the terms stay far from overflow: they are at most 2 ** 400.
            self.ref, pos = at, 0
        ref = self.ref
        if pos == end:
            prefix.append(prefix[-1] + w * 2.0 ** ((at - ref) / h))
            return
        del prefix[pos + 1 :]
        acc = prefix[pos]
        for t, wt in zip(times[pos:], weights[pos:], strict=True):
            acc += wt * 2.0 ** ((t - ref) / h)
            prefix.append(acc)

    def decay(self, cutoff: int, delta: int) -> tuple[Decay, int | None]:
        """``score(now - delta)`` for ``cutoff = now - delta``, and the next instant an
        event enters it."""
        times = self.times
        k = bisect_right(times, cutoff)
        nxt = times[k] + delta if delta and k < len(times) else None
        log = self.log
        if log is None:  # in time order: those at or before the cutoff come first
            weights = self.weights

            def kept() -> tuple[tuple[int, float], ...]:
                return tuple(zip(times[:k], weights[:k], strict=True))

        else:

            def kept() -> tuple[tuple[int, float], ...]:
                return tuple(t for t in log if t[0] <= cutoff)

        prefix = self.prefix
        estimator = None if prefix is None else (prefix[k], self.ref, k, self.total)
        top = times[k - 1] if k else None
        return Decay(1.0, delta, kept, self.config.half_life, top, estimator), nxt
