"""``python -m scripts.bench``: the suite (``_suite``), or with ``--compare REF`` the working
tree against REF (``_compare``); its arguments, the run and what it writes."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from . import _compare
from ._common import ROOT, say
from ._compare_run import CompareError, run_compare
from ._compare_run import write as write_compare
from ._engine_measures import (
    measure_deadlines,
    measure_ingest,
    measure_latency,
    measure_memory,
    measure_rebuild,
    measure_uniform,
)
from ._machine import loadavg, machine, nats_server_version
from ._other_measures import measure_consumer, measure_replay, measure_sql
from ._profiles import find_py_spy
from ._report import markdown, summary, table
from ._suite import MEASUREMENTS, MODES, RESULTS, Run

PROG = "python -m scripts.bench"
COMPARE_RESULTS = ROOT / "scripts" / "bench" / "results" / "compare"


async def _sync(fn: Callable[[Run], dict[str, Any]], run: Run) -> dict[str, Any]:
    return fn(run)


RUNNERS: dict[str, Callable[[Run], Awaitable[dict[str, Any]]]] = {
    "ingest": measure_ingest,
    "latency": measure_latency,
    "deadlines": measure_deadlines,
    "uniform": measure_uniform,
    "replay": lambda run: _sync(measure_replay, run),
    "rebuild": measure_rebuild,
    "memory": measure_memory,
    "sql": lambda run: _sync(measure_sql, run),
    "consumer": measure_consumer,
}


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    sizes = MODES[args.mode]
    chosen = args.only or list(MEASUREMENTS)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "mode": args.mode,
        "command": f"{PROG} " + shlex.join(args.argv),
        "started_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "nats_server": nats_server_version(),
        "load_before": loadavg(),
        "sizes": asdict(sizes),
    }
    doc["failed"] = {}
    done: list[str] = []

    def save(run: Run) -> None:
        """Write what is measured so far: a long run that stops early keeps it."""
        doc["warm"] = run.warm
        doc["results"] = run.results
        doc["not_run"] = [m for m in MEASUREMENTS if m not in done]
        doc["complete"] = len(done) == len(chosen)
        doc["load_after"] = loadavg()
        doc["duration_s"] = time.perf_counter() - t0
        doc["summary"] = summary(run.results)
        write(doc, args.out)

    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        run = Run(args.mode, sizes, Path(tmp), profile=args.profile, out=args.out)
        for name in MEASUREMENTS:
            if name in chosen:
                try:
                    run.results[name] = await RUNNERS[name](run)
                except Exception as e:  # report it, and measure the rest
                    doc["failed"][name] = f"{type(e).__name__}: {e}"
                    say(f"{name} failed: {doc['failed'][name]}")
                done.append(name)
                save(run)
        save(run)
    return doc


def write(doc: dict[str, Any], out: Path) -> Path:
    """``bench-<mode>.json`` and ``.md`` in ``out``; returns their stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{doc['mode']}"
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="shoal's benchmark suite: every figure against its target (the suite's "
        "docstring, scripts/bench/_suite.py, says what each measurement does); or, with "
        "--compare REF, the working tree's replay and ingest cost per event against REF's.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="mode",
        help="tiny sizes, for the test suite",
    )
    parser.set_defaults(mode="full")
    parser.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated, from: {','.join(MEASUREMENTS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for JSON and markdown (default scripts/bench/results/bench, with "
        "--compare scripts/bench/results/compare)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile (py-spy) the replay, one more ingest run at the smallest size and "
        "one more deadline run",
    )
    _compare.add_arguments(parser)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args.only:
        unknown = set(args.only) - set(MEASUREMENTS)
        if unknown:
            parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    problem = _compare.check_arguments(args)
    if problem is not None:
        parser.error(problem)
    if args.out is None:
        args.out = RESULTS if args.compare is None else COMPARE_RESULTS
    args.argv = raw
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite, or the comparison; returns the exit status."""
    args = parse_args(argv)
    if args.profile and find_py_spy() is None:
        print(
            f"{PROG}: --profile needs py-spy (a sampling profiler), which is not installed: "
            "pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    from scripts._logging import configure_logging

    configure_logging("warning")
    if args.compare is not None:
        return compare(args)
    doc = anyio.run(run_all, args)
    print()
    for line in table(doc["summary"]):
        print(line)
    stem = args.out / f"bench-{args.mode}"
    print(f"\nwritten: {stem}.json, {stem}.md")
    return 1 if doc["failed"] else 0


def compare(args: argparse.Namespace) -> int:
    """``--compare REF``: print the table and write the report; returns the exit status."""
    try:
        doc = run_compare(args)
    except CompareError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    rows = [_compare.Row(**r) for r in doc["rows"]]
    print()
    for line in _compare.table(rows, doc["ref"]):
        print(line)
    print()
    for line in doc["checks"]:
        print(line)
    stem = write_compare(doc, args.out)
    print(f"\nwritten: {stem}.json, {stem}.md")
    return 0
