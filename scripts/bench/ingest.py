"""Benchmark shoal's end-to-end ingest: publish, backlog ingest, live ingest, rebuild.

The script starts its own ``nats-server -js`` (``protocol.embedded_broker``) on a free
loopback port, with its store and the SQLite file in a temporary directory, and then:

1. publish: generates N Segment Spec ``track`` events (``Visit`` or ``EmailOpen``) over C
   customers ``c<i>`` with ``random.Random(42)``, stamped within the last 60 days and
   non-decreasing per customer, and publishes them with ``js.publish_async`` on
   ``protocol.event_subject(customer)`` (after ``protocol.nats.ensure_streams``). Events are
   generated while publishing, so the rate includes building each payload (a few us).
2. backlog: with all N events in the stream, starts an engine in-process
   (``_harness.engine_on``: the default segments and ``EngineConfig()``,
   ``await tg.start(engine.run)``) and times, from just before
   ``tg.start``, until ``engine.stats.events_applied == N`` (polled every 10 ms); then until
   the engine is *settled* (every committed transition published, deadlines that fell due
   fired, nothing changing for 0.5 s).
3. live: with the engine settled, publishes N/2 more events (new message ids, stamped in
   the last hour) while the engine consumes; times from the first publish until
   ``events_applied`` reaches N + N/2.
4. rebuild: stops the engine, starts a fresh one on the same SQLite file with
   ``use_snapshots=False`` and times ``await tg.start(engine.run)`` (the rebuild from the
   log happens before it returns).

``--metrics`` runs the first engine as ``shoal serve --metrics-port`` does: with
``protocol.metrics.EngineMetrics`` as its observer and its endpoint served (sampling the
engine and the consumer's lag once a second), to measure what metrics cost.

For each phase it reports wall seconds and, read from ``/proc``, the CPU seconds of this
process's main thread (the event loop: nats-py, decoding, actors), of its other threads
(aiosqlite's SQLite thread) and of the nats-server child. The engine's ``_ingest`` and
``_fire_due``, ``Publisher.publish_transitions`` (on its class) and the log's
``known``/``commit`` are wrapped with a wall-clock timer (two ``perf_counter`` calls per
call, once per batch; ``--no-breakdown`` turns it off). ``--profile FILE`` runs cProfile
over the backlog phase (main thread only; it slows that phase, so take rates from a run
without it) and writes the top 15 entries by cumulative and by internal time to FILE.

The machine is assumed to be small and noisy: compare ratios within one run.

Usage::

    python -m scripts.bench.ingest                    # N=200000, C=20000
    python -m scripts.bench.ingest --quick            # N=20000, C=2000
    python -m scripts.bench.ingest --json out.jsonl --profile prof.txt
"""

from __future__ import annotations

import argparse
import array
import contextlib
import cProfile
import functools
import importlib.metadata
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from actors import Engine, EngineConfig, SegmentSet, load_segments
from protocol import DAY, EVENTS_STREAM, HOUR, event_subject, format_instant
from protocol.nats import Publisher, ensure_streams

from ._common import (
    CpuSnapshot,
    Timers,
    broker,
    cprofile_text,
    free_port,
    now_us,
    publish,
    rss_mib,
)
from ._harness import engine_on

POLL = 0.01
SETTLE_QUIET = 0.5
_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------- measuring


@dataclass
class Phase:
    """One measured phase."""

    phase: str
    events: int
    seconds: float
    rate: float
    cpu_main: float = 0.0
    cpu_threads: float = 0.0
    cpu_broker: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Stopwatch:
    """Wall time and CPU of one phase."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = CpuSnapshot.take()

    def phase(self, name: str, events: int, end: float | None = None, **extra: Any) -> Phase:
        t1 = time.perf_counter() if end is None else end
        cpu1 = CpuSnapshot.take()
        seconds = t1 - self.t0
        return Phase(
            phase=name,
            events=events,
            seconds=seconds,
            rate=events / seconds if seconds > 0 else 0.0,
            cpu_main=cpu1.main - self.cpu0.main,
            cpu_threads=(cpu1.process - cpu1.main) - (self.cpu0.process - self.cpu0.main),
            cpu_broker=cpu1.broker - self.cpu0.broker,
            extra=extra,
        )


# --------------------------------------------------------------------------- events


def instants(rng: random.Random, count: int, start: int, end: int) -> array.array[int]:
    """``count`` sorted instants in [start, end): non-decreasing per customer, since every
    customer's events are taken in this order."""
    a = array.array("q", sorted(rng.randrange(start, end) for _ in range(count)))
    return a


