"""``shoal import`` and ``shoal export``: history in and out of shoal, as JSON lines.

Import publishes the history into the events stream, as one import between two markers
(:func:`protocol.nats.publish_import`; README, Import): to the broker of a running engine,
else to the data directory's embedded broker, started for the import (the next ``shoal
serve`` applies it). Export reads the log beside a running engine
(:func:`actors.export_history`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from actors import export_history
from protocol import (
    KEYS_DIR,
    ApiError,
    Event,
    OrderedHistory,
    embedded_broker,
    format_instant,
    port_in_use,
    role_key_file,
)
from protocol.nats import (
    ApiClient,
    Credentials,
    connect,
    ensure_streams,
    permission_guard,
    publish_import,
)
from store import Store

from ._connection import credentials_of
from ._errors import ExitCode, file_error
from ._input import PIECE
from ._output import output_file
from ._signals import in_thread


def register(sub: Any) -> None:
    """Add ``import`` and ``export`` to the ``shoal`` subcommands ``sub``."""
    imp = sub.add_parser(
        "import",
        help="load history (JSON lines) into the events stream, the engine running or not",
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
        help="the engine's data directory: its embedded broker is started for the import when "
        "no engine runs, and its operator key used (default: ./shoal-data)",
    )
    imp.add_argument(
        "--nats", action="append", metavar="URL", help="the engine's NATS server (not embedded)"
    )
    imp.add_argument("--host", default="127.0.0.1", help="the embedded broker's address")
    imp.add_argument("--port", type=int, default=4222, help="the embedded broker's port")
    imp.add_argument(
        "--wait",
        action="store_true",
        help="with an engine running, wait until it has applied the import (its status lists "
        "the import as applied); Ctrl-C stops waiting, the import goes on",
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
        with _progress(
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeRemainingColumn(),
        ) as (progress, say):
            # Read into receive order (a file's lines may come in any order), repeats left
            # out, in bounded memory: the log then holds them as a replay of the file sees
            # them.
            with OrderedHistory(
                on_skip=lambda number, reason: say(f"line {number}: {reason}; skipped"),
                now=_now(),
            ) as history:
                while await in_thread(history.read, itertools.islice(stream, PIECE)):
                    pass  # (a piece per hop: Ctrl-C waits for one, and its files go after)
                events = await in_thread(history.finish)
                task = progress.add_task("import", total=events or None)
                async with contextlib.AsyncExitStack() as stack:
                    servers, started = await _import_servers(stack, args)
                    credentials = credentials_of(args).for_role("operator")
                    nc = await connect(servers, name="shoal-import", credentials=credentials)
                    stack.push_async_callback(nc.close)
                    async with permission_guard(nc):
                        done = await publish_import(
                            nc,
                            _pieces(iter(history)),
                            on_progress=lambda n: progress.advance(task, n),
                        )
                        if args.wait and not started:
                            say(f"waiting for the engine to apply import {done.import_id}")
                            await _applied(ApiClient(nc), done.import_id)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    print(
        f"imported {done.published} event(s), {done.duplicates + history.repeated} "
        "duplicate(s), "
        f"{history.skipped} line(s) skipped; "
        + (
            "the next `shoal serve` applies them"
            if started
            else "the engine applied them"
            if args.wait
            else "the engine applies them once it reaches the import's end"
        ),
        file=sys.stderr,
    )
    return ExitCode.BAD_INPUT if history.skipped else ExitCode.OK


async def _applied(api: ApiClient, import_id: str, every: float = 0.5) -> None:
    """Return once the engine's status lists ``import_id`` as applied. While no engine
    answers (it may be starting or restarting), keep asking: an import stays open in the
    stream until an engine applies it."""
    while True:
        try:
            status = await api.status()
        except ApiError:  # no engine answering (yet), or a refusal: ask again
            status = None
        if status is not None and import_id in status.imports_applied:
            return
        await anyio.sleep(every)


async def _pieces(events: Iterator[Event], size: int = 1_000) -> AsyncIterator[list[Event]]:
    """``events`` in lists, each read off the event loop (they may come from files)."""
    while True:
        piece = await in_thread(lambda: list(itertools.islice(events, size)))
        if not piece:
            return
        yield piece


async def _import_servers(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace
) -> tuple[list[str], bool]:
    """Where to publish an import, and whether its broker was started for it: ``--nats``;
    else the embedded broker of a ``shoal serve`` running on ``--host``/``--port``; else
    the data directory's embedded broker, started here (with the streams declared, as the
    engine) until ``stack`` closes: the next ``shoal serve`` applies the import."""
    if args.nats:
        return list(args.nats), False
    if port_in_use(args.host, args.port):
        return [f"nats://{args.host}:{args.port}"], False
    data_dir: Path = args.data_dir
    url = await stack.enter_async_context(
        embedded_broker(data_dir / "nats", host=args.host, port=args.port, keys=data_dir / KEYS_DIR)
    )
    engine = Credentials(nkey=role_key_file(data_dir, "engine"), role="engine").for_role("engine")
    nc = await connect([url], name="shoal-import-streams", credentials=engine)
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    return [url], True


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
            cut = store.retention.cut
    print(f"exported {written} event(s)", file=sys.stderr)
    if cut is not None:
        print(
            f"note: the event log is cut (retention): events received up to "
            f"{format_instant(cut.at)} are kept only as each customer's state, and are not "
            "in the export",
            file=sys.stderr,
        )
    return 0
