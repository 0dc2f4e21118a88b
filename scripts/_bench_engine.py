"""The engine side of ``scripts/bench.py``: stores built directly, an engine in a child
process, and the load generator that talks to it through a real broker.

Stores are built as ``scripts/bench_restart.py`` builds them, but with snapshots only: N
customers ``c<i>`` cloned from a few template actors (made by really applying events with
``Customer.apply`` under the default segments), written as the engine writes snapshots,
with the round's marks, and an empty event log. A fresh engine started on such a store
loads every customer from its snapshot in deadline order, exactly as after a clean stop.

The engine runs in a child process (``python -m scripts._bench_engine``), so that its RSS
and CPU are its own and the load generator (this process) competes with it for the cores
as a separate producer would. The child reads one command per line on stdin and answers
with one JSON object per line on stdout:

- at start: ``{"ev": "ready", ...}`` when ``tg.start(engine.run)`` returned, then
  ``{"ev": "warm", ...}`` once every customer is in memory (with RSS after a
  ``gc.collect()``);
- ``stats``: the engine's counters, RSS, CPU seconds of its main thread and other threads,
  garbage-collection seconds, and the longest event-loop stall since the last ``mark``;
- ``mark``: as ``stats``, and the longest stall starts again from zero;
- ``lateness <json windows>``: lateness (fired-at minus due-at, both on the engine's
  ``SystemClock``) of the deadlines fired so far, overall and per window of due instants;
- ``stop`` (or end of input): a clean stop, answered with ``{"ev": "stopped", ...}``.

With ``profile``, the child runs under ``py-spy record`` (``py_spy_command``): py-spy starts
it, samples it until it exits, then writes its collapsed stacks. Attaching py-spy to a
running child (``--pid``) fails where ptrace is restricted (it did on the machine this was
written on), so py-spy wraps the child instead. The child keeps py-spy's stdin and stdout;
py-spy's own messages (``py-spy> ...``) go to the same stdout, and the parent skips every
line that is not a JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import time
from array import array
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from actors import Customer, Engine, EngineConfig, Replay, SegmentSet, load_segments
from actors._customer import SNAPSHOT_FORMAT
from protocol import DAY, Event, connect, event_subject, format_instant
from scripts.bench_ingest import CpuSnapshot, now_us, rss_mb
from scripts.bench_restart import GcClock, Template, make_templates
from store import NEVER, EventLog, Snapshot, SnapshotMarks

PY_SPY_RATE = 250
"""Samples per second for ``py-spy record`` (its default is 100)."""

PART = 50_000
"""Snapshots per transaction while building a store (the engine's part at a clean stop)."""

_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------- statistics


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """count, p50, p90, p99 and max (nearest rank) of ``values``; zeros when empty."""
    if not values:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        return float(s[min(n - 1, max(0, int(q * n + 0.999999) - 1))])

    return {"count": n, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": s[-1]}


# --------------------------------------------------------------------------- stores


def bare_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """K customers whose only event is an ``identify`` (plan, renewal date, time zone) in
    the 90 days before ``cut``: actors with traits and memberships but no event windows."""
    rng = random.Random(43)
    out = []
    for j in range(k):
        at = cut - rng.randrange(DAY, 90 * DAY)
        renewal = (at + rng.randrange(DAY, 120 * DAY)) // DAY * DAY
        e = Event(
            kind="identify",
            customer_id=f"t{j}",
            name=None,
            properties={},
            traits={
                "plan": rng.choice(("monthly", "annual", "premium")),
                "renewal_date": format_instant(renewal)[:10],
                "timezone": rng.choice(("Europe/London", "Europe/Paris", "America/New_York")),
            },
            at=at,
            received=at,
            message_id="0",
        )
        c = Customer(f"t{j}")
        transitions = c.apply(e, segments)
        transitions += c.advance(cut, segments)
        out.append(Template([e], transitions, c.snapshot(), c.deadline))
    return out


def due_template(due: int, segments: SegmentSet, cut: int) -> Template:
    """A customer whose one ``Visit`` was 14 days before ``due``: its next deadline is
    ``due`` (``inactive_14d`` enters then), and nothing else changes before it."""
    at = due - 14 * DAY
    e = Event(
        kind="track",
        customer_id="t",
        name="Visit",
        properties={"club": "north"},
        traits={},
        at=at,
        received=at,
        message_id="0",
    )
    c = Customer("t")
    transitions = c.apply(e, segments)
    transitions += c.advance(cut, segments)
    if c.deadline != due:
        raise RuntimeError(f"template deadline {c.deadline}, expected {due}")
    return Template([e], transitions, c.snapshot(), c.deadline)


def history_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """K customers of a ``scripts/generate.py`` history of the 120 days up to ``cut``
    (about 33 events each), replayed to ``cut``: actors with realistic event windows."""
    from actors.population import generate

    r = Replay(segments)
    ids: set[str] = set()
    for e in generate(k, 120, seed=5, start=cut - 120 * DAY):
        r.apply(e)
        ids.add(e.customer_id)
    r.advance(cut)
    out = []
    for cid in sorted(ids):
        c = r.customer(cid)
        assert c is not None
        out.append(Template([], [], c.snapshot(), c.deadline))
    return out


def typical_templates(k: int, segments: SegmentSet, cut: int) -> list[Template]:
    """``scripts/bench_restart.py``'s templates: an identify and 1 to 6 track events over
    the last 1 to 90 days, advanced to ``cut`` (deadlines spread over the coming weeks)."""
    return make_templates(k, segments, cut)[0]


async def write_clones(
    log: EventLog, segments: SegmentSet, templates: Sequence[Template], ids: range
) -> float:
    """Snapshot customers ``c<i>`` for i in ``ids``, customer i a clone of template
    ``i % len(templates)``; returns seconds."""
    t0 = time.perf_counter()
    needs = segments.needs.fingerprint()
    k = len(templates)
    for start in range(ids.start, ids.stop, PART):
        rows = []
        for i in range(start, min(ids.stop, start + PART)):
            t = templates[i % k]
            rows.append(
                Snapshot(
                    customer_id=f"c{i}",
                    format=SNAPSHOT_FORMAT,
                    needs=needs,
                    log_seq=0,
                    deadline=NEVER if t.deadline is None else t.deadline,
                    body=t.body,
                )
            )
        await log.commit([], [], snapshots=rows)
    return time.perf_counter() - t0


async def finish_store(log: EventLog, segments: SegmentSet) -> None:
    """Record the round's marks: every customer has a snapshot under these definitions."""
    marks = SnapshotMarks(
        events_through=log.last_event_seq,
        outbox_through=log.last_outbox_seq,
        definitions=segments.fingerprint,
        needs=segments.needs.fingerprint(),
    )
    await log.commit([], [], marks=marks)


async def build_store(db: Path, customers: int, population: str = "typical") -> dict[str, Any]:
    """A store of ``customers`` clones of 2,000 templates (``typical``, ``bare`` or
    ``history``)."""
    segments = load_segments()
    cut = now_us()
    t0 = time.perf_counter()
    k = min(2_000, customers)
    make = {"typical": typical_templates, "bare": bare_templates, "history": history_templates}
    templates = make[population](k, segments, cut)
    log = await EventLog.open(db)
    try:
        await write_clones(log, segments, templates, range(customers))
        await finish_store(log, segments)
    finally:
        await log.close()
    return {"population": population, "customers": customers, "build_s": time.perf_counter() - t0}


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
    base = rss_mb()[0]
    nc = await connect([url])
    log = await EventLog.open(db)
    observer = LatenessObserver()
    engine = Engine(nc, log, segments, config=EngineConfig(), observer=observer)
    gc_clock = GcClock()
    # The longest the event loop was held by one piece of work since the last ``mark``:
    # how much a 50 ms sleep overslept.
    stall = {"max": 0.0}

    async def watch_loop() -> None:
        while True:
            t = time.perf_counter()
            await anyio.sleep(0.05)
            stall["max"] = max(stall["max"], time.perf_counter() - t - 0.05)

    def stats(ev: str) -> dict[str, Any]:
        return {
            "ev": ev,
            **asdict(engine.stats),
            "customers": engine.customer_count,
            "pending_deadlines": engine.pending_deadlines,
            "warm": engine.warm,
            "rss_mib": rss_mb()[0],
            "rss_base_mib": base,
            "gc_s": gc_clock.seconds,
            "gc_full": gc_clock.full,
            "max_stall_s": stall["max"],
            **_cpu(),
        }

    try:
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
            tg.start_soon(watch_loop)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                cmd, _, arg = line.strip().partition(" ")
                if cmd in ("", "stop"):
                    break
                if cmd == "stats":
                    _emit(stats("stats"))
                elif cmd == "mark":
                    stall["max"] = 0.0
                    _emit(stats("mark"))
                elif cmd == "lateness":
                    _emit({"ev": "lateness", **observer.summary(json.loads(arg or "{}"))})
            t1 = time.perf_counter()
            tg.cancel_scope.cancel()
        _emit({**stats("stopped"), "stop_s": time.perf_counter() - t1})
    finally:
        await log.close()
        await nc.close()


# --------------------------------------------------------------------------- the parent


def find_py_spy() -> str | None:
    """The ``py-spy`` executable: next to this Python (a virtual environment's ``bin``,
    which need not be on ``PATH``), else on ``PATH``; None if it is not installed."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def py_spy_command(output: Path) -> list[str]:
    """``py-spy record`` writing collapsed stacks (``--format raw``: one ``frame;frame;...
    count`` line per distinct stack) to ``output``, the command to profile to follow after
    it. Samples threads only while they run (idle ones are left out), aggregated by function
    (``--function``: the line of its ``def``), with full file names so that the report can
    tell the repository from site-packages.

    ``--nonblocking``: py-spy reads the process without pausing it. Paused and resumed 250
    times a second, threads blocked in a system call (``epoll_wait``, a ``readline``, a
    queue's ``get``) were taken as running in up to 7 % of their time on a busy machine;
    read without pausing, threads blocked for seconds never were, though an event loop
    woken often still is, now and then, in ``epoll_wait`` (woken, waiting for a core). An
    occasional sample may be torn: py-spy counts those as errors."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return [
        py_spy,
        "record",
        "--format",
        "raw",
        "--rate",
        str(PY_SPY_RATE),
        "--function",
        "--full-filenames",
        "--nonblocking",
        "--output",
        str(output),
        "--",
    ]


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
    cmd = [*spy, sys.executable, "-m", "scripts._bench_engine", "--db", str(db), "--url", url]
    with open(log_path, "ab") as err:
        proc = await anyio.open_process(cmd, stderr=err)
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


async def publish_all(js: Any, events: Iterator[tuple[str, bytes, str]], n: int) -> float:
    """Publish ``n`` events with ``publish_async`` and wait for every ack; returns seconds."""
    errors: list[BaseException] = []

    def check(f: Any) -> None:
        if not f.cancelled() and f.exception() is not None:
            errors.append(f.exception())

    t0 = time.perf_counter()
    for _ in range(n):
        subject, body, _mid = next(events)
        (await js.publish_async(subject, body)).add_done_callback(check)
    await js.publish_async_completed()
    await anyio.sleep(0)
    if errors:
        raise RuntimeError(f"{len(errors)} publishes failed, first: {errors[0]!r}")
    return time.perf_counter() - t0


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
