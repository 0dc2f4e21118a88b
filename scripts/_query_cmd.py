"""``shoal status``, ``customer``, ``explain``, ``members`` and ``segments list|apply``:
requests to a running engine's query service (:class:`protocol.nats.ApiClient`), printed as
tables for people or, with ``--json``, as one JSON line for machines.

Also :func:`serve_queries`, which ``shoal serve`` runs beside the engine.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from nats.aio.client import Client
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from actors import (
    DefinitionError,
    Engine,
    EngineApi,
    SegmentSet,
    load_segments_by_value,
    parse_duration,
)
from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    MAX_FORGET,
    MAX_PAGE,
    MAX_PREFIX_CHARS,
    MAX_SEARCH,
    SECOND,
    ApiError,
    ConditionExplanation,
    CustomerReply,
    DefinitionsApplied,
    DefinitionsReply,
    DefinitionsRequest,
    ExplainReply,
    GatheredStatus,
    MembersReply,
    Ownership,
    ParkedInfo,
    SearchReply,
    SegmentsReply,
    partition_ranges,
)
from protocol.nats import ApiClient, Credentials, connect, serve_api

from ._connection import credentials_of, servers_of
from ._errors import UsageError
from ._export import NOT_FOUND, atomic_output, export_members
from ._times import human_instant

_TIMEOUT = 5.0
_APPLY_TIMEOUT = 600.0
"""Seconds ``segments apply`` waits: new rules reading other facts reread the whole log."""
_encoder = msgspec.json.Encoder()


async def serve_queries(
    engine: Engine,
    servers: Sequence[str],
    credentials: Credentials | None = None,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    owned: Iterable[int] | None = None,
    ownership: Callable[[], Ownership] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the query service for ``engine`` on a connection of its own (so requests never
    wait behind the engine's acknowledgements and publishes) until cancelled: it answers
    for the partitions ``owned`` (all when None) of ``partitions`` (P of ``SHOAL_EVENTS``);
    ``ownership`` says what the engine owns among several, for its status."""
    nc = await connect(servers, name="shoal-api", credentials=credentials)
    try:
        await serve_api(
            nc,
            EngineApi(engine, ownership),
            partitions=partitions,
            owned=owned,
            metadata={"consumer": engine.consumer},
            task_status=task_status,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()


def register(sub: Any, segments: Any) -> None:
    """Add the query commands to the ``shoal`` subparsers ``sub``, and ``list`` and ``apply``
    (and ``validate --nats``) to the ``segments`` subparsers."""

    def common(p: argparse.ArgumentParser, timeout: float = _TIMEOUT) -> None:
        p.add_argument("--nats", action="append", metavar="URL", help="NATS server URL")
        p.add_argument("--json", action="store_true", help="one JSON line instead of tables")
        p.add_argument(
            "--timeout",
            type=float,
            default=timeout,
            metavar="SECONDS",
            help="how long to wait for the engine (default %(default)g)",
        )

    p = sub.add_parser(
        "status",
        help="how the running engine is doing: events/s, consumer lag, deadlines, sizes",
    )
    common(p)
    p.set_defaults(run=_status)

    p = sub.add_parser(
        "customer",
        help="one customer's state: segments, score, traits, counters, next deadline; "
        "--search PREFIX finds customers by the start of their id",
        description="Print one customer's state; or, with --search PREFIX, the ids of the "
        "customers that start with PREFIX, in id order, one per line (exit status 4 when "
        "none does).",
    )
    p.add_argument("customer_id", metavar="ID", nargs="?")
    p.add_argument(
        "--search",
        metavar="PREFIX",
        help=f"the customers whose id starts with PREFIX (at most {MAX_PREFIX_CHARS} "
        "characters) instead of one customer's state",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help=f"with --search: at most N ids (default %(default)s, at most {MAX_SEARCH})",
    )
    common(p)
    p.set_defaults(run=_customer)

    p = sub.add_parser(
        "explain",
        help="why a customer is or is not in a segment (or each), and when that changes",
    )
    p.add_argument("customer_id", metavar="ID")
    p.add_argument("segment", nargs="?", help="only this segment")
    common(p)
    p.set_defaults(run=_explain)

    p = sub.add_parser(
        "members",
        help="a segment's members, a page at a time in id order, and its size",
        description="Print a page of the segment's members, one id per line, in id order; "
        "the size and the cursor of the next page go to stderr.",
    )
    p.add_argument("segment", metavar="SEGMENT")
    p.add_argument("--count", action="store_true", help="print the number of members only")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="ids per page (100)")
    p.add_argument("--cursor", metavar="C", help="start after this id (a page's next cursor)")
    p.add_argument(
        "--format",
        choices=["csv", "jsonl"],
        help="export the whole segment, every page, in id order: CSV with the columns "
        "customer_id,true_since, or JSON lines {customer_id, true_since}; true_since is "
        "when the customer entered the segment (RFC 3339, UTC)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="with --format: write the export to FILE (complete or not at all: written "
        "under a temporary name, renamed when done) instead of stdout",
    )
    common(p)
    p.set_defaults(run=_members)

    p = sub.add_parser(
        "unpark",
        help="try parked customers again (set aside after an error; `status` lists them)",
        description="Ask the running engine to try these parked customers again: each is "
        "rebuilt from the log and the events logged since it was parked are applied. Exits "
        "1 if any stays parked (its new error is printed).",
    )
    p.add_argument("customer_ids", nargs="+", metavar="ID")
    common(p, _APPLY_TIMEOUT)
    p.set_defaults(run=_unpark)

    p = sub.add_parser(
        "forget",
        help="erase customers everywhere shoal keeps data (GDPR art. 17): exits first",
        description="Erase these customers everywhere shoal keeps data: each exits every "
        "segment it is in (an 'exited' transition with cause 'forgotten', so campaigns "
        "stop), then its events, snapshots, outbox rows, rejected messages and transitions "
        "are erased from the store and the broker's streams. Only a hash of each id is "
        "kept, with its last version, when and by whom. Exits 1 if an erasure did not "
        "finish within --wait (it goes on in the engine).",
    )
    p.add_argument("customer_ids", nargs="*", metavar="ID")
    p.add_argument(
        "--from-file",
        type=Path,
        metavar="FILE",
        help="also the ids in FILE, one per line (blank lines and lines starting with # skipped)",
    )
    p.add_argument(
        "--suppress",
        metavar="DURATION",
        help="refuse their later events for this long (e.g. 400d): the refusals name a hash "
        "of the id only",
    )
    p.add_argument(
        "--by",
        metavar="NAME",
        help="who asks, for the record of the erasure (default: user@host)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the erasures to finish (default %(default)g; 0: return "
        "once the orders are stored)",
    )
    common(p)
    p.set_defaults(run=_forget)

    p = segments.add_parser("list", help="the running engine's definitions with their sizes")
    common(p)
    p.set_defaults(run=_list)

    p = segments.add_parser(
        "apply",
        help="validate FILE on the running engine and switch it to FILE (not kept across "
        "a restart: also give it to serve --segments)",
    )
    p.add_argument("file", type=Path, help="segments TOML file")
    common(p, _APPLY_TIMEOUT)
    p.set_defaults(run=_apply)

    # validate stays offline; with --nats it also shows what the file would change there.
    validate: argparse.ArgumentParser = segments.choices["validate"]
    offline = validate.get_default("run")
    validate.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="also check it on the running engine: what applying it would change",
    )

    async def run_validate(args: argparse.Namespace) -> int:
        code: int = await offline(args)
        if args.nats:
            print(_changes(await _definitions(args, apply=False)))
        return code

    validate.set_defaults(run=run_validate, json=False, timeout=_TIMEOUT)


