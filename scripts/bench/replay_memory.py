"""Benchmark replay's memory: peak RSS of ``shoal replay`` at two sizes of the same customers.

Issue 17 asks that replay's memory not grow with the number of events: over the same 100k
customers, peak RSS at 3.25M events at most peak RSS at 1M events plus 50 MB.

1. One history is generated (``actors.population``, seeded: 100,000 customers over 130 days
   by default) and its first N events (in receive order) are written for each size N as a
   JSON-lines file, as ``shoal generate`` writes them. Its late events (a few percent) are
   out of timestamp order: a file replay sorts them (``protocol.OrderedHistory``). Each file
   is also imported (``shoal import FILE --data-dir DIR``) into an event log of its own.
   None of this is timed.
2. Each run is one child process, ``shoal replay SOURCE --segments S --transitions OUT``,
   SOURCE the file or ``--data-dir DIR`` (the log); its peak RSS is the child's own
   ``ru_maxrss`` (``os.wait4``), with its wall and CPU time. Runs go one at a time.
3. Two sets of definitions: ``default`` (shoal's default segments, whose windows and scores
   keep each track event of a customer: the state grows with the events) and ``flat``
   (rules on counters and last instants only: the state of a customer is bounded), so that
   what the replay holds and what the customers hold can be told apart.
4. With ``--compare REF``, REF is installed in a virtual environment of its own (as
   ``python -m scripts.bench --compare`` does) and replays the same files: the ratio
   new/old of each peak, and whether both wrote the same transitions byte for byte.
5. The cost of reading a file in order (``--read-events`` events, in process): in memory,
   and spilled to sorted runs, for the file as generated and sorted by timestamp.

The report is markdown on stdout and in ``--out`` (default
``scripts/bench/results/replay-memory.md``), with one JSON line appended to ``--json``.

Usage::

    python -m scripts.bench.replay_memory --compare main  # about 20 minutes
    python -m scripts.bench.replay_memory --sizes 20000,80000 --customers 2000  # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from actors import import_history
from actors.population import generate, write_history
from protocol import OrderedHistory
from store import Store

from ._common import ROOT, say
from ._compare_run import Tree, ref_tree, working_tree
from ._machine import loadavg, machine

DEFAULT_SEGMENTS = ROOT / "actors" / "default_segments.toml"
FLAT = """\
[segments.active]
rule = "since_last('Visit') < '14d'"

[segments.lapsed]
rule = "since_last('Visit') >= '30d'"

[segments.buyer]
rule = "count('Order Completed') >= 1"

