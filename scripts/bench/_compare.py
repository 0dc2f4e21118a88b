"""``--compare REF``: its arguments, the order of its runs, and its report (medians and
new/old ratios). ``_compare_run`` runs it.

Each tree is driven through its own command line (``shoal replay FILE``, and ``shoal serve``
with a publisher), so that a ref older than this module compares too. The runs alternate,
each side going first as often as the other, so that a change in the machine's load weighs
on both; the figure of a side is the median of its runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SIDES = ("ref", "work")
"""The ref compared against (old), and the working tree (new)."""

METRICS = (
    ("replay_wall_us", "replay: wall us per event"),
    ("replay_cpu_us", "replay: CPU us per event"),
    ("replay1_wall_us", "replay, one process: wall us per event"),
    ("replay1_cpu_us", "replay, one process: CPU us per event"),
    ("replay_rss_mib", "replay: peak RSS MiB (with its workers)"),
    ("ingest_wall_us", "ingest: wall us per event"),
    ("ingest_cpu_us", "ingest: engine CPU us per event"),
    ("deadlines_burst_p50_ms", "deadlines, 100k due in one second: p50 lateness ms"),
    ("deadlines_burst_p99_ms", "deadlines, 100k due in one second: p99 lateness ms"),
    ("deadlines_burst_max_ms", "deadlines, 100k due in one second: max lateness ms"),
    ("deadlines_all_p99_ms", "deadlines, all 200k fired: p99 lateness ms"),
)
"""(key, label) of the figures compared: costs, lower is better (the deadlines' only with
``--deadlines``)."""

DEFAULTS = {
    "runs": 3,
    "replay_events": 50_000,
    "ingest_events": 20_000,
    "seed": 14,
    "deadlines": False,
}
"""The compare flags' values when not given (modest sizes: a few minutes in all)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--compare REF`` and its flags to the benchmark's ``parser``."""
    group = parser.add_argument_group(
        "compare", "run REF and the working tree alternately on the same input"
    )
    group.add_argument(
        "--compare",
        metavar="REF",
        help="a git ref (commit, branch, tag) to compare the working tree with: replay and "
        "ingest cost per event through each tree's command line",
    )
    group.add_argument(
        "--runs", type=int, help=f"runs of each tree per measure (default {DEFAULTS['runs']})"
    )
    group.add_argument(
        "--replay-events",
        type=int,
        metavar="N",
        help=f"events replayed by `shoal replay` (default {DEFAULTS['replay_events']:,})",
    )
    group.add_argument(
        "--ingest-events",
        type=int,
        metavar="N",
        help=f"events published to `shoal serve` (default {DEFAULTS['ingest_events']:,})",
    )
    group.add_argument(
        "--seed", type=int, help=f"of the generated input (default {DEFAULTS['seed']})"
    )
    group.add_argument(
        "--deadlines",
        action="store_const",
        const=True,
        help="also run each tree's own suite, --only deadlines, at its full size (1,000,000 "
        "customers pending, 100,000 due in one second): about 3 minutes a run",
    )


def check_arguments(args: argparse.Namespace) -> str | None:
    """Fill in the compare flags' defaults; what is wrong with them, or None."""
    given = [k for k in DEFAULTS if getattr(args, k) is not None]
    if args.compare is None:
        if given:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            return f"{flags}: only with --compare REF"
        return None
    suite = [
        flag
        for flag, used in (
            ("--quick", args.mode == "quick"),
            ("--smoke", args.mode == "smoke"),
            ("--only", bool(args.only)),
            ("--profile", args.profile),
        )
        if used
    ]
    if suite:
        return f"--compare measures replay and ingest alone; {', '.join(suite)}: for the suite only"
    if not args.compare.strip() or args.compare.startswith("-"):
        return f"--compare: {args.compare!r} is not a git ref"
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("runs", "replay_events", "ingest_events"):
        if getattr(args, key) < 1:
            return f"--{key.replace('_', '-')} must be at least 1"
    return None


def order(runs: int) -> list[str]:
    """The sides in the order they run: ref, work, then work, ref, and so on."""
    out: list[str] = []
    for i in range(runs):
        out += list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
    return out


def ratio(new: float, old: float) -> float | None:
    """new / old (below 1: the working tree costs less), None if ``old`` is 0."""
    return new / old if old else None


@dataclass(frozen=True)
class Row:
    """One figure compared: both medians and their ratio."""

    key: str
    label: str
    old: float
    new: float
    ratio: float | None
    old_runs: tuple[float, ...]
    new_runs: tuple[float, ...]


def rows(samples: dict[str, dict[str, list[float]]]) -> list[Row]:
    """The rows of the figures measured, from ``samples[side][metric]`` (the runs' values)."""
    out = []
    for key, label in METRICS:
        old, new = samples["ref"].get(key, []), samples["work"].get(key, [])
        if not old or not new:
            continue
        a, b = statistics.median(old), statistics.median(new)
        out.append(Row(key, label, a, b, ratio(b, a), tuple(old), tuple(new)))
    return out