class _client:
    """A connected :class:`ApiClient` for a command's ``--nats`` and ``--timeout``, as
    ``role``."""

    def __init__(self, args: argparse.Namespace, role: str = "operator") -> None:
        self._servers = servers_of(args)
        self._credentials = credentials_of(args).for_role(role)
        self._timeout = args.timeout
        self._nc: Client | None = None

    async def __aenter__(self) -> ApiClient:
        self._nc = await connect(self._servers, name="shoal-cli", credentials=self._credentials)
        return ApiClient(self._nc, timeout=self._timeout)

    @property
    def max_payload(self) -> int:
        """The largest message the connected NATS server takes."""
        assert self._nc is not None
        return int(self._nc.max_payload)

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()


async def _ask(
    args: argparse.Namespace,
    call: Callable[[ApiClient], Awaitable[msgspec.Struct]],
    show: Callable[[Any, Console], None],
    *,
    role: str = "operator",
) -> int:
    async with _client(args, role) as api:
        reply = await call(api)
    _warn_missing(getattr(reply, "missing_partitions", []), getattr(reply, "partition_count", 0))
    if args.json:
        sys.stdout.write(_encoder.encode(reply).decode() + "\n")
    else:
        show(reply, Console(highlight=False))
    return 0


def _warn_missing(missing: list[int], count: int | None) -> None:
    """One line on stderr when no engine answered for some partitions: the answer leaves
    their customers out (``--json`` says so too: ``missing_partitions``, ``complete``)."""
    if missing:
        print(
            f"shoal: warning: no engine answered for partition(s) {partition_ranges(missing)} "
            f"of {count}: this answer leaves their customers out",
            file=sys.stderr,
        )


