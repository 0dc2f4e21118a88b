"""Compiling a plan's steps (each segment's rule, exit and dwell) into one function that
evaluates a customer's segments, as rules are compiled (``_compile``).

The function does what a loop over the steps would, written out per step: only the steps
whose kept outcome ran out are evaluated, a segment without an exit rule takes the short
way (one answer decides both entering and leaving), and constants (the first instant a
member may leave, whether an outcome is kept) are in the code instead of looked up. The
source holds only names made here and integers: segment names and rules are passed in as
variables, so nothing of the definitions' text is ever compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from protocol import NEVER

from ._facts import Facts

if TYPE_CHECKING:
    from ._segments import Segment

Answer = tuple[bool, int | None, int | None]
Evaluator = Callable[[Facts, int], Answer]
Change = Callable[[str, bool, int, Any], Any]
StepsRunner = Callable[
    [Facts, int, list[int], list[int], Mapping[str, int], Change, Any, list[Any]], None
]
"""``run(facts, now, untils, nexts, members, change, cause, out)``: evaluate at ``now``
every step whose ``untils`` entry is at or before ``now``; for each, append to ``out`` what
``change(segment, entered, now, cause)`` returns when membership changes, and set its next
instant in ``nexts`` and, when its outcome may be kept, its ``untils`` entry."""


def compile_steps(
    steps: Sequence[tuple[Segment, int, int, bool]], evaluators: Sequence[Evaluator]
) -> StepsRunner:
    """One function running ``steps`` (``Plan.steps``) with ``evaluators`` (by rule number),
    as :meth:`Customer.evaluate` documents them."""
    env: dict[str, Any] = {"NEVER": NEVER}
    lines = ["def run(f, now, untils, nexts, members, change, cause, out):"]

    def add(depth: int, text: str) -> None:
        lines.append("    " * depth + text)

    for j, (seg, ri, xi, cacheable) in enumerate(steps):
        name, rule = f"name{j}", f"rule{j}"
        env[name] = seg.name
        env[rule] = evaluators[ri]
        first_out = max(1, seg.min_dwell)  # never out the instant it came in
        add(1, f"if now >= untils[{j}]:")
        if xi < 0:
            # One answer: in while it holds, out (after the dwell) once it does not. Its
            # next instant is the answer's, or where the dwell ends for a member that
            # should leave but may not yet.
            add(2, f"r = {rule}(f, now)")
            add(2, "c = r[1]")
            add(2, f"entered = members.get({name})")
            add(2, "if entered is None:")
            add(3, "if r[0]:")
            add(4, f"out.append(change({name}, True, now, cause))")
            add(2, "elif not r[0]:")
            add(3, f"first_out = entered + {first_out}")
            add(3, "if now >= first_out:")
            add(4, f"out.append(change({name}, False, now, cause))")
            add(3, "elif c is None or first_out < c:")
            add(4, "c = first_out")
            add(2, f"nexts[{j}] = until = NEVER if c is None else c")
            if cacheable:
                # Looked at again at its next instant, or when the answer runs out.
                add(2, "u = r[2]")
                add(2, "if u is not None and u < until:")
                add(3, "until = u")
                add(2, f"untils[{j}] = until")
            continue
        leave_rule = f"exit{j}"
        env[leave_rule] = evaluators[xi]
        add(2, f"entered = members.get({name})")
        add(2, "r = x = None")
        add(2, "if entered is None:")
        add(3, f"r = {rule}(f, now)")
        add(3, "holds, c = r[0], r[1]")
        add(3, "if holds:")
        # Not in while the exit condition holds: rule and exit overlapping would otherwise
        # flap in and out every microsecond.
        add(4, f"x = {leave_rule}(f, now)")
        add(4, "holds = not x[0]")
        add(4, "if x[1] is not None and (c is None or x[1] < c):")
        add(5, "c = x[1]")
        add(4, "if holds:")
        add(5, f"out.append(change({name}, True, now, cause))")
        add(5, "entered = now")
        add(2, "if entered is not None:")
        add(3, "if x is None:")
        add(4, f"x = {leave_rule}(f, now)")
        add(3, "c = x[1]")
        add(3, "if x[0]:")
        add(4, f"first_out = entered + {first_out}")
        add(4, "if now >= first_out:")
        add(5, f"out.append(change({name}, False, now, cause))")
        add(5, "if r is None:")
        add(6, f"r = {rule}(f, now)")
        # Out now, and not back in while the exit holds: the rule's next instant, or the
        # exit's if sooner while the rule holds.
        add(5, "c = r[1]")
        add(5, "if r[0] and x[1] is not None and (c is None or x[1] < c):")
        add(6, "c = x[1]")
        add(4, "elif c is None or first_out < c:")
        add(5, "c = first_out")
        add(2, f"nexts[{j}] = until = NEVER if c is None else c")
        if cacheable:
            add(2, "if r is not None and r[2] is not None and r[2] < until:")
            add(3, "until = r[2]")
            add(2, "if x is not None and x[2] is not None and x[2] < until:")
            add(3, "until = x[2]")
            add(2, f"untils[{j}] = until")
    if not steps:
        add(1, "pass")
    source = "\n".join(lines) + "\n"
    namespace = dict(env)
    exec(compile(source, "<segment steps>", "exec"), namespace)
    run: StepsRunner = namespace["run"]
    return run