[segments.newsletter]
rule = "since_last('Email Opened') < '30d'"
"""
"""Definitions that keep no event per customer: last instants and counters only."""
BOUND_MIB = 50
"""Issue 17: peak RSS at the large size at most that at the small one plus this."""


# --------------------------------------------------------------------------- measuring


def run_child(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd``; its peak RSS (MiB), wall and CPU seconds.

    Raises:
        RuntimeError: it failed.
    """
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        child = subprocess.Popen(cmd, cwd=cwd, stdout=null, stderr=subprocess.PIPE)
        assert child.stderr is not None
        err = child.stderr.read()  # notes and the summary: small
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0, 1):
        raise RuntimeError(f"{shlex.join(cmd)} exited {child.returncode}: {err[-500:]!r}")
    return {
        "peak_mib": usage.ru_maxrss / 1024,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def replay_run(tree: Tree, source: list[str], segments: Path, out: Path) -> dict[str, Any]:
    """``shoal replay`` of ``tree``: its figures, and the digest of its transitions."""
    cmd = [*tree.shoal, "replay", *source, "--segments", str(segments)]
    r = run_child([*cmd, "--transitions", str(out)], tree.cwd)
    data = out.read_bytes()
    out.unlink()
    r["transitions"] = data.count(b"\n")
    r["sha256"] = hashlib.sha256(data).hexdigest()
    return r


def reading_cost(source: Path, events: int) -> dict[str, float]:
    """CPU us per event of reading the first ``events`` lines of ``source`` into order and
    iterating them (``protocol.OrderedHistory``): in memory, and spilled to runs of 50,000,
    for the lines as generated and sorted by timestamp."""
    with source.open("rb") as f:
        lines = list(itertools.islice(f, events))
    in_order = sorted(lines, key=lambda line: json.loads(line)["timestamp"])
    out = {}
    for order, data in (("generated", lines), ("in_order", in_order)):
        for how, run in (("memory", len(data) + 1), ("spilled", 50_000)):
            t0 = time.process_time()
            with OrderedHistory(run=run) as h:
                h.read(data)
                n = sum(1 for _ in h)
            out[f"{order}_{how}"] = (time.process_time() - t0) / n * 1e6
    return out


# --------------------------------------------------------------------------- the run


def prepare(args: argparse.Namespace, tmp: Path) -> dict[int, tuple[Path, Path]]:
    """The history files and event logs, per size."""
    top = max(args.sizes)
    inputs = {}
    if args.days_per_size:
        # The same customers at each size: a history of its own per size, every customer
        # joining within it (a prefix of one long history would hold fewer customers).
        for n, days in zip(args.sizes, args.days_per_size, strict=True):
            path = tmp / f"history-{n}.jsonl"
            say(f"generating {n:,} events of {args.customers:,} customers over {days} days")
            with path.open("wb") as f:
                got = write_history(
                    itertools.islice(generate(args.customers, days, args.seed), n), f
                )
            if got < n:
                raise SystemExit(f"{days} days hold {got:,} events, fewer than {n:,}")
            data = tmp / f"data-{n}"
            anyio.run(_log, path, data)
            inputs[n] = (path, data)
        return inputs
    say(f"generating {top:,} events of {args.customers:,} customers (seed {args.seed})")
    full = tmp / f"history-{top}.jsonl"
    with full.open("wb") as f:
        got = write_history(
            itertools.islice(generate(args.customers, args.days, args.seed), top), f
        )
    if got < top:
        raise SystemExit(f"the history has {got:,} events, fewer than {top:,}: give --days")
    for n in args.sizes:
        path = tmp / f"history-{n}.jsonl"
        if n != top:
            with full.open("rb") as src, path.open("wb") as dst:
                dst.writelines(itertools.islice(src, n))
        data = tmp / f"data-{n}"
        say(f"logging {n:,} events into {data}")
        # Straight into the log (`shoal import` goes through the stream and an engine).
        anyio.run(_log, path, data)
        inputs[n] = (path, data)
    return inputs


async def _log(path: Path, data: Path) -> None:
    async with await Store.open(data / "shoal.db") as store:
        with path.open("rb") as lines:
            await import_history(store, lines, now=time.time_ns() // 1000)


def measure(args: argparse.Namespace, tmp: Path, trees: dict[str, Tree]) -> list[dict[str, Any]]:
    inputs = prepare(args, tmp)
    flat = tmp / "flat.toml"
    flat.write_text(FLAT)
    segments = {"default": DEFAULT_SEGMENTS, "flat": flat}
    runs = []
    for name in args.segments:
        for kind in ("file", "log"):
            for side, tree in trees.items():
                if kind == "log" and side == "ref" and not args.ref_log:
                    continue  # the log's replay did not change: by default REF replays files
                for n in args.sizes:
                    path, data = inputs[n]
                    source = [str(path)] if kind == "file" else ["--data-dir", str(data)]
                    say(f"{name} segments, {kind}, {n:,} events, {tree.name}")
                    r = replay_run(tree, source, segments[name], tmp / "out.jsonl")
                    r.update(segments=name, input=kind, events=n, side=side)
                    say(
                        f"  peak {r['peak_mib']:,.0f} MiB, {r['wall_s']:.0f} s, "
                        f"{r['transitions']:,} transitions"
                    )
                    runs.append(r)
    return runs


# --------------------------------------------------------------------------- report


def report(doc: dict[str, Any]) -> Iterator[str]:
    m, runs, small, large = doc["machine"], doc["runs"], min(doc["sizes"]), max(doc["sizes"])
    yield "# Replay memory: peak RSS against the number of events"
    yield ""
    yield f"Command: `{doc['command']}`, run at {doc['started']} UTC, {doc['duration_s']:.0f} s."
    yield ""
    yield (
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, shared (load "
        f"{doc['load_before']} before, {doc['load_after']} after); peak RSS does not depend "
        f"on the load. Python {m['python']}. Working tree: {m['code']}."
    )
    if doc.get("ref"):
        yield f"- Old code: `{doc['ref']}` = {doc['ref_commit']}, in a virtual env of its own."
    days = doc.get("days_per_size")
    history = (
        f"for each N, the first N events of a generated history of its own of "
        f"{doc['customers']:,} customers (seed {doc['seed']}) over "
        + " and ".join(f"{d} days" for d in days)
        + " respectively, so that every customer is in each"
        if days
        else f"the first N events of one generated history of {doc['customers']:,} "
        f"customers (seed {doc['seed']})"
    )
    yield (
        f"- History: {history}; each N as a file (`shoal replay FILE`) and as an event log "
        "imported from it (`shoal replay --data-dir DIR`). Peak RSS is each child process's "
        "own `ru_maxrss`."
    )
    yield ""
    columns = ("segments", "input", "code", "events", "peak RSS MiB", "wall s", "CPU us/event")
    yield "| " + " | ".join(columns) + " | transitions |"
    yield "|---|---|---|---:|---:|---:|---:|---:|"
    for r in runs:
        yield (
            f"| {r['segments']} | {r['input']} | {_code(doc, r['side'])} | {r['events']:,} | "
            f"{r['peak_mib']:,.0f} | {r['wall_s']:,.0f} | {r['cpu_s'] / r['events'] * 1e6:.1f} "
            f"| {r['transitions']:,} |"
        )
    yield ""
    yield (
        f"Growth from {small:,} to {large:,} events (the bound: {BOUND_MIB} MB), and the "
        "new/old ratio of the peaks:"
    )
    yield ""
    yield f"| segments | input | code | peak at {large:,} - peak at {small:,} (MiB) | met | new/old at {small:,} | new/old at {large:,} |"  # noqa: E501
    yield "|---|---|---|---:|---|---:|---:|"
    for g in doc["growth"]:
        yield (
            f"| {g['segments']} | {g['input']} | {_code(doc, g['side'])} | {g['growth_mib']:,.0f} "
            f"| {'yes' if g['met'] else 'no'} | {_ratio(g.get('ratio_small'))} | "
            f"{_ratio(g.get('ratio_large'))} |"
        )
    yield ""
    for line in doc["checks"]:
        yield f"- {line}"
    if "reading" in doc:
        rc = doc["reading"]
        yield ""
        yield (
            f"Reading a file into order, CPU us per event (first {doc['read_events']:,} "
            "events, in process, one pass each; a replay with the default segments costs "
            "about 60-100 us per event):"
        )
        yield ""
        yield "| file | in memory | spilled to runs of 50,000 |"
        yield "|---|---:|---:|"
        for order, label in (("generated", "as generated (late events out of order)"),
                             ("in_order", "sorted by timestamp (one run, no merge)")):  # fmt: skip
            yield f"| {label} | {rc[order + '_memory']:.2f} | {rc[order + '_spilled']:.2f} |"


def _code(doc: dict[str, Any], side: str) -> str:
    return "new" if side == "work" else f"old ({doc['ref']})"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(doc: dict[str, Any]) -> None:
    """Fill in the growth rows and the checks from the runs."""
    small, large = min(doc["sizes"]), max(doc["sizes"])
    by = {(r["segments"], r["input"], r["side"], r["events"]): r for r in doc["runs"]}
    growth, checks = [], []
    for seg, kind, side in sorted({k[:3] for k in by}, key=lambda k: (k[0], k[1], k[2] != "work")):
        a, b = by.get((seg, kind, side, small)), by.get((seg, kind, side, large))
        if a is None or b is None:
            continue
        g: dict[str, Any] = {"segments": seg, "input": kind, "side": side}
        g["growth_mib"] = b["peak_mib"] - a["peak_mib"]
        g["met"] = g["growth_mib"] * 1024 * 1024 <= BOUND_MIB * 1e6
        if side == "work":
            for n, key in ((small, "ratio_small"), (large, "ratio_large")):
                old = by.get((seg, kind, "ref", n))
                if old is not None:
                    g[key] = by[(seg, kind, side, n)]["peak_mib"] / old["peak_mib"]
                    same = old["sha256"] == by[(seg, kind, side, n)]["sha256"]
                    checks.append(
                        f"{seg}, {kind}, {n:,} events: old and new wrote "
                        + (
                            "the same transitions, byte for byte"
                            if same
                            else "DIFFERENT transitions"
                        )
                    )
        growth.append(g)
    doc["growth"], doc["checks"] = growth, checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="1000000,3250000", help="events, comma-separated")
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--days", type=int, default=130, help="of the generated history")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--days-per-size",
        help="the same customers at each size: a history of its own per size, over these "
        "days (comma-separated, one per size in increasing order), instead of the first N "
        "events of one history (which hold fewer customers at the smaller size)",
    )
    p.add_argument("--segments", default="flat,default", help="flat, default or both")
    p.add_argument("--compare", metavar="REF", help="replay the files with REF's code too")
    p.add_argument("--ref-log", action="store_true", help="and the logs")
    p.add_argument("--read-events", type=int, default=300_000, help="for the reading cost")
    p.add_argument("--out", type=Path, default=ROOT / "scripts/bench/results/replay-memory.md")
    p.add_argument("--json", type=Path, default=ROOT / "scripts/bench/results/replay-memory.jsonl")
    args = p.parse_args(argv)
    args.sizes = sorted(int(x) for x in args.sizes.split(","))
    args.segments = args.segments.split(",")
    if args.days_per_size:
        args.days_per_size = [int(x) for x in args.days_per_size.split(",")]
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "command": "python -m scripts.bench.replay_memory " + shlex.join(args.argv),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine(),
        "load_before": loadavg(),
        "sizes": args.sizes,
        "customers": args.customers,
        "seed": args.seed,
        "ref": args.compare,
        "days_per_size": args.days_per_size,
    }
    with tempfile.TemporaryDirectory(prefix="shoal-replay-memory-") as name:
        tmp = Path(name)
        trees = {"work": working_tree()}
        if args.compare:
            with ref_tree(args.compare, tmp) as (ref, commit, _):
                doc["ref_commit"] = commit
                doc["runs"] = measure(args, tmp, {**trees, "ref": ref})
        else:
            doc["runs"] = measure(args, tmp, trees)
        if args.read_events:
            say("the cost of reading a file into order")
            doc["read_events"] = args.read_events
            doc["reading"] = reading_cost(
                tmp / f"history-{max(args.sizes)}.jsonl", args.read_events
            )
    summarize(doc)
    doc["load_after"] = loadavg()
    doc["duration_s"] = time.perf_counter() - t0
    text = "\n".join(report(doc)) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, "utf-8")
    with args.json.open("a", encoding="utf-8") as f:
        f.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
