"""The README's walk-through, run as written from a fresh virtual environment.

Every ``sh`` block between the lines ``<!-- walkthrough -->`` and ``<!-- /walkthrough -->``
runs, in order, in one ``bash`` with ``set -euo pipefail``, in an empty directory, with a
new virtual environment made and ``pip install``-ed from this checkout as the README's set-up
says (plus the ``chart`` extra the walk-through asks for). Only the broker's port is changed,
to a free one. Then what the walk-through says it makes is checked: the members export, the
rejected events, and a chart of more than ten segments.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- walkthrough -->", "<!-- /walkthrough -->"
README_PORT = "4230"
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def walkthrough_blocks(text: str) -> list[str]:
    """The ``sh`` blocks of the walk-through, in order."""
    lines = text.splitlines()
    assert START in lines and END in lines, f"README.md has no {START} ... {END} section"
    part = lines[lines.index(START) + 1 : lines.index(END)]
    blocks: list[str] = []
    current: list[str] | None = None
    for line in part:
        if current is None and line.strip() == "```sh":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unclosed sh block in the walk-through"
    return blocks


def test_the_walkthrough_blocks_are_found() -> None:
    blocks = walkthrough_blocks(README.read_text("utf-8"))
    assert len(blocks) >= 3
    text = "\n".join(blocks)
    for command in ("shoal generate", "shoal import", "shoal members", "shoal rejected"):
        assert command in text, command
    assert "--chart" in text


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with shoal installed from this checkout, as Set up does."""
    where = tmp_path_factory.mktemp("venv") / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    done = subprocess.run(
        [str(where / "bin" / "pip"), "install", "-q", f"{ROOT}[chart]"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return where


def test_the_walkthrough_works_as_written(venv: Path, tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text("utf-8"))
    port = str(free_port())
    script = "\n".join(
        [
            "set -euo pipefail",
            # Whatever the walk-through leaves running is stopped, however it ends.
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
            *(re.sub(rf"\b{README_PORT}\b", port, block) for block in blocks),
        ]
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "VIRTUAL_ENV", "PYTHON"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["COLUMNS"] = "120"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (
        f"the walk-through failed ({done.returncode})\n--- script\n{script}\n--- stdout\n"
        f"{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )
    check_outputs(tmp_path, done.stdout)


def check_outputs(where: Path, stdout: str) -> None:
    """What the walk-through says it makes."""
    with (where / "loyal.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["customer_id", "true_since"]
    assert len(rows) > 1, "nobody is loyal in the walk-through's history"
    chart = (where / "segments.png").read_bytes()
    assert chart.startswith(PNG)
    # The chart's replay printed its summary: one JSON line per segment drawn, over ten.
    drawn = [
        line
        for line in stdout.splitlines()
        if line.startswith('{"segment":') and '"members"' in line
    ]
    assert len(drawn) > 10, drawn
    assert "dave" in stdout, "the rejected event is not shown"
