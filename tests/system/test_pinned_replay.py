"""Behaviour is pinned: the generator's history and its replayed transitions, byte for byte.

Both digests are what ``shoal`` at commit ddd092d produced (before the engine was assembled
from parts):

    python scripts/generate.py --customers 1500 --days 120 --seed 14 > h.jsonl
    shoal replay h.jsonl --transitions t.jsonl

The history's digest is checked first, so a changed generator cannot silently re-pin the
transitions: a change to the generator or to the engine's semantics fails here, and only an
issue that asks for it may change these digests.

Re-pinned for issue 17 (item 3 and the payload's ``true_since``): a file now replays in the
order of its lines' ``receivedAt`` (as the same file imported does), so the generator's late
events apply after the deadlines before their receipt (14,324 -> 14,368 transitions); and
every transition carries ``true_since``. Then for issue 17's item 4, the stated late-event
contract (SEGMENTS.md, "Late events"): 28 transitions change their ``at``. An event whose
instant is not before the customer's latest event or change takes effect at its own instant
even where a deadline that changed nothing had been evaluated after it (c1325's visit of
05:25, received 06:25: ``loyal`` entered at 05:25, not 05:40), and a late one at its receive
instant (c1183's visit of 10:55, received 13:35, after ``engagement_dropped`` entered at
11:12: it exits at 13:35:13.693686, not 11:12:00.000001). Same count, 14,368.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import msgspec
import pytest

from actors.population import generate, to_segment_spec
from tests.helpers import SHOAL

ROOT = Path(__file__).resolve().parents[2]
HISTORY_EVENTS = 51_316
HISTORY_SHA256 = "55a0cee2e11f049701945e5ab929e66000554334a0c9a0f00d33de62b87eb191"
TRANSITIONS = 14_368
TRANSITIONS_SHA256 = "9a6aa9ea7a6a664e448cae6dbbe07ad7498cc1e41ab7185369423f0c9656701c"


@pytest.mark.parametrize("processes", [None, "1", "3"])
def test_replay_of_the_generated_history_is_byte_identical(
    tmp_path: Path, processes: str | None
) -> None:
    """The same bytes whether one process replays or several (the default: every core, for
    this many events), three on two cores included."""
    encode = msgspec.json.Encoder().encode
    lines = [encode(to_segment_spec(e)) for e in generate(1500, 120, 14)]
    history = b"\n".join(lines) + b"\n"
    assert len(lines) == HISTORY_EVENTS
    assert hashlib.sha256(history).hexdigest() == HISTORY_SHA256
    source, out = tmp_path / "h.jsonl", tmp_path / "t.jsonl"
    source.write_bytes(history)

    done = subprocess.run(
        [
            *SHOAL,
            "replay",
            str(source),
            "--transitions",
            str(out),
            *(["--processes", processes] if processes else []),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    transitions = out.read_bytes()
    assert transitions.count(b"\n") == TRANSITIONS
    assert hashlib.sha256(transitions).hexdigest() == TRANSITIONS_SHA256
