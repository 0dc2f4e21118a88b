"""Benchmark shoal's restart: snapshot cost, and restart to ready and to warm at N customers.

The script builds a store of N customers ``c<i>`` in a temporary directory, starts its own
``nats-server -js`` (``_common.broker``, free loopback port, empty streams) and:

1. build: makes K template customers (default 2,000) by really applying events with
   ``Customer.apply`` under the default segments, with ``random.Random(42)``: an identify
   (``plan``, ``renewal_date`` from 10 days ago to 60 days ahead, ``timezone``) at the first
   event, 1 to 4 ``Visit``s (the first and the last), an ``Email Opened`` (70 %) and an
   ``Order Completed`` with ``revenue`` (40 %), over the last 1 to 90 days, all before
   ``now - downtime``; each template is then advanced to ``now - downtime``, as a running
   engine would have, so deadlines are spread over the coming days and weeks and those
   falling in the downtime are overdue at the restart. Customer i is template ``i % K``
   cloned: its events (the template's ``protocol.Event``, msgpack, with customer ``c<i>``
   and message ids ``c<i>-<k>``) and its transitions (``protocol.Transition`` JSON with the
   customer replaced, same versions) are appended with ``Store.commit`` in one
   transaction per block of 20,000 customers, sorted by instant within the block, with the
   outbox marked published.
2. snapshots: the actor of customer i is ``Customer.from_snapshot("c<i>", template
   snapshot)``; all N are encoded (``Customer.snapshot()``) and written as
   ``Engine._write_snapshots`` writes them (format ``SNAPSHOT_FORMAT``, ``needs``
   fingerprint, ``log_seq`` = the log's last position, deadline or ``protocol.NEVER``) with
   ``Store.commit([], [], snapshots=rows, marks=...)`` in parts of 50,000 (the engine's
   part at a clean stop), the last part recording the ``SnapshotMarks``. Then a random
   sample of up to 100,000 customers is written again (an upsert, as a running engine
   does) in parts of 5,000 (the engine's part per loop turn) and of 50,000.
3. restarts: each runs in a fresh Python process (this module with a hidden ``--child``
   argument, ``_restart_child``), so that its RSS and CPU are the restart's own: it opens
   the store, connects, and times from just before ``await tg.start(engine.run)`` of a new
   engine (``_harness.engine_on``: the default segments, ``EngineConfig(use_snapshots=...)``,
   ``SystemClock``) until it
   returns (*ready*: consuming events and firing deadlines), then until ``engine.warm``
   (polled every 10 ms), then until *caught up* (no deadline left that was due when the
   restart began), waits for the publisher to publish what was committed, and cancels
   it, timing the clean stop (which snapshots every customer that changed).

   a. snapshots: the store as built, no tail after the marks;
   b. tail: after ``--tail`` events (Visit 70 %, Email Opened 20 %, Order Completed 10 %)
      for random customers, stamped now, are appended with the transitions they cause
      (each customer loaded from its stored snapshot and the events applied with
      ``Customer.apply``, outbox marked published) and no snapshot is written;
   c. log only: ``EngineConfig(use_snapshots=False)``, every customer rebuilt from the
      whole log (its clean stop then snapshots all N customers).

   With ``--profile FILE``, one more restart runs with cProfile on (main thread: the event
   loop; the SQLite thread is not profiled) between b and c: from snapshots after another
   tail of the same size; with ``--profile-log`` also one from the whole log, last. They
   are slower for it: the figures to quote are a, b and c's.

For each restart it reports wall seconds and, read from ``/proc``, CPU seconds of the
child's main thread (event loop, decoding, actors) and of its other threads (aiosqlite's
SQLite thread), and RSS. The engine's ``_rebuild``, ``_page``, ``_load``,
``_load_from_log`` and ``_flush_snapshots`` are wrapped with a wall-clock timer (two
``perf_counter`` calls per call).

The machine is assumed to be small and shared: compare ratios within one run.

Usage::

    python -m scripts.bench.restart                      # N=1000000, tail 100000
    python -m scripts.bench.restart --quick              # N=20000, tail 2000, no file written
    python -m scripts.bench.restart --profile /tmp/restart-prof.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from actors import SegmentSet, load_segments
from protocol import HOUR
from store import Store

from ._common import ROOT, GcClock, broker, now_us, rss_mib, say
from ._machine import loadavg, machine
from ._restart_child import restart, restart_child
from ._restart_report import Report, cpu_table, markdown, reading, restart_table, snapshot_table
from ._restart_store import append_tail, build_store, db_size, write_snapshots
from ._stores import make_templates, round_marks

TEMPLATES = 2_000
STOP_PART = 50_000
"""Snapshots per transaction at a clean stop (``Engine._flush_snapshots``)."""
SAMPLE = 100_000
"""Customers rewritten to compare the two part sizes."""
RESULTS = ROOT / "scripts" / "bench" / "results" / "restart.md"


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> Report:
    segments = load_segments()
    report = Report(
        args={k: v for k, v in vars(args).items() if k != "child"},
        machine=machine(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=loadavg(),
    )
    say(" ".join(f"{k}={v}" for k, v in report.machine.items()))
    say(
        f"customers={args.customers:,} tail={args.tail:,} templates={args.templates:,} "
        f"downtime={args.downtime} h load={report.load_start}"
    )
    n = args.customers
    with tempfile.TemporaryDirectory(prefix="shoal-bench-restart-", dir=args.tmpdir) as tmp:
        db = Path(tmp) / "shoal.db"
        async with broker(Path(tmp)) as url:
            # 1. the store -------------------------------------------------------------------
            cut = now_us() - int(args.downtime * HOUR)
            templates, t_templates, applied = make_templates(min(args.templates, n), segments, cut)
            say(
                f"templates: {len(templates):,} customers, {applied:,} events applied in "
                f"{t_templates:.2f} s ({t_templates / applied * 1e6:.0f} us/event)"
            )
            log = await Store.open(db)
            try:
                build = await build_store(log, templates, n)
                build.update(
                    templates=len(templates),
                    template_events=applied,
                    template_seconds=round(t_templates, 2),
                    apply_us=round(t_templates / applied * 1e6, 1),
                )
                say(
                    f"store: {build['events']:,} events, {build['transitions']:,} transitions "
                    f"in {build['seconds']:.0f} s"
                )
                build["db_before_snapshots"] = db_size(db)
                report.build = build

                # 2. snapshot cost ---------------------------------------------------------
                marks = round_marks(log, segments)
                rss0 = rss_mib()
                gc_clock = GcClock()
                full = await write_snapshots(
                    log, segments, templates, list(range(n)), STOP_PART, marks, gc_clock
                )
                full["rss_delta"] = round(rss_mib() - rss0)
                say(
                    f"snapshots: all {n:,} in parts of {STOP_PART:,}: encode "
                    f"{full['encode_us']} us, commit {full['commit_us']} us per customer, "
                    f"{full['bytes_mean']:.0f} bytes each"
                )
                rng = random.Random(42)
                sample = rng.sample(range(n), min(SAMPLE, n))
                parts = {}
                for part in (5_000, STOP_PART):
                    parts[part] = await write_snapshots(
                        log, segments, templates, sample, part, None, gc_clock
                    )
                    say(
                        f"  rewrite {len(sample):,} in parts of {part:,}: commit "
                        f"{parts[part]['commit_us']} us per customer"
                    )
                report.snapshots = {
                    "full": full,
                    "rewrite": [parts[5_000], parts[STOP_PART]],
                    "db_after": db_size(db),
                    "needs_fingerprint_us": _time_fingerprint(segments),
                }
            finally:
                await log.close()
            del templates
            gc.collect()

            # 3. restarts -----------------------------------------------------------------
            say("restart a: from snapshots, no tail")
            report.restarts.append(
                await restart("a. snapshots", db, url, use_snapshots=True, args=args)
            )
            report.tails.append(await _tail(db, segments, n, args.tail, rng))
            say("restart b: from snapshots plus the tail")
            report.restarts.append(
                await restart(
                    f"b. snapshots + {args.tail:,}-event tail",
                    db,
                    url,
                    use_snapshots=True,
                    args=args,
                )
            )
            if args.profile:
                report.tails.append(await _tail(db, segments, n, args.tail, rng))
                say("restart p1: snapshots + tail, cProfile on")
                report.restarts.append(
                    await restart(
                        f"p1. snapshots + {args.tail:,}-event tail, cProfile on",
                        db,
                        url,
                        use_snapshots=True,
                        args=args,
                        profile=True,
                    )
                )
            say("restart c: from the whole log (use_snapshots=False)")
            report.restarts.append(
                await restart("c. log only", db, url, use_snapshots=False, args=args)
            )
            if args.profile and args.profile_log:
                say("restart p2: log only, cProfile on")
                report.restarts.append(
                    await restart(
                        "p2. log only, cProfile on",
                        db,
                        url,
                        use_snapshots=False,
                        args=args,
                        profile=True,
                    )
                )
            report.snapshots["db_end"] = db_size(db)
    report.load_end = loadavg()
    return report


async def _tail(
    db: Path, segments: SegmentSet, n: int, count: int, rng: random.Random
) -> dict[str, Any]:
    log = await Store.open(db)
    try:
        tail = await append_tail(log, segments, n, count, rng)
    finally:
        await log.close()
    say(
        f"tail: {tail['events']:,} events for {tail['customers']:,} customers, "
        f"{tail['transitions']:,} transitions, {tail['seconds']:.1f} s"
    )
    return tail


def _time_fingerprint(segments: SegmentSet) -> float:
    """Microseconds per ``segments.needs.fingerprint()`` (the engine calls it per snapshot
    loaded)."""
    t0 = time.perf_counter()
    for _ in range(20_000):
        segments.needs.fingerprint()
    return round((time.perf_counter() - t0) / 20_000 * 1e6, 2)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers N")
    parser.add_argument(
        "--tail", type=int, default=100_000, help="events appended after the snapshots"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20000 customers, a 2000-event tail"
    )
    parser.add_argument(
        "--templates", type=int, default=TEMPLATES, help="customers really built (K)"
    )
    parser.add_argument(
        "--downtime",
        type=float,
        default=1.0,
        help="hours the engine was down: deadlines in them are overdue at restart",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="two more restarts with cProfile on; their top entries to FILE and the results",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help=f"markdown results (default {RESULTS.relative_to(ROOT)}; none for --quick)",
    )
    parser.add_argument("--json", metavar="FILE", help="all figures as one JSON document")
    parser.add_argument("--tmpdir", metavar="DIR", help="where the store and broker go")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds any one wait may take"
    )
    parser.add_argument(
        "--profile-log",
        action="store_true",
        help="with --profile, also profile a restart from the whole log (slow at 1M)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.customers, args.tail = 20_000, 2_000
        args.out = args.out or None
    elif args.out is None:
        args.out = str(RESULTS)
    if args.customers < 1 or args.tail < 0 or args.templates < 1:
        parser.error("--customers and --templates must be >= 1, --tail >= 0")
    return args


async def main_async(args: argparse.Namespace) -> int:
    report = await run(args)
    print()
    for line in snapshot_table(report.snapshots):
        print(line)
    print()
    ok = [r for r in report.restarts if "failed" not in r]
    for line in restart_table(ok):
        print(line)
    print()
    for line in cpu_table(ok):
        print(line)
    print()
    for r in report.restarts:
        if "failed" in r:
            print(f"FAILED: {r['label']}: {r['failed']}")
    for line in reading(report):
        print(line)
    command = "python -m scripts.bench.restart " + " ".join(sys.argv[1:])
    if args.profile:
        texts = [
            f"## {r['label']}: {phase}\n{text}\n"
            for r in report.restarts
            for phase, text in r.get("profile", {}).items()
        ]
        Path(args.profile).write_text("\n".join(texts), encoding="utf-8")
        print(f"profiles written to {args.profile}")
    if args.out:
        Path(args.out).write_text(markdown(report, command), encoding="utf-8")
        print(f"results written to {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.__dict__, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from scripts._logging import configure_logging

    configure_logging("warning")
    if args.child:
        result = anyio.run(restart_child, json.loads(args.child))
        print(json.dumps(result), flush=True)
        return 0
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
