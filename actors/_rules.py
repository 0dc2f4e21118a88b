"""The segment rule language: parsing, checking and exact-time evaluation.

SEGMENTS.md is the specification; this module implements it. A rule is an expression in
Python syntax, parsed with :mod:`ast` and checked against a whitelist of nodes and functions
(never ``eval``).

Every node evaluates at an instant ``now`` to ``(value, next)``: its value, and the earliest
instant after ``now`` at which the value (or its form, for values that move with time) can
change without a new event (``None``: never). A customer's deadline is the earliest ``next``
over its segments: that is what lets shoal fire a time-based change at its exact instant
instead of in a periodic sweep. A ``next`` may be early (the engine re-evaluates then and
finds nothing changed) but never late.

Values that move with time are represented, not sampled: an elapsed time by the instant it is
measured from, a score by its terms, so comparisons can solve for the instant they flip.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import math
import operator
import re
import tokenize
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._errors import DefinitionError

_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FAR = 1 << 62
"""Further than any instant shoal handles: searches for a flip stop here."""


class Tracked(Protocol):
    """A retained track event, as rules read it."""

    @property
    def at(self) -> int: ...
    @property
    def name(self) -> str | None: ...
    @property
    def properties(self) -> Mapping[str, Any]: ...


class Facts(Protocol):
    """What a rule may read of a customer."""

    customer_id: str

    def first_at(self) -> int | None: ...
    def last_at(self, name: str | None) -> int | None: ...
    def count(self, name: str | None) -> int: ...
    def trait(self, key: str) -> Any: ...
    def tracked(self) -> Sequence[Tracked]: ...
    def member(self, segment: str) -> bool: ...


class Indexed:
    """Facts that also keep their retained track events indexed by instant, so windows and
    scores need not scan them all (:class:`actors.Customer` does). Rules read any
    :class:`Facts` alike; these give the same answers, faster."""

    __slots__ = ()

    def instants(self, name: str | None) -> Sequence[int]:
        """The instants of the retained track events named ``name`` (None: all), sorted."""
        raise NotImplementedError

    def local_counts(self, name: str | None, zone: tzinfo, where: LocalFilter) -> Sequence[int]:
        """For each i, how many of the first i :meth:`instants` ``where`` lets in, by their
        weekday and hour in ``zone`` (so element 0 is 0)."""
        raise NotImplementedError

    def score_terms(self, config: ScoreConfig) -> ScoreTerms:
        """The score terms of the retained track events under ``config``, up to date."""
        raise NotImplementedError


class LocalFilter:
    """Which local times (``weekday * 24 + hour``, Monday 0) a window with ``days`` or
    ``hours`` lets in."""

    __slots__ = ("ok",)

    def __init__(self, days: frozenset[int] | None, hours: frozenset[int] | None) -> None:
        self.ok = tuple(
            int((not days or d in days) and (not hours or h in hours))
            for d in range(7)
            for h in range(24)
        )

    def complement(self) -> LocalFilter:
        """The filter letting in the local times this one keeps out."""
        out = LocalFilter(None, None)
        out.ok = tuple(1 - x for x in self.ok)
        return out

    def lets_in(self, at: int, zone: tzinfo) -> bool:
        """Whether an event at ``at`` is in, in ``zone``."""
        return bool(self.ok[local_time(at, zone)])


def local_time(at: int, zone: tzinfo) -> int:
    """``weekday * 24 + hour`` (Monday 0) of instant ``at`` in ``zone``."""
    if zone is UTC:
        days, rest = divmod(at, _US["d"])
        return (days + 3) % 7 * 24 + rest // _US["h"]  # 1970-01-01 was a Thursday
    local = (_EPOCH + timedelta(microseconds=at)).astimezone(zone)
    return local.weekday() * 24 + local.hour


MISSING: Any = object()
"""The value of anything the customer does not have (a trait, min of no events...)."""

Value = tuple[Any, int | None]


def earliest(a: int | None, b: int | None) -> int | None:
    """The earlier of two optional instants (``None``: never)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


def parse_duration(text: str) -> int:
    """Microseconds of a duration such as ``'90s'``, ``'14d'``, ``'1d12h'`` or ``'-1d'``.

    Raises:
        ValueError: the text is not a duration.
    """
    compact = text.replace(" ", "")
    sign = -1 if compact.startswith("-") else 1
    if sign < 0:
        compact = compact[1:]
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration: write numbers with units s, m, h or d, "
            "like '90s', '14d' or '1d12h'"
        )
    units = [u for _, u in parts]
    if units != sorted(set(units), key="dhms".index):
        raise ValueError(f"{text!r}: give each unit once, largest first, like '1d12h'")
    total = sum((Decimal(n) * _US[u] for n, u in parts), Decimal(0))
    if total != total.to_integral_value():
        raise ValueError(f"{text!r} is finer than a microsecond")
    return sign * int(total)


def to_instant_value(value: Any) -> int | None:
    """The instant of a date or date-time text (date alone: 00:00 UTC; no offset: UTC)."""
    if not isinstance(value, str):
        return None
    return _instant_of_text(value)


@functools.lru_cache(maxsize=4096)
def _instant_of_text(value: str) -> int | None:
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return (datetime(d.year, d.month, d.day, tzinfo=UTC) - _EPOCH) // timedelta(
                microseconds=1
            )
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


@functools.lru_cache(maxsize=1024)
def _zone(name: Any) -> tzinfo:
    if isinstance(name, str):
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return UTC


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    """How the engagement score weighs events, and how fast it decays."""

    half_life: int = 14 * _US["d"]
    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0

    def weight(self, name: str | None) -> float:
        """The weight of a track event named ``name``."""
        if name is not None and name in self.weights:
            return self.weights[name]
        return self.default_weight


@dataclass(frozen=True, slots=True)
class Env:
    """What rules of one segments file may refer to besides a customer's facts."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    lists: Mapping[str, frozenset[str]] = field(default_factory=dict)
    segments: frozenset[str] = frozenset()
    """Names of the file's segments, for ``in_segment`` (empty: references not checked)."""


# --- values that move with time ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Elapsed:
    """``sign * (now - anchor)``: an elapsed time (sign 1) or a time remaining (sign -1)."""

    anchor: int
    sign: int


class _Decay:
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

    def scaled(self, k: float) -> _Decay:
        return _Decay(k * self.k, self.delta, self._terms, self.half_life, self.top, self.estimator)

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
            m += abs(bf) * _U  # b as a float
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

    def compare_normalised(self, other: _Decay, r: int) -> int:
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


_U = 2.0**-53
_TINY = 2.0**-60


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
    """See :meth:`_Decay.estimate`: ``k * total * 2 ** ((ref - base) / half_life)`` and the
    bound, for ``n`` terms whose weights add up to at most ``weights``."""
    if ref is None:
        return 0.0, 0.0  # no terms: the exact sum is 0.0 too
    z = (ref - base) / half_life
    if not -1000.0 < z < 1000.0:
        return None
    v = k * total * 2.0**z
    if not math.isfinite(v):
        return None
    bound = v * _U * (8 * n + 1024 + 4 * abs(z) + 4 * xmax)
    return v, bound + k * weights * _TINY + 1e-300


