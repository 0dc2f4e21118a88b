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
every transition carries ``true_since``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import msgspec

from actors.population import generate, to_segment_spec
from tests.helpers import SHOAL

ROOT = Path(__file__).resolve().parents[2]
HISTORY_EVENTS = 51_316
HISTORY_SHA256 = "55a0cee2e11f049701945e5ab929e66000554334a0c9a0f00d33de62b87eb191"
TRANSITIONS = 14_368
TRANSITIONS_SHA256 = "89ad634ea9e33c7920f9c05305df80af774b6c8ff47e421c285735710691d649"


def test_replay_of_the_generated_history_is_byte_identical(tmp_path: Path) -> None:
    encode = msgspec.json.Encoder().encode
    lines = [encode(to_segment_spec(e)) for e in generate(1500, 120, 14)]
    history = b"\n".join(lines) + b"\n"
    assert len(lines) == HISTORY_EVENTS
    assert hashlib.sha256(history).hexdigest() == HISTORY_SHA256
    source, out = tmp_path / "h.jsonl", tmp_path / "t.jsonl"
    source.write_bytes(history)

    done = subprocess.run(
        [*SHOAL, "replay", str(source), "--transitions", str(out)],
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
