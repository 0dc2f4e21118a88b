"""``shoal segments validate`` (and ``serve``) on hostile segments files: one clear line and
exit status 1, never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from tests.actors.test_rules_limits import listed, one
from tests.helpers import SHOAL

_MEMORY = 2 << 30  # the child's address space: a read of /dev/zero must fail, not the machine


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY, _MEMORY))


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    """``shoal ARGS`` with bounded memory and time (older versions read /dev/zero forever
    and waited on a FIFO)."""
    return subprocess.run(
        [*SHOAL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_limited,  # the test process starts no threads that could deadlock it
    )


LONGEST = "is longer than the longest duration, 36525d (100 years)"
CASES = {
    "900 nots": (
        one("not " * 900 + "count() >= 1"),
        "segment 'a': the rule is nested too deeply: the limit is 50 levels",
    ),
    "long rule": (
        one(" or ".join(["count('Visit') >= 1"] * 40_000)),
        "segment 'a': the rule has 919,996 characters; the limit is 10,000 (split it into "
        "segments that refer to each other with in_segment)",
    ),
    "duration": (
        one("since_last() >= '1000000000000d'"),
        f"segment 'a': '1000000000000d' {LONGEST}",
    ),
    "min_dwell": (
        one("count() >= 1", exit="count() >= 9", min_dwell="1000000000000d"),
        f"segment 'a': min_dwell: '1000000000000d' {LONGEST}",
    ),
    "date": (
        one("date(trait('renewal')) > '9999-12-31'"),
        "segment 'a': '9999-12-31': a date in a rule is in the years 1000 to 8999",
    ),
    "fifo list": (
        listed("ids"),
        "[lists.vip] cannot read {dir}/ids: it is a FIFO, not a regular file",
    ),
    "zero list": (
        listed("/dev/zero"),
        "[lists.vip] cannot read /dev/zero: it is a character device, not a regular file",
    ),
    "deep toml": (
        "a = " + "[" * 5000 + "]" * 5000 + "\n",
        "not valid TOML: values are nested too deeply",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_validate_says_what_is_wrong_in_one_line(tmp_path: Path, case: str) -> None:
    text, problem = CASES[case]
    os.mkfifo(tmp_path / "ids")
    path = tmp_path / "segments.toml"
    path.write_text(text)
    done = shoal("segments", "validate", str(path))
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == f"shoal: error: {path}: {problem.format(dir=tmp_path)}\n"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("fifo", "it is a FIFO, not a regular file"),
        ("/dev/zero", "it is a character device, not a regular file"),
        ("big", "it has 1,048,577 bytes; the limit is 1,048,576"),
    ],
)
def test_validate_reads_only_a_regular_file_under_the_limit(
    tmp_path: Path, name: str, problem: str
) -> None:
    path = tmp_path / name
    if name == "fifo":
        os.mkfifo(path)
    elif name == "big":
        path.write_text("#" * (1 << 20) + "\n")
    done = shoal("segments", "validate", str(path))
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == f"shoal: error: {path}: cannot read it: {problem}\n"


def test_serve_refuses_a_file_of_900_nested_nots(tmp_path: Path) -> None:
    # It killed `serve` with a RecursionError.
    path = tmp_path / "segments.toml"
    path.write_text(one("not " * 900 + "count() >= 1"))
    done = shoal("serve", "--segments", str(path), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 3
    assert done.stderr.splitlines()[-1] == (
        f"shoal: error: {path}: segment 'a': the rule is nested too deeply: the limit is 50 levels"
    )
    assert "Traceback" not in done.stderr
