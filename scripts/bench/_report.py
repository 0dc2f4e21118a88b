"""The suite's report: a summary row per figure against its target, a table of them, and
the markdown report with the machine, the versions and every measurement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._profiles import PY_SPY_RATE
from ._sql import QUERIES
from ._suite import TARGETS


def summary(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per figure the issue asks for: what was measured, at what size, the target."""
    rows: list[dict[str, str]] = []

    def add(name: str, figure: str, at: str, target: str = "", met: bool | None = None) -> None:
        rows.append(
            {
                "measurement": name,
                "figure": figure,
                "at": at,
                "target": target,
                "met": "" if met is None else ("yes" if met else "no"),
            }
        )

    if "ingest" in results:
        for r in results["ingest"]["sizes"]:
            add(
                "ingest",
                f"{r['events_per_s']:,.0f} events/s",
                f"{r['customers']:,} customers, {r['events']:,} events",
                TARGETS["ingest"],
                r["events_per_s"] >= 100_000,
            )
    if "latency" in results:
        for r in results["latency"]["rates"]:
            p = r["latency_ms"]
            add(
                "latency",
                f"p50 {p['p50']:.1f} / p99 {p['p99']:.1f} / max {p['max']:.1f} ms",
                f"{r['offered_per_s']:,}/s offered ({r['achieved_publish_per_s']:,.0f} published,"
                f" {r['applied_per_s']:,.0f} applied)"
                + (", above capacity" if r["above_capacity"] else ""),
                TARGETS["latency"] if r["offered_per_s"] == 20_000 else "",
                p["p99"] <= 50 if r["offered_per_s"] == 20_000 else None,
            )
    if "deadlines" in results:
        r = results["deadlines"]
        for key in ("all", "burst"):
            p = r["lateness_ms"][key]
            add(
                "deadlines" if key == "all" else "deadlines (one-second burst)",
                f"p50 {p['p50']:.1f} / p99 {p['p99']:.1f} / max {p['max']:.1f} ms",
                f"{p['count']:,} fired, {r['pending_at_warm']:,} pending",
                TARGETS["deadlines"] if key == "all" else "",
                p["p99"] <= 100 if key == "all" and r["customers"] >= 1_000_000 else None,
            )
    if "uniform" in results:
        r = results["uniform"]
        p = r["lateness_ms"]["uniform"]
        add(
            "deadlines (uniform)",
            f"p50 {p['p50']:.1f} / p99 {p['p99']:.1f} / max {p['max']:.1f} ms",
            f"{p['count']:,} fired at {r['rate_per_s']:,}/s, {r['pending_at_warm']:,} pending",
            TARGETS["uniform"],
            p["p99"] <= 100 if r["customers"] >= 1_000_000 else None,
        )
    if "replay" in results:
        r = results["replay"]
        add(
            "replay",
            f"{r['events_per_s']:,.0f} events/s",
            f"{r['events']:,} events, {r['customers']:,} customers",
            TARGETS["replay"],
            r["events_per_s"] >= 500_000,
        )
    if "rebuild" in results:
        # The largest start of each population (smaller ones are in the report's table).
        largest = {
            r["population"]: r
            for r in results["rebuild"]["starts"]
            if r["population"] != "profiled"
        }
        for r in largest.values():
            add(
                "rebuild from snapshots",
                f"ready {r['ready_s']:.2f} s, warm {r['warm_s']:.2f} s",
                f"{r['customers']:,} customers ({r['population']})",
                TARGETS["rebuild"] if r["customers"] >= 1_000_000 else "",
                r["warm_s"] <= 10 if r["customers"] >= 1_000_000 else None,
            )
    if "memory" in results:
        once = {(r["population"], r["customers"]): r for r in results["memory"]["engines"]}
        for r in once.values():
            bare = r["population"] == "bare"
            add(
                "memory",
                f"{r['bytes_per_customer']:,.0f} B/customer",
                f"{r['customers']:,} customers, "
                + {
                    "bare": "no event windows (identify only)",
                    "typical": "small event windows (1 to 6 events)",
                    "history": "generated histories (about 33 events each)",
                }[r["population"]],
                TARGETS["memory"] if bare else "",
                r["bytes_per_customer"] <= 1024 if bare else None,
            )
    if "sql" in results:
        for r in results["sql"]["scales"]:
            agree = sum(a["equal"] for a in r["agreement"].values())
            add(
                "sql recompute",
                f"{r['recompute_s']:.2f} s per full recompute",
                f"{r['customers']:,} customers, {r['rows']:,} rows; {agree}/{len(r['agreement'])}"
                " segments agree",
            )
            add(
                "sql vs shoal",
                f"1 recompute = {r['recompute_over_shoal_event']:,.0f} events through shoal",
                f"{r['customers']:,} customers: SQL recompute {r['recompute_s']:.2f} s / shoal "
                f"{r['shoal_us_per_event']:.0f} us per event ({r['shoal_basis']}); every 15 min "
                f"SQL costs what shoal spends on "
                f"{r['staleness']['15']['break_even_events_per_s']:,.1f} events/s "
                f"(this history: {r['history_events_per_s']:,.2f}/s)",
            )
    if "consumer" in results:
        r = results["consumer"]
        add("nats-py consumer alone", f"{r['consume_per_s']:,.0f} msgs/s", r["variant"])
    return rows


