"""One restart of ``restart``, in a fresh process: an engine (``_harness.engine_on``) started
on the store, timed to ready, warm, caught up and through its clean stop, with the work of
its rebuild methods timed; and the parent's side, which runs that process."""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from actors import Engine, EngineConfig, load_segments

from ._common import (
    ROOT,
    CpuSnapshot,
    GcClock,
    LoopWatch,
    Timers,
    cprofile_text,
    now_us,
    rss_mib,
    say,
)
from ._harness import engine_on
from ._machine import code_digest, loadavg
from ._restart_store import deadline_spread

POLL = 0.01
STALL_TICK = 0.05
"""Seconds the event-loop watcher sleeps; a wake-up later than twice that is a stall."""


class _ReadyMark:
    """A task status that calls ``on_started`` at the very instant the engine says it is
    started, before passing it on (``tg.start`` returns later: after the engine's next
    suspension, which may be a whole turn of its loop)."""

    def __init__(self, inner: anyio.abc.TaskStatus[None], on_started: Callable[[], None]) -> None:
        self._inner = inner
        self._on_started = on_started

    def started(self, value: None = None) -> None:
        self._on_started()
        self._inner.started()


@dataclass
class _Mark:
    """What the engine and the process look like at one instant."""

    t: float
    cpu: CpuSnapshot
    gc: tuple[float, int]
    rss: float
    customers: int
    warm: bool
    stats: dict[str, int]
    timers: dict[str, tuple[float, int]]

    @classmethod
    def take(cls, engine: Engine, timers: Timers, gc_clock: GcClock) -> _Mark:
        return cls(
            t=time.perf_counter(),
            cpu=CpuSnapshot.take(),
            gc=gc_clock.take(),
            rss=rss_mib(),
            customers=engine.customer_count,
            warm=engine.warm,
            stats=msgspec.structs.asdict(_Stats.of(engine)),
            timers=timers.take(),
        )

    def since(self, before: _Mark) -> dict[str, float]:
        return {
            "seconds": round(self.t - before.t, 3),
            "cpu_main": round(self.cpu.main - before.cpu.main, 2),
            "cpu_threads": round(
                (self.cpu.process - self.cpu.main) - (before.cpu.process - before.cpu.main), 2
            ),
            "gc_seconds": round(self.gc[0] - before.gc[0], 2),
            "gc_full": self.gc[1] - before.gc[1],
        }


