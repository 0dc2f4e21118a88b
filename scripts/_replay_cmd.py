"""``shoal replay``: the event log (or a JSON-lines file) through the engine's actors on a
virtual clock, for audits and backtests.

This module parses arguments, opens the inputs and writes the outputs; the replay and its
counts are :class:`actors.ReplayTally` (the live engine's actor and rule code), the file's
events :class:`protocol.OrderedHistory` (in time order, in bounded memory), the log's
:func:`actors.read_log` (in chunks). Nothing is held per event.
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import csv
import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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

from actors import ReplayTally, load_segments, parse_duration, read_bases, read_log
from protocol import (
    MAX_FUTURE_SKEW,
    SECOND,
    Event,
    OrderedHistory,
    format_instant,
    from_instant,
    to_instant,
)
from store import Store

from ._errors import ExitCode, NotFound, UsageError, file_error
from ._input import PIECE
from ._output import output_file, output_path
from ._parallel_replay import ParallelReplay, available_cores
from ._signals import in_thread
from ._times import human_instant, now

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_SQLITE_MAGIC = b"SQLite format 3\x00"
_NO_MATPLOTLIB = "--chart needs matplotlib: pip install 'shoal[chart]'"
_summary_encoder = msgspec.json.Encoder()
AUTO_PARALLEL = 20_000
"""Events from which ``shoal replay`` uses every core by default: below, starting the worker
processes (about half a second) costs more than they save."""
MAX_PROCESSES = 64


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
        "SQLite event log; default: the event log in --data-dir. Lines are validated as "
        "`shoal import` validates them, except that times are not checked against now: a "
        "backtest runs on a virtual clock",
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
        help="draw segment sizes over time as a PNG (needs matplotlib: pip install "
        f"'shoal[chart]'): up to {SINGLE_CHART_MAX} segments on one chart, more as a panel "
        "each; every segment in a colour of its own",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="replay in N processes, the customers split by partition (the transitions and "
        "their order are the same whatever N). Default: every core this process may use "
        f"for {AUTO_PARALLEL:,} events or more, else 1",
    )
    p.add_argument(
        "--only",
        metavar="SEGMENT,...",
        help="with --chart: draw only these segments (comma-separated names, in this order)",
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


def _only(text: str | None, known: Sequence[str]) -> tuple[str, ...] | None:
    """The segments ``--only`` names, checked against those defined."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError("--only needs at least one segment name")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"--only: unknown segment{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)}; the segments defined are: {', '.join(known)}"
        )
    return names


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
    if args.only is not None and args.chart is None:
        raise UsageError("--only chooses the segments --chart draws: give --chart FILE.png")
    if args.chart is not None:
        _check_matplotlib()  # before the work, not after it
    if args.processes is not None and not 1 <= args.processes <= MAX_PROCESSES:
        raise UsageError(f"--processes must be from 1 to {MAX_PROCESSES}, not {args.processes}")
    return _Options(start, until, every)


def _open_output(name: str | None, *, binary: bool, stack: contextlib.ExitStack) -> IO[Any] | None:
    """The stream an output option names ('-': stdout), closed with ``stack``: a file is
    written under a temporary name and takes its name only once complete."""
    if name is None:
        return None
    if name == "-":
        return sys.stdout.buffer if binary else sys.stdout
    if binary:
        return stack.enter_context(output_file(name, binary=True))
    return stack.enter_context(output_file(name, binary=False))


# Reading events -------------------------------------------------------------------------------


def _skip(number: int, reason: str) -> None:
    print(f"line {number}: {reason}; skipped", file=sys.stderr)


def _repeat(number: int, first: int) -> None:
    print(f"line {number}: the same event as line {first}; applied once", file=sys.stderr)


async def _read_file(source: str, history: OrderedHistory) -> None:
    """Read a JSON-lines file (or stdin) into ``history``, a piece per hop to a worker
    thread: Ctrl-C waits for one piece at most (and for it: the history's temporary files
    are removed after)."""
    with contextlib.ExitStack() as stack:
        try:
            f = sys.stdin.buffer if source == "-" else stack.enter_context(open(source, "rb"))
            while await in_thread(history.read, itertools.islice(f, PIECE)):
                pass
        except OSError as e:
            raise file_error(source, e) from None
    await in_thread(history.finish)


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError as e:
        raise file_error(path, e) from None


# The replay and what it writes ----------------------------------------------------------------