def table(rs: Sequence[Row], ref: str) -> Iterator[str]:
    """A markdown table of ``rs``: the medians of ``ref`` and the working tree, new/old."""
    yield f"| cost | {ref} (median) | working tree (median) | new/old |"
    yield "|---|---:|---:|---:|"
    for r in rs:
        share = "-" if r.ratio is None else f"{r.ratio:.3f}"
        yield f"| {r.label} | {r.old:,.2f} | {r.new:,.2f} | {share} |"


def ceiling(rs: Sequence[Row], consumer: dict[str, Any] | None) -> Iterator[str]:
    """What share of the nats-py consumer's ceiling, measured in the same run, each tree's
    ingest reaches (events per second from the median wall cost)."""
    if not consumer:
        return
    wall = next((r for r in rs if r.key == "ingest_wall_us"), None)
    rate = consumer["consume_per_s"]
    yield (
        f"The nats-py consumer alone (`{consumer['variant']}`: push consumer, `AckPolicy.ALL`, "
        f"decode only) read {consumer['messages']:,} events at **{rate:,.0f} msgs/s** in "
        "this run: the ceiling of one process's ingest."
    )
    if wall is not None:
        old, new = 1e6 / wall.old, 1e6 / wall.new
        yield (
            f"Ingest reached {old:,.0f} events/s ({old / rate:.0%} of it) with the ref, "
            f"{new:,.0f} events/s ({new / rate:.0%}) with the working tree."
        )
    yield ""


def markdown(doc: dict[str, Any]) -> str:
    """The report of a compare run: what ran, the table, every run, the checks."""
    m = doc["machine"]
    rs = [
        Row(**{**r, "old_runs": tuple(r["old_runs"]), "new_runs": tuple(r["new_runs"])})
        for r in doc["rows"]
    ]
    s = doc["sizes"]
    out = [
        f"# shoal: the working tree against {doc['ref']}",
        "",
        f"Run on {doc['started_at']}, {doc['duration_s']:.0f} s. `{doc['command']}`",
        "",
        f"- Ref: `{doc['ref']}` = {doc['ref_commit']}, installed with `pip install` in a virtual "
        f"environment of its own (dependencies pinned to this environment's versions: "
        f"{doc['ref_pinned']}). Working tree: {m['code']}, run from the repository.",
        f"- {m['cpu']}, {m['cores']} cores; load average {doc['load_before']} before, "
        f"{doc['load_after']} after (a shared machine: the runs alternate, "
        f"{' '.join(doc['order'])}, and each figure is the median of {s['runs']}).",
        f"- Replay: `shoal replay FILE --transitions OUT` of {s['replay_events']:,} generated "
        f"events (seed {s['seed']}), the whole process and its workers: wall time and CPU "
        "time. Its default: one process, or (where the tree has them) one worker process per "
        "core from 20,000 events on. *One process*: each tree with `--processes 1` where it "
        "has that option (else its replay, which is one process), the cost per core.",
        f"- Ingest: `shoal serve --data-dir NEW --port P`, then {s['ingest_events']:,} "
        "generated events (stamped over the days before now) published to "
        "`shoal.events.<customer>` from the benchmark; from the first publish until the "
        "consumer `shoal-engine` has acknowledged them all: wall time, and the CPU time of "
        "the serve process (`/proc/<pid>/stat`; its broker not counted).",
        "- Replay's peak RSS: the resident memory of the process and its worker processes, "
        "summed, sampled every 50 ms.",
        *(
            [
                "- Deadlines: each tree's own benchmark suite, `python -m scripts.bench --only "
                "deadlines` (full size: 1,000,000 customers pending, 100,000 due in one and "
                "the same second, then 100,000 over 20 s), run from its sources; lateness is "
                "the engine's clock when it fired minus the instant due."
            ]
            if s.get("deadlines")
            else []
        ),
        "- Wall times follow the machine's load; CPU times much less: on a shared machine, "
        "read the CPU rows first.",
        "",
        *table(rs, doc["ref"]),
        "",
        *ceiling(rs, doc.get("consumer_ceiling")),
        "Every run (in the order run, in the unit of its row):",
        "",
    ]
    for r in rs:
        old = ", ".join(f"{x:,.2f}" for x in r.old_runs)
        new = ", ".join(f"{x:,.2f}" for x in r.new_runs)
        out.append(f"- {r.label}: {doc['ref']} {old}; working tree {new}.")
    out += ["", "Checks:", ""]
    out += [f"- {line}" for line in doc["checks"]]
    return "\n".join(out) + "\n"


def file_stem(ref: str) -> str:
    """``compare-<ref>``, the ref made safe for a file name."""
    return "compare-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", ref).strip("-.") or "ref")