def events(
    rng: random.Random, stamps: array.array[int], customers: int, first_id: int
) -> Iterator[tuple[str, bytes]]:
    """(subject, payload) of Segment Spec track events, generated lazily."""
    for k, at in enumerate(stamps):
        cid = f"c{rng.randrange(customers)}"
        doc = {
            "type": "track",
            "userId": cid,
            "event": "Visit" if rng.random() < 0.6 else "EmailOpen",
            "messageId": f"m{first_id + k}",
            "timestamp": format_instant(at),
        }
        yield event_subject(cid), _encode(doc)


# --------------------------------------------------------------------------- engine


@contextlib.asynccontextmanager
async def running_engine(
    url: str,
    db: Path,
    segments: SegmentSet,
    breakdown: Timers | None,
    *,
    metrics: bool = False,
    config: EngineConfig | None = None,
) -> AsyncIterator[tuple[Engine, float, float]]:
    """An engine on ``url`` and ``db`` (``_harness.engine_on``), started in a task group
    (with ``metrics``: as ``shoal serve --metrics-port`` runs it, endpoint on a free port).

    Yields (engine, perf_counter just before ``tg.start``, seconds ``tg.start`` took).
    """
    observer = None
    if metrics:
        from protocol.metrics import EngineMetrics

        observer = EngineMetrics()
    async with engine_on(url, db, segments, config=config, observer=observer) as bench:
        engine = bench.engine
        if breakdown is not None:
            breakdown.wrap(engine._ingest, "batch", "engine._ingest (batch, incl. known+commit)")
            breakdown.wrap(engine._deadlines, "fire_due", "engine._fire_due (incl. commit)")
            breakdown.wrap(bench.log.events, "known", "log.known")
            breakdown.wrap(bench.log, "commit", "log.commit")
        async with anyio.create_task_group() as tg:
            if observer is not None:
                await tg.start(functools.partial(observer.serve, engine, port=free_port()))
            t0 = time.perf_counter()
            await tg.start(engine.run)
            started = time.perf_counter() - t0
            try:
                yield engine, t0, started
            finally:
                tg.cancel_scope.cancel()


async def wait_applied(engine: Engine, target: int, timeout: float) -> float:
    """Poll until ``events_applied >= target``; returns the perf_counter instant."""
    with anyio.fail_after(timeout):
        while engine.stats.events_applied < target:
            await anyio.sleep(POLL)
    return time.perf_counter()


async def wait_settled(engine: Engine, timeout: float) -> float:
    """Poll until every committed transition is published and nothing changed for
    ``SETTLE_QUIET`` s; returns the perf_counter instant the final state was first seen."""
    last: tuple[int, ...] = ()
    since = time.perf_counter()
    with anyio.fail_after(timeout):
        while True:
            s = engine.stats
            key = (s.events_applied, s.transitions, s.transitions_published, s.deadlines_fired)
            t = time.perf_counter()
            if key != last or s.transitions_published != s.transitions:
                last, since = key, t
            elif t - since >= SETTLE_QUIET:
                return since
            await anyio.sleep(POLL)