class ScoreTerms:
    """A customer's score terms under one :class:`ScoreConfig`, kept as its events come.

    The terms are ``(instant, weight)`` of the track events of non-zero weight: in time
    order in ``times`` and ``weights``, and in log order (what the exact sum runs over,
    SEGMENTS.md) in :attr:`terms`. When no weight is negative, ``prefix`` holds prefix sums
    in time order of ``w * 2 ** ((t - ref) / H)``: they estimate any score at any instant in
    O(1), closely enough to settle most comparisons without the exact sum (see
    :meth:`_Decay.estimate`).
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

    def decay(self, cutoff: int, delta: int) -> tuple[_Decay, int | None]:
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
        return _Decay(1.0, delta, kept, self.config.half_life, top, estimator), nxt


# --- nodes ---------------------------------------------------------------------------------
# ``kind`` drives checking at parse time: "bool", "elapsed", "duration", "instant",
# "number" (a number-valued function of the facts), "decay" (a score) or "value".


class _Node:
    kind = "value"
    text = ""
    """The node as written in the rule (set by the parser; for explanations only)."""

    def eval(self, f: Facts, now: int) -> Value:
        raise NotImplementedError

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        """``eval``, and the earliest instant at which ``eval``'s answer (value *and* next)
        can differ with the same facts (``None``: never). For a node that combines
        conditions, that is earlier than its next when a part it ignores changes: ``a and
        b`` false because of ``a`` does not change when ``b`` does, but its next may."""
        value, nxt = self.eval(f, now)
        return value, nxt, nxt

    def children(self) -> tuple[_Node, ...]:
        return tuple(
            n
            for v in vars(self).values()
            for n in (v if isinstance(v, tuple) else (v,))
            if isinstance(n, _Node)
        )


class _Const(_Node):
    def __init__(self, value: Any) -> None:
        self.value = value
        if isinstance(value, bool):
            self.kind = "bool"
        elif isinstance(value, int | float):
            self.kind = "numconst"

    def eval(self, f: Facts, now: int) -> Value:
        return self.value, None


class _DurationConst(_Node):
    kind = "duration"

    def __init__(self, us: int) -> None:
        self.us = us

    def eval(self, f: Facts, now: int) -> Value:
        return self.us, None


class _InstantConst(_Node):
    kind = "instant"

    def __init__(self, us: int) -> None:
        self.us = us

    def eval(self, f: Facts, now: int) -> Value:
        return self.us, None


class _ElapsedNode(_Node):
    """``sign * (now - anchor)``; its value is an :class:`_Elapsed`, or None (missing)."""

    kind = "elapsed"
    sign = 1

    def anchor(self, f: Facts, now: int) -> int | None:
        raise NotImplementedError

    def eval(self, f: Facts, now: int) -> Value:
        at = self.anchor(f, now)
        return (None if at is None else _Elapsed(at, self.sign)), None


class _SinceLast(_ElapsedNode):
    def __init__(self, name: str | None) -> None:
        self.name = name

    def anchor(self, f: Facts, now: int) -> int | None:
        return f.last_at(self.name)


class _SinceFirst(_ElapsedNode):
    def anchor(self, f: Facts, now: int) -> int | None:
        return f.first_at()


class _Relative(_ElapsedNode):
    """``since(instant)`` (sign 1) or ``until(instant)`` (sign -1)."""

    def __init__(self, inner: _Node, sign: int) -> None:
        self.inner, self.sign = inner, sign

    def anchor(self, f: Facts, now: int) -> int | None:
        at, _ = self.inner.eval(f, now)
        return None if at is None or at is MISSING else at


class _Trait(_Node):
    def __init__(self, key: str) -> None:
        self.key = key

    def eval(self, f: Facts, now: int) -> Value:
        return f.trait(self.key), None


class _DateOf(_Node):
    kind = "instant"

    def __init__(self, inner: _Node) -> None:
        self.inner = inner

    def eval(self, f: Facts, now: int) -> Value:
        v, _ = self.inner.eval(f, now)
        at = to_instant_value(v)
        return (MISSING if at is None else at), None


class _Exists(_Node):
    kind = "bool"

    def __init__(self, inner: _Node) -> None:
        self.inner = inner

    def eval(self, f: Facts, now: int) -> Value:
        v, _ = self.inner.eval(f, now)
        return (v is not MISSING and v is not None), None


class _Contains(_Node):
    kind = "bool"

    def __init__(self, haystack: _Node, needle: _Node) -> None:
        self.haystack, self.needle = haystack, needle

    def eval(self, f: Facts, now: int) -> Value:
        h, _ = self.haystack.eval(f, now)
        n, _ = self.needle.eval(f, now)
        if h is MISSING or n is MISSING or h is None or n is None:
            return False, None
        if isinstance(h, str):
            return (isinstance(n, str) and n in h), None
        if isinstance(h, list):
            return any(_comparable(x, n) and x == n for x in h), None
        return False, None


class _Window(_Node):
    """count / sum / min / max of track events, all time or in a trailing window."""

    kind = "number"

    def __init__(
        self,
        func: str,
        name: str | None,
        prop: str | None,
        within: int | None,
        where: Mapping[str, Any],
        days: frozenset[int] | None,
        hours: frozenset[int] | None,
    ) -> None:
        self.func, self.name, self.prop, self.within = func, name, prop, within
        self.where, self.days, self.hours = dict(where), days, hours
        self.simple = func == "count" and within is None and not where and not days and not hours
        # A trailing count without `where` is read off the instants (Indexed facts).
        self.indexed = func == "count" and within is not None and not where
        # Such a count only falls between events, so a comparison with a constant flips at
        # one computable instant (see _NumberCompare).
        self.counting = self.indexed
        self.local = LocalFilter(days, hours)

    def eval(self, f: Facts, now: int) -> Value:
        if self.simple:
            return f.count(self.name), None
        if self.indexed and isinstance(f, Indexed):
            zone = _zone(f.trait("timezone")) if (self.days or self.hours) else None
            return self._indexed(f, now, zone)
        zone = _zone(f.trait("timezone")) if (self.days or self.hours) else UTC
        w = self.within
        values: list[float] = []
        n = 0
        nxt: int | None = None
        for e in f.tracked():
            if self.name is not None and e.name != self.name:
                continue
            if w is not None:
                if not now - w < e.at <= now:
                    continue
                nxt = earliest(nxt, e.at + w)  # when it leaves the window
            if self.where and any(
                not (_comparable(e.properties.get(k, MISSING), v) and e.properties.get(k) == v)
                for k, v in self.where.items()
            ):
                continue
            if self.days or self.hours:
                local = (_EPOCH + timedelta(microseconds=e.at)).astimezone(zone)
                if self.days and local.weekday() not in self.days:
                    continue
                if self.hours and local.hour not in self.hours:
                    continue
            if self.func == "count":
                n += 1
                continue
            assert self.prop is not None
            v = e.properties.get(self.prop)
            if isinstance(v, int | float) and not isinstance(v, bool):
                values.append(v)
        if self.func == "count":
            return n, nxt
        if self.func == "sum":
            total: float = 0
            for v in values:
                total += v
            return total, nxt
        if not values:
            return MISSING, nxt
        return (min(values) if self.func == "min" else max(values)), nxt

    def drop_below(self, f: Facts, now: int, m: int) -> int | None:
        """For a trailing count (``counting``) of at least ``m`` at ``now``: the instant it
        falls below ``m`` with no new event (it only falls: events leave the window)."""
        w = self.within
        assert self.counting and w is not None
        if isinstance(f, Indexed):
            ats = f.instants(self.name)
            hi = bisect_right(ats, now)
            if not (self.days or self.hours):
                return ats[hi - m] + w
            counts = f.local_counts(self.name, _zone(f.trait("timezone")), self.local)
            return ats[bisect_right(counts, counts[hi] - m) - 1] + w
        zone = _zone(f.trait("timezone")) if (self.days or self.hours) else UTC
        ins = sorted(
            e.at
            for e in f.tracked()
            if (self.name is None or e.name == self.name)
            and now - w < e.at <= now
            and self.local.lets_in(e.at, zone)
        )
        return ins[len(ins) - m] + w

    def _indexed(self, f: Indexed, now: int, zone: tzinfo | None) -> Value:
        w = self.within
        assert w is not None
        ats = f.instants(self.name)
        lo = bisect_right(ats, now - w)
        hi = bisect_right(ats, now)
        nxt = ats[lo] + w if lo < hi else None  # when the earliest in it leaves
        if zone is None:
            return hi - lo, nxt
        counts = f.local_counts(self.name, zone, self.local)
        return counts[hi] - counts[lo], nxt


class _Score(_Node):
    kind = "decay"

    def __init__(self, config: ScoreConfig, delta: int) -> None:
        self.config, self.delta = config, delta

    def eval(self, f: Facts, now: int) -> Value:
        cutoff = now - self.delta
        if isinstance(f, Indexed):
            return self._indexed(f, cutoff)
        terms = []
        nxt: int | None = None
        weight = self.config.weight
        for e in f.tracked():
            w = weight(e.name)
            if w == 0:
                continue
            if e.at <= cutoff:
                terms.append((e.at, float(w)))
            elif self.delta:
                nxt = earliest(nxt, e.at + self.delta)  # when it enters score(now - delta)
        top = max((te for te, _ in terms), default=None)
        return _Decay(1.0, self.delta, tuple(terms), self.config.half_life, top), nxt

    def _indexed(self, f: Indexed, cutoff: int) -> Value:
        return f.score_terms(self.config).decay(cutoff, self.delta)


class _Scale(_Node):
    def __init__(self, k: float, inner: _Node) -> None:
        self.k, self.inner = k, inner
        self.kind = inner.kind

    def eval(self, f: Facts, now: int) -> Value:
        v, nxt = self.inner.eval(f, now)
        if isinstance(v, _Decay):
            return v.scaled(self.k), nxt
        if isinstance(v, int | float) and not isinstance(v, bool):
            return self.k * v, nxt
        return MISSING, nxt


class _InSegment(_Node):
    kind = "bool"

    def __init__(self, name: str) -> None:
        self.name = name

    def eval(self, f: Facts, now: int) -> Value:
        return f.member(self.name), None


class _InList(_Node):
    kind = "bool"

    def __init__(self, members: frozenset[str]) -> None:
        self.members = members

    def eval(self, f: Facts, now: int) -> Value:
        return f.customer_id in self.members, None


_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _instant_compare(now: int, op: str, t: int) -> Value:
    """``now OP t`` and the next instant its value changes."""
    if op == ">=":
        return now >= t, (t if now < t else None)
    if op == ">":
        return now > t, (t + 1 if now <= t else None)
    if op == "<":
        return now < t, (t if now < t else None)
    if op == "<=":
        return now <= t, (t + 1 if now <= t else None)
    nxt = t if now < t else (t + 1 if now == t else None)
    return (now == t) == (op == "=="), nxt


def _comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b) and isinstance(a, str)


def _first_flip(
    pred: Callable[[int], bool],
    now: int,
    limit: int | None,
    guess: int | None,
    monotone: bool = True,
) -> int | None:
    """The first instant in (now, limit) where ``pred`` is true, for a ``pred`` false at
    ``now`` that flips at most once there; ``None`` if it does not flip before ``limit``.

    With ``monotone`` (``pred`` stays true once it is: the score of non-negative weights
    never rises), one look at the end of the range tells whether there is a flip at all, and
    the search gallops out from ``guess``; otherwise it goes out from ``now``.
    """
    end = (limit - 1) if limit is not None else _FAR
    if end <= now:
        return None
    if monotone:
        if not pred(end):
            return None
        lo, hi = now, end
        if guess is not None:
            # Bracket the flip near the analytic estimate; pred has the last word.
            g = min(max(guess, lo + 1), hi)
            step = 1
            if pred(g):
                hi = g
                while hi - step > lo:
                    if not pred(hi - step):
                        lo = hi - step
                        break
                    hi, step = hi - step, step * 2
            else:
                lo = g
                while lo + step < hi:
                    if pred(lo + step):
                        hi = lo + step
                        break
                    lo, step = lo + step, step * 2
    else:
        lo, found = now, None
        if guess is not None and now < guess:
            for cand in (guess - 2, guess - 1, guess, guess + 1, guess + 2):
                if now < cand <= end:
                    if not pred(cand):
                        lo = max(lo, cand)
                    else:
                        found = cand
                        break
        if found is None:
            step = max(1, lo - now)
            while True:
                cand = min(lo + step, end)
                if pred(cand):
                    found = cand
                    break
                if cand >= end:
                    return None
                lo, step = cand, step * 2
        hi = found
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if not pred(mid):
            lo = mid
        else:
            hi = mid
    return hi


class _Compare(_Node):
    kind = "bool"

    def __init__(self, left: _Node, op: str, right: _Node) -> None:
        # Keep the moving value on the left, so evaluation has fewer shapes to handle.
        self.mirrored = right.kind in ("elapsed", "decay") and left.kind not in ("elapsed", "decay")
        if self.mirrored:
            left, right, op = right, left, _MIRROR[op]
        self.left, self.op, self.right = left, op, right
        inner = left.inner if isinstance(left, _Scale) else left
        # A score of non-negative weights (and a positive factor) never rises between events.
        self.monotone = not isinstance(inner, _Score) or (
            inner.config.default_weight >= 0 and all(w >= 0 for w in inner.config.weights.values())
        )

    def eval(self, f: Facts, now: int) -> Value:
        a, na = self.left.eval(f, now)
        b, nb = self.right.eval(f, now)
        nxt = earliest(na, nb)
        if a is None or b is None or a is MISSING or b is MISSING:
            return False, nxt
        op = self.op
        if isinstance(a, _Elapsed):
            if isinstance(b, _Elapsed):
                # Same sign (checked at parse time): the difference does not move with now.
                return _OPS[op](a.sign * (b.anchor - a.anchor), 0), nxt
            # sign * (now - anchor) OP d
            if a.sign == 1:
                v, n = _instant_compare(now, op, a.anchor + b)
            else:  # anchor - now OP d  <=>  now MIRROR(OP) anchor - d
                v, n = _instant_compare(now, _MIRROR[op], a.anchor - b)
            return v, earliest(n, nxt)
        if isinstance(a, _Decay):
            return self._decay(f, a, b, now, nxt)
        if not _comparable(a, b):
            return op == "!=", nxt
        if isinstance(a, bool) and op not in ("==", "!="):
            return False, nxt  # booleans are equal or not, never ordered
        return _OPS[op](a, b), nxt

    def _decay(self, f: Facts, a: _Decay, b: Any, now: int, nxt: int | None) -> Value:
        # Comparisons go by the sign of the difference (never NaN: no term is), which
        # estimates settle without the exact sums unless the two sides are very close.
        # A score changes by a step where an event enters it (score_at('7d') a week after
        # the event) and decays in between. The next instant is where the comparison
        # flips: the steps to come are looked at in order (at most _STEPS of them), each
        # as evaluating there would. _ScoreCompare._estimated follows the same steps.
        op = _OPS[self.op]
        if isinstance(b, _Decay):
            # Both decay by the same factor: the result only changes at steps.
            value = op(_versus(a, b), 0)
            t = nxt
            for _ in range(_STEPS):
                if t is None:
                    return value, None
                a, na = self.left.eval(f, t)
                b, nb = self.right.eval(f, t)
                if op(_versus(a, b), 0) != value:
                    return value, t
                t = earliest(na, nb)
            return value, t
        if not (isinstance(b, int | float) and not isinstance(b, bool)):
            return self.op == "!=", nxt

        sign, v_now = a.compare(now, b)
        value = op(sign, 0)
        # Steps are looked at only against a constant: another number has steps of its own.
        stepped = self.monotone and isinstance(self.right, _Const)
        if sign < 0:
            if not stepped:
                return value, nxt
            # Below b it only falls between steps: the first step that does not leave it
            # below may change the result.
            t = nxt
            for _ in range(_STEPS):
                if t is None:
                    return value, None
                a, n = self.left.eval(f, t)
                if a.compare(t, b)[0] >= 0:
                    return value, t
                t = n
            return value, t
        # The score never rises between events, so "at or below b" and "below b" each flip
        # at most once: the comparison can only change where one of them does.
        if sign > 0:

            def pred(t: int) -> bool:
                return a.compare(t, b)[0] <= 0

        else:

            def pred(t: int) -> bool:
                return a.compare(t, b)[0] < 0

        # pred(now) is false either way. The guess only steers the search (a quotient
        # that overflows or underflows gives none).
        guess = None
        if v_now > 0 and b > 0 and 0.0 < v_now / b < math.inf:
            guess = now + math.ceil(a.half_life * math.log2(v_now / b))
        flip = _first_flip(pred, now, nxt, guess, self.monotone)
        if flip is not None or nxt is None or sign == 0 or not stepped:
            return value, earliest(flip, nxt)
        # Above b until the first step, it rises there: it can only fall to b between two
        # steps if it is at or below b at the end of that interval. The crossing is then
        # searched for from the interval's start.
        s: int | None = nxt
        for _ in range(_STEPS):
            start = s
            assert start is not None
            a, s = self.left.eval(f, start)
            end = _FAR if s is None else s - 1
            if end > start and a.compare(end, b)[0] <= 0:
                return value, start
            if s is None:
                return value, None
        return value, s


def _versus(a: _Decay, b: _Decay) -> int:
    """The sign of ``a - b`` for two scores that decay alike, computed relative to the
    latest event instant of either (it does not change with now)."""
    if a.top is None and b.top is None:
        return 0
    r = a.top if b.top is None or (a.top is not None and a.top > b.top) else b.top
    assert r is not None
    return a.compare_normalised(b, r)


class _ElapsedCompare(_Compare):
    """An elapsed time compared with a duration: it flips at an exact instant."""

    def __init__(self, left: _Node, op: str, right: _Node) -> None:
        super().__init__(left, op, right)
        assert isinstance(self.left, _ElapsedNode) and isinstance(self.right, _DurationConst)
        self.elapsed, self.us = self.left, self.right.us
        # sign * (now - anchor) OP d: now OP anchor + d, or now MIRROR(OP) anchor - d
        self.now_op = self.op if self.left.sign == 1 else _MIRROR[self.op]

    def eval(self, f: Facts, now: int) -> Value:
        at = self.elapsed.anchor(f, now)
        if at is None:
            return False, None
        if self.elapsed.sign == 1:
            return _instant_compare(now, self.now_op, at + self.us)
        return _instant_compare(now, self.now_op, at - self.us)


class _NumberCompare(_Compare):
    """Counts or sums of windows (always numbers) and number constants."""

    def __init__(self, left: _Node, op: str, right: _Node) -> None:
        super().__init__(left, op, right)
        self.fn = _OPS[self.op]
        # A comparison that is a trailing count (``window``) against a constant flips where
        # that count falls below a threshold (for the result true, for false). ``count``
        # says how to get the count from the two sides: 1 the left, 2 the right, 3 left
        # minus right, 4 right minus left.
        self.window: _Window | None = None
        self.thresholds: tuple[int | None, int | None] = (None, None)
        self.count = 0
        left, right, op = self.left, self.right, self.op
        for i, (x, y, o) in enumerate(((left, right, op), (right, left, _MIRROR[op]))):
            if isinstance(x, _Window) and x.counting and isinstance(y, _Const):
                t = _count_thresholds(o, y.value)
                if t is not None:
                    self.window, self.thresholds, self.count = x, t, 1 + i
            elif (
                isinstance(x, _Window)
                and isinstance(y, _Window)
                and x.counting
                and y.counting
                and (x.name, x.within) == (y.name, y.within)
                and not (x.days or x.hours)
                and (y.days or y.hours)
            ):
                # All events in a window against those of some days or hours: the
                # difference is a count of the others, which only falls too.
                t = _count_thresholds(o, 0)
                if t is not None:
                    self.thresholds, self.count = t, 3 + i
                    self.window = _Window("count", y.name, None, y.within, {}, y.days, y.hours)
                    self.window.local = y.local.complement()

    def eval(self, f: Facts, now: int) -> Value:
        a, na = self.left.eval(f, now)
        b, nb = self.right.eval(f, now)
        value = self.fn(a, b)
        if self.window is not None:
            # Not where the count next changes, but where the comparison does.
            m = self.thresholds[0] if value else self.thresholds[1]
            k = self.count
            count = a if k == 1 else b if k == 2 else a - b if k == 3 else b - a
            if m is None or count < m:
                return value, None
            return value, self.window.drop_below(f, now, m)
        if na is None or (nb is not None and nb < na):
            na = nb
        return value, na


def _count_thresholds(op: str, k: Any) -> tuple[int | None, int | None] | None:
    """For ``count OP k``, with a count that only falls: the count it must fall below to
    change the result, while the result is true and while it is false (None: it cannot
    change that way). None when ``k`` is not a finite number."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k):
        return None

    def low(m: int) -> int | None:
        return m if m >= 1 else None  # a count never falls below 0

    if op == ">=":  # true for counts >= ceil(k)
        return low(math.ceil(k)), None
    if op == ">":
        return low(math.floor(k) + 1), None
    if op == "<=":  # false for counts >= floor(k) + 1
        return None, low(math.floor(k) + 1)
    if op == "<":
        return None, low(math.ceil(k))
    if k != math.floor(k):  # == never holds, != always does
        return None, None
    n = int(k)
    # Falling from above k, the count may skip k (events leaving at one instant): then the
    # result is looked at again at that instant and found the same.
    if op == "==":
        return low(n), low(n + 1)
    return low(n + 1), low(n)


