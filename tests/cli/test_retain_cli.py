"""``--retain``: ``segments validate`` refuses a window longer than the retention, with the
segment, the window and the retention named (exit 3, bad input); ``serve`` takes it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run

DEFS = """
[segments.lapsed]
rule = "since_first() > '90d' and count('Visit', within='30d') == 0"
"""


def test_validate_refuses_a_window_past_the_retention(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text(DEFS)
    done = run("segments", "validate", str(f), "--retain", "20d")
    assert done.returncode == 3, done.stderr
    assert done.stderr == (
        f"shoal: error: {f}: segment 'lapsed': `count('Visit', within=30d)` reads 30d back, "
        "longer than the retention of 20d: the events it reads are cut from the log. Shorten "
        "the window, or retain longer (--retain)\n"
    )
    done = run("segments", "validate", str(f), "--retain", "30d")
    assert (done.returncode, done.stdout) == (0, f"{f}: ok, 1 segment (lapsed)\n")
    done = run("segments", "validate", str(f), "--retain", "2h")
    assert done.returncode == 2
    assert "'2h': a retention is at least '1d'" in done.stderr


def test_serve_takes_retain() -> None:
    done = run("serve", "--help")
    assert "--retain DURATION" in done.stdout