def table(rows: list[dict[str, str]]) -> Iterator[str]:
    yield "| measurement | figure | at | target | met |"
    yield "|---|---|---|---|---|"
    for r in rows:
        yield f"| {r['measurement']} | {r['figure']} | {r['at']} | {r['target']} | {r['met']} |"


def _gc(r: dict[str, Any]) -> str:
    """GC seconds (full collections) | the longest event-loop stall, or dashes when the
    results predate these figures."""
    if "engine_gc_s" not in r:
        return "- | -"
    return f"{r['engine_gc_s']:.2f} ({r['engine_gc_full']}) | {r['max_stall_s']:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    res = doc["results"]
    out = [
        f"# shoal benchmark, {doc['mode']} mode",
        "",
        f"Script: `python -m scripts.bench` (`scripts/bench/_suite.py`'s docstring says what "
        "each measurement does). "
        f"Run on {doc['started_at']}, {doc['duration_s']:.0f} s.",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "## Machine and code",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; load average "
        f"{doc['load_before']} before, {doc['load_after']} after (shared machine: compare "
        "ratios within a run).",
        f"- Python {m['python']}, msgspec {m['msgspec']}, nats-py {m['nats_py']}, nats-server "
        f"{doc['nats_server']}, SQLite {m['sqlite']}, aiosqlite {m['aiosqlite']}.",
        f"- Code: {m['code']}.",
        "",
        "## Summary",
        "",
        *table(doc["summary"]),
        "",
    ]
    if not doc["complete"]:
        out += ["**Partial: the run has not finished (or stopped early).**", ""]
    if doc["not_run"]:
        out += [f"Not run: {', '.join(doc['not_run'])}.", ""]
    for name, error in doc["failed"].items():
        out += [f"Failed: {name}: `{error}`.", ""]
    if "ingest" in res:
        out += [
            "## Ingest",
            "",
            "| customers | events | s | events/s | transitions | engine CPU main / other s "
            "| broker CPU s | producer CPU s | RSS warm / end MiB | engine GC s (full) "
            "| longest loop stall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["ingest"]["sizes"]:
            out.append(
                f"| {r['customers']:,} | {r['events']:,} | {r['seconds']:.2f} "
                f"| {r['events_per_s']:,.0f} | {r['transitions']:,} "
                f"| {r['engine_cpu_main_s']:.1f} / {r['engine_cpu_threads_s']:.1f} "
                f"| {r['broker_cpu_s']:.1f} | {r['producer_cpu_s']:.1f} "
                f"| {r['rss_warm_mib']:.0f} / {r['rss_end_mib']:.0f} | {_gc(r)} |"
            )
        out.append("")
    if "latency" in res:
        out += [
            f"## Event-to-transition latency ({res['latency']['customers']:,} customers)",
            "",
            "| offered/s | published/s | applied/s | transitions | p50 ms | p90 ms | p99 ms "
            "| max ms | drained s after publishing | engine GC s (full) | longest loop stall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["latency"]["rates"]:
            p = r["latency_ms"]
            out.append(
                f"| {r['offered_per_s']:,} | {r['achieved_publish_per_s']:,.0f} "
                f"| {r['applied_per_s']:,.0f} | {p['count']:,} | {p['p50']:.1f} | {p['p90']:.1f} "
                f"| {p['p99']:.1f} | {p['max']:.1f} | {r['drain_after_publish_s']:.1f} "
                f"| {_gc(r)} |"
            )
        out += [
            "",
            "Above the engine's capacity the stream holds a growing backlog: latency is then "
            "the time the backlog takes to drain, and grows with the length of the run.",
            "",
        ]
    if "deadlines" in res:
        r = res["deadlines"]
        out += [
            f"## Deadline lateness ({r['customers']:,} customers, {r['pending_at_warm']:,} "
            f"pending at warm; {r['due_in_one_second']:,} due in one second, then spread over "
            f"{r['spread_over_s']} s; engine warm before the first was due: "
            f"{r['warm_before_due']})",
            "",
            "| deadlines | fired | firing rounds | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, p in r["lateness_ms"].items():
            out.append(
                f"| {key} | {p['count']:,} | {p['rounds']:,} | {p['p50']:.1f} | {p['p90']:.1f} "
                f"| {p['p99']:.1f} | {p['max']:.1f} |"
            )
        out += ["", f"Engine GC s (full collections) | longest loop stall s: {_gc(r)}.", ""]
    if "uniform" in res:
        r = res["uniform"]
        p = r["lateness_ms"]["uniform"]
        out += [
            f"## Deadline lateness, due uniformly ({r['customers']:,} customers, "
            f"{r['pending_at_warm']:,} pending at warm, due at {r['rate_per_s']:,}/s over "
            f"{r['span_s']:g} s; engine warm before the first was due: {r['warm_before_due']})",
            "",
            "| fired | firing rounds | p50 ms | p90 ms | p99 ms | max ms |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {p['count']:,} | {p['rounds']:,} | {p['p50']:.1f} | {p['p90']:.1f} "
            f"| {p['p99']:.1f} | {p['max']:.1f} |",
            "",
            f"Engine GC s (full collections) | longest loop stall s: {_gc(r)}.",
            "",
        ]
    if "replay" in res:
        r = res["replay"]
        out += [
            "## Replay",
            "",
            f"{r['events']:,} events ({r['customers']:,} customers, {r['days']} days, "
            f"`shoal generate` seed 7): {r['seconds']:.2f} s, {r['events_per_s']:,.0f} "
            f"events/s, {r['transitions']:,} transitions.",
            "",
        ]
    if "rebuild" in res or "memory" in res:
        out += [
            "## Engine starts from snapshots (rebuild) and memory",
            "",
            "| population | customers | ready s | warm s | RSS before / warm MiB "
            "| bytes/customer |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for w in sorted(doc["warm"], key=lambda w: (w["population"], w["customers"])):
            out.append(
                f"| {w['population']} | {w['customers']:,} | {w['ready_s']:.2f} "
                f"| {w['warm_s']:.2f} | {w['rss_base_mib']:.0f} / {w['rss_warm_mib']:.0f} "
                f"| {w['bytes_per_customer']:,.0f} |"
            )
        out += [
            "",
            "*typical*: an identify and 1 to 6 track events (event windows); *bare*: an "
            "identify only (no event windows); *history*: customers of a `shoal generate` "
            "history of the last 120 days (about 33 events each); *deadlines*: the lateness "
            "store; *profiled*: the engine under py-spy. RSS after `gc.collect()`; "
            "bytes/customer is (warm - before) / customers, so small stores carry the "
            "engine's fixed costs.",
            "",
        ]
    if "sql" in res:
        r = res["sql"]
        out += [
            "## SQL baseline",
            "",
            f"A `shoal generate` history of {r['base_customers']:,} customers over "
            f"{r['days']} days ({r['base_events']:,} events, "
            f"{r['events_per_customer_day']:.2f} per customer and day), loaded from its "
            "JSON lines into SQLite and cloned to size. shoal's members come from a replay "
            f"of the base history ({r['shoal_us_per_event_replay']:.1f} us per event), "
            "times the clones. Queries: `scripts/bench/_sql.py`.",
            "",
            "*ratio*: one full SQL recompute against one event through shoal (its cost per "
            "event from this run's ingest at the nearest size, else from the replay). *CPU per "
            "hour*: keeping the segments current for an hour at this history's event rate "
            "(shoal: that many events; SQL: a recompute every 15 or 60 minutes). *Break-even*: "
            "the event rate at which shoal would spend what SQL every 15 minutes spends. "
            "*Staleness*: how old a membership is when read, on average and at worst, with a "
            "recompute every 15 minutes: a run's results show the data as of its start, from "
            "its end until the next run's end (time-based changes wait for the next run; "
            "shoal's are on time, see the deadline lateness). A recompute longer than the "
            "interval cannot keep to it: the runs then go back to back, using a whole core.",
            "",
            "| customers | rows | recompute s | SQL us per row | shoal us per event | ratio "
            "| events/s of this history | CPU s per hour: shoal / SQL every 15 min / every 60 min "
            "| break-even events/s, every 15 min | staleness mean / max s, every 15 min |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in r["scales"]:
            st = s["staleness"]
            out.append(
                f"| {s['customers']:,} | {s['rows']:,} | {s['recompute_s']:.2f} "
                f"| {s['sql_us_per_row']:.2f} | {s['shoal_us_per_event']:.0f} "
                f"| {s['recompute_over_shoal_event']:,.0f} "
                f"| {s['history_events_per_s']:,.1f} "
                f"| {s['shoal_cpu_s_per_hour']:.1f} / {st['15']['sql_cpu_s_per_hour']:.1f} / "
                f"{st['60']['sql_cpu_s_per_hour']:.1f} "
                f"| {st['15']['break_even_events_per_s']:,.0f} "
                f"| {st['15']['mean_s']:.0f} / {st['15']['max_s']:.0f}"
                + ("" if st["15"]["feasible"] else " (runs back to back: longer than 15 min)")
                + " |"
            )
        out += ["", "Members per segment at the history's end, SQL against shoal:", ""]
        out += [
            "| segment | "
            + " | ".join(f"{s['customers']:,} SQL / shoal" for s in r["scales"])
            + " | seconds |"
        ]
        out += ["|---|" + "---:|" * (len(r["scales"]) + 1)]
        for seg in QUERIES:
            cells = []
            for s in r["scales"]:
                a = s["agreement"][seg]
                mark = "" if a["equal"] else " (differs)"
                cells.append(f"{a['sql']:,} / {a['shoal']:,}{mark}")
            secs = " / ".join(f"{s['query_s'][seg]:.2f}" for s in r["scales"])
            out.append(f"| {seg} | " + " | ".join(cells) + f" | {secs} |")
        out += ["", "Approximated in SQL:", ""]
        out += [f"- `{k}`: {v}." for k, v in r["approximated"].items()]
        out.append("")
    if "consumer" in res:
        r = res["consumer"]
        out += [
            "## nats-py consumer ceiling",
            "",
            f"{r['messages']:,} events, `scripts.bench.consumer`'s `{r['variant']}` (push "
            f"consumer, `AckPolicy.ALL`, decode only): {r['consume_per_s']:,.0f} msgs/s "
            f"(publish_async {r['publish_async_per_s']:,.0f}/s).",
            "",
        ]
    profiled = [
        n for n in ("ingest", "deadlines", "uniform", "replay") if "profile" in res.get(n, {})
    ]
    if profiled:
        out += [
            "## Profiles (py-spy)",
            "",
            f"`py-spy record --rate {PY_SPY_RATE} --function --nonblocking` on a child "
            "process: it samples "
            "the threads while they run (a thread waiting is not sampled, so the percentages "
            "are of the CPU time), and costs the process little, unlike a deterministic "
            "profiler. Self: the function was running; inclusive: it was on the stack "
            "(counted once per sample). A C extension has no frame of its own: msgspec's and "
            "sqlite3's work, and garbage collection, count to the Python function running. "
            "A thread that is woken but waits for a free core or for the GIL counts as running "
            "(on a busy machine, a share of the event loop's waits: *waiting*). "
            "The collapsed stacks (for flamegraph.pl or speedscope) are in `--out`'s "
            "`profiles/`.",
            "",
        ]
    for name in profiled:
        r = res[name]
        prof = r["profile"]
        if name == "ingest":
            p = r["profiled"]
            out += [
                "### The engine during ingest",
                "",
                f"One more ingest run at {p['customers']:,} customers, the engine child under "
                f"py-spy ({p['events_per_s']:,.0f} events/s under the profiler; the samples "
                "include its start and warm-up).",
            ]
        elif name == "uniform":
            p = r["profiled"]["lateness_ms"]["uniform"]
            out += [
                "### The engine firing deadlines due uniformly",
                "",
                f"One more uniform run at {r['profiled']['customers']:,} customers, the engine "
                f"child under py-spy (lateness p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms "
                "under the profiler): the whole child, loading the store included, then the "
                "stacks through `Deadlines.fire_due` and `Deadlines.prepare` alone.",
            ]
        elif name == "deadlines":
            p = r["profiled"]["lateness_ms"]["all"]
            out += [
                "### The engine firing deadlines",
                "",
                f"One more deadline run at {r['profiled']['customers']:,} customers, the "
                f"engine child under py-spy (lateness p99 {p['p99']:.1f} ms, max "
                f"{p['max']:.1f} ms under the profiler): the whole child, loading the store "
                "included, then the stacks through `Engine._fire_due` alone.",
            ]
        else:
            p = r["profiled"]
            out += [
                "### The replay",
                "",
                f"The same replay in a child under py-spy, {p['repeats']} time(s) over "
                f"{p['seconds']:.1f} s; the stacks through `actors.replay` alone (not the "
                "generation of the history).",
            ]
        errors = prof["py_spy_errors"]
        out += [
            "",
            f"Collapsed stacks: `{prof['collapsed']}`"
            + ("" if errors is None else f" (py-spy errors: {errors})")
            + ".",
            "",
            "```",
            prof["text"],
            "```",
            "",
        ]
    return "\n".join(out) + "\n"
