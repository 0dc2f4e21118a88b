"""``shoal replay``: the event log (or a JSON-lines file) through the engine's actors on a
virtual clock, for audits and backtests.

This module parses arguments, reads events and writes outputs; the replay itself is
:func:`actors.replay` (:class:`actors.Replay`), the live engine's actor and rule code.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from actors import Replay, SegmentSet, load_segments, parse_duration
from protocol import Event, InvalidEvent, Transition, format_instant, from_instant, to_instant
from store import EventLog, LoggedEvent

from ._errors import UsageError
from ._import_cmd import event_from_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_SQLITE_MAGIC = b"SQLite format 3\x00"
_END_OF_TIME = to_instant(datetime(9999, 12, 31, tzinfo=UTC))
"""The "now" a file's lines are read at: a file replays its own time, none of it ahead."""
_NO_MATPLOTLIB = "--chart needs matplotlib: pip install 'shoal[chart]'"
_PIECE = 10_000
"""Events of a file replayed per hop to the worker thread (the log goes by its chunks)."""
_event_decoder = msgspec.msgpack.Decoder(Event)
_transition_encoder = msgspec.json.Encoder()
_summary_encoder = msgspec.json.Encoder()


def register(sub: Any) -> None:
    """Add the ``replay`` command to the ``shoal`` subparsers ``sub``."""
    p = sub.add_parser(
        "replay",
        help="replay the event log (or a JSON-lines file) on a virtual clock: audits, "
        "backtests, segment sizes over time",
        description="Replay events through the live engine's actor and rule code on a virtual "
        "clock that follows the events' receive instants, firing every deadline at its exact "
        "instant. Without an output option it prints the summary only: per segment, entered, "
        "exited and members at the end (a table on a terminal, else JSON lines "
        '{"segment", "entered", "exited", "members"}; on stderr when an output goes to '
        "stdout).",
    )
    p.add_argument(
        "source",
        nargs="?",
        metavar="FILE",
        help="JSON-lines file of Segment Spec events, each with a `timestamp` (its instant "
        "and receive time; replayed in timestamp order, stable), '-' for stdin, or a shoal "
        "SQLite event log; default: the event log in --data-dir",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the data directory of `shoal serve` whose event log to replay (default: "
        "./shoal-data); read only, so it works beside a running engine",
    )
    p.add_argument(
        "--segments",
        type=Path,
        default=None,
        help="segments TOML file (default: the one shipped with shoal). The file serve used "
        "reproduces what it published; another one backtests new definitions, and nothing "
        "live is touched",
    )
    p.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        help="outputs cover TIME to --until; events before it still apply (they make the "
        "state). Default: the first event's instant. ISO-8601 date or date and time (no "
        "offset: UTC)",
    )
    p.add_argument(
        "--until",
        metavar="TIME",
        help="stop the clock here: events received later are not applied, deadlines fire up "
        "to TIME (past the last event, too). Default: the last event's receive instant",
    )
    p.add_argument(
        "--transitions",
        metavar="FILE",
        help="write the transitions as JSON lines, the payload of shoal.segments.<segment>."
        "<change> ('-': stdout); byte-identical from run to run",
    )
    p.add_argument(
        "--sizes",
        metavar="FILE",
        help="write segment sizes over time as CSV ('-': stdout): instant,<segment>,... one "
        "row per --every from --from to --until, members at that instant",
    )
    p.add_argument(
        "--every",
        default="1d",
        metavar="DURATION",
        help="resolution of --sizes and --chart, e.g. 1h, 1d (default %(default)s)",
    )
    p.add_argument(
        "--chart",
        type=Path,
        metavar="FILE.png",
        help="draw segment sizes over time as a PNG (needs matplotlib: pip install 'shoal[chart]')",
    )
    p.set_defaults(run=run)


# Arguments ------------------------------------------------------------------------------------


def _instant(text: str, flag: str) -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not a date (2026-01-31) or an ISO-8601 date and time "
            "(2026-01-31T09:00:00Z)"
        ) from None
    return to_instant(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))


def _every(text: str) -> int:
    try:
        every = parse_duration(text)
    except ValueError as e:
        raise UsageError(f"--every {e}") from None
    if every <= 0:
        raise UsageError(f"--every {text!r} must be a positive duration")
    return every


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(_NO_MATPLOTLIB) from None


