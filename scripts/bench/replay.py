"""Benchmark replay throughput: ``actors.replay`` over a generated history, default segments.

1. Generates a history with ``actors.population`` (``shoal generate``; seeded: the same
   arguments give the same events) and keeps it in memory as a list of ``protocol.Event``
   in receive order. This is not timed.
2. Times ``actors.replay(events, load_segments(), until=end)``, where ``end`` is the end of
   the generated period, consuming every transition (a counting loop, nothing else), with
   ``time.perf_counter`` (wall) and ``time.process_time`` (CPU). The default segments are
   parsed before the clock starts. Repeated ``--repeat`` times; each run starts from no
   state (replay builds fresh actors).
3. Peak RSS is read from ``/proc/self/status`` (VmHWM), reset (``/proc/self/clear_refs``)
   just before the first timed run so it reflects the replay with the history in memory.
4. With ``--digest``, a further untimed replay counts transitions by segment, change and
   cause and computes a SHA-256 over every transition (customer, segment, change, instant,
   cause, version), so two versions of the code can be shown to give the same results.
5. With ``--floor``, the cost below the rules on the same history: the loop alone,
   ``Customer.fold`` alone, a replay with one simple segment; and how many evaluations the
   default segments take (per event and per fired deadline) and how many changed anything.
6. With ``--profile``, one more replay runs under cProfile and the top 20 functions by
   internal time are reported (cProfile slows it several-fold: take rates from runs
   without it).

Defaults: 100,000 customers over 200 days (about 5.4M events); ``--quick``: 5,000 customers
over 200 days (about 270k events). The report is markdown on stdout (``--out FILE`` writes
it to a file as well) and, with ``--json FILE``, one JSON line appended to FILE.

Usage::

    python -m scripts.bench.replay --quick --digest --floor --profile
    python -m scripts.bench.replay --json /tmp/replay.jsonl
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from actors import Customer, load_segments, parse_segments, replay
from actors.population import generate, history_end
from protocol import EventCause, TimeCause, Transition, format_instant, to_instant
from scripts._input import PIECE
from scripts._parallel_replay import ParallelReplay

from ._common import cprofile_text, reset_peak_rss, rss_mib, say
from ._machine import code_digest, loadavg, machine

# --------------------------------------------------------------------------- measuring


def _cpu() -> float:
    """CPU seconds of this process and of its children that ended (a split replay's
    workers, joined when it closes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def split_transitions(events: list[Any], end: int, processes: int) -> Iterator[Transition]:
    """The transitions of a replay split over ``processes`` worker processes, fed as
    ``shoal replay`` feeds it (pieces of ``PIECE`` events)."""
    with ParallelReplay(load_segments(), processes) as split:
        for i in range(0, len(events), PIECE):
            yield from split.apply_all(events[i : i + PIECE])
        yield from split.advance(end)


def timed_replay(events: list[Any], end: int, processes: int = 1) -> dict[str, float]:
    segments = load_segments()
    gc.collect()
    wall0, cpu0 = time.perf_counter(), _cpu()
    n = 0
    if processes == 1:
        for _ in replay(events, segments, until=end):
            n += 1
    else:
        for _ in split_transitions(events, end, processes):
            n += 1
    wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    return {
        "processes": processes,
        "seconds": wall,
        "cpu_seconds": cpu,
        "transitions": n,
        "events_per_s": len(events) / wall,
        "transitions_per_s": n / wall,
        "us_per_event": wall / len(events) * 1e6,
    }


def digest(transitions: Iterable[Transition]) -> tuple[str, Counter[tuple[str, str, str]]]:
    """SHA-256 over every transition, and counts by (segment, change, cause kind)."""
    h = hashlib.sha256()
    counts: Counter[tuple[str, str, str]] = Counter()
    for t in transitions:
        if isinstance(t.cause, EventCause):
            cause = "event:" + t.cause.message_id
            kind = "event"
        else:
            cause = kind = "time" if isinstance(t.cause, TimeCause) else "definition"
        h.update(
            f"{t.customer_id}|{t.segment}|{t.change}|{to_instant(t.at)}|{cause}|{t.version}\n".encode()
        )
        counts[(t.segment, t.change, kind)] += 1
    return h.hexdigest(), counts


def profile(events: list[Any], end: int, top: int = 20) -> str:
    segments = load_segments()
    prof = cProfile.Profile()
    prof.enable()
    for _ in replay(events, segments, until=end):
        pass
    prof.disable()
    return cprofile_text(prof, top=top)


FLOOR_RULE = "[segments.idle]\nrule = \"since_last() >= '14d'\"\n"


def floor(events: list[Any], end: int) -> dict[str, Any]:
    """What a replay costs below the rules, on the same history (each timed once):

    - ``loop``: one dict lookup per event (the replay loop's own floor);
    - ``fold``: ``Customer.fold`` alone (facts kept, no segment evaluated);
    - ``one_segment``: a replay with one segment, ``since_last() >= '14d'``;
    - ``defaults``: a replay with the default segments, counting evaluations (per event
      and per fired deadline) by wrapping ``Customer.evaluate`` (untimed figures only).
    """
    segments = load_segments()
    out: dict[str, Any] = {}

    def timed(label: str, fn: Any) -> None:
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out[label] = (time.perf_counter() - t0) / len(events) * 1e6

    def loop() -> None:
        seen: dict[str, int] = {}
        for e in events:
            if seen.get(e.customer_id) is None:
                seen[e.customer_id] = 1

    def fold() -> None:
        customers: dict[str, Customer] = {}
        for e in events:
            c = customers.get(e.customer_id)
            if c is None:
                c = customers[e.customer_id] = Customer(e.customer_id)
            c.fold(e, segments)

    one = parse_segments(FLOOR_RULE)

    def one_segment() -> None:
        for _ in replay(events, one, until=end):
            pass

    timed("loop", loop)
    timed("fold", fold)
    timed("one_segment", one_segment)
    calls = [0, 0]  # evaluations, with a transition
    evaluate = Customer.evaluate

    def counting(self: Customer, segs: Any, cause: Any) -> list[Transition]:
        changed = evaluate(self, segs, cause)
        calls[0] += 1
        calls[1] += bool(changed)
        return changed

    Customer.evaluate = counting  # type: ignore[method-assign,assignment]
    try:
        for _ in replay(events, segments, until=end):
            pass
    finally:
        Customer.evaluate = evaluate  # type: ignore[method-assign]
    out["evaluations"] = calls[0]
    out["deadlines_fired"] = calls[0] - len(events)
    out["evaluations_changing"] = calls[1]
    return out


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, result: dict[str, Any]) -> Iterator[str]:
    m = result["machine"]
    yield f"## Replay: {result['customers']:,} customers, {result['days']} days, seed {args.seed}"
    yield ""
    yield f"Command: `{result['command']}`, run at {result['started']} UTC."
    yield ""
    yield (
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, shared with other "
        f"engineers (load average {result['load_before']} before, {result['load_after']} "
        "after): compare ratios within a run."
    )
    yield f"- Python {m['python']}, msgspec {m['msgspec']}. Code: {m['code']}."
    md5 = ", ".join(f"`{k}` {v}" for k, v in m["code_md5"].items())
    yield f"- md5 (first 8 hex digits) of the packages: {md5}."
    g = result["history"]
    yield (
        f"- History: {g['events']:,} events ({g['per_customer']:.1f} per customer; "
        f"{g['late']:,} received late), {g['by_name']}; generated in {g['seconds']:.1f} s "
        f"(not timed). RSS with the history in memory: {g['rss_mib']:,.0f} MiB."
    )
    yield ""
    yield (
        "| run | processes | events | transitions | wall s | CPU s (all processes) | "
        "events/s | transitions/s | us/event | peak RSS MiB (this process) |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for i, r in enumerate(result["runs"], 1):
        yield (
            f"| {i} | {r.get('processes', 1)} | {g['events']:,} | {r['transitions']:,} | "
            f"{r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['events_per_s']:,.0f} | "
            f"{r['transitions_per_s']:,.0f} | {r['us_per_event']:.2f} | "
            f"{r['rss_peak_mib']:,.0f} |"
        )
    bests = result.get("best_by_processes") or {"1": result["best"]}
    one = bests.get("1")
    yield ""
    for p, best in bests.items():
        speed_up = (
            ""
            if one is None or p == "1"
            else (
                f"; {one['seconds'] / best['seconds']:.2f}x the speed of one process, "
                f"{best['cpu_seconds'] / one['cpu_seconds']:.2f}x its CPU"
            )
        )
        yield (
            f"- Best with {p} process(es): **{best['events_per_s']:,.0f} events/s** "
            f"({best['us_per_event']:.2f} us/event wall, "
            f"{best['cpu_seconds'] / g['events'] * 1e6:.2f} us/event CPU{speed_up})."
        )
    if "digest" in result:
        yield ""
        yield f"Transitions digest (SHA-256): `{result['digest']}`."
        for p, d in result.get("split_digests", {}).items():
            same = "the same" if d == result["digest"] else f"**different**: `{d}`"
            yield f"Split over {p} processes: {same}."
        yield ""
        yield "| segment | entered (event) | entered (time) | exited (event) | exited (time) |"
        yield "|---|---:|---:|---:|---:|"
        counts = result["counts"]
        for seg in result["segments"]:
            cells = [
                counts.get(f"{seg}|{change}|{kind}", 0)
                for change in ("entered", "exited")
                for kind in ("event", "time")
            ]
            yield f"| {seg} | " + " | ".join(f"{c:,}" for c in cells) + " |"
    if "floor" in result:
        fl = result["floor"]
        yield ""
        yield "Below the rules, on the same history (`--floor`, one timed pass each):"
        yield ""
        yield "| pass | us/event |"
        yield "|---|---:|"
        yield f"| the loop alone (one dict lookup per event) | {fl['loop']:.2f} |"
        yield f"| `Customer.fold` alone (facts, no segment) | {fl['fold']:.2f} |"
        yield f"| replay with one segment, `since_last() >= '14d'` | {fl['one_segment']:.2f} |"
        yield ""
        yield (
            f"With the default segments, {fl['evaluations']:,} evaluations: one per event "
            f"and {fl['deadlines_fired']:,} fired deadlines; {fl['evaluations_changing']:,} "
            "of all evaluations changed a membership."
        )
    if "profile" in result:
        yield ""
        yield "cProfile of one more replay, top 20 by internal time (cProfile slows it):"
        yield ""
        yield "```"
        yield result["profile"]
        yield "```"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5,000 customers")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs (best is reported)")
    parser.add_argument("--digest", action="store_true", help="check figures of the results")
    parser.add_argument("--profile", action="store_true", help="cProfile top 20")
    parser.add_argument("--floor", action="store_true", help="cost below the rules")
    parser.add_argument(
        "--processes",
        default="1",
        help="comma-separated counts of processes to replay with, each timed (e.g. 1,2; "
        "the first is the one reported as best); more than 1 splits the customers over "
        "worker processes as `shoal replay --processes` does",
    )
    parser.add_argument("--json", metavar="FILE", help="append the figures as a JSON line")
    parser.add_argument("--out", metavar="FILE", help="write the markdown report there too")
    args = parser.parse_args(argv)
    try:
        args.processes = [int(p) for p in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes {args.processes!r}: comma-separated integers")
    if not args.processes or min(args.processes) < 1:
        parser.error("--processes: each count must be 1 or more")
    if args.quick:
        args.customers = 5_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.gmtime()
    result: dict[str, Any] = {
        "command": "python -m scripts.bench.replay " + " ".join(sys.argv[1:] or []),
        "started": time.strftime("%Y-%m-%d %H:%M", started),
        "customers": args.customers,
        "days": args.days,
        "seed": args.seed,
        "machine": {**machine(), "code_md5": code_digest(("actors",))},
        "load_before": loadavg(),
    }
    say(f"generating {args.customers:,} customers over {args.days} days (seed {args.seed})")
    t0 = time.perf_counter()
    events = list(generate(args.customers, args.days, args.seed))
    end = history_end(args.days)
    gen_s = time.perf_counter() - t0
    names = Counter(e.name or "identify" for e in events)
    result["history"] = {
        "events": len(events),
        "per_customer": len(events) / args.customers,
        "late": sum(1 for e in events if e.at < e.received),
        "by_name": ", ".join(f"{k} {v:,}" for k, v in names.most_common()),
        "seconds": gen_s,
        "rss_mib": rss_mib("VmRSS"),
        "first": format_instant(events[0].received),
        "end": format_instant(end),
    }
    say(f"{len(events):,} events in {gen_s:.1f} s; replaying")
    runs = []
    for i in range(args.repeat):
        # Each count of processes goes first as often as the others: a change of the
        # machine's load weighs on all.
        for processes in args.processes if i % 2 == 0 else args.processes[::-1]:
            reset_peak_rss()
            r = timed_replay(events, end, processes)
            r["rss_peak_mib"] = rss_mib("VmHWM")
            runs.append(r)
            say(
                f"run {i + 1}, {processes} process(es): {r['seconds']:.2f} s, "
                f"{r['events_per_s']:,.0f} events/s, {r['us_per_event']:.2f} us/event, "
                f"{r['transitions']:,} transitions"
            )
    result["runs"] = runs
    by_count = {
        p: min((r for r in runs if r["processes"] == p), key=lambda r: r["seconds"])
        for p in args.processes
    }
    result["best_by_processes"] = {str(p): r for p, r in by_count.items()}
    result["best"] = by_count[args.processes[0]]
    if args.digest:
        segments = load_segments()
        hexdigest, counts = digest(replay(events, segments, until=end))
        result["digest"] = hexdigest
        result["counts"] = {"|".join(k): v for k, v in counts.items()}
        result["segments"] = list(segments.names)
        say(f"digest {hexdigest}")
        result["split_digests"] = {
            str(p): digest(split_transitions(events, end, p))[0] for p in args.processes if p > 1
        }
    if args.floor:
        result["floor"] = floor(events, end)
    if args.profile:
        result["profile"] = profile(events, end)
    result["load_after"] = loadavg()
    text = "\n".join(report(args, result)) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, "utf-8")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
