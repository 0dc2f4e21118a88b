"""Sampling profiles of the benchmarks' child processes with py-spy, read back.

``py_spy_command`` wraps a child in ``py-spy record --format raw``; ``profile_report`` reads
its collapsed stacks (one ``frame;frame;... count`` line per distinct stack), keeps them in
``--out``'s ``profiles/``, and reports the samples: main thread against the others, the share
by where the running function is (``actors/``, ``store/``, ``protocol/``, ``scripts/``,
nats-py, msgspec, SQLite, asyncio/anyio, a wait, other), and the top functions by self and by
inclusive samples.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import ROOT

PY_SPY_RATE = 250
"""Samples per second for ``py-spy record`` (its default is 100)."""


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


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
STDLIB = "stdlib/"
"""What ``shorten_line`` puts before a file of the standard library."""
AREAS = (
    "actors",
    "store",
    "protocol",
    "scripts",
    "nats",
    "msgspec",
    "sqlite",
    "asyncio/anyio",
    "waiting",
)
"""Where a sample's running function is, by the first part of its shortened file name
(anything else is ``other``). A C extension has no frame of its own (py-spy without
``--native``): msgspec's and sqlite3's work counts to the Python function that called it.
``waiting``: the running function is one that waits (``WAITS``)."""
WAITS = (
    "EpollSelector.select (stdlib/selectors.py",
    "Condition.wait (stdlib/threading.py",
    "Event.wait (stdlib/threading.py",
    "Thread.join (stdlib/threading.py",
    "Thread._wait_for_tstate_lock (stdlib/threading.py",
)
"""Functions that wait, yet are sampled: py-spy takes a thread as running when the system
says it is runnable, and a thread woken that waits for a free core (or for the GIL) is."""
_ANYIO_RUN = ("run", "AsyncIOBackend.run", "AsyncIOBackend.run.<locals>.wrapper")
_AREA = {
    "actors": "actors",
    "store": "store",
    "protocol": "protocol",
    "scripts": "scripts",
    "nats": "nats",
    "msgspec": "msgspec",
    "aiosqlite": "sqlite",
    f"{STDLIB}sqlite3": "sqlite",
    f"{STDLIB}asyncio": "asyncio/anyio",
    f"{STDLIB}selectors.py": "asyncio/anyio",
    "anyio": "asyncio/anyio",
}


def shorten_line(line: str, roots: Sequence[tuple[str, str]] | None = None) -> str:
    """A line of py-spy's collapsed stacks (``func (/full/path.py:line);... count``) with
    each file named relative to its ``site-packages`` (a virtual environment may be inside
    the repository), else to the first of ``roots`` (prefix, replacement) it is under
    (default: the repository, nothing; the standard library, ``stdlib/``)."""
    if roots is None:
        roots = ((f"{ROOT}/", ""), (sysconfig.get_paths()["stdlib"] + "/", STDLIB))
    stack, _, count = line.strip().rpartition(" ")
    frames = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame)
        if m is not None:
            path = m["file"]
            marker = next((k for k in ("/site-packages/", "/dist-packages/") if k in path), None)
            if marker is not None:
                path = path.rsplit(marker, 1)[1]
            else:
                for prefix, replacement in roots:
                    if path.startswith(prefix):
                        path = replacement + path[len(prefix) :]
                        break
            line_no = f":{m['line']}" if m["line"] else ""
            frame = f"{m['func']} ({path}{line_no})"
        frames.append(frame)
    return f"{';'.join(frames)} {count}"


@dataclass
class Profile:
    """Collapsed stacks summed up by function."""

    samples: int = 0
    """Samples counted (those through ``within``, if given)."""
    all_samples: int = 0
    """Samples in the input."""
    other_threads: int = 0
    """Samples counted that are not of the main thread (their stack starts in a thread)."""
    self_samples: Counter[str] = field(default_factory=Counter)
    """Samples in which the function was the one running."""
    inclusive: Counter[str] = field(default_factory=Counter)
    """Samples in which the function was on the stack (once per sample, recursion or not)."""
    areas: Counter[str] = field(default_factory=Counter)
    """Samples by ``AREAS`` (of the running function) and ``other``."""


def area(frame: str) -> str:
    """The ``AREAS`` entry of a (shortened) frame, or ``other``."""
    m = _FRAME.match(frame)
    if m is None:
        return "other"
    if frame.startswith(WAITS):
        return "waiting"
    path = m["file"]
    top = path.split("/", 2 if path.startswith(STDLIB) else 1)
    return _AREA.get("/".join(top[:2]) if path.startswith(STDLIB) else top[0], "other")


def read_collapsed(lines: Iterable[str], within: str | None = None) -> Profile:
    """Sum up collapsed stacks (``frame;frame;... count`` lines, root first, shortened by
    ``shorten_line``). With ``within``, only the samples with a frame starting with it
    count, each from its first such frame down (what called it is left out)."""
    p = Profile()
    for line in lines:
        stack, _, count = line.strip().rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        p.all_samples += n
        thread = frames[0].startswith("Thread._bootstrap ")
        if within is not None:
            at = next((i for i, f in enumerate(frames) if f.startswith(within)), None)
            if at is None:
                continue
            frames = frames[at:]
        p.samples += n
        p.other_threads += n * thread
        p.self_samples[frames[-1]] += n
        for f in set(frames):
            p.inclusive[f] += n
        p.areas[area(frames[-1])] += n
    return p


def plumbing(frame: str) -> bool:
    """Whether the inclusive table leaves ``frame`` out: a module's top level, the standard
    library's or Python's own (the event loop, threads, runpy, imports) and anyio's running
    of the event loop, which are on most stacks and say nothing of where the time goes."""
    m = _FRAME.match(frame)
    return (
        m is None
        or m["func"] == "<module>"
        or m["file"].startswith((STDLIB, "<frozen "))
        or (m["file"].startswith("anyio/") and m["func"] in _ANYIO_RUN)
    )


def profile_summary(p: Profile, top: int = 20) -> dict[str, Any]:
    """The JSON form: totals, samples by area, the top functions by self and inclusive
    samples (as ``profile_lines``)."""
    return {
        "samples": p.samples,
        "all_samples": p.all_samples,
        "other_threads": p.other_threads,
        "areas": {a: p.areas[a] for a in (*AREAS, "other")},
        "self": p.self_samples.most_common(top),
        "inclusive": [(f, n) for f, n in p.inclusive.most_common() if not plumbing(f)][:top],
    }


def profile_lines(p: Profile, rate: int, top: int = 20) -> list[str]:
    """The text form: a line of totals, one of areas, then the top ``top`` functions by
    self samples and by inclusive samples (``plumbing`` left out), in % of the samples."""
    if not p.samples:
        return ["no samples"]

    def pct(n: int) -> str:
        return f"{100 * n / p.samples:5.1f}"

    main = p.samples - p.other_threads
    out = [
        f"{p.samples:,} samples at {rate} Hz ({p.samples / rate:.1f} s on a CPU): "
        f"main thread {pct(main).strip()} %, other threads {pct(p.other_threads).strip()} %",
        "running in " + ", ".join(f"{a} {pct(p.areas[a]).strip()} %" for a in (*AREAS, "other")),
        "",
        f"top {top} by self samples (the function running), % of samples",
        " self %  incl %  function",
    ]
    out += [f"{pct(n)}   {pct(p.inclusive[f])}   {f}" for f, n in p.self_samples.most_common(top)]
    out += [
        "",
        f"top {top} by inclusive samples (the function on the stack; the standard library "
        "and the loop's runner left out), % of samples",
        " incl %  self %  function",
    ]
    out += [
        f"{pct(n)}   {pct(p.self_samples[f])}   {f}"
        for f, n in profile_summary(p, top)["inclusive"]
    ]
    return out


def profile_report(
    out: Path,
    stem: str,
    raw: Path,
    parts: Sequence[tuple[str, str | None]],
    spy: Sequence[str] = (),
) -> dict[str, Any]:
    """Read py-spy's collapsed stacks ``raw``; keep them (files shortened) in
    ``out / "profiles" / f"{stem}.txt"`` (gzipped if over 1 MB); report each of ``parts``
    (title, ``within`` of ``read_collapsed``). ``spy``: py-spy's own messages (with its count
    of errors)."""
    lines = raw.read_text(encoding="utf-8").splitlines()
    stacks = [shorten_line(ln) for ln in lines if ln.strip()]
    text = "\n".join(stacks) + "\n"
    keep = out / "profiles" / f"{stem}.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    if len(text) > 1_000_000:
        keep = keep.with_name(keep.name + ".gz")
        keep.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        keep.write_text(text, encoding="utf-8")
    errors = [int(m[1]) for ln in spy if (m := re.search(r"Errors: (\d+)", ln))]
    report: dict[str, Any] = {
        "collapsed": keep.relative_to(out).as_posix(),
        "rate": PY_SPY_RATE,
        "py_spy_errors": errors[-1] if errors else None,
        "parts": {},
    }
    text_lines: list[str] = []
    for title, within in parts:
        p = read_collapsed(stacks, within)
        report["parts"][title] = profile_summary(p)
        if within is not None:
            share = 100 * p.samples / p.all_samples if p.all_samples else 0.0
            title += f" ({share:.1f} % of all samples)"
        text_lines += [""] if text_lines else []
        text_lines += [f"== {title}", *profile_lines(p, PY_SPY_RATE)]
    report["text"] = "\n".join(text_lines)
    return report