@dataclass(frozen=True, slots=True)
class _Options:
    start: int | None
    until: int | None
    every: int


def _options(args: argparse.Namespace) -> _Options:
    start = None if args.start is None else _instant(args.start, "--from")
    until = None if args.until is None else _instant(args.until, "--until")
    if start is not None and until is not None and start > until:
        raise UsageError(f"--from {args.start} is after --until {args.until}")
    if args.transitions == "-" and args.sizes == "-":
        raise UsageError("--transitions and --sizes cannot both go to stdout")
    if args.source is not None and args.data_dir is not None:
        raise UsageError("give a FILE or --data-dir, not both")
    every = _every(args.every)
    if args.chart is not None:
        _check_matplotlib()  # before the work, not after it
    return _Options(start, until, every)


def _open_output(name: str | None, *, binary: bool, stack: contextlib.ExitStack) -> IO[Any] | None:
    """The stream an output option names ('-': stdout), closed with ``stack``."""
    if name is None:
        return None
    if name == "-":
        return sys.stdout.buffer if binary else sys.stdout
    try:
        if binary:
            return stack.enter_context(open(name, "wb"))
        return stack.enter_context(open(name, "w", encoding="utf-8", newline=""))
    except OSError as e:
        raise UsageError(f"cannot write {name}: {e.strerror}") from None


# Reading events -------------------------------------------------------------------------------


def decode_line(line: bytes) -> Event:
    """The event of one JSON line of a file: a Segment Spec event with a ``timestamp``.

    As ``shoal import`` reads a line (:func:`scripts._import_cmd.event_from_line`), so a
    file replayed gives the transitions the same file imported then replayed gives. A file
    has no broker: the timestamp is both the event's instant and its receive instant, and
    none is "ahead". Without a ``messageId``, the id is ``import:`` and a hash of the
    line's content. Everything else is validated as the live engine validates what
    producers publish.

    Raises:
        InvalidEvent: the line is not such an event; ``reason`` says why.
    """
    return event_from_line(line, now=_END_OF_TIME)


def read_events_file(
    lines: Iterable[bytes],
    on_skip: Callable[[int, str], None] = lambda number, reason: None,
    on_repeat: Callable[[int, int], None] = lambda number, first: None,
) -> list[Event]:
    """The valid events of a JSON-lines file (:func:`decode_line`), in timestamp order
    (stable: equal timestamps keep their file order). Blank lines are ignored.

    ``on_skip(number, reason)`` is called for each line that is not a valid event, and
    ``on_repeat(number, first)`` for each event of a customer with the message id of an
    earlier line ``first``: the engine applies an event once, so the repeat is left out."""
    events: list[Event] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            event = decode_line(line)
        except InvalidEvent as e:
            on_skip(number, e.reason)
            continue
        first = seen.setdefault((event.customer_id, event.message_id), number)
        if first != number:
            on_repeat(number, first)
            continue
        events.append(event)
    events.sort(key=lambda e: e.received)
    return events


def _read_file(source: str) -> tuple[list[Event], int]:
    """Events of a JSON-lines file (or stdin) and how many lines were not valid events."""
    skipped = 0

    def skip(number: int, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        print(f"line {number}: {reason}; skipped", file=sys.stderr)

    def repeat(number: int, first: int) -> None:
        print(f"line {number}: the same event as line {first}; applied once", file=sys.stderr)

    if source == "-":
        return read_events_file(sys.stdin.buffer, skip, repeat), skipped
    try:
        with open(source, "rb") as f:
            return read_events_file(f, skip, repeat), skipped
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror}") from None


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


# The replay and what it writes ----------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    entered: int = 0
    exited: int = 0
    members: int = 0