def _score_of(node: _Node) -> tuple[float, _Score] | None:
    if isinstance(node, _Score):
        return 1.0, node
    if isinstance(node, _Scale) and isinstance(node.inner, _Score):
        return node.k, node.inner
    return None


class _ScoreCompare(_Compare):
    """A score compared with a number constant or another score: on indexed facts the
    estimates of :class:`ScoreTerms` settle most such comparisons without building the
    terms; when they do not, the general way gives the answer (the same either way)."""

    def __init__(self, left: _Node, op: str, right: _Node) -> None:
        super().__init__(left, op, right)
        a = _score_of(self.left)
        assert a is not None
        self.a = a
        self.b = _score_of(self.right)
        self.const: float | None = None
        if self.b is None:
            assert isinstance(self.right, _Const)
            try:
                self.const = float(self.right.value)
            except OverflowError:
                self.const = None
        self.fn = _OPS[self.op]
        # Unpacked for _estimated.
        self.ka, self.config, self.da = a[0], a[1].config, a[1].delta
        self.kb, self.db = (self.b[0], self.b[1].delta) if self.b is not None else (0.0, 0)
        self.same = self.b is not None and self.b[1].config is self.config
        self.mb = abs(self.const) * _U if self.const is not None else 0.0  # b as a float

    def eval(self, f: Facts, now: int) -> Value:
        if isinstance(f, Indexed):
            answer = self._estimated(f, now)
            if answer is not None:
                return answer
        return super().eval(f, now)

    def _estimated(self, f: Indexed, now: int) -> Value | None:
        """The answer from the estimates of :class:`ScoreTerms`, or None where they do not
        settle it (the general way then gives it).

        The next instant is where the comparison flips, not merely where an event enters a
        score: a score changes by a step where an event enters it (``score_at('7d')`` a
        week after the event) and decays in between, so the steps to come are looked at
        in order, each as evaluating there would (the same estimates, so the same answer),
        until one changes the result or the estimates do not settle it. At most
        ``_STEPS`` steps are looked at; the next instant is then the one after them.
        """
        terms = f.score_terms(self.config)
        prefix, ref = terms.prefix, terms.ref
        if prefix is None or ref is None:
            return None
        if self.const is not None:
            return self._against_constant(terms.times, prefix, ref, terms.total * _TINY, now)
        if self.same:
            return self._against_score(terms.times, prefix, ref, terms.total * _TINY, now)
        return None

    def _sign(
        self, prefix: list[float], i: int, ref: int, tiny: float, t: int, extra: int = 0
    ) -> int:
        """The sign of ``ka * score(t - da) - b`` as the estimate settles it, for the first
        ``i`` terms in time order; 0 when it does not (or it overflows). ``extra`` widens
        the bound (in units of the estimate's roundoff)."""
        assert self.const is not None
        z = (ref - t + self.da) / self.config.half_life
        ka, b = self.ka, self.const
        if z < -1500.0:
            # Every term (at most 2 ** 400 relative to ref) underflows: the exact sum is 0.
            return (0.0 > b) - (0.0 < b)
        if not -1000.0 < z < 1000.0:
            return 0
        v = ka * prefix[i] * 2.0**z
        m = v * _U * (8 * i + 1024 + extra + 4 * abs(z)) + ka * tiny + 1e-300 + self.mb
        if v + m < b:
            return -1
        if v - m > b:
            return 1
        return 0

    def _against_constant(
        self, times: list[int], prefix: list[float], ref: int, tiny: float, now: int
    ) -> Value | None:
        # As _Compare._decay, step for step; where an estimate does not settle the sign,
        # the general way (exact sums) gives the whole answer.
        da, n = self.da, len(times)
        i = bisect_right(times, now - da)
        sign = self._sign(prefix, i, ref, tiny, now)
        if not sign:
            return None
        value = self.fn(sign, 0)
        step = times[i] + da if da and i < n else None
        if sign < 0:
            if (
                step is not None
                and n - i <= _STEPS
                and self._sign(prefix, n, ref, tiny, step, 8) < 0
            ):
                # Every term in, at the first step, it would still be clearly below b:
                # at each later step it has no more terms and has decayed for longer.
                # (The wider bound covers the roundoff of those later estimates.)
                return value, None
            for _ in range(_STEPS):
                if step is None:
                    return value, None
                i = bisect_right(times, times[i], i)
                s = self._sign(prefix, i, ref, tiny, step)
                if not s:
                    return None
                if s > 0:
                    return value, step
                step = times[i] + da if i < n else None
            return value, step
        b = self.const
        assert b is not None
        if step is not None and b > 0 and n - i <= _STEPS:
            last = times[-1] + da
            if self._sign(prefix, i, ref, tiny, last - 1, 8) > 0:
                # With no more terms than now, it would still be clearly above b just
                # before the last step: above b at the end of every interval but the
                # last, where it decays to 0 (b > 0). It can first fall in that one.
                return value, last
        end = _FAR if step is None else step - 1
        if end > now and self._sign(prefix, i, ref, tiny, end) <= 0:
            return None  # it may fall to b before the first step: searched the general way
        for _ in range(_STEPS):
            if step is None:
                return value, None
            start = step
            i = bisect_right(times, times[i], i)
            step = times[i] + da if i < n else None
            end = _FAR if step is None else step - 1
            if end > start:
                s = self._sign(prefix, i, ref, tiny, end)
                if not s:
                    return None
                if s < 0:
                    return value, start
        return value, step

    def _against_score(
        self, times: list[int], prefix: list[float], ref: int, tiny: float, now: int
    ) -> Value | None:
        # Both sides decay by the same factor: the result only changes at steps, where an
        # event enters one side, and is computed relative to the latest term of either
        # (the estimates of both sides, inline: this runs for every step of every such
        # evaluation).
        da, db, n = self.da, self.db, len(times)
        ka, kb, h, fn = self.ka, self.kb, self.config.half_life, self.fn
        ta, tb = ka * tiny + 1e-300, kb * tiny + 1e-300
        ia, ib = bisect_right(times, now - da), bisect_right(times, now - db)
        value = False
        step: int | None = None
        last_r: int | None = None
        pa = pb = ca = cb = 0.0
        for k in range(_STEPS + 2):
            if k:
                na = times[ia] + da if da and ia < n else None
                nb = times[ib] + db if db and ib < n else None
                step = na if nb is None or (na is not None and na <= nb) else nb
                if step is None or k > _STEPS:
                    return value, step
                # As evaluating at the step would count them (all of either side at or
                # before it, also events after now, which facts as of now do not have).
                if da or ia < n:
                    ia = bisect_right(times, step - da, ia)
                ib = bisect_right(times, step - db, ib)
            if not ia and not ib:
                s = 0
            else:
                r = times[(ia if ia > ib else ib) - 1]
                if r != last_r:
                    za, zb = (ref - r + da) / h, (ref - r + db) / h
                    if not (-1000.0 < za < 1000.0 and -1000.0 < zb < 1000.0):
                        return None
                    pa, pb = 2.0**za, 2.0**zb
                    ca = _U * (1024 + 4 * abs(za) + 4 * da / h)
                    cb = _U * (1024 + 4 * abs(zb) + 4 * db / h)
                    last_r = r
                va = ka * prefix[ia] * pa
                ma = va * (_U * 8 * ia + ca) + ta
                vb = kb * prefix[ib] * pb
                mb = vb * (_U * 8 * ib + cb) + tb
                if va - ma > vb + mb:
                    s = 1
                elif va + ma < vb - mb:
                    s = -1
                else:
                    return None
            if not k:
                value = fn(s, 0)
                if s > 0 and not da and ia == n and ib < n and n - ib <= _STEPS:
                    # Only the other side grows from here (by steps): if it stays clearly
                    # below with every term in, no step changes the result.
                    vb = kb * prefix[n] * pb
                    if va - ma > vb + vb * (_U * 8 * n + cb) + tb:
                        return value, None
            elif fn(s, 0) != value:
                return value, step
        raise AssertionError("unreachable")