def _when(at: datetime | str | None) -> str:
    return "-" if at is None else human_instant(at)


# status -----------------------------------------------------------------------------------


async def _status(args: argparse.Namespace) -> int:
    return await _ask(args, lambda api: api.status(), _show_status)


def _applied(a: DefinitionsApplied) -> str:
    """Version, instant and origin of the definitions in force, on one line."""
    if a.origin == "file":
        where = f"from the served file {a.source}"
        if a.content_hash:
            where += f" (sha256 {a.content_hash[:12]})"
    else:
        where = f"over the API ({a.source}" + (f", by {a.client}" if a.client else "") + ")"
    return f"version {a.version}, applied {_when(a.applied_at)} {where}"


def _show_status(r: GatheredStatus, out: Console) -> None:
    """One engine's status as a table; for several, a line per engine, then the table of
    their combined counts."""
    engine = f"up, consumer {r.consumer} on {r.filter_subject}"
    if len(r.engines) > 1:
        engines = Table("engine", "partitions", "customers", "events/s", "consumer lag")
        for e in r.engines:
            elag = "unknown" if e.consumer_lag is None else str(e.consumer_lag)
            loading = "" if e.warm else " (loading)"
            name = e.ownership.engine_id if e.ownership else f"{e.consumer} on {e.filter_subject}"
            engines.add_row(
                f"{name}{loading}",
                partition_ranges(e.partitions),
                str(e.customers),
                f"{e.events_per_second:g}",
                elag,
            )
        out.print(engines)
        engine = f"{len(r.engines)} engines up, combined below"
    if r.partition_count is not None:
        engine += f"; partitions {partition_ranges(r.partitions)} of {r.partition_count}"
    lag = "unknown" if r.consumer_lag is None else str(r.consumer_lag)
    warm = "" if r.warm else "  (still loading customers after a restart)"
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    for key, value in (
        ("engine", f"{engine}{warm}"),
        *((("paused", f"ingestion paused: {r.paused}"),) if r.paused else ()),
        ("at", _when(r.at)),
        ("customers", str(r.customers)),
        ("events/s", f"{r.events_per_second:g} (last 10 s)"),
        (
            "events",
            f"{r.events_applied} applied, {r.events_duplicate} duplicate, "
            f"{r.events_rejected} rejected",
        ),
        ("consumer lag", f"{lag} waiting in the broker, {r.buffered} received not applied"),
        ("transitions", f"{r.transitions} committed, {r.unpublished} not yet published"),
        ("timer queue", f"{r.pending_deadlines} pending, next due {_when(r.next_deadline)}"),
        ("deadlines fired", str(r.deadlines_fired)),
        ("definitions", f"{r.definitions} ({r.fingerprint})"),
        *((("applied", _applied(r.definitions_applied)),) if r.definitions_applied else ()),
        *(("owner", _owner(e.ownership)) for e in (r.engines or [r]) if e.ownership),
        ("quarantined", f"{r.events_quarantined} events (rejected: they raised when applied)"),
        (
            "parked",
            f"{r.parked} customers" + (" (`shoal unpark ID` tries one again)" * bool(r.parked)),
        ),
    ):
        t.add_row(key, value)
    out.print(t)
    sizes = Table("segment", "members")
    for s in r.segments:
        sizes.add_row(s.name, str(s.size))
    out.print(sizes)
    if r.parked_customers:
        _show_parked(r.parked_customers, out)
        if r.parked > len(r.parked_customers):
            out.print(f"... and {r.parked - len(r.parked_customers)} more parked")


