"""The suite's measurements without a running engine: replay, the SQL baseline (``_sql``)
and the nats-py consumer ceiling (``scripts.bench.consumer``)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from actors import load_segments, replay
from actors.population import generate, history_end

from . import _sql as bsql
from ._common import ROOT, broker, say
from ._profiles import py_spy_command
from ._suite import Run
from .consumer import VARIANTS, fill_stream, run_variant


def measure_replay(run: Run) -> dict[str, Any]:
    sz = run.sizes
    events = list(generate(sz.replay_customers, sz.replay_days, seed=7))
    end = history_end(sz.replay_days)
    segments = load_segments()
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    transitions = sum(1 for _ in replay(events, segments, until=end))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    say(f"replay: {len(events):,} events in {seconds:.2f} s: {len(events) / seconds:,.0f}/s")
    out: dict[str, Any] = {}
    if run.profile:
        out["profiled"], out["profile"] = profile_replay(run)
    return {
        **out,
        "customers": sz.replay_customers,
        "days": sz.replay_days,
        "events": len(events),
        "transitions": transitions,
        "seconds": seconds,
        "cpu_s": cpu,
        "events_per_s": len(events) / seconds,
    }


REPLAY_CHILD = (
    "import sys; from scripts.bench._other_measures import replay_child; "
    "replay_child(*sys.argv[1:])"
)


def profile_replay(run: Run, seconds: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same replay in a child process under py-spy (repeated for ``seconds`` at least,
    for enough samples); returns what the child ran and the report of the replay alone."""
    sz = run.sizes
    raw = run.tmp / "replay.txt"
    cmd = [
        *py_spy_command(raw),
        sys.executable,
        "-c",
        REPLAY_CHILD,
        str(sz.replay_customers),
        str(sz.replay_days),
        str(seconds),
    ]
    say("replay under py-spy")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=sz.timeout, cwd=ROOT)
    docs = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not docs:
        raise RuntimeError(f"replay under py-spy failed ({proc.returncode}): {proc.stderr[-2000:]}")
    child: dict[str, Any] = json.loads(docs[-1])
    parts = [("replay: the stacks through actors.replay", "replay (actors/")]
    spy = [ln for ln in proc.stdout.splitlines() if ln.startswith("py-spy>")]
    return child, run.profile_report("replay", raw, parts, spy)


def replay_child(customers: str, days: str, seconds: str) -> None:
    """``profile_replay``'s child: ``measure_replay``'s history, replayed until ``seconds``
    have passed (at least once); prints what it did as JSON."""
    events = list(generate(int(customers), int(days), seed=7))
    end = history_end(int(days))
    segments = load_segments()
    t0 = time.perf_counter()
    repeats = 0
    while not repeats or time.perf_counter() - t0 < float(seconds):
        for _ in replay(events, segments, until=end):
            pass
        repeats += 1
    took = time.perf_counter() - t0
    print(json.dumps({"events": len(events), "repeats": repeats, "seconds": took}), flush=True)


def schedule(recompute_s: float, minutes: int, shoal_us: float) -> dict[str, Any]:
    """A full recompute every ``minutes``, each taking ``recompute_s``: how old the
    memberships read are (a run's results show the data as of its start, from its end
    until the next run's end), the CPU it takes per hour, and the event rate at which
    shoal (``shoal_us`` per event) would spend as much. A recompute longer than the
    interval cannot keep to it: the runs go back to back (``feasible`` false)."""
    period = max(minutes * 60.0, recompute_s)
    return {
        "feasible": recompute_s <= minutes * 60,
        "period_s": period,
        "mean_s": period / 2 + recompute_s,
        "max_s": period + recompute_s,
        "sql_cpu_s_per_hour": recompute_s * 3600 / period,
        "break_even_events_per_s": recompute_s / period / (shoal_us / 1e6),
    }