_STEPS = 64
"""How many steps of a score :meth:`_ScoreCompare._estimated` looks at for one answer."""


def _always_number(node: _Node) -> bool:
    if isinstance(node, _Window):
        return node.func in ("count", "sum")
    return isinstance(node, _Const) and node.kind == "numconst"


def _compare(left: _Node, op: str, right: _Node) -> _Compare:
    """The comparison, specialised for the common shapes (each evaluates exactly as
    :class:`_Compare` would)."""
    if isinstance(left, _ElapsedNode) and isinstance(right, _DurationConst):
        return _ElapsedCompare(left, op, right)
    if isinstance(right, _ElapsedNode) and isinstance(left, _DurationConst):
        return _ElapsedCompare(left, op, right)  # mirrored into place
    if (
        _always_number(left)
        and _always_number(right)
        and not (isinstance(left, _Const) and isinstance(right, _Const))
    ):
        return _NumberCompare(left, op, right)
    a, b = _score_of(left), _score_of(right)
    numconst = isinstance(right, _Const) and right.kind == "numconst"
    if a is not None and (b is not None or numconst):
        return _ScoreCompare(left, op, right)
    if b is not None and isinstance(left, _Const) and left.kind == "numconst":
        return _ScoreCompare(left, op, right)  # mirrored into place
    return _Compare(left, op, right)


