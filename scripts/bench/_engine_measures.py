"""The suite's measurements of a running engine (in a child process, ``_harness``): ingest,
event-to-transition latency, deadline lateness, restarts from snapshots, memory per customer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

from actors import load_segments
from protocol import (
    DAY,
    EVENTS_STREAM,
    SECOND,
    EventCause,
    Transition,
    event_subject,
    format_instant,
)
from store import Store

from ._common import CpuSnapshot, broker, now_us, percentiles, publish, say
from ._harness import EngineProcess, engine_process, wait_drained
from ._stores import build_store, due_template, finish_store, typical_templates, write_clones
from ._suite import Run

_transition = msgspec.json.Decoder(Transition)
_encode = msgspec.json.Encoder().encode


async def start_warm(
    run: Run, ep: EngineProcess, population: str, customers: int
) -> dict[str, Any]:
    """Wait for the engine child to be ready, then warm; record the start."""
    ready = await ep.wait("ready", run.sizes.timeout)
    warm = await ep.wait("warm", run.sizes.timeout)
    rec = {
        "population": population,
        "customers": customers,
        "ready_s": ready["seconds"],
        "warm_s": warm["seconds"],
        "customers_at_ready": ready["customers"],
        "rss_base_mib": warm["rss_base_mib"],
        "rss_warm_mib": warm["rss_mib"],
        "bytes_per_customer": (warm["rss_mib"] - warm["rss_base_mib"]) * 2**20 / customers,
        "pending_deadlines": warm["pending_deadlines"],
        "cpu_main_s": warm["cpu_main"],
        "cpu_threads_s": warm["cpu_threads"],
    }
    run.warm.append(rec)
    say(
        f"  {population} {customers:,}: ready {rec['ready_s']:.2f} s, warm {rec['warm_s']:.2f} s, "
        f"RSS {rec['rss_base_mib']:.0f} -> {rec['rss_warm_mib']:.0f} MiB"
    )
    return rec


# --------------------------------------------------------------------------- measurements


async def ingest_once(run: Run, n: int, profile: Path | None = None) -> dict[str, Any]:
    """One engine on a store of ``n`` customers, warm, then ``ingest_events`` live events."""
    sz = run.sizes
    d = run.dir(f"ingest-{n}" + ("-profile" if profile else ""))
    db = d / "shoal.db"
    build = await build_store(db, n)
    say(
        f"ingest at {n:,} customers (store built in {build['build_s']:.1f} s)"
        + (", engine under py-spy" if profile else "")
    )
    async with (
        broker(d) as url,
        engine_process(db, url, d / "engine.log", profile=profile) as ep,
    ):
        warm = await start_warm(run, ep, "typical" if profile is None else "profiled", n)
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            base = await ep.ask("mark")
            cpu0 = CpuSnapshot.take()
            t0 = time.perf_counter()
            events = live_events(random.Random(n), n, "i")
            await publish(js, ((s, b) for s, b, _ in islice(events, sz.ingest_events)))
            publish_s = time.perf_counter() - t0
            t1, st = await wait_drained(ep, base["events_applied"] + sz.ingest_events, sz.timeout)
            cpu1 = CpuSnapshot.take()
        finally:
            await nc.close()
        await ep.stop()
    seconds = t1 - t0
    row: dict[str, Any] = {
        "customers": n,
        "events": sz.ingest_events,
        "seconds": seconds,
        "events_per_s": sz.ingest_events / seconds,
        "publish_s": publish_s,
        "transitions": st["transitions"] - base["transitions"],
        "deadlines_fired": st["deadlines_fired"] - base["deadlines_fired"],
        "engine_cpu_main_s": st["cpu_main"] - base["cpu_main"],
        "engine_cpu_threads_s": st["cpu_threads"] - base["cpu_threads"],
        "broker_cpu_s": cpu1.broker - cpu0.broker,
        "producer_cpu_s": cpu1.process - cpu0.process,
        "rss_warm_mib": warm["rss_warm_mib"],
        "rss_end_mib": st["rss_mib"],
        "engine_gc_s": st["gc_s"] - base["gc_s"],
        "engine_gc_full": st["gc_full"] - base["gc_full"],
        "max_stall_s": st["max_stall_s"],
    }
    if profile is not None:
        row["py_spy"] = ep.spy
    say(f"  {sz.ingest_events:,} events in {seconds:.2f} s: {row['events_per_s']:,.0f}/s")
    return row


async def measure_ingest(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": [await ingest_once(run, n) for n in run.sizes.ingest_customers]}
    if run.profile:
        # Once more at the smallest size with the engine under py-spy (not a figure).
        raw = run.tmp / "ingest.txt"
        out["profiled"] = await ingest_once(run, run.sizes.ingest_customers[0], raw)
        out["profile"] = run.profile_report(
            "ingest", raw, [("the engine child", None)], out["profiled"]["py_spy"]
        )
    return out


async def measure_latency(run: Run) -> dict[str, Any]:
    sz = run.sizes
    n = sz.latency_customers
    d = run.dir("latency")
    db = d / "shoal.db"
    await build_store(db, n)
    say(f"latency at {n:,} customers, offered {', '.join(f'{r:,}' for r in sz.latency_rates)}/s")
    sent: dict[str, float] = {}
    lat: list[float] = []
    rows = []
    async with broker(d) as url, engine_process(db, url, d / "engine.log") as ep:
        await start_warm(run, ep, "typical", n)
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()

            async def on_transition(msg: Any) -> None:
                t = time.perf_counter()
                tr = _transition.decode(msg.data)
                if isinstance(tr.cause, EventCause):
                    t0 = sent.get(tr.cause.message_id)
                    if t0 is not None:
                        lat.append(t - t0)

            await nc.subscribe("shoal.segments.>", cb=on_transition)
            published = 0
            for rate in sz.latency_rates:
                lat.clear()
                sent.clear()
                base = await ep.ask("mark")
                gen = live_events(random.Random(rate), n, f"l{rate}-", fresh=0.3)
                k = 0
                start = time.perf_counter()
                while (elapsed := time.perf_counter() - start) < sz.latency_seconds:
                    due = int(rate * elapsed) + 1
                    while k < due:
                        subject, body, mid = next(gen)
                        sent[mid] = time.perf_counter()
                        await nc.publish(subject, body)
                        k += 1
                    await anyio.sleep(0.002)
                await nc.flush()
                publish_s = time.perf_counter() - start
                done, st = await wait_drained(ep, base["events_applied"] + k, sz.timeout)
                await anyio.sleep(0.3)  # the last transitions on their way to the subscriber
                published += k
                stored = (await js.stream_info(EVENTS_STREAM)).state.messages
                ms = [x * 1000 for x in lat]
                row: dict[str, Any] = {
                    "offered_per_s": rate,
                    "published": k,
                    "stored_total": stored,
                    "published_total": published,
                    "achieved_publish_per_s": k / publish_s,
                    "seconds": sz.latency_seconds,
                    "drain_after_publish_s": done - start - publish_s,
                    "applied_per_s": k / (done - start),
                    "transitions_matched": len(ms),
                    "latency_ms": percentiles(ms),
                    "above_capacity": done - start - publish_s > 1.0,
                    "engine_gc_s": st["gc_s"] - base["gc_s"],
                    "engine_gc_full": st["gc_full"] - base["gc_full"],
                    "max_stall_s": st["max_stall_s"],
                }
                rows.append(row)
                p = row["latency_ms"]
                say(
                    f"  {rate:,}/s: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, "
                    f"max {p['max']:.1f} ms ({p['count']:,} transitions; "
                    f"drained {row['drain_after_publish_s']:.1f} s after publishing)"
                )
        finally:
            await nc.close()
        await ep.stop()
    return {"customers": n, "rates": rows}


@dataclass
class LatenessRun:
    """What :func:`lateness_run` read of the engine: its start, the lateness by window, its
    stats at the end and at the mark before the first was due, and py-spy's lines."""

    warm: dict[str, Any]
    warm_before_due: bool
    late: dict[str, Any]
    stats: dict[str, Any]
    base: dict[str, Any]
    spy: list[str]


