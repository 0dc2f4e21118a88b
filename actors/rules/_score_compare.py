"""Score comparisons on indexed facts: settled by estimates without building the terms."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import cast

from protocol import NEVER

from ._compare import OPS, STEPS, Compare, _first_flip
from ._facts import Facts, Indexed, Value
from ._nodes import Const, Node, Scale, Score
from ._scores import TINY, Decay, U


def score_of(node: Node) -> tuple[float, Score] | None:
    if isinstance(node, Score):
        return 1.0, node
    if isinstance(node, Scale) and isinstance(node.inner, Score):
        return node.k, node.inner
    return None


class ScoreCompare(Compare):
    """A score compared with a number constant or another score: on indexed facts the
    estimates of :class:`ScoreTerms` settle most such comparisons without building the
    terms; when they do not, the general way gives the answer (the same either way)."""

    def __init__(self, left: Node, op: str, right: Node) -> None:
        super().__init__(left, op, right)
        a = score_of(self.left)
        assert a is not None
        self.a = a
        self.b = score_of(self.right)
        self.const: float | None = None
        if self.b is None:
            assert isinstance(self.right, Const)
            try:
                self.const = float(self.right.value)
            except OverflowError:
                self.const = None
        self.fn = OPS[self.op]
        # Above and below give different results (not so for == and !=).
        self.ordering = self.fn(1, 0) != self.fn(-1, 0)
        # Unpacked for _estimated.
        self.ka, self.config, self.da = a[0], a[1].config, a[1].delta
        self.kb, self.db = (self.b[0], self.b[1].delta) if self.b is not None else (0.0, 0)
        self.same = self.b is not None and self.b[1].config is self.config
        self.mb = abs(self.const) * U if self.const is not None else 0.0  # b as a float

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
        ``STEPS`` steps are looked at; the next instant is then the one after them.
        """
        terms = f.score_terms(self.config)
        prefix, ref = terms.prefix, terms.ref
        if prefix is None or ref is None:
            return None
        # The folded terms (ScoreTerms.fold_old) are in every score: they count in the
        # bounds (8 units of roundoff each) and stand for the latest instant when no other
        # term is in.
        off, top0 = terms.off, terms.top0
        if self.const is not None:
            return self._against_constant(
                f, terms.times, prefix, ref, terms.total * TINY, now, 8 * off
            )
        if self.same:
            return self._against_score(terms.times, prefix, ref, terms.total * TINY, now, off, top0)
        return None

    def _sign(
        self, prefix: Sequence[float], i: int, ref: int, tiny: float, t: int, extra: int
    ) -> int:
        """The sign of ``ka * score(t - da) - b`` as the estimate settles it, for the first
        ``i`` terms in time order (and the folded ones); 0 when it does not (or it
        overflows). ``extra`` widens the bound (in units of the estimate's roundoff)."""
        assert self.const is not None
        z = (ref - t + self.da) / self.config.half_life
        ka, b = self.ka, self.const
        if z < -1500.0:
            # Every term (at most 2 ** 400 relative to ref) underflows: the exact sum is 0.
            return (0.0 > b) - (0.0 < b)
        if not -1000.0 < z < 1000.0:
            return 0
        v = ka * prefix[i] * 2.0**z
        m = v * U * (8 * i + 1024 + extra + 4 * abs(z)) + ka * tiny + 1e-300 + self.mb
        if v + m < b:
            return -1
        if v - m > b:
            return 1
        return 0

    def _against_constant(
        self,
        f: Indexed,
        times: Sequence[int],
        prefix: Sequence[float],
        ref: int,
        tiny: float,
        now: int,
        e0: int,
    ) -> Value | None:
        # As Compare._decay, step for step; where an estimate does not settle the sign,
        # the general way (exact sums) gives the whole answer.
        da, n = self.da, len(times)
        i = bisect_right(times, now - da)
        sign = self._sign(prefix, i, ref, tiny, now, e0)
        if not sign:
            return None
        value = self.fn(sign, 0)
        step = times[i] + da if da and i < n else None
        if sign < 0:
            if (
                step is not None
                and n - i <= STEPS
                and self._sign(prefix, n, ref, tiny, step, 8 + e0) < 0
            ):
                # Every term in, at the first step, it would still be clearly below b:
                # at each later step it has no more terms and has decayed for longer.
                # (The wider bound covers the roundoff of those later estimates.)
                return value, None
            for _ in range(STEPS):
                if step is None:
                    return value, None
                i = bisect_right(times, times[i], i)
                s = self._sign(prefix, i, ref, tiny, step, e0)
                if not s:
                    return None
                if s > 0:
                    return value, step
                step = times[i] + da if i < n else None
            return value, step
        b = self.const
        assert b is not None
        if step is not None and b > 0 and n - i <= STEPS:
            last = times[-1] + da
            if self._sign(prefix, i, ref, tiny, last - 1, 8 + e0) > 0:
                # With no more terms than now, it would still be clearly above b just
                # before the last step: above b at the end of every interval but the
                # last, where it decays to 0 (b > 0). It can first fall in that one.
                return value, last
        end = NEVER if step is None else step - 1
        if end > now:
            s = self._sign(prefix, i, ref, tiny, end, e0)
            if s < 0 and b > 0 and self.ka > 0:
                # It falls to b before the first step: where, the decay says.
                return self._crossing(f, prefix, i, ref, tiny, now, end, e0, value)
            if s <= 0:
                return None  # it may fall to b before the first step: the general way
        for _ in range(STEPS):
            if step is None:
                return value, None
            start = step
            i = bisect_right(times, times[i], i)
            step = times[i] + da if i < n else None
            end = NEVER if step is None else step - 1
            if end > start:
                s = self._sign(prefix, i, ref, tiny, end, e0)
                if not s:
                    return None
                if s < 0:
                    return value, start
        return value, step

    def _crossing(
        self,
        f: Indexed,
        prefix: Sequence[float],
        i: int,
        ref: int,
        tiny: float,
        now: int,
        end: int,
        e0: int,
        value: bool,
    ) -> Value | None:
        """The answer of :meth:`_against_constant` where the score, clearly above ``b > 0``
        now and clearly below it at ``end`` (before any term enters), falls to it in
        between: the first instant the comparison is no longer above, searched as the general
        way searches for it (:func:`_first_flip`), from where the decay puts it.

        Between steps the score is ``ka * prefix[i] * 2 ** ((ref - t + da) / H)``, so it
        reaches ``b`` near ``ref + da + H * log2(ka * prefix[i] / b)``. The signs looked at
        are the estimate's where it settles them, else the exact sums' (as the general way
        compares): the same either way, and they do not rise between steps.
        """
        b = self.const
        assert b is not None
        exact: Decay | None = None

        def at_or_below(t: int) -> bool:
            nonlocal exact
            s = self._sign(prefix, i, ref, tiny, t, e0)
            if s:
                return s < 0
            if exact is None:
                a = self.left.eval(cast(Facts, f), now)[0]  # indexed facts are facts too
                assert isinstance(a, Decay)
                exact = a
            return exact.compare(t, b)[0] <= 0

        try:
            x = math.log2(self.ka * prefix[i] / b)
        except (ValueError, OverflowError, ZeroDivisionError):
            x = math.nan
        guess = ref + self.da + math.ceil(self.config.half_life * x) if -1e6 < x < 1e6 else None
        flip = _first_flip(at_or_below, now, end + 1, guess)
        return None if flip is None else (value, flip)

    def _against_score(
        self,
        times: Sequence[int],
        prefix: Sequence[float],
        ref: int,
        tiny: float,
        now: int,
        off: int,
        top0: int | None,
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
        for k in range(STEPS + 2):
            if k:
                na = times[ia] + da if da and ia < n else None
                nb = times[ib] + db if db and ib < n else None
                step = na if nb is None or (na is not None and na <= nb) else nb
                if step is None or k > STEPS:
                    return value, step
                # As evaluating at the step would count them (all of either side at or
                # before it, also events after now, which facts as of now do not have).
                if da or ia < n:
                    ia = bisect_right(times, step - da, ia)
                ib = bisect_right(times, step - db, ib)
            if not ia and not ib and not off:
                s = 0
            else:
                j = ia if ia > ib else ib
                r = times[j - 1] if j else top0
                assert r is not None
                if r != last_r:
                    za, zb = (ref - r + da) / h, (ref - r + db) / h
                    if not (-1000.0 < za < 1000.0 and -1000.0 < zb < 1000.0):
                        return None
                    pa, pb = 2.0**za, 2.0**zb
                    ca = U * (1024 + 4 * abs(za) + 4 * da / h)
                    cb = U * (1024 + 4 * abs(zb) + 4 * db / h)
                    last_r = r
                va = ka * prefix[ia] * pa
                ma = va * (U * 8 * (ia + off) + ca) + ta
                vb = kb * prefix[ib] * pb
                mb = vb * (U * 8 * (ib + off) + cb) + tb
                if va - ma > vb + mb:
                    s = 1
                elif va + ma < vb - mb:
                    s = -1
                else:
                    return None
            if not k:
                value = fn(s, 0)
                if s > 0 and not da and ia == n and ib < n and n - ib <= STEPS:
                    # Only the other side grows from here (by steps): if it stays clearly
                    # below with every term in, no step changes the result.
                    vb = kb * prefix[n] * pb
                    if va - ma > vb + vb * (U * 8 * (n + off) + cb) + tb:
                        return value, None
                    if self.ordering:
                        return self._first_step_up(
                            times, prefix, ib, n, off, value, va - ma, va + ma, pb, cb, tb
                        )
            elif fn(s, 0) != value:
                return value, step
        raise AssertionError("unreachable")

    def _first_step_up(
        self,
        times: Sequence[int],
        prefix: Sequence[float],
        ib: int,
        n: int,
        off: int,
        value: bool,
        low: float,
        high: float,
        pb: float,
        cb: float,
        tb: float,
    ) -> Value | None:
        """:meth:`_against_score` from its first step on, where the left side is the score
        now (every term in, between ``low`` and ``high`` as estimated, and clearly above
        the right side) and only the right side grows, a term at a time; with no more than
        ``STEPS`` steps to come, and an ordering operator (above and below differ).

        Each step is checked as the loop would check it, with the same floats, but not each
        in turn: the right side's upper bound, ``vb + mb`` at ``m`` terms, cannot fall as
        ``m`` grows (every float in it is a rounded sum or product of non-negative numbers
        that do not fall), so whether the left side is still clearly above it at ``m`` terms
        is true up to some ``m`` and false after. The first ``m`` where it is not is found
        by bisection; the step that brings it in (the terms at its instant enter together)
        is the one the loop would stop at, and there it either flips the result (the right
        side clearly above) or is not settled (the general way then gives the answer).
        """
        kb, db = self.kb, self.db
        # Clearly above with lo terms. Not with hi, as the caller found (its sum rounds in
        # another order: should the loop's say otherwise at hi, the check below gives None).
        lo, hi = ib, n
        while hi - lo > 1:
            m = (lo + hi) // 2
            vb = kb * prefix[m] * pb
            if low > vb + (vb * (U * 8 * (m + off) + cb) + tb):
                lo = m
            else:
                hi = m
        at = times[hi - 1]
        g = bisect_right(times, at, hi)
        vb = kb * prefix[g] * pb
        mb = vb * (U * 8 * (g + off) + cb) + tb
        if high < vb - mb:
            return value, at + db
        return None