class _In(_Node):
    kind = "bool"

    def __init__(self, left: _Node, options: tuple[Any, ...], negate: bool) -> None:
        self.left, self.options, self.negate = left, options, negate

    def eval(self, f: Facts, now: int) -> Value:
        a, nxt = self.left.eval(f, now)
        if a is None or a is MISSING:
            return False, nxt
        found = any(_comparable(a, o) and a == o for o in self.options)
        return found != self.negate, nxt


class _And(_Node):
    kind = "bool"

    def __init__(self, parts: Sequence[_Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        value, nxt, _ = self.test(f, now)
        return value, nxt

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        # While false, only a false part changing can change the result; a part that is
        # false for good keeps it false for good.
        until: int | None = None
        nxt_all: int | None = None  # over all parts: the next while they all hold
        nxt_false: int | None = None  # over the false parts
        value = True
        forever = False  # a part is false for good
        for p in self.parts:
            v, n, u = p.test(f, now)
            if u is not None and (until is None or u < until):
                until = u
            if n is not None and (nxt_all is None or n < nxt_all):
                nxt_all = n
            if not v:
                value = False
                if n is None:
                    forever = True
                elif nxt_false is None or n < nxt_false:
                    nxt_false = n
        if value:
            return True, nxt_all, until
        return False, (None if forever else nxt_false), until


class _Or(_Node):
    kind = "bool"

    def __init__(self, parts: Sequence[_Node]) -> None:
        self.parts = tuple(parts)

    def eval(self, f: Facts, now: int) -> Value:
        value, nxt, _ = self.test(f, now)
        return value, nxt

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        # While true, only a true part changing can change the result.
        until: int | None = None
        nxt_all: int | None = None
        nxt_true: int | None = None
        value = False
        forever = False  # a part is true for good
        for p in self.parts:
            v, n, u = p.test(f, now)
            if u is not None and (until is None or u < until):
                until = u
            if n is not None and (nxt_all is None or n < nxt_all):
                nxt_all = n
            if v:
                value = True
                if n is None:
                    forever = True
                elif nxt_true is None or n < nxt_true:
                    nxt_true = n
        if not value:
            return False, nxt_all, until
        return True, (None if forever else nxt_true), until


class _Not(_Node):
    kind = "bool"

    def __init__(self, part: _Node) -> None:
        self.part = part

    def eval(self, f: Facts, now: int) -> Value:
        v, n = self.part.eval(f, now)
        return not v, n

    def test(self, f: Facts, now: int) -> tuple[Any, int | None, int | None]:
        v, n, u = self.part.test(f, now)
        return not v, n, u


# --- parsing -------------------------------------------------------------------------------

_CMP = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FUNCTIONS = {
    "since_last": "since_last() or since_last('Event')",
    "since_first": "since_first()",
    "since": "since(trait('date_key'))",
    "until": "until(trait('date_key'))",
    "trait": "trait('key')",
    "date": "date(trait('key')) or date('2027-01-01')",
    "exists": "exists(trait('key'))",
    "contains": "contains(trait('key'), 'text')",
    "count": "count('Event', within='30d', where={...}, days=[...], hours=[...])",
    "sum": "sum('Event', 'property', within='30d', ...)",
    "min": "min('Event', 'property', within='30d', ...)",
    "max": "max('Event', 'property', within='30d', ...)",
    "score": "score()",
    "score_at": "score_at('7d')",
    "in_segment": "in_segment('segment')",
    "in_list": "in_list('list')",
}
_NUMERIC = ("number", "numconst", "value", "decay")


@dataclass(frozen=True, slots=True)
class Needs:
    """The facts a set of rules reads, so customers keep only those."""

    event_names: frozenset[str | None] = frozenset()
    """Track event names whose last instant and count are read (``None``: any track)."""
    trait_keys: frozenset[str] = frozenset()
    retained: frozenset[str | None] = frozenset()
    """Track event names whose events are kept for windows and scores (``None``: all)."""

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.event_names | other.event_names,
            self.trait_keys | other.trait_keys,
            self.retained | other.retained,
        )

    def fingerprint(self) -> str:
        """A short text equal for equal needs, to tell whether stored facts still fit."""

        def names(keys: frozenset[str | None]) -> list[str]:
            # "*" cannot clash with an event name: None (any track) has no name.
            return sorted("*" if k is None else "=" + k for k in keys)

        text = repr((names(self.event_names), sorted(self.trait_keys), names(self.retained)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Parser:
    def __init__(self, rewrite: _Rewrite, fail: Callable[[str], DefinitionError], env: Env) -> None:
        self.rewrite = rewrite
        self.fail = fail
        self.env = env
        self.names: set[str | None] = set()
        self.traits: set[str] = set()
        self.retained: set[str | None] = set()
        self.refs: set[str] = set()
        self.first = False

    def snippet(self, node: ast.AST) -> str:
        return self.rewrite.snippet(node)

    def node(self, n: ast.AST) -> _Node:
        made = self.make(n)
        if not made.text:
            made.text = self.snippet(n)
        return made

    def make(self, n: ast.AST) -> _Node:
        if isinstance(n, ast.BoolOp):
            parts = [self.condition(v) for v in n.values]
            return _And(parts) if isinstance(n.op, ast.And) else _Or(parts)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return _Not(self.condition(n.operand))
        if isinstance(n, ast.Compare):
            pairs: list[_Node] = []
            left = n.left
            for op, right in zip(n.ops, n.comparators, strict=True):
                pair = self.compare(left, op, right)
                pair.text = self.rewrite.snippet(left, right)  # one link of a chain
                pairs.append(pair)
                left = right
            return pairs[0] if len(pairs) == 1 else _And(pairs)
        if isinstance(n, ast.Call):
            return self.call(n)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
            return self.scale(n)
        if isinstance(n, ast.Constant) and isinstance(n.value, str | int | float | bool):
            return _Const(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            inner = n.operand
            if isinstance(inner, ast.Constant) and isinstance(inner.value, int | float):
                if not isinstance(inner.value, bool):
                    return _Const(-inner.value)
        if isinstance(n, ast.Name):
            raise self.fail(
                f"unknown name {n.id!r}: write text in quotes ('{n.id}'), or call a function "
                "such as " + ", ".join(list(_FUNCTIONS.values())[:4]) + " (see SEGMENTS.md)"
            )
        raise self.fail(f"`{self.snippet(n)}` is not allowed in a rule")

    def condition(self, n: ast.AST) -> _Node:
        node = self.node(n)
        if node.kind != "bool":
            raise self.fail(f"`{self.snippet(n)}` is not a condition (true or false)")
        return node

    def scale(self, n: ast.BinOp) -> _Node:
        left, right = self.node(n.left), self.node(n.right)
        if isinstance(left, _Const) and left.kind == "numconst":
            k, inner, inner_ast = left.value, right, n.right
        elif isinstance(right, _Const) and right.kind == "numconst":
            k, inner, inner_ast = right.value, left, n.left
        else:
            raise self.fail(f"`{self.snippet(n)}`: only a number constant can multiply")
        if inner.kind not in ("number", "value", "decay", "numconst"):
            raise self.fail(f"`{self.snippet(inner_ast)}` is not a number that can be multiplied")
        if inner.kind == "decay" and not k > 0:
            raise self.fail(
                f"`{self.snippet(n)}`: a score can only be multiplied by a positive number"
            )
        if isinstance(inner, _Const):
            return _Const(k * inner.value)
        return _Scale(float(k), inner)

    def compare(self, left_ast: ast.expr, op: ast.cmpop, right_ast: ast.expr) -> _Node:
        left = self.node(left_ast)
        if isinstance(op, ast.In | ast.NotIn):
            if not isinstance(right_ast, ast.List | ast.Tuple | ast.Set):
                raise self.fail(
                    f"`in` needs a list of values, like ['gold', 'platinum'], "
                    f"not `{self.snippet(right_ast)}`"
                )
            options = []
            for elt in right_ast.elts:
                item = self.node(elt)
                if not isinstance(item, _Const):
                    raise self.fail(f"list items must be plain values, not `{self.snippet(elt)}`")
                options.append(item.value)
            return _In(left, tuple(options), isinstance(op, ast.NotIn))
        symbol = _CMP.get(type(op))
        if symbol is None:
            raise self.fail(f"comparison `{type(op).__name__}` is not allowed in a rule")
        right = self.node(right_ast)
        left, right = self.typed(left, left_ast, right, right_ast)
        if left.kind == "bool" or right.kind == "bool":
            if not (isinstance(left, _Const) or isinstance(right, _Const)):
                raise self.fail(f"compare conditions with and/or/not, not `{symbol}`")
        return _compare(left, symbol, right)

    def typed(
        self, left: _Node, left_ast: ast.expr, right: _Node, right_ast: ast.expr
    ) -> tuple[_Node, _Node]:
        """Check that two sides can be compared; turn text into durations or instants."""
        for a, b, b_ast, swap in (
            (left, right, right_ast, False),
            (right, left, left_ast, True),
        ):
            if a.kind == "elapsed":
                if b.kind == "elapsed":
                    if getattr(a, "sign", 1) != getattr(b, "sign", 1):
                        raise self.fail(
                            "a time since and a time until cannot be compared with each other"
                        )
                    return left, right
                d = self.duration(b, b_ast)
                return (d, a) if swap else (a, d)
            if a.kind == "instant":
                if b.kind == "instant":
                    return left, right
                i = self.instant(b, b_ast)
                return (i, a) if swap else (a, i)
            if a.kind == "decay":
                if b.kind not in _NUMERIC:
                    raise self.fail(
                        f"a score compares with a number or another score, "
                        f"not `{self.snippet(b_ast)}`"
                    )
                return left, right
        if left.kind == "duration" or right.kind == "duration":
            raise self.fail("a duration compares with an elapsed time such as since_last()")
        for a, b, b_ast in ((left, right, right_ast), (right, left, left_ast)):
            if a.kind == "number" and isinstance(b, _Const) and isinstance(b.value, str):
                raise self.fail(
                    f"a count, sum, min or max compares with a number, not `{self.snippet(b_ast)}`"
                )
        return left, right

    def duration(self, node: _Node, where: ast.expr) -> _Node:
        if isinstance(node, _Const) and isinstance(node.value, str):
            try:
                return _DurationConst(parse_duration(node.value))
            except ValueError as e:
                raise self.fail(str(e)) from None
        raise self.fail(
            f"an elapsed time compares with a duration in quotes like '14d', "
            f"not `{self.snippet(where)}`"
        )

    def instant(self, node: _Node, where: ast.expr) -> _Node:
        if isinstance(node, _Const) and isinstance(node.value, str):
            at = to_instant_value(node.value)
            if at is None:
                raise self.fail(f"{node.value!r} is not an ISO-8601 date or date and time")
            return _InstantConst(at)
        raise self.fail(
            f"a date compares with another date, like date('2027-01-01'), "
            f"not `{self.snippet(where)}`"
        )

    def text_arg(self, n: ast.Call, a: ast.expr) -> str:
        if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value:
            return a.value
        raise self.fail(f"`{self.snippet(n)}` takes a name in quotes, not `{self.snippet(a)}`")

    def call(self, n: ast.Call) -> _Node:
        name = n.func.id if isinstance(n.func, ast.Name) else None
        if name is None or name not in _FUNCTIONS:
            raise self.fail(
                f"unknown function in `{self.snippet(n)}`: see SEGMENTS.md for the functions "
                "rules can use"
            )
        usage = f"write it as {_FUNCTIONS[name]}"
        if name in ("count", "sum", "min", "max"):
            return self.window(n, name)
        if n.keywords:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        args = n.args
        if name in ("since_first", "score"):
            if args:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            if name == "score":
                self.score_needs()
                return _Score(self.env.score, 0)
            self.first = True
            return _SinceFirst()
        if len(args) != 1 and not (name == "since_last" and not args) and name != "contains":
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        if name == "since_last":
            event = self.text_arg(n, args[0]) if args else None
            self.names.add(event)
            return _SinceLast(event)
        if name == "trait":
            key = self.text_arg(n, args[0])
            self.traits.add(key)
            return _Trait(key)
        if name == "score_at":
            d = self.duration(self.node(args[0]), args[0])
            assert isinstance(d, _DurationConst)
            if d.us <= 0:
                raise self.fail(f"`{self.snippet(n)}`: the duration must be positive")
            self.score_needs()
            return _Score(self.env.score, d.us)
        if name in ("in_segment", "in_list"):
            target = self.text_arg(n, args[0])
            if name == "in_list":
                if target not in self.env.lists:
                    raise self.fail(f"`{self.snippet(n)}`: no list {target!r} ([lists.{target}])")
                return _InList(self.env.lists[target])
            if self.env.segments and target not in self.env.segments:
                raise self.fail(f"`{self.snippet(n)}`: no segment {target!r}")
            self.refs.add(target)
            return _InSegment(target)
        inner = self.node(args[0]) if args else None
        if name in ("since", "until", "date"):
            assert inner is not None
            if isinstance(inner, _Const) and isinstance(inner.value, str) and name == "date":
                return self.instant(inner, args[0])
            if isinstance(inner, _Trait):
                inner = _DateOf(inner)
            if inner.kind != "instant":
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            if name == "date":
                return inner
            return _Relative(inner, 1 if name == "since" else -1)
        if name == "exists":
            if not isinstance(inner, _Trait):
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            return _Exists(inner)
        # contains
        if len(args) != 2:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        needle = self.node(args[1])
        if not isinstance(needle, _Const) or inner is None:
            raise self.fail(f"`{self.snippet(n)}`: {usage}")
        return _Contains(inner, needle)

    def score_needs(self) -> None:
        config = self.env.score
        if config.default_weight != 0:
            self.retained.add(None)
        else:
            self.retained.update(k for k, w in config.weights.items() if w != 0)

    def window(self, n: ast.Call, func: str) -> _Node:
        usage = f"write it as {_FUNCTIONS[func]}"
        args = [self.text_arg(n, a) for a in n.args]
        if func == "count":
            if len(args) > 1:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            event, prop = (args[0] if args else None), None
        else:
            if len(args) != 2:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
            event, prop = args
        within: int | None = None
        where: dict[str, Any] = {}
        days: frozenset[int] | None = None
        hours: frozenset[int] | None = None
        for kw in n.keywords:
            value = kw.value
            if kw.arg == "within":
                d = self.duration(self.node(value), value)
                assert isinstance(d, _DurationConst)
                if d.us <= 0:
                    raise self.fail(f"`{self.snippet(n)}`: `within` must be positive")
                within = d.us
            elif kw.arg == "where" and isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values, strict=True):
                    key = self.node(k) if k is not None else None
                    val = self.node(v)
                    if not (isinstance(key, _Const) and isinstance(key.value, str)):
                        raise self.fail(f"`{self.snippet(n)}`: `where` keys are property names")
                    if not isinstance(val, _Const):
                        raise self.fail(f"`{self.snippet(n)}`: `where` values are plain values")
                    where[key.value] = val.value
            elif kw.arg in ("days", "hours") and isinstance(value, ast.List | ast.Tuple):
                items = [self.node(e) for e in value.elts]
                consts = [i.value for i in items if isinstance(i, _Const)]
                if kw.arg == "days":
                    if len(consts) != len(items) or any(c not in _DAYS for c in consts):
                        raise self.fail(
                            f"`{self.snippet(n)}`: `days` lists 'mon', 'tue', 'wed', 'thu', "
                            "'fri', 'sat', 'sun'"
                        )
                    days = frozenset(_DAYS.index(c) for c in consts)
                else:
                    if len(consts) != len(items) or not all(
                        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 23
                        for c in consts
                    ):
                        raise self.fail(f"`{self.snippet(n)}`: `hours` lists whole hours 0 to 23")
                    hours = frozenset(consts)
            else:
                raise self.fail(f"`{self.snippet(n)}`: {usage}")
        node = _Window(func, event, prop, within, where, days, hours)
        if node.simple:
            self.names.add(event)
        else:
            self.retained.add(event)
            if days or hours:
                self.traits.add("timezone")
        return node


class _Rewrite:
    """A rule as Python can parse it, with columns mapped back to the text as written.

    SQL and spreadsheet habits are accepted: ``=`` for ``==`` (not a keyword argument's
    ``=``) and upper-case ``AND``/``OR``/``NOT``. The rewrite splices into the original text,
    so spacing is kept and messages can quote exactly what the user wrote.
    """

    def __init__(self, text: str) -> None:
        self.original = text
        lines = text.splitlines(keepends=True) or [""]
        inserted: dict[int, list[int]] = {}  # row -> rewritten columns of added '=' signs
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, SyntaxError):
            tokens = []  # ast.parse reports the problem with its position
        edits: list[tuple[int, int, str, str]] = []
        for i, tok in enumerate(tokens):
            if tok.type == tokenize.OP and tok.string == "=":
                before = tokens[i - 2].string if i >= 2 else ""
                if not (tokens[i - 1].type == tokenize.NAME and before in ("(", ",")):
                    edits.append((tok.start[0], tok.start[1], "=", "=="))
            elif tok.type == tokenize.NAME and tok.string in ("AND", "OR", "NOT"):
                edits.append((tok.start[0], tok.start[1], tok.string, tok.string.lower()))
        for row, col, old, new in sorted(edits, reverse=True):
            line = lines[row - 1]
            lines[row - 1] = line[:col] + new + line[col + len(old) :]
        shifts: dict[int, int] = {}
        for row, col, old, new in sorted(edits):
            if len(new) > len(old):
                at = col + shifts.get(row, 0) + len(old)
                inserted.setdefault(row, []).append(at)
                shifts[row] = shifts.get(row, 0) + len(new) - len(old)
        self.text = "".join(lines)
        self._inserted = inserted
        self._lines: list[str] = text.splitlines(keepends=True) or [""]

    def column(self, row: int, col: int) -> int:
        """The original column of rewritten column ``col`` (0-based) on line ``row``."""
        return col - sum(1 for c in self._inserted.get(row, ()) if c < col)

    def snippet(self, node: ast.AST, through: ast.AST | None = None) -> str:
        """The text of ``node`` (on to the end of ``through``) as the user wrote it."""
        keys = ("lineno", "end_lineno", "col_offset", "end_col_offset")
        last = through or node
        pos: list[int] = [
            p
            for k in keys
            if isinstance(p := getattr(last if k.startswith("end") else node, k, None), int)
        ]
        if len(pos) != len(keys):
            return ast.unparse(node)
        r0, r1, c0, c1 = pos
        start, end = self.column(r0, c0), self.column(r1, c1)
        if r0 == r1:
            return self._lines[r0 - 1][start:end]
        parts = [self._lines[r0 - 1][start:], *self._lines[r0 : r1 - 1], self._lines[r1 - 1][:end]]
        return "".join(parts)


# --- compiling -------------------------------------------------------------------------------
# A rule is also compiled into one Python function, so evaluating it is straight-line code
# instead of a call per node. Each node compiles to the same computation as its ``test``
# (or ``eval``); nodes without a compiled form are called. The source holds only names made
# here, operators from fixed tables and integers: everything else (event names, constants,
# nodes) is passed in as a variable, so nothing of the rule's text is ever compiled.

_FLIP_NEXT = {
    ">=": "{t} if now < {t} else None",
    ">": "{t} + 1 if now <= {t} else None",
    "<": "{t} if now < {t} else None",
    "<=": "{t} + 1 if now <= {t} else None",
    "==": "{t} if now < {t} else ({t} + 1 if now == {t} else None)",
    "!=": "{t} if now < {t} else ({t} + 1 if now == {t} else None)",
}
"""The next instant ``now OP t`` changes, as _instant_compare computes it."""


class _Compiler:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "bisect_right": bisect_right,
            "Indexed": Indexed,
            "compare_eval": _Compare.eval,
            "zone_of": _zone,
        }
        self.n = 0
        self.windows: dict[str, tuple[str, str]] = {}
        # Of an indexed window: the names of its instants, its end and its local counts.
        self.indexes: dict[str, tuple[str, str, str | None]] = {}

    @staticmethod
    def window_key(node: _Window) -> str:
        return repr(
            (node.func, node.name, node.prop, node.within, node.where, node.days, node.hours)
        )

    def var(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: Any) -> str:
        name = self.var("k")
        self.env[name] = value
        return name

    def line(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def earliest(self, depth: int, out: str, a: str, b: str) -> None:
        """``out = earliest(a, b)`` (either may be the literal None)."""
        if a == "None":
            self.line(depth, f"{out} = {b}")
        elif b == "None":
            self.line(depth, f"{out} = {a}")
        else:
            later = f"{a} is None or ({b} is not None and {b} < {a})"
            self.line(depth, f"{out} = {b} if {later} else {a}")

    def condition(self, node: _Node, d: int) -> tuple[str, str, str]:
        """Code setting (value, next, until) of a condition; their names."""
        v, n = self.var("v"), self.var("n")
        if isinstance(node, _ElapsedCompare):
            a, t = self.var("a"), self.var("t")
            el = node.elapsed
            if isinstance(el, _SinceLast):
                self.line(d, f"{a} = f.last_at({self.const(el.name)})")
            elif isinstance(el, _SinceFirst):
                self.line(d, f"{a} = f.first_at()")
            else:
                self.line(d, f"{a} = {self.const(el)}.anchor(f, now)")
            self.line(d, f"if {a} is None:")
            self.line(d + 1, f"{v} = False")
            self.line(d + 1, f"{n} = None")
            self.line(d, "else:")
            sign = "+" if el.sign == 1 else "-"
            self.line(d + 1, f"{t} = {a} {sign} {int(node.us)}")
            self.line(d + 1, f"{v} = now {node.now_op} {t}")
            self.line(d + 1, f"{n} = " + _FLIP_NEXT[node.now_op].format(t=t))
            return v, n, n
        if isinstance(node, _NumberCompare):
            a, na = self.number(node.left, d)
            b, nb = self.number(node.right, d)
            self.line(d, f"{v} = {a} {node.op} {b}")
            if node.window is None:
                self.earliest(d, n, na, nb)
                return v, n, n
            # As _NumberCompare.eval and _Window.drop_below: where the comparison flips.
            win = node.window
            count = {1: a, 2: b, 3: f"({a} - {b})", 4: f"({b} - {a})"}[node.count]
            m = self.var("m")
            t_true, t_false = node.thresholds
            self.line(d, f"{m} = {t_true} if {v} else {t_false}")
            self.line(d, f"if {m} is None or {count} < {m}:")
            self.line(d + 1, f"{n} = None")
            if node.count > 2:
                self.line(d, "else:")
                self.line(d + 1, f"{n} = {self.const(win)}.drop_below(f, now, {m})")
                return v, n, n
            ats, hi, counts = self.indexes[self.window_key(win)]
            assert win.within is not None
            self.line(d, "elif indexed:")
            if counts is None:
                self.line(d + 1, f"{n} = {ats}[{hi} - {m}] + {int(win.within)}")
            else:
                at = f"bisect_right({counts}, {counts}[{hi}] - {m}) - 1"
                self.line(d + 1, f"{n} = {ats}[{at}] + {int(win.within)}")
            self.line(d, "else:")
            self.line(d + 1, f"{n} = {self.const(win)}.drop_below(f, now, {m})")
            return v, n, n
        if isinstance(node, _Not):
            pv, pn, pu = self.condition(node.part, d)
            self.line(d, f"{v} = not {pv}")
            return v, pn, pu
        if isinstance(node, _And | _Or):
            return self.combine(node, d)
        if isinstance(node, _ScoreCompare):
            k, r = self.const(node), self.var("r")
            self.line(d, f"{r} = {k}._estimated(f, now) if indexed else None")
            self.line(d, f"if {r} is None:")
            self.line(d + 1, f"{v}, {n} = compare_eval({k}, f, now)")
            self.line(d, "else:")
            self.line(d + 1, f"{v}, {n} = {r}")
            return v, n, n
        u = self.var("u")
        self.line(d, f"{v}, {n}, {u} = {self.const(node)}.test(f, now)")
        return v, n, u

    def combine(self, node: _And | _Or, d: int) -> tuple[str, str, str]:
        # As _And.test / _Or.test: the next instant over all parts while the result is
        # decided by all of them, else over the parts that decide it (None if one of those
        # is decided for good).
        if len(node.parts) == 2:
            return self.pair(node, d)
        conj = isinstance(node, _And)
        v, n, u = self.var("v"), self.var("n"), self.var("u")
        every, deciding, forever = self.var("e"), self.var("s"), self.var("f")
        self.line(d, f"{v} = {conj}")
        self.line(d, f"{u} = {every} = {deciding} = None")
        self.line(d, f"{forever} = False")
        for part in node.parts:
            pv, pn, pu = self.condition(part, d)
            self.line(d, f"if {pu} is not None and ({u} is None or {pu} < {u}):")
            self.line(d + 1, f"{u} = {pu}")
            self.line(d, f"if {pn} is not None and ({every} is None or {pn} < {every}):")
            self.line(d + 1, f"{every} = {pn}")
            self.line(d, f"if not {pv}:" if conj else f"if {pv}:")
            self.line(d + 1, f"{v} = {not conj}")
            self.line(d + 1, f"if {pn} is None:")
            self.line(d + 2, f"{forever} = True")
            self.line(d + 1, f"elif {deciding} is None or {pn} < {deciding}:")
            self.line(d + 2, f"{deciding} = {pn}")
        decided = f"not {v}" if conj else v
        self.line(d, f"{n} = (None if {forever} else {deciding}) if {decided} else {every}")
        return v, n, u

    def pair(self, node: _And | _Or, d: int) -> tuple[str, str, str]:
        """``combine`` of two parts, written out case by case."""
        conj = isinstance(node, _And)
        v1, n1, u1 = self.condition(node.parts[0], d)
        v2, n2, u2 = self.condition(node.parts[1], d)
        v, n = self.var("v"), self.var("n")
        both = f"None if {n1} is None or {n2} is None else ({n1} if {n1} <= {n2} else {n2})"
        every = self.var("e")
        self.earliest(d, every, n1, n2)
        # ``decide``: the value when a part decides it (false for and, true for or).
        decide = not conj
        self.line(d, f"if {v1}:" if conj else f"if not {v1}:")
        self.line(d + 1, f"if {v2}:" if conj else f"if not {v2}:")
        self.line(d + 2, f"{v}, {n} = {not decide}, {every}")
        self.line(d + 1, "else:")
        self.line(d + 2, f"{v}, {n} = {decide}, {n2}")
        self.line(d, "else:")
        self.line(d + 1, f"{v} = {decide}")
        self.line(d + 1, f"if {v2}:" if conj else f"if not {v2}:")
        self.line(d + 2, f"{n} = {n1}")
        self.line(d + 1, "else:")
        self.line(d + 2, f"{n} = {both}")
        if u1 == n1 and u2 == n2:
            return v, n, every
        u = self.var("u")
        self.earliest(d, u, u1, u2)
        return v, n, u

    def number(self, node: _Node, d: int) -> tuple[str, str]:
        """Code setting (value, next) of a count, a sum or a number constant."""
        if isinstance(node, _Const):
            return self.const(node.value), "None"
        assert isinstance(node, _Window)
        # The same window twice in a rule is computed once: every node's code runs, in
        # order, at the top level of the function (branches only assign results).
        key = self.window_key(node)
        if key in self.windows:
            return self.windows[key]
        c, cn = self.var("c"), self.var("cn")
        if node.simple:
            self.line(d, f"{c} = f.count({self.const(node.name)})")
            self.windows[key] = c, "None"
            return c, "None"
        self.windows[key] = c, cn
        if node.indexed:
            # As _Window._indexed.
            assert node.within is not None
            w = int(node.within)
            name = self.const(node.name)
            ats, lo, hi = self.var("ats"), self.var("lo"), self.var("hi")
            self.line(d, "if indexed:")
            self.line(d + 1, f"{ats} = f.instants({name})")
            self.line(d + 1, f"{lo} = bisect_right({ats}, now - {w})")
            self.line(d + 1, f"{hi} = bisect_right({ats}, now)")
            self.line(d + 1, f"{cn} = {ats}[{lo}] + {w} if {lo} < {hi} else None")
            if node.days or node.hours:
                counts, where = self.var("cnt"), self.const(node.local)
                zone = 'zone_of(f.trait("timezone"))'
                self.line(d + 1, f"{counts} = f.local_counts({name}, {zone}, {where})")
                self.line(d + 1, f"{c} = {counts}[{hi}] - {counts}[{lo}]")
                self.indexes[key] = ats, hi, counts
            else:
                self.line(d + 1, f"{c} = {hi} - {lo}")
                self.indexes[key] = ats, hi, None
            self.line(d, "else:")
            self.line(d + 1, f"{c}, {cn} = {self.const(node)}.eval(f, now)")
            return c, cn
        self.line(d, f"{c}, {cn} = {self.const(node)}.eval(f, now)")
        return c, cn


def _compile(root: _Node) -> Callable[[Facts, int], tuple[bool, int | None, int | None]]:
    """One function computing ``root.test`` (as a bool, next, until)."""
    c = _Compiler()
    c.line(1, "indexed = isinstance(f, Indexed)")
    v, n, u = c.condition(root, 1)
    c.line(1, f"return bool({v}), {n}, {u}")
    source = "def rule(f, now):\n" + "\n".join(c.lines) + "\n"
    code = compile(source, "<rule>", "exec")
    namespace = dict(c.env)
    exec(code, namespace)
    fn: Callable[[Facts, int], tuple[bool, int | None, int | None]] = namespace["rule"]
    return fn


@dataclass(frozen=True, slots=True)
class Rule:
    """A checked rule, ready to evaluate."""

    text: str
    needs: Needs
    refs: frozenset[str]
    """Segments the rule reads the membership of."""
    _root: _Node
    reads_first: bool = False
    """Whether it reads the instant of the first event (``since_first()``)."""
    cacheable: bool = True
    """Whether :meth:`evaluate_until`'s answer may be kept until its ``until`` while the
    facts it reads stay the same: false when the rule reads memberships, or searches a score
    of negative weights (whose crossing found depends on where the search starts)."""

    evaluator: Callable[[Facts, int], tuple[bool, int | None, int | None]] = field(
        init=False, repr=False, compare=False
    )
    """:meth:`evaluate_until` as one compiled function (what customers call)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "evaluator", _compile(self._root))

    def evaluate(self, facts: Facts, now: int) -> tuple[bool, int | None]:
        """Whether the rule holds at ``now``, and the next instant that can change."""
        value, nxt, _ = self.evaluator(facts, now)
        return value, nxt

    def evaluate_until(self, facts: Facts, now: int) -> tuple[bool, int | None, int | None]:
        """:meth:`evaluate`, and the earliest instant after ``now`` at which its answer
        (value or next) can differ while the facts stay the same (``None``: never).

        Facts here are as of ``now``: no event the rule reads is after ``now``.
        """
        return self.evaluator(facts, now)


def parse_rule(
    text: str, *, source: str = "<rule>", segment: str | None = None, env: Env | None = None
) -> Rule:
    """Parse and check one rule.

    Args:
        text: the rule.
        source, segment: where it comes from, for error messages.
        env: the score settings, static lists and segment names it may refer to.

    Raises:
        DefinitionError: the rule is not valid; the message says where and why.
    """

    def fail(problem: str) -> DefinitionError:
        return DefinitionError(problem, source=source, segment=segment)

    if not text.strip():
        raise fail("the rule is empty")
    rewrite = _Rewrite(text)
    try:
        tree = ast.parse(rewrite.text, mode="eval")
    except SyntaxError as e:
        words = text.split()
        if not e.offset or e.offset > len(rewrite.text.rstrip()):
            # Python points at nothing when the rule stops short, e.g. after `and`.
            raise fail(
                f"rule `{text}` is incomplete: something is missing after `{words[-1]}`"
            ) from None
        col = rewrite.column(e.lineno or 1, e.offset - 1) + 1
        raise fail(f"rule `{text}` is not valid syntax at column {col}: {e.msg}") from None
    parser = _Parser(rewrite, fail, env or Env())
    root = parser.condition(tree.body)
    return Rule(
        text=text,
        needs=Needs(
            event_names=frozenset(parser.names),
            trait_keys=frozenset(parser.traits),
            retained=frozenset(parser.retained),
        ),
        refs=frozenset(parser.refs),
        _root=root,
        reads_first=parser.first,
        cacheable=not parser.refs
        and all(n.monotone for n in _walk(root) if isinstance(n, _Compare)),
    )


def _walk(node: _Node) -> Iterator[_Node]:
    yield node
    for child in node.children():
        yield from _walk(child)