def _owner(o: Ownership) -> str:
    """What one engine owns among several, on one line."""
    ages = [lease.lease_age for lease in o.leases]
    taken = sum(lease.taken_over for lease in o.leases)
    renewed = f"{min(ages):.1f}-{max(ages):.1f} s ago" if ages else "-"
    return (
        f"engine {o.engine_id}: {len(o.leases)} partitions "
        f"({partition_ranges([lease.partition for lease in o.leases])}, {taken} of them taken "
        f"over), leases renewed {renewed} (TTL {o.lease_ttl} s); since start {o.takeovers} "
        f"taken over, {o.handovers} handed over, {o.lost} lost, {o.terms} terms"
    )


def _show_parked(parked: list[ParkedInfo], out: Console) -> None:
    t = Table("parked customer", "since", "during", "error")
    for p in parked:
        t.add_row(escape(p.customer_id), _when(p.parked_at), p.during, escape(p.reason))
    out.print(t)


# unpark -----------------------------------------------------------------------------------


async def _unpark(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        reply = await api.unpark(list(args.customer_ids))
    if args.json:
        sys.stdout.write(_encoder.encode(reply).decode() + "\n")
    else:
        out = Console(highlight=False)
        for customer_id in reply.unparked:
            out.print(f"unparked {escape(customer_id)}")
        for customer_id in reply.not_parked:
            out.print(f"{escape(customer_id)} is not parked")
        for customer_id in reply.unanswered:
            out.print(
                f"{escape(customer_id)} not tried: no engine answered for its partition; try again"
            )
        if reply.parked:
            _show_parked(reply.parked, out)
    return 1 if reply.parked or reply.unanswered else 0


# forget -----------------------------------------------------------------------------------


def _forget_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.customer_ids)
    if args.from_file is not None:
        try:
            text = args.from_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read ids from {args.from_file}: {e}") from e
        ids += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    if not ids:
        raise UsageError("no customer to forget: give ids, or --from-file FILE")
    return list(dict.fromkeys(ids))


