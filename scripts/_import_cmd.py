"""``shoal import`` and ``shoal export``: history in and out of the event log, as JSON lines.

Import writes straight into the SQLite log (taking its single-writer lock), so it is for
history while the engine is stopped: the next ``shoal serve`` folds the imported events in.
Export reads the log beside a running engine. The work is :func:`actors.import_history` and
:func:`actors.export_history`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from actors import export_history, import_history
from store import Store

from ._errors import ExitCode, file_error
from ._output import output_file


def register(sub: Any) -> None:
    """Add ``import`` and ``export`` to the ``shoal`` subcommands ``sub``."""
    imp = sub.add_parser(
        "import",
        help="load history (JSON lines) into the event log, while the engine is stopped",
    )
    imp.add_argument(
        "file",
        help="JSON-lines file of Segment Spec events ('-': stdin), validated as `shoal replay "
        "FILE` validates them and, unlike replay, checked against now: a timestamp more "
        "than 300 s ahead is refused",
    )
    imp.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data)",
    )
    imp.set_defaults(run=_import)

    exp = sub.add_parser("export", help="write the event log as JSON lines")
    exp.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        metavar="DIR",
        help="the engine's data directory (default: ./shoal-data); it may be running",
    )
    exp.add_argument(
        "--output", "-o", metavar="FILE", help="file to write (default or '-': stdout)"
    )
    exp.set_defaults(run=_export)


class _Rate(ProgressColumn):
    """Events per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} events/s", style="progress.data.speed")


@contextlib.contextmanager
def _progress(*columns: str | ProgressColumn) -> Iterator[tuple[Progress, Callable[[str], None]]]:
    """A progress bar on stderr when it is a terminal (quiet otherwise), and a function that
    prints a line to stderr above it."""
    console = Console(stderr=True)
    live = console.is_terminal
    progress = Progress(*columns, console=console, disable=not live, transient=False)

    def say(text: str) -> None:
        if live:
            progress.console.print(Text(text), soft_wrap=True)
        else:
            print(text, file=sys.stderr)

    with progress:
        yield progress, say


def _now() -> int:
    return time.time_ns() // 1000


async def _import(args: argparse.Namespace) -> int:
    name: str = args.file
    try:
        stream = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
    except OSError as e:
        raise file_error(name, e) from None
    try:
        total = os.fstat(stream.fileno()).st_size if name != "-" else None
        async with await Store.open(args.data_dir / "shoal.db") as store:
            with _progress(
                TextColumn("importing"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[events]:,} events"),
            ) as (progress, say):
                task = progress.add_task("import", total=total or None, events=0)
                read = 0

                def advance(size: int, events: int) -> None:
                    nonlocal read
                    read += events
                    progress.update(task, advance=size, events=read)

                report = await import_history(
                    store,
                    stream,
                    now=_now(),
                    on_skip=lambda number, reason: say(f"line {number}: {reason}; skipped"),
                    on_progress=advance,
                )
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    print(
        f"imported {report.imported} event(s), {report.duplicates} duplicate(s), "
        f"{report.skipped} line(s) skipped",
        file=sys.stderr,
    )
    return ExitCode.BAD_INPUT if report.skipped else ExitCode.OK


async def _export(args: argparse.Namespace) -> int:
    async with await Store.open_read_only(args.data_dir / "shoal.db") as store:
        total = await store.events.count()
        to_stdout = args.output in (None, "-")
        with contextlib.ExitStack() as stack:
            # A file takes its name only once complete: Ctrl-C leaves none half written.
            out = (
                sys.stdout.buffer
                if to_stdout
                else stack.enter_context(output_file(args.output, binary=True))
            )
            with _progress(
                TextColumn("exporting"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
            ) as (progress, _):
                task = progress.add_task("export", total=total)
                written = await export_history(
                    store, out, on_progress=lambda n: progress.advance(task, n)
                )
    print(f"exported {written} event(s)", file=sys.stderr)
    return 0