def measure_sql(run: Run) -> dict[str, Any]:
    sz = run.sizes
    d = run.dir("sql")
    events = list(generate(sz.sql_base, sz.sql_days, seed=11))
    at = history_end(sz.sql_days)
    jsonl = d / "history.jsonl"
    bsql.write_jsonl(events, jsonl)
    segments = load_segments()
    t0, c0 = time.perf_counter(), time.process_time()
    shoal = bsql.shoal_members(events, segments, at)
    shoal_s, shoal_cpu = time.perf_counter() - t0, time.process_time() - c0
    per_event_us = shoal_s / len(events) * 1e6
    # The engine's end-to-end cost per event, from this run's ingest, if it ran.
    ingest = run.results.get("ingest", {}).get("sizes", [])
    events_per_customer_day = len(events) / sz.sql_base / sz.sql_days
    say(
        f"sql baseline: base {sz.sql_base:,} customers, {len(events):,} events; "
        f"shoal replay {shoal_s:.2f} s"
    )
    scales = []
    for k in sz.sql_clones:
        customers = sz.sql_base * k
        db = d / f"events-{customers}.db"
        loaded = bsql.load(db, jsonl, k)
        seconds, counts = bsql.recompute(db, at)
        total = sum(seconds.values())
        agreement = {
            s: {
                "sql": counts[s],
                "shoal": shoal[s] * k,
                "equal": counts[s] == shoal[s] * k,
                "approximated": s in bsql.APPROXIMATED,
            }
            for s in bsql.QUERIES
        }
        # shoal's cost per event: end to end from this run's ingest at the nearest size,
        # else the actors alone (the replay above).
        if ingest:
            near = min(ingest, key=lambda r: abs(r["customers"] - customers))
            shoal_us, basis = 1e6 / near["events_per_s"], f"ingest at {near['customers']:,}"
        else:
            shoal_us, basis = per_event_us, "replay"
        # Keeping C customers current for an hour, at the history's own event rate.
        events_per_s = events_per_customer_day * customers / 86_400
        staleness = {str(m): schedule(total, m, shoal_us) for m in (5, 15, 60, 1440)}
        row = {
            "customers": customers,
            "rows": loaded["rows"],
            "load_s": loaded["load_s"],
            "index_s": loaded["index_s"],
            "recompute_s": total,
            "query_s": seconds,
            "sql_us_per_row": total / loaded["rows"] * 1e6,
            "shoal_us_per_event": shoal_us,
            "shoal_basis": basis,
            "recompute_over_shoal_event": total * 1e6 / shoal_us,
            "history_events_per_s": events_per_s,
            "shoal_cpu_s_per_hour": events_per_s * 3600 * shoal_us / 1e6,
            "staleness": staleness,
            "agreement": agreement,
        }
        scales.append(row)
        say(
            f"  {customers:,} customers, {loaded['rows']:,} rows: recompute {total:.2f} s "
            f"(load {loaded['load_s']:.1f} s, indexes {loaded['index_s']:.1f} s)"
        )
        db.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    return {
        "base_customers": sz.sql_base,
        "days": sz.sql_days,
        "base_events": len(events),
        "at": at,
        "shoal_replay_s": shoal_s,
        "shoal_replay_cpu_s": shoal_cpu,
        "shoal_us_per_event_replay": per_event_us,
        "events_per_customer_day": events_per_customer_day,
        "approximated": bsql.APPROXIMATED,
        "scales": scales,
    }


async def measure_consumer(run: Run) -> dict[str, Any]:
    m = run.sizes.consumer_messages
    v = next(v for v in VARIANTS if v.name == "push-cb-all-map50k")
    d = run.dir("consumer")
    async with broker(d) as url:
        published = await fill_stream(url, m)
        consumed = await run_variant(url, v, m, run.sizes.timeout)
    say(f"consumer ceiling ({v.name}): {consumed.rate:,.0f} msgs/s")
    return {
        "variant": v.name,
        "messages": m,
        "publish_async_per_s": published.rate,
        "consume_per_s": consumed.rate,
        "status": consumed.status,
    }