async def _forget(args: argparse.Namespace) -> int:
    ids = _forget_ids(args)
    suppress: int | None = None
    if args.suppress is not None:
        try:
            suppress = max(1, parse_duration(args.suppress) // SECOND)
        except ValueError as e:
            raise UsageError(f"--suppress: {e}") from e
    if not 0 <= args.wait <= 300:
        raise UsageError("--wait must be within 0-300 seconds")
    by = args.by or _who()
    done = 0
    async with _client(args) as api:
        for start in range(0, len(ids), MAX_FORGET):
            reply = await api.forget(
                ids[start : start + MAX_FORGET],
                by=by,
                suppress_seconds=suppress,
                wait_seconds=args.wait,
            )
            if args.json:
                sys.stdout.write(_encoder.encode(reply).decode() + "\n")
            for c in reply.customers:
                done += c.done
                if not args.json:
                    state = "erased" if c.done else "erasing (not finished yet)"
                    print(
                        f"{state}  sha256:{c.hash}  partition {c.partition}, order "
                        f"{EVENTS_STREAM} #{c.order}, request {reply.request}"
                    )
    return 0 if done == len(ids) else 1


# customer ---------------------------------------------------------------------------------


async def _customer(args: argparse.Namespace) -> int:
    if args.search is not None:
        return await _search(args)
    if args.customer_id is None:
        raise UsageError("give a customer ID, or --search PREFIX")
    return await _ask(args, lambda api: api.customer(args.customer_id), _show_customer)


async def _search(args: argparse.Namespace) -> int:
    prefix: str = args.search
    if args.customer_id is not None:
        raise UsageError("give a customer ID or --search PREFIX, not both")
    if not prefix:
        raise UsageError("--search needs a PREFIX of at least one character")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise UsageError(
            f"--search PREFIX is {len(prefix)} characters long; a customer id has at most "
            f"{MAX_PREFIX_CHARS}"
        )
    if not 1 <= args.limit <= MAX_SEARCH:
        raise UsageError(f"--limit must be between 1 and {MAX_SEARCH}")
    async with _client(args) as api:
        reply = await api.search(prefix, limit=args.limit)
    _warn_missing(reply.missing_partitions, reply.partition_count)
    if args.json:
        sys.stdout.write(_encoder.encode(reply).decode() + "\n")
    else:
        for customer_id in reply.customers:
            print(customer_id)
        partial = " (so far: the engine is still loading customers)" if _loading(reply) else ""
        more = "; more match: give a longer prefix" if reply.more else ""
        print(
            f"{len(reply.customers)} customer(s) whose id starts with {prefix!r}{partial}{more}",
            file=sys.stderr,
        )
    return 0 if reply.customers else NOT_FOUND


def _show_customer(r: CustomerReply, out: Console) -> None:
    out.print(f"[bold]{escape(r.customer_id)}[/bold] at {_when(r.at)}, version {r.version}")
    score = "-" if r.score is None else f"{r.score:.4g}"
    out.print(
        f"first seen {_when(r.first_seen_at)}, evaluated up to {_when(r.evaluated_at)}, "
        f"score {score}, next deadline {_when(r.next_deadline)}"
    )
    segments = Table("segment", "entered at")
    for m in r.segments:
        segments.add_row(m.segment, _when(m.entered_at))
    if not r.segments:
        segments.add_row("(none)", "")
    out.print(segments)
    if r.traits:
        traits = Table("trait", "value")
        for key, value in r.traits.items():
            traits.add_row(escape(key), escape(_encoder.encode(value).decode()))
        out.print(traits)
    if r.events:
        events = Table("event", "count", "last at", "7 days", "30 days")
        for c in r.events:
            events.add_row(
                "(any track)" if c.event is None else escape(c.event),
                str(c.count),
                _when(c.last_at),
                "-" if c.within_7d is None else str(c.within_7d),
                "-" if c.within_30d is None else str(c.within_30d),
            )
        out.print(events)


# explain ----------------------------------------------------------------------------------


async def _explain(args: argparse.Namespace) -> int:
    return await _ask(args, lambda api: api.explain(args.customer_id, args.segment), _show_explain)


def _condition(tree: Tree, c: ConditionExplanation) -> None:
    mark = "[green]true[/green]" if c.value else "[red]false[/red]"
    text = f"{mark} {escape(c.text)}"
    if c.op is not None:
        text += f"  [dim]({escape(f'{c.left} {c.op} {c.right}')})[/dim]"
    if c.decides:
        text += "  [bold]decides[/bold]"
    if c.next_change is not None:
        text += f"  [dim]changes at {_when(c.next_change)}[/dim]"
    branch = tree.add(text)
    for child in c.children:
        _condition(branch, child)


def _show_explain(r: ExplainReply, out: Console) -> None:
    out.print(f"[bold]{escape(r.customer_id)}[/bold] at {_when(r.at)}")
    for s in r.segments:
        tree = Tree(f"[bold]{s.segment}[/bold]: {escape(s.reason)}")
        _condition(tree.add("rule"), s.rule)
        if s.exit is not None:
            _condition(tree.add("exit"), s.exit)
        if s.min_dwell is not None:
            tree.add(f"min_dwell {s.min_dwell}, earliest exit {_when(s.earliest_exit)}")
        nxt = (
            _when(s.next_change)
            if s.next_change
            else (f"none before {_when(s.horizon)}" if s.horizon else "none")
        )
        tree.add(f"next change without a new event: {nxt}")
        out.print(tree)


# members ----------------------------------------------------------------------------------


async def _members(args: argparse.Namespace) -> int:
    if args.format is not None:
        return await _export(args)
    if args.output is not None:
        raise UsageError("--output goes with --format csv|jsonl (the whole segment)")
    limit = 100 if args.limit is None else args.limit
    if not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"--limit must be between 1 and {MAX_PAGE}")
    return await _ask(
        args,
        lambda api: api.members(
            args.segment, limit=limit, cursor=args.cursor, count_only=args.count
        ),
        lambda r, out: _show_members(r, count=args.count),
    )


async def _export(args: argparse.Namespace) -> int:
    """``members SEGMENT --format csv|jsonl``: every page of the segment, in id order."""
    for flag, given in (
        ("--json", args.json),
        ("--count", args.count),
        ("--limit", args.limit is not None),
        ("--cursor", args.cursor is not None),
    ):
        if given:
            raise UsageError(f"--format exports the whole segment: give no {flag}")
    async with _client(args) as api:
        try:
            with atomic_output(args.output) as out:
                rows, complete, missing = await export_members(api, args.segment, args.format, out)
        except ApiError as e:
            if e.code != "404":
                raise
            print(f"shoal: error: {e.message}", file=sys.stderr)
            return NOT_FOUND
        except BrokenPipeError:
            # The reader stopped early (`| head`): not an error. Point stdout at /dev/null
            # so that the interpreter's last flush does not fail on the closed pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    _warn_missing(missing, api.partitions)
    where = f" to {args.output}" if args.output else ""
    partial = "" if complete or missing else " (so far: the engine is still loading customers)"
    print(f"exported {rows} member(s) of {args.segment}{where}{partial}", file=sys.stderr)
    return 0


