"""Comparisons: of values, of elapsed times, and of decayed scores (solving for the flip)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from protocol import NEVER

from ._facts import MISSING, Facts, Value, earliest
from ._nodes import Const, DurationConst, Elapsed, ElapsedNode, Node, Scale, Score, comparable
from ._scores import Decay

MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def instant_compare(now: int, op: str, t: int) -> Value:
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
    end = (limit - 1) if limit is not None else NEVER
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


class Compare(Node):
    kind = "bool"

    def __init__(self, left: Node, op: str, right: Node) -> None:
        # Keep the moving value on the left, so evaluation has fewer shapes to handle.
        self.mirrored = right.kind in ("elapsed", "decay") and left.kind not in ("elapsed", "decay")
        if self.mirrored:
            left, right, op = right, left, MIRROR[op]
        self.left, self.op, self.right = left, op, right
        inner = left.inner if isinstance(left, Scale) else left
        # A score of non-negative weights (and a positive factor) never rises between events.
        self.monotone = not isinstance(inner, Score) or (
            inner.config.default_weight >= 0 and all(w >= 0 for w in inner.config.weights.values())
        )

    def eval(self, f: Facts, now: int) -> Value:
        a, na = self.left.eval(f, now)
        b, nb = self.right.eval(f, now)
        nxt = earliest(na, nb)
        if a is None or b is None or a is MISSING or b is MISSING:
            return False, nxt
        op = self.op
        if isinstance(a, Elapsed):
            if isinstance(b, Elapsed):
                # Same sign (checked at parse time): the difference does not move with now.
                return OPS[op](a.sign * (b.anchor - a.anchor), 0), nxt
            # sign * (now - anchor) OP d
            if a.sign == 1:
                v, n = instant_compare(now, op, a.anchor + b)
            else:  # anchor - now OP d  <=>  now MIRROR(OP) anchor - d
                v, n = instant_compare(now, MIRROR[op], a.anchor - b)
            return v, earliest(n, nxt)
        if isinstance(a, Decay):
            return self._decay(f, a, b, now, nxt)
        if not comparable(a, b):
            return op == "!=", nxt
        if isinstance(a, bool) and op not in ("==", "!="):
            return False, nxt  # booleans are equal or not, never ordered
        return OPS[op](a, b), nxt

    def _decay(self, f: Facts, a: Decay, b: Any, now: int, nxt: int | None) -> Value:
        # Comparisons go by the sign of the difference (never NaN: no term is), which
        # estimates settle without the exact sums unless the two sides are very close.
        # A score changes by a step where an event enters it (score_at('7d') a week after
        # the event) and decays in between. The next instant is where the comparison
        # flips: the steps to come are looked at in order (at most STEPS of them), each
        # as evaluating there would. ScoreCompare._estimated follows the same steps.
        op = OPS[self.op]
        if isinstance(b, Decay):
            # Both decay by the same factor: the result only changes at steps.
            value = op(_versus(a, b), 0)
            t = nxt
            for _ in range(STEPS):
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
        stepped = self.monotone and isinstance(self.right, Const)
        if sign < 0:
            if not stepped:
                return value, nxt
            # Below b it only falls between steps: the first step that does not leave it
            # below may change the result.
            t = nxt
            for _ in range(STEPS):
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
        for _ in range(STEPS):
            start = s
            assert start is not None
            a, s = self.left.eval(f, start)
            end = NEVER if s is None else s - 1
            if end > start and a.compare(end, b)[0] <= 0:
                return value, start
            if s is None:
                return value, None
        return value, s


def _versus(a: Decay, b: Decay) -> int:
    """The sign of ``a - b`` for two scores that decay alike, computed relative to the
    latest event instant of either (it does not change with now)."""
    if a.top is None and b.top is None:
        return 0
    r = a.top if b.top is None or (a.top is not None and a.top > b.top) else b.top
    assert r is not None
    return a.compare_normalised(b, r)


class ElapsedCompare(Compare):
    """An elapsed time compared with a duration: it flips at an exact instant."""

    def __init__(self, left: Node, op: str, right: Node) -> None:
        super().__init__(left, op, right)
        assert isinstance(self.left, ElapsedNode) and isinstance(self.right, DurationConst)
        self.elapsed, self.us = self.left, self.right.us
        # sign * (now - anchor) OP d: now OP anchor + d, or now MIRROR(OP) anchor - d
        self.now_op = self.op if self.left.sign == 1 else MIRROR[self.op]

    def eval(self, f: Facts, now: int) -> Value:
        at = self.elapsed.anchor(f, now)
        if at is None:
            return False, None
        if self.elapsed.sign == 1:
            return instant_compare(now, self.now_op, at + self.us)
        return instant_compare(now, self.now_op, at - self.us)


STEPS = 64
"""How many steps of a score :meth:`ScoreCompare._estimated` looks at for one answer."""