async def restart_child(p: dict[str, Any]) -> dict[str, Any]:
    """One restart, in this (fresh) process; returns its figures (with ``failed`` set, and
    what is known so far, if the engine failed)."""
    db = Path(p["db"])
    segments = load_segments()
    out: dict[str, Any] = {"label": p["label"], "use_snapshots": p["use_snapshots"]}
    out["code"] = code_digest()
    if p["use_snapshots"]:
        out["deadlines"] = deadline_spread(db, now_us())
    gc.collect()
    gc_clock = GcClock()
    out["rss_start"] = round(rss_mib())
    timers = Timers()
    profiles: dict[str, cProfile.Profile] = {}
    marks: dict[str, _Mark] = {}
    watch = LoopWatch(STALL_TICK)
    start_clock = 0
    t = time.perf_counter()
    config = EngineConfig(use_snapshots=p["use_snapshots"])
    async with engine_on(p["url"], db, segments, config=config) as bench:
        out["open_s"] = round(time.perf_counter() - t, 3)  # the store opened, NATS connected
        engine = bench.engine
        # Labelled as before the engine was assembled from parts, so reports compare.
        timers.wrap(engine, "_rebuild")
        timers.wrap(engine._recovery, "page", "_page")
        timers.wrap(engine._recovery, "load", "_load")
        timers.wrap(engine._recovery, "_load_from_log")
        timers.wrap(engine._snapshots, "flush", "_flush_snapshots")

        def on_started() -> None:
            if p["profile"]:
                profiles["start to ready"].disable()
            marks["ready"] = _Mark.take(engine, timers, gc_clock)
            # Not timed: customers in memory whose deadline was due when the restart began.
            due = engine._partition._timers._due.values()
            out["overdue_at_ready"] = sum(1 for at in due if at <= start_clock)
            if p["profile"]:
                profiles["ready to caught up"] = cProfile.Profile()
                profiles["ready to caught up"].enable()

        async def run_engine(
            *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            await engine.run(task_status=_ReadyMark(task_status, on_started))

        def caught_up() -> bool:
            nxt = engine._partition._timers.next()
            return nxt is None or nxt > start_clock

        out["rss_before"] = round(rss_mib())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch.run)
                await anyio.sleep(0)
                start_clock = now_us()
                marks["start"] = _Mark.take(engine, timers, gc_clock)
                if p["profile"]:
                    profiles["start to ready"] = cProfile.Profile()
                    profiles["start to ready"].enable()
                await tg.start(run_engine)
                out["tg_start_returned_s"] = round(time.perf_counter() - marks["start"].t, 3)
                with anyio.fail_after(p["timeout"]):
                    while not engine.warm:
                        await anyio.sleep(POLL)
                    marks["warm"] = _Mark.take(engine, timers, gc_clock)
                    # Every deadline that was due when the restart began has fired.
                    while not caught_up():
                        await anyio.sleep(POLL)
                if p["profile"]:
                    profiles["ready to caught up"].disable()
                marks["caught_up"] = _Mark.take(engine, timers, gc_clock)
                out["pending_deadlines"] = engine.pending_deadlines
                # Let the publisher catch up, so the next restart does not republish.
                with anyio.fail_after(p["timeout"]):
                    while engine.stats.transitions_published < engine.stats.transitions:
                        await anyio.sleep(POLL)
                out["dirty_at_stop"] = len(engine._partition.changed or ())
                marks["stop"] = _Mark.take(engine, timers, gc_clock)
                tg.cancel_scope.cancel()
            marks["stopped"] = _Mark.take(engine, timers, gc_clock)
        except Exception as e:
            for prof in profiles.values():
                prof.disable()
            out["failed"] = _leaf(e)
            if "start" not in marks:
                raise
            out["failed_after_s"] = round(time.perf_counter() - marks["start"].t, 3)
            out["timers_failed"] = timers.take()
        out["reconnects"] = bench.nc.stats["reconnects"]
        out["loadavg"] = loadavg()
        out["rss_peak"] = round(rss_mib("VmHWM"))
    stalls = watch.stalls
    t0 = marks["start"].t
    out["long_stalls"] = [
        [round(at - late - t0, 2), round(late, 2)] for at, late in stalls if late >= 1.0
    ]
    if profiles:
        out["profile"] = {k: cprofile_text(v) for k, v in profiles.items()}
    if "failed" in out:
        out["stalls"] = {"start to failure": round(max((x for _, x in stalls), default=0.0), 2)}
        return out

    start, ready, warm, caught = marks["start"], marks["ready"], marks["warm"], marks["caught_up"]
    stop, stopped = marks["stop"], marks["stopped"]
    if ready.warm:  # log only: the poll saw it only once tg.start had returned
        warm = ready

    def longest(a: _Mark, b: _Mark) -> float:
        return round(max((x for at, x in stalls if a.t < at <= b.t), default=0.0), 2)

    out.update(
        ready_s=round(ready.t - start.t, 3),
        warm_s=round(warm.t - start.t, 3),
        caught_up_s=round(max(caught.t, warm.t) - start.t, 3),
        stop_s=round(stopped.t - stop.t, 3),
        loaded_at_ready=ready.customers,
        loaded_at_warm=warm.customers,
        warm_at_ready=ready.warm,
        to_ready=ready.since(start),
        to_warm=warm.since(ready),
        to_caught_up=caught.since(warm),
        stopping=stopped.since(stop),
        stalls={
            "start to ready": longest(start, ready),
            "ready to warm": longest(ready, warm),
            "warm to caught up": longest(warm, caught),
            "clean stop": longest(stop, stopped),
        },
        rss_ready=round(ready.rss),
        rss_warm=round(max(warm.rss, caught.rss)),
        stats_ready=ready.stats,
        stats_warm=warm.stats,
        stats_caught_up=caught.stats,
        stats_stop=stop.stats,
        stats_end=stopped.stats,
        timers_ready=ready.timers,
        timers_warm=warm.timers,
        timers_caught_up=caught.timers,
        timers_end=stopped.timers,
    )
    return out


def _leaf(e: BaseException) -> str:
    """The innermost error of a (nested) exception group, as one line."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__module__}.{type(e).__name__}: {e}"


class _Stats(msgspec.Struct):
    """The engine's counters that matter here."""

    events_applied: int
    transitions: int
    transitions_published: int
    deadlines_fired: int
    rebuilt_events: int
    rebuilt_customers: int
    snapshots_loaded: int
    snapshots_ignored: int
    snapshots_written: int
    snapshot_rounds: int

    @classmethod
    def of(cls, engine: Engine) -> _Stats:
        s = engine.stats
        return cls(**{f: getattr(s, f) for f in cls.__struct_fields__})


async def restart(
    label: str,
    db: Path,
    url: str,
    *,
    use_snapshots: bool,
    args: argparse.Namespace,
    profile: bool = False,
) -> dict[str, Any]:
    """Run one restart in a fresh process; returns its figures."""
    params = {
        "label": label,
        "db": str(db),
        "url": url,
        "use_snapshots": use_snapshots,
        "profile": profile,
        "timeout": args.timeout,
    }
    cpu0 = CpuSnapshot.take()
    done = await anyio.run_process(
        [sys.executable, "-m", "scripts.bench.restart", "--child", json.dumps(params)],
        check=False,
        cwd=ROOT,
    )
    cpu1 = CpuSnapshot.take()
    sys.stderr.write(done.stderr.decode(errors="replace"))
    lines = done.stdout.decode().strip().splitlines()
    result: dict[str, Any]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        errors = done.stderr.decode(errors="replace").strip().splitlines() or ["?"]
        result = {"label": label, "failed": f"exit status {done.returncode}: {errors[-1]}"}
    result["cpu_broker"] = round(cpu1.broker - cpu0.broker, 2)
    if "failed" in result:
        say(f"  {label}: FAILED after {result.get('failed_after_s', '?')} s: {result['failed']}")
    else:
        say(
            f"  {label}: ready {result['ready_s']:.2f} s ({result['loaded_at_ready']:,} "
            f"customers), warm {result['warm_s']:.2f} s, caught up {result['caught_up_s']:.2f} "
            f"s, stop {result['stop_s']:.2f} s, RSS {result['rss_warm']:,} MiB, longest "
            f"event-loop stall {max(result['stalls'].values()):.2f} s"
        )
    return result
