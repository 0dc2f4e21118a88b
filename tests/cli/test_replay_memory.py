"""``shoal replay FILE`` in bounded memory: four times the events of the same customers take
about the same peak memory (issue 17, item 9, at a small scale; the benchmark has 1M and
3.25M events)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import tzinfo
from pathlib import Path
from types import FunctionType
from typing import Any

import msgspec
import pytest

from actors import Customer, Replay, SegmentSet, load_segments
from actors.rules import LocalFilter, Needs, ScoreConfig
from protocol import DAY, SECOND, Event, format_instant

CUSTOMERS = 500
SMALL = 60_000
SEGMENTS = """
[segments.active]
rule = "since_last('Visit') < '1d'"

[segments.idle]
rule = "since_last('Visit') >= '2d'"
"""
CHILD = """
import resource, sys
from scripts.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""
"""``shoal`` in a child that reports its own peak RSS (KiB) as the last line of stderr."""
GROWTH_KIB = 40 * 1024
"""What 3 x 60,000 more events may add to the peak. Holding them all (the replay before it
streamed) adds about 800 bytes each, 140 MB; streaming adds a few blocks of the merge."""


def history(path: Path, events: int) -> None:
    """``events`` visits of the same :data:`CUSTOMERS` customers over 60 days, out of order:
    each stretch of 1,000 lines reversed, and a few hundred late by up to a day."""
    rng = random.Random(events)
    start = 1_767_225_600 * SECOND  # 2026-01-01
    step = 60 * DAY // events
    lines = []
    for i in range(events):
        at = start + i * step
        if rng.random() < 0.005:
            at -= rng.randrange(DAY)
        lines.append(
            json.dumps(
                {
                    "type": "track",
                    "userId": f"c{rng.randrange(CUSTOMERS):04}",
                    "event": "Visit",
                    "properties": {"page": f"/p/{rng.randrange(50)}"},
                    "timestamp": format_instant(at),
                    "messageId": f"m{i}",
                }
            )
        )
    with path.open("w") as f:
        for i in range(0, events, 1000):
            f.write("\n".join(reversed(lines[i : i + 1000])) + "\n")


def peak_kib(source: Path, segments: Path, transitions: Path, tmp: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "replay", str(source), "--segments", str(segments),
         "--transitions", str(transitions)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stderr.splitlines()[-1])


@pytest.mark.slow
def test_four_times_the_events_of_the_same_customers_take_about_the_same_memory(
    tmp_path: Path,
) -> None:
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    history(small, SMALL)
    history(large, 4 * SMALL)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    at_small = peak_kib(small, segments, tmp_path / "small-out.jsonl", tmp)
    at_large = peak_kib(large, segments, tmp_path / "large-out.jsonl", tmp)
    assert at_large - at_small < GROWTH_KIB, (at_small, at_large)
    assert list((tmp_path / "tmp").iterdir()) == []  # the runs spilled are removed


@pytest.mark.slow
def test_ctrl_c_removes_the_temporary_files(tmp_path: Path) -> None:
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    source, tmp = tmp_path / "h.jsonl", tmp_path / "tmp"
    history(source, 4 * SMALL)
    tmp.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "scripts.cli", "replay", str(source), "--segments",
         str(segments), "--transitions", str(tmp_path / "out.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.iterdir()):  # the first run spilled: the reading is under way
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert (child.returncode, err) == (130, "")
    assert list(tmp.iterdir()) == []


def test_stdin_spills_as_a_file_does_and_replays_the_same(tmp_path: Path) -> None:
    segments = tmp_path / "segments.toml"
    segments.write_text(SEGMENTS)
    source, tmp = tmp_path / "h.jsonl", tmp_path / "tmp"
    history(source, SMALL)  # more than one run: spilled
    tmp.mkdir()
    outputs = []
    for name, args, stdin in (("file", [str(source)], None), ("stdin", ["-"], source)):
        out = tmp_path / f"{name}.jsonl"
        with open(stdin or os.devnull, "rb") as f:
            done = subprocess.run(
                [sys.executable, "-m", "scripts.cli", "replay", *args, "--segments",
                 str(segments), "--transitions", str(out)],
                stdin=f, capture_output=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp)},
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") > 100
    assert list(tmp.iterdir()) == []


# --- the customers' state with the default segments ----------------------------------------

SAME = 60
"""Customers, each with one event a day, of every name the default segments read."""
NAMES = ("Visit", "Visit", "Email Opened", "Email Link Clicked", "Order Completed")
BYTES_PER_EVENT = 16
"""What the customers may hold per event more once their history is longer than the longest
window (90 days). They keep every retained event's instant and name code, 9 bytes (the
score's exact sum reads every term, SEGMENTS.md), and index only what windows and scores can
still read. Holding each retained event as an object with its properties, indexed whole,
took about 500 bytes."""


def daily(days: int) -> list[Event]:
    """``days`` days of the same :data:`SAME` customers, in log order."""
    start = 1_767_225_600 * SECOND  # 2026-01-01
    out = []
    for d in range(days):
        for k in range(SAME):
            at = start + d * DAY + (k * 7919 % 86_400) * SECOND
            name = NAMES[(d + k) % len(NAMES)]
            out.append(
                Event(
                    kind="track",
                    customer_id=f"c{k:03}",
                    name=name,
                    properties={"revenue": 10.0} if name == "Order Completed" else {},
                    traits={},
                    at=at,
                    received=at,
                    message_id=f"m{d}-{k}",
                )
            )
    return sorted(out, key=lambda e: e.received)


def held(customers: list[Customer]) -> tuple[int, int]:
    """How many objects the customers reach, each counted once, and their bytes (the rules,
    definitions, zones and functions they refer to are shared by all: left out)."""
    shared = (SegmentSet, ScoreConfig, Needs, LocalFilter, tzinfo, FunctionType, type)
    seen: set[int] = set()
    size = 0
    todo: list[Any] = list(customers)
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, shared):
            continue
        seen.add(id(o))
        size += sys.getsizeof(o)
        if isinstance(o, dict):
            todo += o.keys()
            todo += o.values()
        elif isinstance(o, list | tuple | set | frozenset):
            todo += o
        elif isinstance(o, msgspec.Struct):
            todo += (getattr(o, f) for f in o.__struct_fields__)
        else:
            for cls in type(o).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(o, slot):
                        todo.append(getattr(o, slot))
    return len(seen), size


def test_default_segments_keep_as_many_objects_for_three_times_the_history() -> None:
    segments = load_segments()
    figures = []
    for days in (150, 450):
        r = Replay(segments)
        events = daily(days)
        for e in events:
            r.apply(e)
        customers = [c for c in map(r.customer, (f"c{k:03}" for k in range(SAME))) if c]
        assert len(customers) == SAME
        figures.append((len(events), *held(customers)))
    (small, objects_small, bytes_small), (large, objects_large, bytes_large) = figures
    # Not one object more per event: the retained events are arrays, the index is pruned.
    # (A few counters per customer pass 256 and become objects of their own.)
    assert objects_large <= objects_small + 8 * SAME, figures
    assert (bytes_large - bytes_small) / (large - small) < BYTES_PER_EVENT, figures