def _loading(r: MembersReply | SearchReply | SegmentsReply) -> bool:
    """Whether the answer is incomplete because an engine still loads customers (rather than
    for partitions no engine answered for, which :func:`_warn_missing` reports)."""
    return not r.complete and not r.missing_partitions


def _show_members(r: MembersReply, *, count: bool) -> None:
    partial = " (so far: the engine is still loading customers)" if _loading(r) else ""
    if count:
        print(f"{r.count}{partial}")
        return
    for customer_id in r.members:
        print(customer_id)
    more = f"; next page: --cursor {r.next_cursor}" if r.next_cursor is not None else ""
    print(f"{len(r.members)} of {r.count} member(s){partial}{more}", file=sys.stderr)


# segments list / apply ----------------------------------------------------------------------


async def _list(args: argparse.Namespace) -> int:
    return await _ask(args, lambda api: api.segments(), _show_segments)


def _show_segments(r: SegmentsReply, out: Console) -> None:
    partial = f", sizes among the {r.customers} loaded so far" if _loading(r) else ""
    out.print(f"{escape(r.source)} ({r.fingerprint}), {r.customers} customer(s){partial}")
    t = Table("segment", "members", "rule")
    for s in r.segments:
        rule = escape(s.rule)
        if s.exit is not None:
            rule += f"\n[dim]exit:[/dim] {escape(s.exit)}"
        if s.min_dwell_seconds:
            rule += f"\n[dim]min_dwell:[/dim] {s.min_dwell_seconds:g} s"
        name = s.name + (f"\n[dim]{escape(s.description)}[/dim]" if s.description else "")
        t.add_row(name, str(s.size), rule)
    out.print(t)


async def _apply(args: argparse.Namespace) -> int:
    reply = await _definitions(args, apply=True)
    if args.json:
        sys.stdout.write(_encoder.encode(reply).decode() + "\n")
    else:
        print(_changes(reply))
    return 0


async def _definitions(args: argparse.Namespace, *, apply: bool) -> DefinitionsReply:
    """Send the segments file ``args.file`` to the engine, to validate or ``apply``. Its list
    files are read here, on the user's machine, and their ids sent by value: the engine
    reads no file for definitions that come over the network."""
    # A bad file fails here, offline, with its list files read.
    text, segments = load_segments_by_value(args.file)
    source = str(args.file)
    client = _client(args)
    async with client as api:
        body = DefinitionsRequest(toml=text, source=source, apply=apply)
        _check_size(len(_encoder.encode(body)), client.max_payload, segments)
        return await api.definitions(
            text, source=source, apply=apply, timeout=args.timeout, client=_who()
        )


def _who() -> str:
    """``user@host`` of this command, which the engine stores with definitions it applies;
    ASCII, as a header value must be."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment
        user = "?"
    who = f"{user}@{socket.gethostname()}"
    return who.encode("ascii", "replace").decode()


def _check_size(size: int, max_payload: int, segments: SegmentSet) -> None:
    """Refuse a request larger than the NATS server takes, naming the largest list (nats-py
    would refuse it with no word of why)."""
    if size <= max_payload:
        return
    lists = sorted(segments.lists.items(), key=lambda kv: -len(kv[1]))
    biggest = f" ([lists.{lists[0][0]}] has {len(lists[0][1]):,} ids)" if lists else ""
    raise DefinitionError(
        f"the request is {size:,} bytes{biggest}, more than the NATS server takes in a "
        f"message (max_payload {max_payload:,}): serve large lists from files instead "
        "(`shoal serve --segments FILE --lists-dir DIR`)",
        source=segments.source,
    )


def _changes(r: DefinitionsReply) -> str:
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (("adds", r.added), ("removes", r.removed), ("changes", r.changed))
        if names
    ]
    if r.refolds:
        parts.append("rereads the event log (the rules read other facts)")
    what = "; ".join(parts) or "no change to the definitions in force"
    if r.applied:
        return f"{r.source}: applied ({what}); {r.transitions} transition(s)"
    return f"{r.source}: on the engine, applying it {what}"
