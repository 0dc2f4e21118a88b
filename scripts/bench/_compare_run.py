"""``--compare REF`` run: REF checked out in a temporary git worktree and installed in a
virtual environment of its own, then REF and the working tree measured alternately on the
same input, each through its own command line.

The input is generated once, by the working tree's ``actors.population``: REF's generator
is not used, so a ref from before it moved compares too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from actors.population import generate, to_segment_spec, write_history
from protocol import DAY, event_subject

from . import _compare as cmp
from ._common import ROOT, broker, free_port, now_us, process_cpu, publish, say
from ._machine import loadavg, machine
from .consumer import VARIANTS, fill_stream, run_variant

TIMEOUT = 600.0
"""Seconds any one run may take."""
CONSUMER = "shoal-engine"
"""The durable consumer ``shoal serve`` reads events with (its ``--consumer`` default)."""
DAYS = 120
"""Days of the generated histories (about 34 events per customer)."""
WARM_UP = 1_000
"""Events of the untimed replay each tree runs first."""
_POLL = 0.02
CEILING = "push-cb-all-map50k"
"""The consumer variant whose rate is the ceiling (as the suite's ``consumer``)."""
T = TypeVar("T")


class CompareError(Exception):
    """The comparison cannot run: the message says why, in one line."""


@dataclass(frozen=True)
class Tree:
    """A tree measured: its name, the command that runs its ``shoal``, where from, and its
    sources (where its own benchmark suite runs)."""

    name: str
    shoal: tuple[str, ...]
    cwd: Path
    src: Path


def working_tree() -> Tree:
    """This repository's working tree, run from its sources with this Python."""
    return Tree("working tree", (sys.executable, "-m", "scripts.cli"), ROOT, ROOT)


def _run(cmd: list[str], what: str, **kwargs: Any) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise CompareError(f"{what} failed ({shlex.join(cmd)}): {' / '.join(tail)}")
    out: str = done.stdout
    return out


def _constraints(path: Path) -> int:
    """Write this environment's versions (``pip freeze``, shoal itself left out) as pip
    constraints, so that REF runs on the same dependencies; returns how many."""
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], "pip freeze")
    pins = [
        line
        for line in frozen.splitlines()
        if "==" in line and " @ " not in line and not line.lower().startswith("shoal")
    ]
    path.write_text("\n".join(pins) + "\n", encoding="utf-8")
    return len(pins)


@contextlib.contextmanager
def ref_tree(ref: str, tmp: Path) -> Iterator[tuple[Tree, str, str]]:
    """REF checked out in a temporary worktree under ``tmp`` and installed in a virtual
    environment of its own; yields the tree, its commit and how its dependencies were
    pinned. The worktree is removed on the way out.

    Raises:
        CompareError: REF is not a commit here, or it cannot be installed.
    """
    try:
        commit = _run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], "")
    except CompareError:
        raise CompareError(f"--compare: {ref!r} is not a commit of {ROOT}") from None
    commit = commit.strip()
    src, venv = tmp / "ref-src", tmp / "ref-venv"
    say(f"checking out {ref} ({commit[:12]}) in a temporary worktree")
    _run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), commit], "git")
    try:
        say("installing it in a virtual environment of its own")
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        python = str(venv / "bin" / "python")
        constraints = tmp / "constraints.txt"
        pins = _constraints(constraints)
        install = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        try:
            _run([*install, "-c", str(constraints), str(src)], "pip install")
            pinned = f"{pins} pins"
        except CompareError:
            # REF asks for versions this environment does not have: its own choice, then.
            _run([*install, str(src)], "pip install")
            pinned = "not pinned: REF's requirements differ"
        yield Tree(ref, (python, "-m", "scripts.cli"), tmp, src), commit, pinned
    finally:
        with contextlib.suppress(CompareError):
            _run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(src)], "git")
        with contextlib.suppress(CompareError):
            _run(["git", "-C", str(ROOT), "worktree", "prune"], "git")


# --------------------------------------------------------------------------- the input


