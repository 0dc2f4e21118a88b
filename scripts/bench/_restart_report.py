"""``restart``'s report: the tables of snapshot cost, restarts and CPU, the markdown
report, and the facts its figures say."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    args: dict[str, Any]
    machine: dict[str, Any]
    date: str
    load_start: str
    load_end: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    snapshots: dict[str, Any] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    tails: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- report


def restart_table(restarts: list[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| restart | ready s | customers at ready | of them overdue | events replayed "
        "| warm s | caught up s | clean stop s (snapshots written) "
        "| RSS MiB: before / ready / warm |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for r in restarts:
        yield (
            f"| {r['label']} | {r['ready_s']:.2f} | {r['loaded_at_ready']:,} "
            f"| {r['overdue_at_ready']:,} | {r['stats_ready']['rebuilt_events']:,} "
            f"| {r['warm_s']:.2f} | {r['caught_up_s']:.2f} "
            f"| {r['stop_s']:.2f} ({_written_at_stop(r):,}) "
            f"| {r['rss_before']:,} / {r['rss_ready']:,} / {r['rss_warm']:,} |"
        )


def _written_at_stop(r: dict[str, Any]) -> int:
    return int(r["stats_end"]["snapshots_written"] - r["stats_stop"]["snapshots_written"])


def cpu_table(restarts: list[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| restart | span | wall s | CPU main thread s | CPU SQLite thread s "
        "| of which GC s (full collections) | deadlines fired | longest event-loop stall s |"
    )
    yield "|---|---|---:|---:|---:|---:|---:|---:|"
    for r in restarts:
        for span, key, before, after in (
            ("start to ready", "to_ready", None, "stats_ready"),
            ("ready to warm", "to_warm", "stats_ready", "stats_warm"),
            ("warm to caught up", "to_caught_up", "stats_warm", "stats_caught_up"),
            ("clean stop", "stopping", "stats_caught_up", "stats_end"),
        ):
            stall = {
                "to_ready": "start to ready",
                "to_warm": "ready to warm",
                "to_caught_up": "warm to caught up",
                "stopping": "clean stop",
            }[key]
            c = r[key]
            if key == "to_warm" and r["warm_at_ready"] or c["seconds"] < 0.005:
                continue
            fired = r[after]["deadlines_fired"] - (r[before]["deadlines_fired"] if before else 0)
            yield (
                f"| {r['label']} | {span} | {c['seconds']:.2f} | {c['cpu_main']:.2f} "
                f"| {c['cpu_threads']:.2f} | {c['gc_seconds']:.2f} ({c['gc_full']}) "
                f"| {fired:,} | {r['stalls'][stall]:.2f} |"
            )


def snapshot_table(s: dict[str, Any]) -> Iterator[str]:
    yield (
        "| write | customers | part | transactions | from_snapshot us | encode us "
        "| rows us | commit us | total us | CPU main / SQLite thread | GC s |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name, w in (
        ("all N, insert", s["full"]),
        ("sample, upsert", s["rewrite"][0]),
        ("sample, upsert", s["rewrite"][1]),
    ):
        total = w["rows_us"] + w["commit_us"]
        yield (
            f"| {name} | {w['customers']:,} | {w['part']:,} | {w['transactions']:,} "
            f"| {w['from_snapshot_us']} | {w['encode_us']} | {w['rows_us']} | {w['commit_us']} "
            f"| {total:.1f} | {w['cpu_main']:.2f} / {w['cpu_threads']:.2f} s "
            f"| {w['gc_seconds']:.2f} |"
        )


def breakdown_lines(r: dict[str, Any]) -> Iterator[str]:
    names = {
        "_rebuild": "`_rebuild` (tail, overdue pages; or the whole log)",
        "_page": "`_page` (a page of snapshots)",
        "_load": "`_load` (tail customers, and customers of events while warming)",
        "_load_from_log": "`_load_from_log`",
        "_flush_snapshots": "`_flush_snapshots` (clean stop)",
    }
    ready, warm, end = r["timers_ready"], r["timers_caught_up"], r["timers_end"]
    for key, label in names.items():
        a = ready.get(key, [0.0, 0])
        b = warm.get(key, [0.0, 0])
        c = end.get(key, [0.0, 0])
        if c[1] == 0:
            continue
        yield (
            f"| {r['label']} | {label} | {a[0]:.2f} s / {a[1]} | {b[0] - a[0]:.2f} s / "
            f"{b[1] - a[1]} | {c[0] - b[0]:.2f} s / {c[1] - b[1]} |"
        )


def markdown(report: Report, command: str) -> str:
    a = report.args
    m = report.machine
    b = report.build
    s = report.snapshots
    first = report.restarts[0]
    ok = [r for r in report.restarts if "failed" not in r]
    failed = [r for r in report.restarts if "failed" in r]
    spread = first["deadlines"]
    full = s["full"]
    all_n = full["commit_seconds"] + full["rows_us"] * a["customers"] / 1e6
    n = a["customers"]
    lines = [
        "# Restart time and snapshot cost",
        "",
        f"Script: `python -m scripts.bench.restart` (its docstring says exactly what it does). "
        f"Run on {report.date}.",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine and code",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, shared with other "
        f"engineers running tests (load average {report.load_start} at the start, "
        f"{report.load_end} at the end): compare ratios within the run.",
        f"- Python {m['python']}, SQLite {m['sqlite']}, msgspec {m['msgspec']}, aiosqlite "
        f"{m['aiosqlite']}, nats-py {m['nats_py']}; the store on the local disk (temporary "
        "directory).",
        f"- Code: {m['code']}; md5 (first 8 hex digits) of the packages the restarts ran: "
        + ", ".join(f"`{k}` {v}" for k, v in report.restarts[0]["code"].items())
        + (
            "."
            if all(r["code"] == report.restarts[0]["code"] for r in report.restarts)
            else " for the first restart; THE CODE CHANGED DURING THE RUN: "
            + "; ".join(f"{r['label']}: {r['code']}" for r in report.restarts)
        ),
        "",
        "## The store",
        "",
        f"- {n:,} customers cloned from {b['templates']:,} templates; "
        f"{b['template_events']:,} template events really applied with `Customer.apply` in "
        f"{b['template_seconds']} s ({b['apply_us']} us per event, default segments).",
        f"- Log: {b['events']:,} events ({b['events'] / n:.2f} per customer), outbox: "
        f"{b['transitions']:,} transitions ({b['transitions'] / n:.2f} per customer), all "
        f"published; written in {b['seconds']} s.",
        f"- Downtime {a['downtime']} h: the templates were advanced to "
        f"now - {a['downtime']} h, so deadlines that fell in the downtime (and in the minutes "
        "the build took) are overdue at restart a. Deadlines of the stored snapshots at "
        "restart a:",
        "",
        "| overdue | < 1 h | < 1 d | < 7 d | < 30 d | later | none |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{v:,} ({v / n:.1%})" for v in spread.values()) + " |",
        "",
        f"- SQLite file before the snapshots: {b['db_before_snapshots']['pages']:,} MiB; "
        f"after: {s['db_after']['pages']:,} MiB, of which the snapshots table and its "
        f"indexes {s['db_after']['snapshots_table']:,} MiB; at the end: "
        f"{s['db_end']['pages']:,} MiB (WAL {s['db_end']['wal']:,} MiB).",
        "",
        "## Snapshot cost",
        "",
        f"Per customer, in microseconds. Bytes per snapshot: {s['full']['bytes_mean']:.0f} "
        f"on average ({s['full']['bytes_min']} to {s['full']['bytes_max']}). "
        "`from_snapshot` is the builder making the actor from the template's snapshot "
        "(what loading one costs at restart, without the SQL and the checks; GC included); "
        "encode is `Customer.snapshot(outcomes=True)` alone; rows is the list "
        "`Engine._write_snapshots` makes (encode plus the `store.Snapshot` around it); commit is "
        "`Store.commit(snapshots=...)` wall time (parameter tuples, then the SQLite "
        'thread\'s work). "total" is what the engine spends per snapshot written: rows + '
        "commit. GC is the builder's garbage collections during that write.",
        "",
        *snapshot_table(s),
        "",
        f"All {n:,} written at a clean stop's part size: {all_n:.1f} s. "
        f"`SegmentSet.needs.fingerprint()` costs {s['needs_fingerprint_us']} us a call "
        "(before commit 2884e2c the engine paid it for every snapshot it loaded).",
        "",
        "## Restarts",
        "",
        "Each restart is a fresh process. *ready* is the instant the engine calls "
        "`task_status.started()` in `await tg.start(engine.run)` (consuming events, firing "
        "deadlines); *warm* is `engine.warm` (every customer in memory); *caught up*: no "
        'deadline left that was due when the restart began ("of them overdue": customers '
        'in memory at ready with such a deadline). "events replayed" is '
        "`stats.rebuilt_events` at ready. The clean stop is `cancel` to the task group's "
        "exit; it snapshots every customer that changed.",
        "",
        *restart_table(ok),
        "",
        "Where the time goes (CPU from `/proc`: the main thread runs the event loop, "
        "decoding and the actors; the other threads are aiosqlite's SQLite thread; GC is "
        "the main thread's garbage collections, timed with `gc.callbacks`):",
        "",
        *cpu_table(ok),
        "",
        "The event-loop stall is the longest a 50 ms sleep of a watcher task overslept: the "
        "longest stretch the loop spent in one piece of synchronous work. nats-py answers "
        "the server's PINGs only between such pieces; nats-server drops a client that "
        "leaves 2 PINGs, sent every 2 minutes, unanswered.",
        "",
    ]
    for i, t in enumerate(report.tails):
        lines.append(
            f"- Tail {i + 1}: {t['events']:,} events for {t['customers']:,} customers, "
            f"{t['transitions']:,} transitions, appended in {t['seconds']} s."
        )
    if failed:
        lines += ["", "Failed restarts:", ""]
    for r in failed:
        rebuild = r.get("timers_failed", {}).get("_rebuild", ["?", 0])[0]
        lines.append(
            f"- {r['label']}: **failed** after {r.get('failed_after_s', '?')} s: "
            f"`{r['failed']}`. `_rebuild` took {rebuild} s; longest event-loop stall "
            f"{r.get('stalls', {}).get('start to failure', '?')} s; NATS reconnects "
            f"{r.get('reconnects', '?')}; stalls of 1 s or more (s from the start, s long): "
            f"{r.get('long_stalls', '?')}."
        )
    lines += ["", "Engine stats:", ""]
    for r in ok:
        lines.append(
            f"- {r['label']}: at ready {_stats_text(r['stats_ready'])}; caught up "
            f"{_stats_text(r['stats_caught_up'])}; snapshots written while running "
            f"{r['stats_stop']['snapshots_written']:,} in "
            f"{r['stats_stop']['snapshot_rounds']} complete rounds; pending deadlines "
            f"{r['pending_deadlines']:,}; "
            f"customers changed at stop {r['dirty_at_stop']:,}; log open {r['open_s']} s; "
            f"`tg.start` returned {r['tg_start_returned_s']} s after the start; "
            f"peak RSS {r['rss_peak']:,} MiB; load average at its end {r['loadavg']}; "
            f"nats-server CPU {r['cpu_broker']} s; NATS "
            f"reconnects {r['reconnects']}; stalls of 1 s or more (s from the start, s long): "
            f"{r['long_stalls'] or 'none'}."
        )
    lines += [
        "",
        "Wrapped engine methods, wall seconds / calls (nested: `_page` and `_load` run inside "
        "`_rebuild` before ready):",
        "",
        "| restart | method | start to ready | ready to caught up | clean stop |",
        "|---|---|---:|---:|---:|",
    ]
    for r in ok:
        lines += breakdown_lines(r)
    lines += ["", "## Reading", "", *reading(report), ""]
    for r in report.restarts:
        for phase, text in r.get("profile", {}).items():
            lines += [
                f"### cProfile, {r['label']}: {phase} (main thread)",
                "",
                "```",
                text,
                "```",
                "",
            ]
    return "\n".join(lines)


def _stats_text(st: dict[str, int]) -> str:
    keys = ("rebuilt_customers", "snapshots_loaded", "deadlines_fired", "transitions")
    return ", ".join(f"{k} {st[k]:,}" for k in keys)


def reading(report: Report) -> Iterator[str]:
    """Facts the figures say, written out (the run's own numbers)."""
    for r in report.restarts:
        if "cProfile" in r["label"] or "failed" in r:
            continue
        cr, cw = r["to_ready"], r["to_warm"]
        rebuild = r["timers_ready"].get("_rebuild", [0.0, 0])[0]
        busy = cr["cpu_main"] + cr["cpu_threads"]
        text = (
            f"- {r['label']}: ready in {r['ready_s']:.2f} s, of which `_rebuild` "
            f"{rebuild:.2f} s ({rebuild / r['ready_s']:.0%}; the rest is streams, "
            f"publisher and consumer set-up). CPU to ready: main thread "
            f"{cr['cpu_main']:.2f} s (GC {cr['gc_seconds']:.2f} s), SQLite thread "
            f"{cr['cpu_threads']:.2f} s ({busy / r['ready_s']:.0%} of a core on average)."
        )
        if not r["warm_at_ready"]:
            pages = r["timers_warm"].get("_page", [0.0, 0])
            before = r["timers_ready"].get("_page", [0.0, 0])
            loaded = r["loaded_at_warm"] - r["loaded_at_ready"]
            text += (
                f" Warm-up: {loaded:,} more customers in {cw['seconds']:.2f} s "
                f"({cw['seconds'] / max(loaded, 1) * 1e6:.1f} us each), `_page` "
                f"{pages[0] - before[0]:.2f} s in {pages[1] - before[1]} calls; CPU main "
                f"{cw['cpu_main']:.2f} s (GC {cw['gc_seconds']:.2f} s), SQLite thread "
                f"{cw['cpu_threads']:.2f} s."
            )
        cc = r["to_caught_up"]
        if cc["seconds"] >= 0.05:
            fired = r["stats_caught_up"]["deadlines_fired"] - r["stats_warm"]["deadlines_fired"]
            made = r["stats_caught_up"]["transitions"] - r["stats_warm"]["transitions"]
            text += (
                f" Once warm, {cc['seconds']:.2f} s more until caught up: {fired:,} deadlines "
                f"fired ({made:,} transitions), CPU main {cc['cpu_main']:.2f} s."
            )
        yield text