def stats_of(engine: Engine) -> dict[str, int]:
    return dict(asdict(engine.stats))


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Phase], dict[str, Any]]:
    n, customers = args.events, args.customers
    live_n = n // 2
    rng = random.Random(42)
    segments = load_segments()
    breakdown = None if args.no_breakdown else Timers()
    if breakdown is not None:
        # The engine makes its Publisher inside run(), so this one is wrapped on the class;
        # publishing runs in a task of its own, overlapping ingest.
        breakdown.wrap(Publisher, "publish", "publisher (publish+acks, own task)")
    extras: dict[str, Any] = {}
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-ingest-") as tmp:
        db = Path(tmp) / "shoal.db"
        async with broker(Path(tmp)) as url:
            pub = await nats.connect(url)
            try:
                js = pub.jetstream()
                await ensure_streams(js)
                sv = pub.connected_server_version
                meta = {
                    "kind": "meta",
                    "nproc": os.cpu_count(),
                    "python": platform.python_version(),
                    "nats_py": importlib.metadata.version("nats-py"),
                    "nats_server": f"{sv.major}.{sv.minor}.{sv.patch}",
                    "msgspec": importlib.metadata.version("msgspec"),
                    "aiosqlite": importlib.metadata.version("aiosqlite"),
                    "sqlite": sqlite3.sqlite_version,
                    "events": n,
                    "customers": customers,
                    "live_events": live_n,
                    "segments": list(segments.names),
                    "breakdown": breakdown is not None,
                    "metrics": args.metrics,
                    "profile": bool(args.profile),
                }
                print("# " + " ".join(f"{k}={v}" for k, v in meta.items() if k != "kind"))

                # 1. publish the backlog -------------------------------------------------
                gen_now = now_us()
                stamps = instants(rng, n, gen_now - 60 * DAY, gen_now - 2 * HOUR)
                sw = Stopwatch()
                published = await publish(js, events(rng, stamps, customers, 0))
                phases.append(sw.phase("publish (publish_async)", published))
                del stamps
                info = await js.stream_info(EVENTS_STREAM)
                if info.state.messages != n:
                    raise RuntimeError(f"stream holds {info.state.messages} events, expected {n}")
                _say(phases[-1])
                rss_before = _rss()

                # 2. backlog ingest -----------------------------------------------------
                profiler = cProfile.Profile() if args.profile else None
                bd0 = breakdown.take() if breakdown else {}
                sw = Stopwatch()
                if profiler is not None:
                    profiler.enable()
                async with running_engine(url, db, segments, breakdown, metrics=args.metrics) as (
                    engine,
                    t0,
                    started,
                ):
                    sw.t0 = t0
                    applied_at = await wait_applied(engine, n, args.timeout)
                    if profiler is not None:
                        profiler.disable()
                    st = stats_of(engine)
                    backlog = sw.phase(
                        "backlog ingest" + (" (cProfile on)" if profiler else ""),
                        n,
                        end=applied_at,
                        start_seconds=round(started, 4),
                        transitions=st["transitions"],
                        transitions_published=st["transitions_published"],
                        deadlines_fired=st["deadlines_fired"],
                        duplicates=st["events_duplicate"],
                        rejected=st["events_rejected"],
                    )
                    phases.append(backlog)
                    _say(backlog)
                    if breakdown is not None:
                        extras["breakdown_backlog"] = _bd_json(breakdown.since(bd0))
                    settled_at = await wait_settled(engine, args.timeout)
                    st = stats_of(engine)
                    phases.append(
                        sw.phase(
                            "backlog settled (+time-fired, all published)",
                            n,
                            end=settled_at,
                            **{
                                k: st[k]
                                for k in ("transitions", "transitions_published", "deadlines_fired")
                            },
                        )
                    )
                    _say(phases[-1])
                    if breakdown is not None:
                        extras["breakdown_settled"] = _bd_json(breakdown.since(bd0))
                    rss_after = _rss()
                    extras["rss_mb"] = {
                        "before_engine": {"current": rss_before[0], "peak": rss_before[1]},
                        "after_backlog": {"current": rss_after[0], "peak": rss_after[1]},
                    }
                    extras["customers_held"] = engine.customer_count
                    extras["pending_deadlines"] = engine.pending_deadlines
                    if profiler is not None:
                        extras["profile"] = cprofile_text(profiler, ("cumulative", "tottime"))
                        profiler.dump_stats(args.profile + ".prof")

                    # 3. live ingest -----------------------------------------------------
                    base = stats_of(engine)
                    live_now = now_us()
                    stamps = instants(rng, live_n, live_now - HOUR, live_now)
                    live_events = events(rng, stamps, customers, n)
                    bd0 = breakdown.take() if breakdown else {}
                    sw = Stopwatch()
                    pub_done: list[float] = []

                    async def producer() -> None:
                        await publish(js, live_events)
                        pub_done.append(time.perf_counter())

                    async with anyio.create_task_group() as ptg:
                        ptg.start_soon(producer)
                        applied_at = await wait_applied(engine, n + live_n, args.timeout)
                    st = stats_of(engine)
                    live = sw.phase(
                        "live ingest (publish + consume)",
                        live_n,
                        end=applied_at,
                        publish_seconds=round(pub_done[0] - sw.t0, 4),
                        publish_rate=round(live_n / (pub_done[0] - sw.t0)),
                        transitions=st["transitions"] - base["transitions"],
                        deadlines_fired=st["deadlines_fired"] - base["deadlines_fired"],
                    )
                    phases.append(live)
                    _say(live)
                    if breakdown is not None:
                        extras["breakdown_live"] = _bd_json(breakdown.since(bd0))
                    await wait_settled(engine, args.timeout)
                    final = stats_of(engine)
                extras["first_engine_stats"] = final

                # 4. rebuild ---------------------------------------------------------------
                sw = Stopwatch()
                # From the log: the clean stop above wrote snapshots of every customer.
                rebuild_config = EngineConfig(use_snapshots=False)
                async with running_engine(url, db, segments, None, config=rebuild_config) as (
                    engine,
                    t0,
                    started,
                ):
                    sw.t0 = t0
                    st = stats_of(engine)
                    rebuild = sw.phase(
                        "rebuild (tg.start of a fresh engine)",
                        st["rebuilt_events"],
                        end=t0 + started,
                        rebuilt_customers=st["rebuilt_customers"],
                        transitions_read=final["transitions"],
                    )
                    phases.append(rebuild)
                    _say(rebuild)
                    if st["rebuilt_events"] != n + live_n:
                        raise RuntimeError(
                            f"rebuilt {st['rebuilt_events']} events, expected {n + live_n}"
                        )
                extras["rss_mb"]["end"] = dict(zip(("current", "peak"), _rss(), strict=True))
            finally:
                await pub.close()
    return meta, phases, extras


