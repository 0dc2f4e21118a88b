"""What the benchmarks measure with: CPU seconds and RSS from ``/proc``, garbage-collection
time, timers around coroutine methods, percentiles, cProfile listings; and the broker they
talk to (a free port, an embedded ``nats-server``, publishing with acks).

Every benchmark runs on a small machine shared with others: compare ratios measured in one
run, not absolute figures across runs.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import os
import pstats
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from protocol import embedded_broker

ROOT = Path(__file__).resolve().parents[2]
"""The repository (the benchmarks run from it: ``python -m scripts.bench ...``)."""

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def say(text: str) -> None:
    """A progress line on stderr (``# text``), so stdout keeps the results."""
    print(f"# {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- clocks


def now_us() -> int:
    """Wall-clock microseconds since the epoch (live events are stamped with it)."""
    return time.time_ns() // 1000


def stat_cpu(path: str) -> float:
    """utime + stime in seconds from a /proc .../stat file (0.0 when unreadable)."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` has used so far, all its threads (not its children)."""
    return stat_cpu(f"/proc/{pid}/stat")


def _nats_server_pids() -> list[int]:
    """Pids of this process's nats-server children (Linux /proc; empty elsewhere)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                pids += [int(p) for p in f.read().split()]
    out = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm", encoding="ascii") as f:
            if f.read().strip() == "nats-server":
                out.append(pid)
    return out


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds so far: this process (all threads), its main thread, the broker."""

    process: float
    main: float
    broker: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        pid = os.getpid()
        return cls(
            process=process_cpu(pid),
            main=stat_cpu(f"/proc/{pid}/task/{pid}/stat"),
            broker=sum(process_cpu(p) for p in _nats_server_pids()),
        )


def rss_mib(field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB (0 when unreadable)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class GcClock:
    """Seconds the garbage collector ran, and full (generation 2) collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.full += info["generation"] == 2

    def take(self) -> tuple[float, int]:
        return self.seconds, self.full


class LoopWatch:
    """How late a short sleep wakes up: the longest the event loop ran one piece of work
    without a break (nats-py answers the server's PINGs only in the breaks). Run ``run`` in
    a task of the loop watched."""

    def __init__(self, tick: float = 0.05) -> None:
        self.tick = tick
        self.longest = 0.0
        """The longest oversleep so far (set it to 0 to start again)."""
        self.stalls: list[tuple[float, float]] = []
        """(perf_counter at the wake-up, seconds late) of every wake-up later than a tick."""

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await anyio.sleep(self.tick)
            late = time.perf_counter() - t - self.tick
            self.longest = max(self.longest, late)
            if late > self.tick:
                self.stalls.append((time.perf_counter(), late))


class Timers:
    """Wall seconds and calls of coroutine methods, wrapped on the instance (or the class)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj: object, name: str, label: str | None = None) -> None:
        """Time every call of ``obj.name`` under ``label`` (default: ``name``)."""
        fn: Callable[..., Awaitable[Any]] = getattr(obj, name)
        key = label or name

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(obj, name, timed)

    def take(self) -> dict[str, tuple[float, int]]:
        """(seconds, calls) so far, by label."""
        return {k: (s, self.calls.get(k, 0)) for k, s in self.seconds.items()}

    def since(self, before: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
        """(seconds, calls) since ``before`` (an earlier ``take``), by label."""
        out = {}
        for k, (s, c) in self.take().items():
            s0, c0 = before.get(k, (0.0, 0))
            out[k] = (s - s0, c - c0)
        return out


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


def cprofile_text(
    profiler: cProfile.Profile, orders: Sequence[str] = ("tottime",), top: int = 15
) -> str:
    """The top ``top`` functions by each of ``orders`` (pstats sort keys; file names
    shortened), then the top ``top`` of shoal's own code by cumulative time (files named from
    the repository), without pstats' preambles."""
    out = io.StringIO()
    for key in orders:
        out.write(f"## top {top} by {key}\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
    out.write(f"## top {top} by cumulative, shoal code only (actors/, protocol/, store/)\n")
    own = io.StringIO()
    pstats.Stats(profiler, stream=own).sort_stats("cumulative").print_stats(
        re.escape(f"{ROOT}{os.sep}") + r"(actors|protocol|store)/", top
    )
    out.write(own.getvalue().replace(f"{ROOT}{os.sep}", ""))
    return "\n".join(
        line.rstrip()
        for line in out.getvalue().splitlines()
        if line.strip()
        and "function calls" not in line
        and "Ordered by" not in line
        and "restriction" not in line
        and not line.lstrip().startswith("List reduced")
    )


# --------------------------------------------------------------------------- the broker


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def broker(d: Path) -> AsyncIterator[str]:
    """A ``nats-server -js`` (``protocol.embedded_broker``) on a free loopback port, its
    store in ``d / "nats"``; yields its URL."""
    async with embedded_broker(d / "nats", host="127.0.0.1", port=free_port()) as url:
        yield url


async def publish(js: Any, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish (subject, payload) pairs with ``publish_async`` and wait for every ack;
    returns how many.

    The futures are not kept (200k of them would inflate the RSS figures); a done callback
    records failures instead.

    Raises:
        RuntimeError: the broker did not store some of them.
    """
    n = 0
    errors: list[BaseException] = []

    def check(f: Any) -> None:
        if not f.cancelled() and f.exception() is not None:
            errors.append(f.exception())

    for subject, body in messages:
        (await js.publish_async(subject, body)).add_done_callback(check)
        n += 1
    await js.publish_async_completed()
    await anyio.sleep(0)  # let the last done callbacks run
    if errors:
        raise RuntimeError(f"{len(errors)} publishes failed, first: {errors[0]!r}")
    return n