async def lateness_run(
    run: Run,
    name: str,
    db: Path,
    n: int,
    due: int,
    windows: dict[str, list[int]],
    expected: int,
    profile: Path | None,
) -> LatenessRun:
    """An engine child on the store ``db`` of ``n`` customers with pending deadlines (under
    py-spy, writing ``profile``, if given), warm, until the ``expected`` deadlines due in
    ``windows`` (name -> [from, to] instants, the first from ``due`` on) have fired, 2 s
    after the last window at the soonest (or the run's timeout): their lateness, by
    window."""
    d = db.parent
    end = max(to for _, to in windows.values()) + 2 * SECOND
    async with (
        broker(d) as url,
        engine_process(db, url, d / "engine.log", profile=profile) as ep,
    ):
        warm = await start_warm(run, ep, name if profile is None else "profiled", n)
        warm_before_due = now_us() < due
        base = await ep.ask("mark")
        fired0 = (await ep.ask("stats"))["deadlines_fired"]
        await anyio.sleep(max(0.0, (end - now_us()) / SECOND))
        # An engine that fell behind is still firing: its lateness is known once all fired.
        with anyio.move_on_after(run.sizes.timeout):
            while (await ep.ask("stats"))["deadlines_fired"] - fired0 < expected:
                await anyio.sleep(0.5)
        # Stats first: the child's summary of a million deadlines holds its loop for a second
        # or so, which the longest stall would otherwise count.
        st = await ep.ask("stats")
        late = await ep.ask("lateness " + json.dumps(windows), run.sizes.timeout)
        await ep.stop()
    del late["ev"]
    return LatenessRun(warm, warm_before_due, late, st, base, ep.spy if profile else [])


