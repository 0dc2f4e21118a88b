"""The wheel holds shoal's packages and its command line, and no benchmark code nor tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "store", "protocol")


@pytest.mark.timeout(300)
def test_wheel_holds_the_packages_and_the_command_line_only(tmp_path: Path) -> None:
    # Built from a copy: a build in the repository would leave build/ behind, and an old
    # build/ there can leak stale files into the wheel.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(src), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("shoal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    sources = {
        p.relative_to(src).as_posix()
        for package in PACKAGES
        for p in (src / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    commands = {p.relative_to(src).as_posix() for p in (src / "scripts").glob("*.py")}
    assert "scripts/cli.py" in commands and "actors/population.py" in sources
    assert {n for n in names if n.endswith(".py")} == sources | commands
    assert {f"{p}/py.typed" for p in PACKAGES} | {"actors/default_segments.toml"} <= names
    assert not [n for n in names if n.startswith(("scripts/bench", "tests/"))]
    top = {n.split("/", 1)[0] for n in names if not n.startswith("shoal-")}
    assert top == {*PACKAGES, "scripts"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "shoal = scripts.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