def history(events: int, seed: int, *, start: int | None = None) -> Iterator[Any]:
    """The first ``events`` events of a generated history of ``DAYS`` days (enough
    customers for them), from ``start`` (default: the generator's)."""
    customers = max(1, -(-events // 30))
    if start is None:
        return islice(generate(customers, DAYS, seed), events)
    return islice(generate(customers, DAYS, seed, start=start), events)


def ingest_messages(events: int, seed: int, start: int) -> list[tuple[str, bytes]]:
    """(subject, payload) of ``events`` generated events of a history from ``start``."""
    encode = msgspec.json.Encoder().encode
    return [
        (event_subject(e.customer_id), encode(to_segment_spec(e)))
        for e in history(events, seed, start=start)
    ]


# --------------------------------------------------------------------------- replay


def _splits_replay(tree: Tree) -> bool:
    """Whether ``tree``'s ``shoal replay`` takes ``--processes`` (issue 21 on)."""
    return "--processes" in _run(
        [*tree.shoal, "replay", "--help"], "shoal replay --help", cwd=tree.cwd
    )


def run_replay(tree: Tree, source: Path, out: Path, events: int, *options: str) -> dict[str, Any]:
    """``shoal replay SOURCE --transitions OUT [OPTIONS]`` of ``tree``: wall and CPU time
    per event (its worker processes included), and the digest of the transitions it
    wrote."""
    cmd = [*tree.shoal, "replay", str(source), "--transitions", str(out), *options]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    peak = _run_sampling_rss(cmd, f"{tree.name}: shoal replay", tree.cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    data = out.read_bytes()
    out.unlink()
    return {
        "replay_wall_us": wall / events * 1e6,
        "replay_cpu_us": cpu / events * 1e6,
        "replay_rss_mib": peak / 2**20,
        "transitions": data.count(b"\n"),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


RSS_EVERY = 0.05
"""Seconds between samples of a replay's memory."""


def _rss(pid: int) -> int:
    """Bytes resident of ``pid`` and its children (a replay's workers), 0 once gone."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in (str(pid), *children):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue  # ended meanwhile
    return total


def _run_sampling_rss(cmd: list[str], what: str, cwd: Path) -> int:
    """Run ``cmd`` as :func:`_run` does; return the peak of its resident memory, summed over
    it and its child processes, sampled every ``RSS_EVERY`` s."""
    peak = 0
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                raise CompareError(f"{what} took more than {TIMEOUT:g} s")
            time.sleep(RSS_EVERY)
        err = proc.stderr.read() if proc.stderr is not None else ""
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-5:]
        raise CompareError(f"{what} failed ({shlex.join(cmd)}): {' / '.join(tail)}")
    return peak


# --------------------------------------------------------------------------- deadlines


def run_deadlines(tree: Tree, out: Path) -> dict[str, Any]:
    """The tree's own benchmark suite, ``--only deadlines`` at its full size (1,000,000
    customers pending, 100,000 due in one second, then 100,000 over 20 s): the lateness of
    the burst and of every deadline, in ms."""
    python = tree.shoal[0]
    cmd = [python, "-m", "scripts.bench", "--only", "deadlines", "--out", str(out)]
    _run(cmd, f"{tree.name}: deadlines benchmark", cwd=tree.src, timeout=3 * TIMEOUT)
    doc = json.loads((out / "bench-full.json").read_text(encoding="utf-8"))
    late = doc["results"]["deadlines"]["lateness_ms"]
    return {
        "deadlines_burst_p50_ms": late["burst"]["p50"],
        "deadlines_burst_p99_ms": late["burst"]["p99"],
        "deadlines_burst_max_ms": late["burst"]["max"],
        "deadlines_all_p99_ms": late["all"]["p99"],
    }


# --------------------------------------------------------------------------- ingest


async def _quiet(e: Exception) -> None:
    """nats-py's error callback: refusals are expected while the broker starts."""


async def _poll(proc: anyio.abc.Process, attempt: Callable[[], Awaitable[T | None]]) -> T:
    """The first of ``attempt``'s results that is not None, tried again and again while the
    serve process ``proc`` runs.

    Raises:
        CompareError: ``proc`` exited first.
    """
    with anyio.fail_after(TIMEOUT):
        while True:
            if proc.returncode is not None:
                raise CompareError(f"shoal serve exited ({proc.returncode}); see its log")
            found = await attempt()
            if found is not None:
                return found
            await anyio.sleep(_POLL)


def _started(d: Path) -> bool:
    """Whether the engine of the serve process logging in ``d`` has started consuming."""
    with contextlib.suppress(OSError):
        return b"engine started" in (d / "serve.log").read_bytes()
    return False


async def run_ingest(tree: Tree, messages: list[tuple[str, bytes]], d: Path) -> dict[str, Any]:
    """``shoal serve`` of ``tree`` on a fresh data dir and port, and ``messages`` published to
    it: wall time and the serve process's CPU time per event, from the first publish until
    its consumer has acknowledged the last."""
    d.mkdir(parents=True)
    port = free_port()
    cmd = [*tree.shoal, "serve", "--data-dir", str(d / "data"), "--port", str(port)]
    # This client connects anonymously, as to the trees before the broker's role keys.
    if "--no-auth" in _run([*tree.shoal, "serve", "--help"], "shoal serve --help", cwd=tree.cwd):
        cmd.append("--no-auth")
    with open(d / "serve.log", "wb") as log:
        proc = await anyio.open_process(
            cmd, cwd=tree.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:

        async def connected() -> Client | None:
            with contextlib.suppress(OSError, nats.errors.Error):
                return await nats.connect(
                    f"nats://127.0.0.1:{port}",
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    connect_timeout=1,
                    error_cb=_quiet,
                )
            return None

        nc = await _poll(proc, connected)
        try:
            js = nc.jetstream()

            async def engine_consumers(stream: str) -> list[Any]:
                """The engine's consumers: one (``shoal-engine``), or one per partition
                (``shoal-engine-<p>``, from issue 18 on)."""
                infos = await js.consumers_info(stream)
                return [i for i in infos if i.name == CONSUMER or i.name.startswith(CONSUMER + "-")]

            async def consuming() -> str | None:
                """The stream of the events, once the engine consumes it (the engine makes
                its consumers before it starts, so ``serve`` logs its start after them)."""
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    stream: str = await js.find_stream_name_by_subject(event_subject("x"))
                    if await engine_consumers(stream) and _started(d):
                        return stream
                return None

            stream = await _poll(proc, consuming)
            cpu0, t0 = process_cpu(proc.pid), time.perf_counter()
            await publish(js, messages)

            async def acknowledged() -> bool | None:
                # Every message published is stored by now: pending (stored, not sent),
                # sent and not acknowledged, or acknowledged.
                infos = await engine_consumers(stream)
                return all(not i.num_pending and not i.num_ack_pending for i in infos) or None

            await _poll(proc, acknowledged)
            wall, cpu = time.perf_counter() - t0, process_cpu(proc.pid) - cpu0
        finally:
            await nc.close()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()  # a clean stop: SIGTERM
                with anyio.move_on_after(60):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    n = len(messages)
    return {"ingest_wall_us": wall / n * 1e6, "ingest_cpu_us": cpu / n * 1e6}


# --------------------------------------------------------------------------- ceiling


async def consumer_ceiling(messages: int, tmp: Path) -> dict[str, Any]:
    """The nats-py consumer alone (``scripts.bench.consumer``'s ``push-cb-all-map50k``, the
    suite's ceiling) over ``messages`` events, on a broker of its own."""
    v = next(v for v in VARIANTS if v.name == CEILING)
    async with broker(tmp / "consumer") as url:
        await fill_stream(url, messages)
        consumed = await run_variant(url, v, messages, TIMEOUT)
    return {"variant": v.name, "messages": messages, "consume_per_s": consumed.rate}


# --------------------------------------------------------------------------- the run


def run_compare(args: Any) -> dict[str, Any]:
    """Measure; returns the document ``_compare.markdown`` reports."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {
        "ref": args.compare,
        "command": "python -m scripts.bench " + shlex.join(args.argv),
        "started_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_before": loadavg(),
        "sizes": {k: getattr(args, k) for k in cmp.DEFAULTS},
        "order": cmp.order(args.runs),
    }
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in cmp.SIDES}
    replays: dict[str, set[tuple[int, str]]] = {side: set() for side in cmp.SIDES}

    def keep(side: str, figures: dict[str, Any]) -> None:
        for key, value in figures.items():
            if key.endswith(("_us", "_mib", "_ms")):
                samples[side].setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="shoal-compare-") as name:
        tmp = Path(name)
        source = tmp / "replay.jsonl"
        with open(source, "wb") as f:
            n = write_history(history(args.replay_events, args.seed), f)
        # Stamped over the days up to today, as live events would be.
        today = now_us() // DAY * DAY
        messages = ingest_messages(args.ingest_events, args.seed, today - DAYS * DAY)
        say(f"input: {n:,} events to replay, {len(messages):,} to ingest (seed {args.seed})")
        with ref_tree(args.compare, tmp) as (ref, commit, pinned):
            doc["ref_commit"], doc["ref_pinned"] = commit, pinned
            trees = {"ref": ref, "work": working_tree()}
            # Untimed: each tree compiles its bytecode and reads its files once.
            warm = tmp / "warm-up.jsonl"
            warm.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:WARM_UP]))
            for tree in trees.values():
                run_replay(tree, warm, tmp / "transitions.jsonl", WARM_UP)
            # One process, the cost per core: a tree that splits replays over processes is
            # run once more with --processes 1; for one that cannot, its replay is that.
            split = {side: _splits_replay(tree) for side, tree in trees.items()}
            for i, side in enumerate(doc["order"]):
                r = run_replay(trees[side], source, tmp / "transitions.jsonl", n)
                keep(side, r)
                replays[side].add((r["transitions"], r["sha256"]))
                say(f"replay {i + 1}, {trees[side].name}: {r['replay_wall_us']:.2f} us/event")
                if split[side]:
                    r = run_replay(
                        trees[side], source, tmp / "transitions.jsonl", n, "--processes", "1"
                    )
                    replays[side].add((r["transitions"], r["sha256"]))
                    say(f"replay {i + 1}, one process: {r['replay_wall_us']:.2f} us/event")
                keep(
                    side,
                    {"replay1_wall_us": r["replay_wall_us"], "replay1_cpu_us": r["replay_cpu_us"]},
                )
            for i, side in enumerate(doc["order"]):
                r = anyio.run(run_ingest, trees[side], messages, tmp / f"ingest-{i}")
                keep(side, r)
                say(f"ingest {i + 1}, {trees[side].name}: {r['ingest_wall_us']:.2f} us/event")
            if args.deadlines:
                for i, side in enumerate(doc["order"]):
                    r = run_deadlines(trees[side], tmp / f"deadlines-{i}")
                    keep(side, r)
                    say(
                        f"deadlines {i + 1}, {trees[side].name}: burst p99 "
                        f"{r['deadlines_burst_p99_ms']:,.0f} ms"
                    )
            doc["consumer_ceiling"] = anyio.run(consumer_ceiling, args.ingest_events, tmp)
            say(f"consumer ceiling: {doc['consumer_ceiling']['consume_per_s']:,.0f} msgs/s")
    doc["samples"] = samples
    doc["rows"] = [vars(r) for r in cmp.rows(samples)]
    doc["checks"] = _checks(replays, args.compare)
    doc["load_after"] = loadavg()
    doc["duration_s"] = time.perf_counter() - t0
    return doc


def _checks(replays: dict[str, set[tuple[int, str]]], ref: str) -> list[str]:
    out = []
    for side, name in zip(cmp.SIDES, (ref, "the working tree"), strict=True):
        if len(replays[side]) != 1:
            out.append(f"{name}'s replays wrote different transitions from run to run")
    if replays["ref"] == replays["work"] and len(replays["ref"]) == 1:
        ((count, digest),) = replays["ref"]
        out.append(
            f"both replays wrote the same {count:,} transitions, byte for byte "
            f"(sha256 {digest[:16]}...)"
        )
    else:
        out.append(
            f"the transitions differ: {ref} {replays['ref']}, working tree {replays['work']}"
        )
    return out


def write(doc: dict[str, Any], out: Path) -> Path:
    """``compare-<ref>.json`` and ``.md`` in ``out``; returns their stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / cmp.file_stem(doc["ref"])
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(cmp.markdown(doc), encoding="utf-8")
    return stem
