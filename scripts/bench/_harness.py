"""The one engine harness of the benchmarks: ``engine_on`` is the only place that builds an
``Engine``; and the engine in a child process, driven from the load generator.

The suite runs the engine in a child process (``python -m scripts.bench._harness``), so that
its RSS and CPU are its own and the load generator (the parent) competes with it for the
cores as a separate producer would. The child reads one command per line on stdin and
answers with one JSON object per line on stdout:

- at start: ``{"ev": "ready", ...}`` when ``tg.start(engine.run)`` returned, then
  ``{"ev": "warm", ...}`` once every customer is in memory (with RSS after a
  ``gc.collect()``);
- ``stats``: the engine's counters, RSS, CPU seconds of its main thread and other threads,
  garbage-collection seconds, and the longest event-loop stall since the last ``mark``;
- ``mark``: as ``stats``, and the longest stall starts again from zero;
- ``lateness <json windows>``: lateness (fired-at minus due-at, both on the engine's
  ``SystemClock``) of the deadlines fired so far, overall and per window of due instants;
- ``stop`` (or end of input): a clean stop, answered with ``{"ev": "stopped", ...}``.

With ``profile``, the child runs under ``py-spy record`` (``_profiles.py_spy_command``):
py-spy starts it, samples it until it exits, then writes its collapsed stacks. Attaching
py-spy to a running child (``--pid``) fails where ptrace is restricted (it did on the machine
this was written on), so py-spy wraps the child instead. The child keeps py-spy's stdin and
stdout; py-spy's own messages (``py-spy> ...``) go to the same stdout, and the parent skips
every line that is not a JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from nats.aio.client import Client

from actors import Engine, EngineConfig, EngineObserver, SegmentSet, load_segments
from protocol import NEVER
from protocol.nats import connect, jetstream_ports
from store import Store

from ._common import ROOT, CpuSnapshot, GcClock, LoopWatch, percentiles, rss_mib
from ._profiles import py_spy_command


@dataclass(frozen=True, slots=True)
class BenchEngine:
    """An engine built by ``engine_on``, with the store and the connection it runs on."""

    engine: Engine
    log: Store
    nc: Client


@contextlib.asynccontextmanager
async def engine_on(
    url: str,
    db: Path,
    segments: SegmentSet,
    *,
    config: EngineConfig | None = None,
    observer: EngineObserver | None = None,
) -> AsyncIterator[BenchEngine]:
    """An engine (not started: ``await tg.start(b.engine.run)``) on the store ``db`` and the
    broker at ``url``; the store and the connection are closed on the way out.

    Every benchmark builds its engines here and nowhere else, so that a change to the
    ``Engine``'s constructor is made once.
    """
    log = await Store.open(db)
    try:
        nc = await connect([url])
        try:
            source, sink = await jetstream_ports(nc)
            config = config or EngineConfig()
            engine = Engine(source, sink, log, segments, config=config, observer=observer)
            yield BenchEngine(engine, log, nc)
        finally:
            await nc.close()
    finally:
        await log.close()


# --------------------------------------------------------------------------- the child


class LatenessObserver:
    """Keeps, for every deadline fired, the instant it was due and the engine's clock when
    it fired (``EngineObserver``)."""

    def __init__(self) -> None:
        self.due = array("q")
        self.fired = array("q")

    def timing_commit(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def deadlines_fired(self, fired_at: int, due: Sequence[int]) -> None:
        self.due.extend(due)
        self.fired.extend([fired_at] * len(due))

    def summary(self, windows: dict[str, list[int]]) -> dict[str, Any]:
        """Lateness in ms: overall and for the deadlines due within each [lo, hi) window;
        plus how many distinct clock readings (firing rounds) they took."""
        out: dict[str, Any] = {}
        pairs = list(zip(self.due, self.fired, strict=True))
        for name, (lo, hi) in {"all": [-NEVER, NEVER], **windows}.items():
            sel = [(d, f) for d, f in pairs if lo <= d < hi]
            out[name] = percentiles([(f - d) / 1000 for d, f in sel])
            out[name]["rounds"] = len({f for _, f in sel})
        return out


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _cpu() -> dict[str, float]:
    c = CpuSnapshot.take()
    return {"cpu_main": c.main, "cpu_threads": c.process - c.main}


async def child(db: Path, url: str) -> None:
    """Run an engine on ``db`` against ``url`` and answer commands until told to stop."""
    from scripts._logging import configure_logging

    configure_logging("warning")
    segments = load_segments()
    gc.collect()
    base = rss_mib()
    observer = LatenessObserver()
    async with engine_on(url, db, segments, observer=observer) as bench:
        engine = bench.engine
        gc_clock = GcClock()
        # The longest the event loop was held by one piece of work since the last ``mark``.
        watch = LoopWatch()

        def stats(ev: str) -> dict[str, Any]:
            return {
                "ev": ev,
                **asdict(engine.stats),
                "customers": engine.customer_count,
                "pending_deadlines": engine.pending_deadlines,
                "warm": engine.warm,
                "rss_mib": rss_mib(),
                "rss_base_mib": base,
                "gc_s": gc_clock.seconds,
                "gc_full": gc_clock.full,
                "max_stall_s": watch.longest,
                **_cpu(),
            }

        async with anyio.create_task_group() as tg:
            t0 = time.perf_counter()
            await tg.start(engine.run)
            _emit({**stats("ready"), "seconds": time.perf_counter() - t0})

            async def watch_warm() -> None:
                while not engine.warm:
                    await anyio.sleep(0.01)
                t = time.perf_counter() - t0
                gc.collect()
                _emit({**stats("warm"), "seconds": t})

            tg.start_soon(watch_warm)
            tg.start_soon(watch.run)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                cmd, _, arg = line.strip().partition(" ")
                if cmd in ("", "stop"):
                    break
                if cmd == "stats":
                    _emit(stats("stats"))
                elif cmd == "mark":
                    watch.longest = 0.0
                    _emit(stats("mark"))
                elif cmd == "lateness":
                    _emit({"ev": "lateness", **observer.summary(json.loads(arg or "{}"))})
            t1 = time.perf_counter()
            tg.cancel_scope.cancel()
        _emit({**stats("stopped"), "stop_s": time.perf_counter() - t1})


# --------------------------------------------------------------------------- the parent


class EngineProcess:
    """The engine child, seen from the load generator."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self._proc = proc
        self._buf = b""
        self._seen: dict[str, dict[str, Any]] = {}
        self.spy: list[str] = []
        """py-spy's own messages, when the child runs under it."""

    async def _line(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        while True:
            while b"\n" not in self._buf:
                try:
                    self._buf += await self._proc.stdout.receive()
                except anyio.EndOfStream:
                    raise RuntimeError(
                        f"engine child exited ({await self._proc.wait()}); see its log"
                    ) from None
            line, _, self._buf = self._buf.partition(b"\n")
            if line.startswith(b"{"):
                doc: dict[str, Any] = json.loads(line)
                return doc
            if line.strip():
                self.spy.append(line.decode(errors="replace"))

    async def wait(self, ev: str, timeout: float) -> dict[str, Any]:
        """The next (or an already received) message ``ev``."""
        with anyio.fail_after(timeout):
            while ev not in self._seen:
                doc = await self._line()
                self._seen[doc["ev"]] = doc
        return self._seen.pop(ev)

    async def ask(self, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self._proc.stdin is not None
        await self._proc.stdin.send(cmd.encode() + b"\n")
        return await self.wait(cmd.split(" ", 1)[0], timeout)

    async def stop(self, timeout: float = 600.0) -> dict[str, Any]:
        """A clean stop; returns the final stats once the process exited (under py-spy:
        once py-spy wrote its profile)."""
        assert self._proc.stdin is not None
        await self._proc.stdin.send(b"stop\n")
        doc = await self.wait("stopped", timeout)
        with anyio.fail_after(120):
            # To the end of the output: py-spy's last messages (samples and errors).
            with contextlib.suppress(RuntimeError):
                while True:
                    await self._line()
            await self._proc.wait()
        return doc


@contextlib.asynccontextmanager
async def engine_process(
    db: Path, url: str, log_path: Path, *, profile: Path | None = None
) -> AsyncIterator[EngineProcess]:
    """Start the engine child on ``db`` (under py-spy, writing collapsed stacks to
    ``profile``, if given); kill it on the way out if it is still running."""
    spy = py_spy_command(profile) if profile is not None else []
    cmd = [*spy, sys.executable, "-m", "scripts.bench._harness", "--db", str(db), "--url", url]
    with open(log_path, "ab") as err:
        proc = await anyio.open_process(cmd, stderr=err, cwd=ROOT)
    try:
        yield EngineProcess(proc)
    finally:
        if proc.returncode is None:
            with anyio.CancelScope(shield=True):
                if profile is not None:
                    # Killing py-spy would leave the engine running: end of input stops the
                    # engine, and py-spy exits after it.
                    assert proc.stdin is not None
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await proc.stdin.aclose()
                    with anyio.move_on_after(30):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def wait_drained(
    ep: EngineProcess, applied: int, timeout: float, poll: float = 0.05
) -> tuple[float, dict[str, Any]]:
    """Poll until the engine applied ``applied`` events and published every transition it
    committed; returns the perf_counter instant and the stats."""
    with anyio.fail_after(timeout):
        while True:
            st = await ep.ask("stats")
            if st["events_applied"] >= applied and st["transitions_published"] == st["transitions"]:
                return time.perf_counter(), st
            await anyio.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shoal bench: the engine child process")
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--url", required=True)
    args = parser.parse_args(argv)
    anyio.run(child, args.db, args.url)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
