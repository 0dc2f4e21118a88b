"""What a figure was measured on: the machine, its load, the versions, the code."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocol import BrokerError, find_nats_server

from ._common import ROOT

PACKAGES = ("actors", "store", "protocol")
"""shoal's packages, whose code the figures are of."""


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, versions, and the commit (with the packages' uncommitted changes)."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "msgspec": importlib.metadata.version("msgspec"),
        "aiosqlite": importlib.metadata.version("aiosqlite"),
        "nats_py": importlib.metadata.version("nats-py"),
        "code": git_code(),
    }


def git_code() -> str:
    """The short commit of the repository, with the packages' uncommitted changes named."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", *PACKAGES],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
        return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    return "?"


def loadavg() -> str:
    """The load averages over 1, 5 and 15 minutes."""
    with contextlib.suppress(OSError), open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])
    return "?"


def code_digest(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Short md5 (8 hex digits) of each package's Python files as this process imports them,
    so that two runs can be shown to have run the same code."""
    out = {}
    for name in packages:
        module = importlib.import_module(name)
        root = Path(module.__file__ or "").parent
        h = hashlib.md5()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
        out[name] = h.hexdigest()[:8]
    return out


def nats_server_version() -> str:
    """The version of the ``nats-server`` the benchmarks start, or ``?``."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError, BrokerError):
        out = subprocess.run(
            [str(find_nats_server()), "--version"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip().removeprefix("nats-server: ")
    return "?"