async def measure_deadlines(run: Run) -> dict[str, Any]:
    out = await deadlines_once(run)
    if run.profile:
        # Once more with the engine under py-spy (not a figure): the whole child, loading
        # the store included, then the firing path alone.
        raw = run.tmp / "deadlines.txt"
        p = await deadlines_once(run, raw)
        out["profiled"] = {
            k: p[k] for k in ("customers", "lateness_ms", "deadlines_fired", "py_spy")
        }
        out["profile"] = run.profile_report(
            "deadlines",
            raw,
            [
                ("the engine child", None),
                ("firing: the stacks through Deadlines.fire_due", "Deadlines.fire_due (actors/"),
            ],
            p["py_spy"],
        )
    return out


async def deadlines_once(run: Run, profile: Path | None = None) -> dict[str, Any]:
    """One engine on a store of ``deadline_customers`` customers with pending deadlines,
    until they fell due (under py-spy, writing ``profile``, if given)."""
    sz = run.sizes
    n = sz.deadline_customers
    burst = n // 10
    spread = n // 10
    typical = n - burst - spread
    span = sz.deadline_spread_s * SECOND
    d = run.dir("deadlines" + ("-profile" if profile else ""))
    db = d / "shoal.db"
    segments = load_segments()
    say(
        f"deadlines: {n:,} customers pending, {burst:,} due in one second"
        + (", engine under py-spy" if profile else "")
    )
    t0 = time.perf_counter()
    log = await Store.open(db)
    try:
        cut = now_us()
        templates = typical_templates(min(2_000, typical), segments, cut)
        await write_clones(log, segments, templates, range(typical))
        # Due once the rest is written and the engine has restarted and is warm.
        margin = (burst + spread) * 40e-6 + n * 80e-6 + 8.0
        due = (now_us() + int(margin * SECOND)) // SECOND * SECOND + SECOND
        burst_t = [due_template(due + j * (SECOND // 50), segments, cut) for j in range(50)]
        spread_t = [
            due_template(due + SECOND + j * (span // 200), segments, cut) for j in range(200)
        ]
        await write_clones(log, segments, burst_t, range(typical, typical + burst))
        await write_clones(log, segments, spread_t, range(typical + burst, n))
        await finish_store(log, segments)
    finally:
        await log.close()
    build_s = time.perf_counter() - t0
    windows = {"burst": [due, due + SECOND], "spread": [due + SECOND, due + SECOND + span]}
    ran = await lateness_run(run, "deadlines", db, n, due, windows, burst + spread, profile)
    late, st, base = ran.late, ran.stats, ran.base
    warm, warm_before_due = ran.warm, ran.warm_before_due
    spy = {"py_spy": ran.spy} if profile is not None else {}
    say(
        f"  lateness p50 {late['all']['p50']:.1f} ms, p99 {late['all']['p99']:.1f} ms, "
        f"max {late['all']['max']:.1f} ms over {late['all']['count']:,} deadlines"
    )
    return {
        "customers": n,
        "pending_at_warm": warm["pending_deadlines"],
        "due_in_one_second": burst,
        "spread_over_s": sz.deadline_spread_s,
        "build_s": build_s,
        "warm_before_due": warm_before_due,
        "lateness_ms": late,
        "deadlines_fired": st["deadlines_fired"],
        "transitions": st["transitions"],
        "transitions_published": st["transitions_published"],
        "engine_gc_s": st["gc_s"] - base["gc_s"],
        "engine_gc_full": st["gc_full"] - base["gc_full"],
        "max_stall_s": st["max_stall_s"],
        **spy,
    }


UNIFORM_TEMPLATES = 10_000
"""Distinct due instants of the ``uniform`` measurement (each shared by n / this clones)."""


async def measure_uniform(run: Run) -> dict[str, Any]:
    """Every customer with a deadline, due uniformly at ``uniform_rate`` per second once the
    engine is warm: the lateness of a steady stream of deadlines with all of them pending.
    With ``--profile``, once more with the engine under py-spy (not a figure)."""
    out = await uniform_once(run)
    if run.profile:
        raw = run.tmp / "uniform.txt"
        p = await uniform_once(run, raw)
        out["profiled"] = {k: p[k] for k in ("customers", "lateness_ms", "deadlines_fired")}
        out["profile"] = run.profile_report(
            "uniform",
            raw,
            [
                ("the engine child", None),
                ("firing: the stacks through Deadlines.fire_due", "Deadlines.fire_due (actors/"),
                ("preparing: the stacks through Deadlines.prepare", "Deadlines.prepare (actors/"),
            ],
            p["py_spy"],
        )
    return out


async def uniform_once(run: Run, profile: Path | None = None) -> dict[str, Any]:
    """One engine on a store of ``uniform_customers`` customers due at ``uniform_rate``/s
    (under py-spy, writing ``profile``, if given)."""
    sz = run.sizes
    n, rate = sz.uniform_customers, sz.uniform_rate
    span = n * SECOND // rate
    k = min(n, UNIFORM_TEMPLATES)
    d = run.dir("uniform" + ("-profile" if profile else ""))
    db = d / "shoal.db"
    segments = load_segments()
    say(f"uniform deadlines: {n:,} customers pending, due at {rate:,}/s over {span / SECOND:g} s")
    t0 = time.perf_counter()
    log = await Store.open(db)
    try:
        cut = now_us()
        # Due once the store is written and the engine has restarted and is warm (as in
        # deadlines_once: about 80 us a customer for both, and a margin).
        margin = n * 80e-6 + 8.0
        due = (now_us() + int(margin * SECOND)) // SECOND * SECOND + SECOND
        templates = [due_template(due + j * (span // k), segments, cut) for j in range(k)]
        await write_clones(log, segments, templates, range(n))
        await finish_store(log, segments)
    finally:
        await log.close()
    build_s = time.perf_counter() - t0
    windows = {"uniform": [due, due + span]}
    ran = await lateness_run(run, "uniform", db, n, due, windows, n, profile)
    late, st, base = ran.late, ran.stats, ran.base
    warm, warm_before_due = ran.warm, ran.warm_before_due
    p = late["uniform"]
    say(
        f"  lateness p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms "
        f"over {p['count']:,} deadlines"
    )
    return {
        "customers": n,
        "rate_per_s": rate,
        "span_s": span / SECOND,
        "pending_at_warm": warm["pending_deadlines"],
        "build_s": build_s,
        "warm_before_due": warm_before_due,
        "lateness_ms": late,
        "deadlines_fired": st["deadlines_fired"],
        "engine_gc_s": st["gc_s"] - base["gc_s"],
        "engine_gc_full": st["gc_full"] - base["gc_full"],
        "max_stall_s": st["max_stall_s"],
        **({"py_spy": ran.spy} if profile is not None else {}),
    }


async def start_only(run: Run, name: str, population: str, n: int) -> None:
    """An engine started on a store of ``n`` ``population`` customers until warm, and
    stopped (its start recorded by ``start_warm``)."""
    d = run.dir(name)
    db = d / "shoal.db"
    await build_store(db, n, population)
    async with broker(d) as url, engine_process(db, url, d / "engine.log") as ep:
        await start_warm(run, ep, population, n)
        await ep.stop()


async def measure_rebuild(run: Run) -> dict[str, Any]:
    if not run.warm:
        n = run.sizes.deadline_customers
        say(f"rebuild from snapshots at {n:,} customers")
        await start_only(run, "rebuild", "typical", n)
    starts = sorted(run.warm, key=lambda w: w["customers"])
    return {
        "starts": [
            {k: w[k] for k in ("population", "customers", "ready_s", "warm_s")} for w in starts
        ]
    }


async def measure_memory(run: Run) -> dict[str, Any]:
    sz = run.sizes
    have = {(w["population"], w["customers"]) for w in run.warm}
    wanted = [("typical", n) for n in sz.ingest_customers] + [
        ("bare", sz.memory_bare),
        ("history", sz.memory_bare),
    ]
    for population, n in wanted:
        if (population, n) in have:
            continue
        say(f"memory: {population} {n:,}")
        await start_only(run, f"memory-{population}-{n}", population, n)
    rows = [
        {
            k: w[k]
            for k in (
                "population",
                "customers",
                "rss_base_mib",
                "rss_warm_mib",
                "bytes_per_customer",
            )
        }
        for w in sorted(run.warm, key=lambda w: (w["population"], w["customers"]))
        if w["population"] in ("typical", "bare", "history")
    ]
    return {"engines": rows}


# --------------------------------------------------------------------------- load

_MIX = (
    ("Visit", 0.55),
    ("Email Opened", 0.25),
    ("Email Link Clicked", 0.07),
    ("Order Completed", 0.05),
    (None, 0.08),  # identify with a new renewal date
)


def live_events(
    rng: random.Random, customers: int, prefix: str, *, fresh: float = 0.0
) -> Iterator[tuple[str, bytes, str]]:
    """Endless (subject, payload, message id) of live Segment Spec events stamped now, for
    customers ``c<i>`` (i < ``customers``) and, a share ``fresh`` of them, new customers
    ``<prefix>n<k>`` (whose first event enters ``new_customer`` at once)."""
    names = [n for n, _ in _MIX]
    weights = [w for _, w in _MIX]
    k = 0
    while True:
        k += 1
        cid = f"{prefix}n{k}" if rng.random() < fresh else f"c{rng.randrange(customers)}"
        name = rng.choices(names, weights)[0]
        now = now_us()
        mid = f"{prefix}{k}"
        doc: dict[str, Any] = {"type": "track", "userId": cid, "messageId": mid}
        if name is None:
            doc["type"] = "identify"
            renewal = now + rng.randrange(DAY, 60 * DAY)
            doc["traits"] = {"renewal_date": format_instant(renewal)[:10]}
        else:
            doc["event"] = name
            doc["properties"] = (
                {"revenue": 12.0, "product": "towel"}
                if name == "Order Completed"
                else {"club": "north"}
            )
        doc["timestamp"] = format_instant(now)
        yield event_subject(cid), _encode(doc), mid