def write_sizes(
    out: IO[str], names: Sequence[str], sizes: Iterable[tuple[int, Sequence[int]]]
) -> None:
    """Write sizes as CSV: a header ``instant,<segment>,...``, then one row per
    ``(instant, members of each segment)`` of ``sizes``, the instant in RFC 3339 UTC."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["instant", *names])
    for instant, row in sizes:
        w.writerow([format_instant(instant), *row])


SINGLE_CHART_MAX = 6
"""The most segments drawn together on one chart; more are drawn as small multiples (a
panel each), which stay readable however many there are."""
_TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def palette(n: int) -> list[str]:
    """``n`` colours (``#rrggbb``), none repeated, whatever ``n``: matplotlib's ten
    categorical colours up to ten, else ``n`` hues evenly spaced around the colour wheel,
    adjacent ones told apart by lightness too."""
    if n <= len(_TAB10):
        return list(_TAB10[:n])
    out: list[str] = []
    for i in range(n):
        # Hue i/n is distinct for each i; the darker and lighter turns keep neighbours
        # apart. Dark enough everywhere (yellows too) to read on white.
        r, g, b = colorsys.hls_to_rgb(i / n, 0.32 if i % 2 else 0.45, 0.8)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    if len(set(out)) < n:  # more hues than 8-bit colours tell apart (never in practice)
        raise ValueError(f"cannot draw {n} segments in distinct colours")
    return out


def size_chart(
    names: Sequence[str], instants: Sequence[int], rows: Sequence[Sequence[int]]
) -> Figure:
    """A matplotlib figure of segment sizes over time, each segment in a colour of its own
    (:func:`palette`). Up to :data:`SINGLE_CHART_MAX` segments share one chart, each line
    labelled with its name at its end (and in the legend); more get a panel each (small
    multiples), titled with the name and the last size, each on its own scale. Needs
    matplotlib; uses no global state (no pyplot).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # matplotlib plots datetimes (its stubs admit only numbers and arrays).
    x: Any = [from_instant(i) for i in instants]
    colours = palette(len(names))
    span = f", {human_instant(instants[0])} to {human_instant(instants[-1])}" if instants else ""

    def dates(ax: Any) -> None:
        locator = AutoDateLocator(minticks=3, maxticks=7)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.grid(True, alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    if len(names) <= SINGLE_CHART_MAX:
        fig = Figure(figsize=(11, 5.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
            ax.plot(x, [row[i] for row in rows], label=name, color=colour, linewidth=2)
        dates(ax)
        ax.set_ylabel("members")
        ax.set_title("Segment sizes" + span, loc="left")
        if rows:
            _label_line_ends(ax, names, colours, rows[-1], x[-1])
        return fig

    cols = min(4, math.ceil(math.sqrt(len(names))))
    lines = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.3 * lines + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, cols, sharex=True, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        ys = [row[i] for row in rows]
        ax.plot(x, ys, color=colours[i], linewidth=2)
        ax.fill_between(x, ys, color=colours[i], alpha=0.15, linewidth=0)
        # An empty segment's panel reads 0 to 1: matplotlib's own limits (0 to 0.05) would
        # show fractions of a member.
        ax.set_ylim(bottom=0, top=None if any(ys) else 1)
        ax.set_title(name, loc="left", fontsize=11, fontweight="bold")
        if ys:
            ax.set_title(f"{ys[-1]:,} at the end", loc="right", fontsize=9, color="0.35")
        dates(ax)
    for j in range(len(names), lines * cols):
        axes[j // cols][j % cols].set_visible(False)
        # The panel above is the last of its column: it shows the dates.
        axes[j // cols - 1][j % cols].xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"Segment sizes{span}; each panel on its own scale", x=0.01, ha="left")
    return fig


def _label_line_ends(
    ax: Any, names: Sequence[str], colours: Sequence[str], last: Sequence[int], at: Any
) -> None:
    """Write each name at the end of its line, in its colour, nudged apart so that no two
    labels overlap (lines ending at close values)."""
    low, high = ax.get_ylim()
    gap = (high - low) * 0.06  # about one line of text on a chart this tall
    order = sorted(range(len(names)), key=lambda i: last[i])
    placed: list[float] = []
    for i in order:
        y = float(last[i])
        if placed and y < placed[-1] + gap:
            y = placed[-1] + gap
        placed.append(y)
        ax.annotate(
            f" {names[i]}",
            xy=(at, last[i]),
            xytext=(at, y),
            color=colours[i],
            fontsize=10,
            fontweight="bold",
            va="center",
            annotation_clip=False,
        )


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


def _summary(run: ReplayTally, end: int | None, out: IO[str]) -> None:
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
        else f", {human_instant(origin)} to {human_instant(end)}"
    )
    table = Table(
        title=f"{run.events:,} events, {run.customers:,} customers, "
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
    only = _only(args.only, segments.names)  # before the work, not after it
    source: str | None = args.source
    db: Path | None = None
    if source is None:
        db = (args.data_dir or Path("shoal-data")) / "shoal.db"
        if not db.is_file():
            raise NotFound(
                f"no event log at {db} (give `shoal serve`'s --data-dir, or a FILE of events)"
            )
    elif source != "-" and _is_sqlite(Path(source)):
        db = Path(source)

    with contextlib.ExitStack() as outputs:
        # Opened first: a path that cannot be written fails before the work, not after it.
        transitions_out = _open_output(args.transitions, binary=True, stack=outputs)
        sizes_out = _open_output(args.sizes, binary=False, stack=outputs)
        history: OrderedHistory | None = None
        cut: tuple[int, int] | None = None
        ahead = _Ahead(now() + MAX_FUTURE_SKEW)
        if db is None:
            assert source is not None
            history = OrderedHistory(on_skip=_skip, on_repeat=_repeat)
            outputs.enter_context(history)  # its temporary files go, whatever happens
            await _read_file(source, history)
            events = history.events
        else:
            events = await _count_log(db)
        processes = args.processes
        if processes is None:
            processes = available_cores() if events >= AUTO_PARALLEL else 1
        replayer = None
        if processes > 1:
            replayer = outputs.enter_context(ParallelReplay(segments, processes))
        the_run = ReplayTally(
            segments,
            start=options.start,
            until=options.until,
            every=options.every,
            transitions_out=transitions_out,
            replay=replayer,
        )
        progress = _progress()
        with progress or contextlib.nullcontext():
            if history is not None:
                await _replay_history(the_run, history, progress, ahead)
            else:
                assert db is not None
                cut = await _replay_log(the_run, db, progress, events)
            end = await in_thread(the_run.finish)
        if sizes_out is not None:
            await in_thread(write_sizes, sizes_out, segments.names, the_run.sizes(end))
            sizes_out.flush()
        if args.chart is not None:
            instants, rows = [], []
            for instant, row in the_run.sizes(end):
                instants.append(instant)
                rows.append(row)
            names: Sequence[str] = segments.names
            if only is not None:
                columns = [names.index(n) for n in only]
                names, rows = only, [[row[c] for c in columns] for row in rows]
            await _chart(args.chart, names, instants, rows)
    to_stdout = "-" in (args.transitions, args.sizes)
    _summary(the_run, end, sys.stderr if to_stdout else sys.stdout)
    if cut is not None:
        print(
            f"note: the event log is cut (retention) at {human_instant(cut[0])}: the replay "
            f"reaches back to there, starting from the state then of {cut[1]} customer(s) "
            "(memberships that began before it are dated at each customer's last event "
            "before it)",
            file=sys.stderr,
        )
    if the_run.out_of_order:
        print(
            f"note: {the_run.out_of_order} event(s) of the log were received before events "
            "logged ahead of them (imported history?); a replay applies events in log order",
            file=sys.stderr,
        )
    if ahead.count:
        print(
            f"note: {ahead.count} event(s) are stamped more than "
            f"{MAX_FUTURE_SKEW // SECOND} s after now (the latest at "
            f"{human_instant(ahead.latest)}): a replay runs on a virtual clock and applies "
            "them, `shoal import` (which checks times against now) would refuse them",
            file=sys.stderr,
        )
    if history is not None and history.skipped:
        print(f"{history.skipped} line(s) skipped", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


async def _chart(
    path: Path, names: Sequence[str], instants: Sequence[int], rows: Sequence[Sequence[int]]
) -> None:
    try:
        with output_path(path) as temporary:
            await in_thread(write_chart, temporary, names, instants, rows)
    except ImportError:
        raise UsageError(_NO_MATPLOTLIB) from None
    except OSError as e:
        raise file_error(path, e, "write") from None


class _Ahead:
    """The events of a file stamped after ``limit`` (now, and the skew a live event may
    have): how many, and the latest instant."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.latest = 0

    def see(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.at > self.limit:
                self.count += 1
                self.latest = max(self.latest, event.at)


async def _replay_history(
    the_run: ReplayTally, history: OrderedHistory, progress: Progress | None, ahead: _Ahead
) -> None:
    task = progress.add_task("", total=history.events) if progress is not None else None
    events = iter(history)

    def feed_piece() -> int:
        piece = list(itertools.islice(events, PIECE))
        ahead.see(piece)
        the_run.feed(piece)
        return len(piece)

    while fed := await in_thread(feed_piece):
        if progress is not None and task is not None:
            progress.advance(task, fed)


async def _count_log(db: Path) -> int:
    async with await Store.open_read_only(db) as store:
        return await store.events.count()


async def _replay_log(
    the_run: ReplayTally, db: Path, progress: Progress | None, events: int
) -> tuple[int, int] | None:
    """Replay the log of ``db`` (``events`` long, as counted before); return, when it was cut
    (retention), the cut instant and how many customers' states the replay started from."""
    async with await Store.open_read_only(db) as store:
        cut = store.retention.cut
        based = 0
        if cut is not None:
            # What the cut log still holds begins there: each customer's state then.
            async for bases in read_bases(store):
                await in_thread(the_run.start_from, bases)
                based += len(bases)
        task: TaskID | None = None
        if progress is not None:
            task = progress.add_task("", total=events)
        async for entries in read_log(store):
            await in_thread(the_run.feed_logged, entries)
            if progress is not None and task is not None:
                progress.advance(task, len(entries))
        return None if cut is None else (cut.at, based)
