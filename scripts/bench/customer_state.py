"""Benchmark what a customer's state is made of: bytes per customer by component, at two
sizes of the same customers.

``replay_memory`` shows that replay's peak RSS grows with the events when the rules keep
events per customer (the default segments). This says where: each history (``generate``,
seeded, the same customers over ``--days-per-size`` days each) is replayed in process, and
every customer's state is walked object by object (``sys.getsizeof``, each object once;
objects the rules share, such as interned names and the definitions, are not counted). The
components are a customer's slots, with its retained log (``_log``) and its index
(``_index``: window instants, local times, score terms) split by their own slots.

Usage::

    python -m scripts.bench.customer_state --customers 100000 --days-per-size 36,117
    python -m scripts.bench.customer_state --customers 10000 --days-per-size 36,117  # quick
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from actors import load_segments
from actors._replay import Replay
from actors.population import generate

from ._common import ROOT, say
from ._machine import machine

DEFAULT_SEGMENTS = ROOT / "actors" / "default_segments.toml"
_SPLIT = ("_log", "_index")
"""Slots of a customer whose own slots are shown apart."""


def _deep(o: object, seen: set[int]) -> int:
    """Bytes of ``o`` and what it holds, each object once (``seen``); small shared atoms
    (interned names, cached numbers: many references) are not the customer's."""
    if id(o) in seen:
        return 0
    if isinstance(o, str | int | float | bool | type) and sys.getrefcount(o) > 8:
        return 0
    if o is None or callable(o):
        return 0
    seen.add(id(o))
    size = sys.getsizeof(o)
    if isinstance(o, dict):
        size += sum(_deep(k, seen) + _deep(v, seen) for k, v in o.items())
    elif isinstance(o, list | tuple | set | frozenset):
        size += sum(_deep(v, seen) for v in o)
    else:
        for slot in _slots(o):
            size += _deep(getattr(o, slot, None), seen)
    return size


def _slots(o: object) -> list[str]:
    return [s for cls in type(o).__mro__ for s in getattr(cls, "__slots__", ())]


def breakdown(replay: Replay, segments: object) -> tuple[int, Counter[str]]:
    """(customers, bytes by component) of a replay's customers."""
    seen = {id(segments)}
    out = Counter[str]()
    customers = replay._partition.customers  # noqa: SLF001 - a benchmark looks inside
    for c in customers.values():
        out["(object)"] += sys.getsizeof(c)
        for slot in _slots(c):
            v = getattr(c, slot, None)
            if v is None:
                continue
            if slot in _SPLIT:
                out[slot] += sys.getsizeof(v)
                seen.add(id(v))
                for inner in _slots(v):
                    out[f"{slot}.{inner}"] += _deep(getattr(v, inner, None), seen)
            else:
                out[slot] += _deep(v, seen)
    return len(customers), out


def measure(customers: int, days: int, seed: int) -> dict[str, Any]:
    segments = load_segments(DEFAULT_SEGMENTS)
    replay = Replay(segments)
    t0 = time.perf_counter()
    events = 0
    for event in generate(customers, days, seed):
        replay.apply(event)
        events += 1
    # Every deadline up to the end of the history, as a file replay does.
    if replay.now is not None:
        replay.advance(replay.now)
    n, parts = breakdown(replay, segments)
    return {
        "days": days,
        "events": events,
        "customers": n,
        "parts": dict(parts),
        "seconds": time.perf_counter() - t0,
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[str]:
    m = machine()
    small, large = runs[0], runs[-1]
    names = sorted(large["parts"], key=lambda k: -large["parts"][k])
    out = [
        "# Customer state: bytes per customer by component",
        "",
        f"Command: `python -m scripts.bench.customer_state {shlex.join(args.argv)}`, "
        f"run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- {m['cpu']}, Python {m['python']}. Working tree: {m['code']}.",
        f"- The default segments; the same {args.customers:,} customers (seed {args.seed}) "
        "over each number of days, every event applied in process (`actors.Replay`), then "
        "each customer's state walked object by object.",
        "",
        "| component | "
        + " | ".join(f"{r['days']} days, {r['events']:,} events" for r in runs)
        + " | difference | difference x customers (MB) |",
        "|---|" + "---:|" * (len(runs) + 2),
    ]
    total = {id(r): sum(r["parts"].values()) for r in runs}
    for name in names:
        cells = [r["parts"].get(name, 0) / r["customers"] for r in runs]
        diff = cells[-1] - cells[0]
        out.append(
            f"| {name} | "
            + " | ".join(f"{c:,.0f}" for c in cells)
            + f" | {diff:+,.0f} | {diff * large['customers'] / 1e6:+,.1f} |"
        )
    cells = [total[id(r)] / r["customers"] for r in runs]
    diff = cells[-1] - cells[0]
    out.append(
        "| **all** | "
        + " | ".join(f"**{c:,.0f}**" for c in cells)
        + f" | **{diff:+,.0f}** | **{diff * large['customers'] / 1e6:+,.1f}** |"
    )
    out.append("")
    out.append(
        f"Events per customer: {small['events'] / small['customers']:.1f} and "
        f"{large['events'] / large['customers']:.1f}."
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--days-per-size", default="36,117", help="comma-separated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    runs = []
    for days in (int(d) for d in args.days_per_size.split(",")):
        say(f"{args.customers:,} customers over {days} days")
        runs.append(measure(args.customers, days, args.seed))
    text = "\n".join(report(args, runs)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
