"""Event windows (count, sum, min, max of track events in a trailing window), and
comparisons of counts, which solve for the instant an event leaves the window."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from datetime import UTC, timedelta, tzinfo
from typing import Any

from ._compare import MIRROR, OPS, Compare
from ._dates import EPOCH, LocalFilter, zone_of
from ._facts import MISSING, Facts, Indexed, Value, earliest
from ._nodes import Const, Node, comparable


class Window(Node):
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
        # one computable instant (see NumberCompare).
        self.counting = self.indexed
        self.local = LocalFilter(days, hours)

    def eval(self, f: Facts, now: int) -> Value:
        if self.simple:
            return f.count(self.name), None
        if self.indexed and isinstance(f, Indexed):
            zone = zone_of(f.trait("timezone")) if (self.days or self.hours) else None
            return self._indexed(f, now, zone)
        zone = zone_of(f.trait("timezone")) if (self.days or self.hours) else UTC
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
                not (comparable(e.properties.get(k, MISSING), v) and e.properties.get(k) == v)
                for k, v in self.where.items()
            ):
                continue
            if self.days or self.hours:
                local = (EPOCH + timedelta(microseconds=e.at)).astimezone(zone)
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
            counts = f.local_counts(self.name, zone_of(f.trait("timezone")), self.local)
            return ats[bisect_right(counts, counts[hi] - m) - 1] + w
        zone = zone_of(f.trait("timezone")) if (self.days or self.hours) else UTC
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


class NumberCompare(Compare):
    """Counts or sums of windows (always numbers) and number constants."""

    def __init__(self, left: Node, op: str, right: Node) -> None:
        super().__init__(left, op, right)
        self.fn = OPS[self.op]
        # A comparison that is a trailing count (``window``) against a constant flips where
        # that count falls below a threshold (for the result true, for false). ``count``
        # says how to get the count from the two sides: 1 the left, 2 the right, 3 left
        # minus right, 4 right minus left.
        self.window: Window | None = None
        self.thresholds: tuple[int | None, int | None] = (None, None)
        self.count = 0
        left, right, op = self.left, self.right, self.op
        for i, (x, y, o) in enumerate(((left, right, op), (right, left, MIRROR[op]))):
            if isinstance(x, Window) and x.counting and isinstance(y, Const):
                t = _count_thresholds(o, y.value)
                if t is not None:
                    self.window, self.thresholds, self.count = x, t, 1 + i
            elif (
                isinstance(x, Window)
                and isinstance(y, Window)
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
                    self.window = Window("count", y.name, None, y.within, {}, y.days, y.hours)
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