@dataclass(slots=True)
class _Run:
    """One replay, fed events in pieces; gathers what the outputs need as it goes."""

    segments: SegmentSet
    options: _Options
    transitions_out: IO[bytes] | None
    replay: Replay = field(init=False)
    index: dict[str, int] = field(init=False)
    tallies: list[_Tally] = field(init=False)
    first_at: int | None = None
    last_received: int | None = None
    events: int = 0
    out_of_order: int = 0
    """Events received before an event applied ahead of them (in a log: imported history)."""
    transitions: int = 0
    # Sizes: for grid step k (instant first_at/--from + k * every), the membership changes
    # since step k - 1, per segment. Sparse: only steps where something changed.
    steps: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.replay = Replay(self.segments)
        self.index = {name: i for i, name in enumerate(self.segments.names)}
        self.tallies = [_Tally() for _ in self.segments.names]

    @property
    def origin(self) -> int | None:
        """The instant of the sizes grid's first row."""
        return self.options.start if self.options.start is not None else self.first_at

    def feed_logged(self, entries: Sequence[LoggedEvent]) -> None:
        self.feed([_event_decoder.decode(e.body) for e in entries])

    def feed(self, events: Sequence[Event]) -> None:
        until = self.options.until
        for event in events:
            if until is not None and event.received > until:
                continue  # after the clock's end, as if not yet received
            if self.first_at is None:
                self.first_at = event.at  # before its transitions: the grid starts here
            if self.last_received is None or event.received > self.last_received:
                self.last_received = event.received
            elif event.received < self.last_received:
                self.out_of_order += 1
            self.events += 1
            self._emit(self.replay.apply(event))

    def finish(self) -> int | None:
        """Run the clock on to the end; return the end instant (None: no events, no end)."""
        end = self.options.until
        if end is None:
            end = self.last_received if self.last_received is not None else self.origin
        if end is not None:
            self._emit(self.replay.advance(end))
        if self.transitions_out is not None:
            self.transitions_out.flush()
        return end

    def _emit(self, transitions: list[Transition]) -> None:
        start, out = self.options.start, self.transitions_out
        for t in transitions:
            at = to_instant(t.at)
            i = self.index[t.segment]
            delta = 1 if t.change == "entered" else -1
            tally = self.tallies[i]
            tally.members += delta
            self._add(at, i, delta)
            if start is not None and at < start:
                continue  # before the window: it only makes the state
            if delta > 0:
                tally.entered += 1
            else:
                tally.exited += 1
            self.transitions += 1
            if out is not None:
                out.write(_transition_encoder.encode(t) + b"\n")

    def _add(self, at: int, segment: int, delta: int) -> None:
        origin = self.origin
        assert origin is not None  # known from the first event on
        # The first grid instant at or after ``at``: the change counts from that row on.
        k = max(0, -((origin - at) // self.options.every))
        row = self.steps.get(k)
        if row is None:
            row = self.steps[k] = [0] * len(self.tallies)
        row[segment] += delta

    def sizes(self, end: int | None) -> Iterator[tuple[int, list[int]]]:
        """Each instant of the grid up to ``end``, with the members of each segment then."""
        origin = self.origin
        if origin is None or end is None or end < origin:
            return
        every = self.options.every
        current = [0] * len(self.tallies)
        for k in range((end - origin) // every + 1):
            for i, d in enumerate(self.steps.get(k, ())):
                current[i] += d
            yield origin + k * every, list(current)


def write_sizes(
    out: IO[str], names: Sequence[str], sizes: Iterable[tuple[int, Sequence[int]]]
) -> None:
    """Write sizes as CSV: a header ``instant,<segment>,...``, then one row per
    ``(instant, members of each segment)`` of ``sizes``, the instant in RFC 3339 UTC."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["instant", *names])
    for instant, row in sizes:
        w.writerow([format_instant(instant), *row])


def size_chart(
    names: Sequence[str], instants: Sequence[int], rows: Sequence[Sequence[int]]
) -> Figure:
    """A matplotlib figure of segment sizes over time: one line per segment, labelled with
    its name in the legend. Needs matplotlib; uses no global state (no pyplot).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # matplotlib plots datetimes (its stubs admit only numbers and arrays).
    x: Any = [from_instant(i) for i in instants]
    for i, name in enumerate(names):
        ax.plot(x, [row[i] for row in rows], label=name)
    ax.set_title("Segment sizes")
    ax.set_ylabel("members")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("UTC")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.autofmt_xdate()
    return fig


def write_chart(
    path: Path, names: Sequence[str], instants: Sequence[int], rows: Sequence[Sequence[int]]
) -> None:
    """Draw :func:`size_chart` into a PNG file at ``path``."""
    size_chart(names, instants, rows).savefig(path, format="png", dpi=100)


# Progress and summary -------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} events/s")


def _progress() -> Progress | None:
    if not sys.stderr.isatty():
        return None  # quiet in a pipe
    return Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _summary(run: _Run, end: int | None, out: IO[str]) -> None:
    names = run.segments.names
    if not out.isatty():
        for name, t in zip(names, run.tallies, strict=True):
            doc = {"segment": name, "entered": t.entered, "exited": t.exited, "members": t.members}
            out.write(_summary_encoder.encode(doc).decode() + "\n")
        out.flush()
        return
    origin = run.origin
    span = (
        ""
        if origin is None or end is None
        else f", {format_instant(origin)} to {format_instant(end)}"
    )
    table = Table(
        title=f"{run.events:,} events, {run.replay.customers:,} customers, "
        f"{run.transitions:,} transitions{span}"
    )
    table.add_column("segment")
    for heading in ("entered", "exited", "members at the end"):
        table.add_column(heading, justify="right")
    for name, t in zip(names, run.tallies, strict=True):
        table.add_row(name, f"{t.entered:,}", f"{t.exited:,}", f"{t.members:,}")
    Console(file=out).print(table)


# The command ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    """``shoal replay``: see :func:`register` for the options."""
    options = _options(args)
    segments = load_segments(args.segments)
    source: str | None = args.source
    db: Path | None = None
    if source is None:
        db = (args.data_dir or Path("shoal-data")) / "shoal.db"
        if not db.is_file():
            raise UsageError(
                f"no event log at {db} (give `shoal serve`'s --data-dir, or a FILE of events)"
            )
    elif source != "-" and _is_sqlite(Path(source)):
        db = Path(source)

    with contextlib.ExitStack() as outputs:
        # Opened first: a path that cannot be written fails before the work, not after it.
        transitions_out = _open_output(args.transitions, binary=True, stack=outputs)
        sizes_out = _open_output(args.sizes, binary=False, stack=outputs)
        skipped = 0
        file_events: list[Event] = []
        if db is None:
            assert source is not None
            file_events, skipped = await anyio.to_thread.run_sync(_read_file, source)
        the_run = _Run(segments, options, transitions_out)
        progress = _progress()
        with progress or contextlib.nullcontext():
            if db is not None:
                await _replay_log(the_run, db, progress)
            else:
                await _replay_events(the_run, file_events, progress)
            end = await anyio.to_thread.run_sync(the_run.finish)
        if sizes_out is not None:
            await anyio.to_thread.run_sync(
                write_sizes, sizes_out, segments.names, the_run.sizes(end)
            )
            sizes_out.flush()
        if args.chart is not None:
            instants, rows = [], []
            for instant, row in the_run.sizes(end):
                instants.append(instant)
                rows.append(row)
            await _chart(args.chart, segments.names, instants, rows)
    to_stdout = "-" in (args.transitions, args.sizes)
    _summary(the_run, end, sys.stderr if to_stdout else sys.stdout)
    if the_run.out_of_order:
        print(
            f"note: {the_run.out_of_order} event(s) of the log were received before events "
            "logged ahead of them (imported history?); a replay applies events in log order",
            file=sys.stderr,
        )
    if skipped:
        print(f"{skipped} line(s) skipped", file=sys.stderr)
        return 1
    return 0


async def _chart(
    path: Path, names: Sequence[str], instants: Sequence[int], rows: Sequence[Sequence[int]]
) -> None:
    try:
        await anyio.to_thread.run_sync(write_chart, path, names, instants, rows)
    except ImportError:
        raise UsageError(_NO_MATPLOTLIB) from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


async def _replay_events(the_run: _Run, events: list[Event], progress: Progress | None) -> None:
    task = progress.add_task("", total=len(events)) if progress is not None else None
    for i in range(0, len(events), _PIECE):
        piece = events[i : i + _PIECE]
        await anyio.to_thread.run_sync(the_run.feed, piece)
        if progress is not None and task is not None:
            progress.advance(task, len(piece))


async def _replay_log(the_run: _Run, db: Path, progress: Progress | None) -> None:
    async with await EventLog.open_read_only(db) as log:
        # What is in the log now: an engine may append while we read.
        through = log.last_event_seq
        task: TaskID | None = None
        if progress is not None:
            task = progress.add_task("", total=await log.count_events())
        async for chunk in log.read_events():
            entries = [e for e in chunk if e.seq <= through]
            await anyio.to_thread.run_sync(the_run.feed_logged, entries)
            if progress is not None and task is not None:
                progress.advance(task, len(entries))
            if len(entries) < len(chunk):
                break