def _bd_json(d: dict[str, tuple[float, int]]) -> dict[str, dict[str, float]]:
    return {k: {"seconds": round(s, 4), "calls": c} for k, (s, c) in d.items()}


def _rss() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    return rss_mib(), rss_mib("VmHWM")


def _say(p: Phase) -> None:
    print(
        f"#   {p.phase}: {p.events} events, {p.seconds:.2f} s, {p.rate:,.0f}/s, "
        f"CPU main thread {p.cpu_main:.2f} s",
        flush=True,
    )


# --------------------------------------------------------------------------- report


def table(phases: list[Phase]) -> Iterator[str]:
    yield (
        "| phase | events | seconds | events/s | CPU main thread | CPU other threads "
        "| CPU nats-server | notes |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---|"
    for p in phases:
        notes = " ".join(f"{k}={v}" for k, v in p.extra.items())
        yield (
            f"| {p.phase} | {p.events} | {p.seconds:.2f} | {p.rate:,.0f} | {p.cpu_main:.2f} s "
            f"| {p.cpu_threads:.2f} s | {p.cpu_broker:.2f} s | {notes} |"
        )


def breakdown_table(name: str, bd: dict[str, dict[str, float]], wall: float) -> Iterator[str]:
    yield f"| {name}: wrapped call | wall s | calls | share of phase wall |"
    yield "|---|---:|---:|---:|"
    for k, v in bd.items():
        yield f"| {k} | {v['seconds']:.2f} | {int(v['calls'])} | {v['seconds'] / wall:.0%} |"


async def main_async(args: argparse.Namespace) -> int:
    meta, phases, extras = await run(args)
    print()
    for line in table(phases):
        print(line)
    by_name = {p.phase.split(" (")[0]: p for p in phases}
    for key, phase in (("breakdown_backlog", "backlog ingest"), ("breakdown_live", "live ingest")):
        if key in extras:
            print()
            for line in breakdown_table(phase, extras[key], by_name[phase].seconds):
                print(line)
    print()
    rss = extras["rss_mb"]
    print(
        "RSS MiB (current/peak): before engine {:.0f}/{:.0f}, after backlog {:.0f}/{:.0f}, "
        "end {:.0f}/{:.0f}".format(
            rss["before_engine"]["current"],
            rss["before_engine"]["peak"],
            rss["after_backlog"]["current"],
            rss["after_backlog"]["peak"],
            rss["end"]["current"],
            rss["end"]["peak"],
        )
    )
    print(f"first engine stats: {extras['first_engine_stats']}")
    print(
        f"customers held: {extras['customers_held']}, "
        f"pending deadlines: {extras['pending_deadlines']}"
    )
    if "profile" in extras:
        Path(args.profile).write_text(extras["profile"], encoding="utf-8")
        print(f"profile of the backlog phase written to {args.profile} (raw: {args.profile}.prof)")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(json.dumps(meta) + "\n")
            for p in phases:
                out.write(json.dumps({"kind": "phase", **asdict(p)}) + "\n")
            out.write(
                json.dumps(
                    {"kind": "extras", **{k: v for k, v in extras.items() if k != "profile"}}
                )
                + "\n"
            )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000, help="backlog events N")
    parser.add_argument("--customers", type=int, default=20_000, help="customers C")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20000 events, 2000 customers"
    )
    parser.add_argument("--json", metavar="FILE", help="append JSON lines results to FILE")
    parser.add_argument(
        "--profile", metavar="FILE", help="cProfile the backlog phase; top entries to FILE"
    )
    parser.add_argument(
        "--no-breakdown", action="store_true", help="do not wrap engine/log methods in timers"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds any one wait may take"
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="run the first engine with its Prometheus metrics (observer and endpoint)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.customers = 20_000, 2_000
    if args.events < 2 or args.customers < 1:
        parser.error("--events must be >= 2 and --customers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from scripts._logging import configure_logging

    configure_logging("warning")
    return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
