"""Compiling a checked rule into one evaluation function (what customers call)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from ._compare import Compare, ElapsedCompare
from ._dates import zone_of
from ._facts import Facts, Indexed
from ._nodes import And, Const, Node, Not, Or, SinceFirst, SinceLast
from ._score_compare import ScoreCompare
from ._windows import NumberCompare, Window

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
"""The next instant ``now OP t`` changes, as instant_compare computes it."""


class _Compiler:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "bisect_right": bisect_right,
            "Indexed": Indexed,
            "compare_eval": Compare.eval,
            "zone_of": zone_of,
        }
        self.n = 0
        self.windows: dict[str, tuple[str, str]] = {}
        # Of an indexed window: the names of its instants, its end and its local counts.
        self.indexes: dict[str, tuple[str, str, str | None]] = {}

    @staticmethod
    def window_key(node: Window) -> str:
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

    def condition(self, node: Node, d: int) -> tuple[str, str, str]:
        """Code setting (value, next, until) of a condition; their names."""
        v, n = self.var("v"), self.var("n")
        if isinstance(node, ElapsedCompare):
            a, t = self.var("a"), self.var("t")
            el = node.elapsed
            if isinstance(el, SinceLast):
                self.line(d, f"{a} = f.last_at({self.const(el.name)})")
            elif isinstance(el, SinceFirst):
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
        if isinstance(node, NumberCompare):
            a, na = self.number(node.left, d)
            b, nb = self.number(node.right, d)
            self.line(d, f"{v} = {a} {node.op} {b}")
            if node.window is None:
                self.earliest(d, n, na, nb)
                return v, n, n
            # As NumberCompare.eval and Window.drop_below: where the comparison flips.
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
        if isinstance(node, Not):
            pv, pn, pu = self.condition(node.part, d)
            self.line(d, f"{v} = not {pv}")
            return v, pn, pu
        if isinstance(node, And | Or):
            return self.combine(node, d)
        if isinstance(node, ScoreCompare):
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

    def combine(self, node: And | Or, d: int) -> tuple[str, str, str]:
        # As And.test / Or.test: the next instant over all parts while the result is
        # decided by all of them, else over the parts that decide it; a part that decides
        # it for good (no next) decides the answer until a fact changes, and the parts
        # after it are not evaluated.
        if len(node.parts) == 2:
            return self.pair(node, d)
        conj = isinstance(node, And)
        v, n, u = self.var("v"), self.var("n"), self.var("u")
        every, deciding, forever = self.var("e"), self.var("s"), self.var("f")
        self.line(d, f"{v} = {conj}")
        self.line(d, f"{u} = {every} = {deciding} = None")
        self.line(d, f"{forever} = False")
        depth = d
        for i, part in enumerate(node.parts):
            if i:
                self.line(depth, f"if not {forever}:")
                depth += 1
            pv, pn, pu = self.condition(part, depth)
            decides = f"not {pv}" if conj else pv
            self.line(depth, f"if {decides} and {pn} is None:")
            self.line(depth + 1, f"{forever} = True")
            self.line(depth, "else:")
            e = depth + 1
            self.line(e, f"if {pu} is not None and ({u} is None or {pu} < {u}):")
            self.line(e + 1, f"{u} = {pu}")
            self.line(e, f"if {pn} is not None and ({every} is None or {pn} < {every}):")
            self.line(e + 1, f"{every} = {pn}")
            self.line(e, f"if {decides}:")
            self.line(e + 1, f"{v} = {not conj}")
            self.line(e + 1, f"if {deciding} is None or {pn} < {deciding}:")
            self.line(e + 2, f"{deciding} = {pn}")
        decided = f"not {v}" if conj else v
        self.line(d, f"if {forever}:")
        self.line(d + 1, f"{v}, {n}, {u} = {not conj}, None, None")
        self.line(d, "else:")
        self.line(d + 1, f"{n} = {deciding} if {decided} else {every}")
        return v, n, u

    def pair(self, node: And | Or, d: int) -> tuple[str, str, str]:
        """``combine`` of two parts, written out case by case."""
        conj = isinstance(node, And)
        # ``decide``: the value when a part decides it (false for and, true for or).
        decide = not conj
        v, n, u = self.var("v"), self.var("n"), self.var("u")
        v1, n1, u1 = self.condition(node.parts[0], d)
        self.line(d, f"if {'not ' if conj else ''}{v1} and {n1} is None:")
        self.line(d + 1, f"{v}, {n}, {u} = {decide}, None, None")  # decided for good
        self.line(d, "else:")
        e = d + 1
        v2, n2, u2 = self.condition(node.parts[1], e)
        self.line(e, f"if {'not ' if conj else ''}{v2} and {n2} is None:")
        self.line(e + 1, f"{v}, {n}, {u} = {decide}, None, None")
        self.line(e, "else:")
        g = e + 1
        # From here a part that decides the value has a next instant.
        every = self.var("e")
        self.earliest(g, every, n1, n2)
        self.line(g, f"if {v1}:" if conj else f"if not {v1}:")
        self.line(g + 1, f"if {v2}:" if conj else f"if not {v2}:")
        self.line(g + 2, f"{v}, {n} = {not decide}, {every}")
        self.line(g + 1, "else:")
        self.line(g + 2, f"{v}, {n} = {decide}, {n2}")
        self.line(g, "else:")
        self.line(g + 1, f"{v} = {decide}")
        self.line(g + 1, f"if {v2}:" if conj else f"if not {v2}:")
        self.line(g + 2, f"{n} = {n1}")
        self.line(g + 1, "else:")
        self.line(g + 2, f"{n} = {n1} if {n1} <= {n2} else {n2}")
        if u1 == n1 and u2 == n2:
            self.line(g, f"{u} = {every}")
        else:
            self.earliest(g, u, u1, u2)
        return v, n, u

    def number(self, node: Node, d: int) -> tuple[str, str]:
        """Code setting (value, next) of a count, a sum or a number constant."""
        if isinstance(node, Const):
            return self.const(node.value), "None"
        assert isinstance(node, Window)
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
            # As Window._indexed.
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


def compile_rule(root: Node) -> Callable[[Facts, int], tuple[bool, int | None, int | None]]:
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
