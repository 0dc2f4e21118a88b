"""``shoal``: run the engine, publish events, watch transitions, check segments files.

Each command parses its arguments and calls package APIs; errors a user can fix are one
line on stderr (``shoal: error: ...``) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio
import msgspec
import nats.js.errors
import structlog

from actors import (
    ActorsError,
    DefinitionsKeeper,
    Engine,
    EngineConfig,
    SegmentSet,
    SystemClock,
    file_stamp,
    load_segments,
    served_origin,
    watch_segments,
)
from protocol import (
    EVENTS_STREAM,
    BrokerError,
    ProtocolError,
    Transition,
    event_subject,
    format_instant,
    segment_filter,
    to_instant,
)
from protocol.nats import (
    DefinitionsKV,
    connect,
    iter_transitions,
    jetstream_ports,
    permission_guard,
    redact,
)
from store import Store, StoreError

from . import (
    _auth_cmd,
    _generate_cmd,
    _history_cmd,
    _import_cmd,
    _query_cmd,
    _rebuild_cmd,
    _rejected_cmd,
    _replay_cmd,
)
from ._connection import (
    add_connection_options,
    credentials_of,
    engine_servers,
    explain,
    servers_of,
)
from ._errors import UsageError
from ._logging import Scrubber, configure_logging, secrets_of

_CONNECTING = {
    "serve": "engine",
    "import": "operator",
    "publish": "producer",
    "tail": "subscriber",
    "rebuild": "engine",
    "status": "operator",
    "customer": "operator",
    "explain": "operator",
    "members": "operator",
    "unpark": "operator",
    "rejected": "operator",
}
"""The commands that connect to NATS, and the role each acts as: they take the credential
options and --data-dir, whose key of their role they use when given no credentials."""
_SEGMENTS_CONNECTING = {"list": "subscriber", "apply": "operator", "validate": "operator"}
_USER_ERRORS = (ActorsError, ProtocolError, StoreError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shoal`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    scrub = Scrubber(secrets_of(args))
    configure_logging(args.log_level, scrubber=scrub)
    try:
        code: int = anyio.run(args.run, args)
        return code
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - unwrap task-group errors for one clear line
        known = _find(e, (*_USER_ERRORS, UsageError))
        if known is None:
            raise
        print(f"shoal: error: {scrub(explain(known, args))}", file=sys.stderr)
        return 2 if isinstance(known, UsageError) else 1


def _find(e: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(e, kinds):
        return e
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
    return None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535)")
    return value


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: the top level would take a subcommand's --nats for --nats-user.
    p = argparse.ArgumentParser(
        prog="shoal", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the engine (starts an embedded nats-server)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path("shoal-data"),
        help="where the event log, the embedded broker's store and the role keys (auth/) live "
        "(default: ./shoal-data)",
    )
    serve.add_argument(
        "--segments",
        type=Path,
        default=None,
        help="segments TOML file (default: the one shipped with shoal); reloaded when it "
        "changes or on SIGHUP",
    )
    serve.add_argument(
        "--lists-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the only directory the segments file's list files are read from (default: "
        "the segments file's own directory); one outside it is refused",
    )
    serve.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="use this NATS server instead of starting one (repeat for a cluster)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="embedded broker address")
    serve.add_argument("--port", type=int, default=4222, help="embedded broker port")
    serve.add_argument(
        "--sync",
        choices=["normal", "full"],
        default="normal",
        help="SQLite synchronous level (full: every commit reaches the disk)",
    )
    serve.add_argument("--consumer", default="shoal-engine", help="durable consumer name")
    serve.add_argument(
        "--snapshot-interval",
        type=_positive_seconds,
        default=EngineConfig().snapshot_interval,
        metavar="SECONDS",
        help="snapshot the customers that changed this often (default %(default)g); a "
        "restart replays the log written since the last round",
    )
    serve.add_argument(
        "--rebuild",
        action="store_true",
        help="ignore stored snapshots: rebuild every customer from the event log (slow; "
        "snapshots are written again afterwards)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (default: none; "
        "0 picks a free port, logged)",
    )
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default %(default)s)",
    )
    serve.set_defaults(run=_serve)

    pub = sub.add_parser(
        "publish", help="publish events (JSON lines from a file or stdin, or one built from flags)"
    )
    pub.add_argument("file", nargs="?", help="JSON-lines file ('-' or nothing: stdin)")
    pub.add_argument("--nats", action="append", metavar="URL")
    pub.add_argument("--customer", help="build one event for this customer id")
    pub.add_argument(
        "--user", dest="user_alias", help="deprecated: the same as --customer (one release)"
    )
    pub.add_argument("--event", help="track event name")
    pub.add_argument("--identify", action="store_true", help="an identify event")
    pub.add_argument(
        "--prop",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="track property (VALUE is JSON when it parses, else text)",
    )
    pub.add_argument(
        "--trait",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="identify trait (VALUE is JSON when it parses, else text)",
    )
    pub.add_argument("--timestamp", help="ISO-8601 with offset (default: when received)")
    pub.add_argument("--message-id", help="idempotency key")
    pub.set_defaults(run=_publish)

    tail = sub.add_parser("tail", help="print segment transitions as they happen")
    tail.add_argument("segment", nargs="?", help="only this segment")
    tail.add_argument("--nats", action="append", metavar="URL")
    tail.add_argument(
        "--from-start",
        action="store_true",
        help="first print every transition the SHOAL_SEGMENTS stream holds",
    )
    tail.set_defaults(run=_tail)

    segs = sub.add_parser("segments", help="work with segments files")
    segs_sub = segs.add_subparsers(required=True, metavar="ACTION")
    validate = segs_sub.add_parser("validate", help="check a segments file, offline")
    validate.add_argument("file", type=Path, help="segments TOML file")
    validate.set_defaults(run=_validate)
    _import_cmd.register(sub)
    _history_cmd.register(sub)
    _replay_cmd.register(sub)
    _query_cmd.register(sub, segs_sub)
    _generate_cmd.register(sub)
    _rebuild_cmd.register(sub)
    _rejected_cmd.register(sub)
    _auth_cmd.register(sub)
    add_connection_options(p, top=True)
    for name, role in _CONNECTING.items():
        add_connection_options(sub.choices[name], top=False, role=role)
    for name, role in _SEGMENTS_CONNECTING.items():
        add_connection_options(segs_sub.choices[name], top=False, role=role)
    return p


# serve ------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    logger = structlog.get_logger("shoal")
    path: Path | None = args.segments
    lists_dir = _lists_dir(path, args.lists_dir)
    stamp = file_stamp(path) if path is not None else None  # before reading: no change is missed
    segments = load_segments(path, lists_dir=lists_dir)
    data_dir: Path = args.data_dir
    async with contextlib.AsyncExitStack() as stack:
        # Taken over now, so a SIGHUP during start-up waits for the engine instead of
        # ending the process (its default).
        hups = (
            stack.enter_context(anyio.open_signal_receiver(signal.SIGHUP))
            if path is not None
            else None
        )
        store = await Store.open(data_dir / "shoal.db", synchronous=args.sync.upper())
        stack.push_async_callback(store.close)
        servers = await engine_servers(stack, args, data_dir)
        credentials = credentials_of(args).for_role("engine")
        nc = await connect(servers, name="shoal-engine", credentials=credentials)
        stack.push_async_callback(nc.close)
        metrics = None
        if args.metrics_port is not None:
            # Imported only when asked for: prometheus-client is slow to import.
            from protocol.metrics import EngineMetrics

            metrics = EngineMetrics()
        source, sink = await jetstream_ports(nc, consumer=args.consumer)
        # The definitions in force persist: those stored win unless the served file changed
        # since it was last applied (the keeper logs which it chose, and why).
        clock = SystemClock()
        keeper = DefinitionsKeeper(store, await DefinitionsKV.open(nc), clock)
        served = segments.source  # the path given, or the shipped file's name
        segments = await keeper.resume(segments, served)
        engine = Engine(
            source,
            sink,
            store,
            segments,
            clock=clock,
            config=EngineConfig(
                use_snapshots=not args.rebuild,
                snapshot_interval=args.snapshot_interval,
            ),
            observer=metrics,
            keeper=keeper,
        )

        async def apply_file(new: SegmentSet) -> int:
            return await engine.apply_segments(new, origin=await served_origin(new, served))

        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            if metrics is not None:
                # Before the engine starts: the start-up (a rebuild) is watched too.
                await tg.start(
                    functools.partial(
                        metrics.serve,
                        engine,
                        broker=nc,
                        host=args.metrics_host,
                        port=args.metrics_port,
                    )
                )
            await tg.start(engine.run)
            await tg.start(_query_cmd.serve_queries, engine, servers, credentials)
            if path is not None and hups is not None:
                tg.start_soon(
                    functools.partial(
                        watch_segments,
                        path,
                        apply_file,
                        stamp=stamp,
                        asked=hups,
                        lists_dir=lists_dir,
                    )
                )
            logger.info(
                "shoal is serving", nats=[redact(s) for s in servers], data_dir=str(data_dir)
            )
    logger.info("shoal stopped", **dataclasses.asdict(engine.stats))
    return 0


def _lists_dir(segments: Path | None, lists_dir: Path | None) -> Path | None:
    """Where ``serve`` reads list files from: ``--lists-dir``, else the segments file's own
    directory."""
    if lists_dir is None:
        return None if segments is None else segments.parent
    if segments is None:
        raise UsageError("--lists-dir is for the list files of --segments FILE: give both")
    if not lists_dir.is_dir():
        raise UsageError(f"--lists-dir {lists_dir} is not a directory")
    return lists_dir


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger("shoal").info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


# segments validate --------------------------------------------------------------------------


async def _validate(args: argparse.Namespace) -> int:
    segments = load_segments(args.file)
    names = segments.names
    plural = "" if len(names) == 1 else "s"
    print(f"{args.file}: ok, {len(names)} segment{plural} ({', '.join(names)})")
    return 0


# publish ----------------------------------------------------------------------------------


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: write it as KEY=VALUE")
        out[key] = _value(value)
    return out


def _event_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if args.identify == bool(args.event):
        raise UsageError("give --event NAME (a track event) or --identify, not both or neither")
    event: dict[str, Any] = {"userId": args.customer}
    if args.identify:
        event |= {"type": "identify", "traits": _pairs(args.trait, "--trait")}
    else:
        event |= {"type": "track", "event": args.event, "properties": _pairs(args.prop, "--prop")}
    if args.timestamp:
        event["timestamp"] = args.timestamp
    if args.message_id:
        event["messageId"] = args.message_id
    return event


async def _publish(args: argparse.Namespace) -> int:
    if args.user_alias is not None:
        if args.customer is not None:
            raise UsageError("give --customer, not --user as well")
        print(
            "shoal publish: warning: --user is renamed --customer; --user goes in the next release",
            file=sys.stderr,
        )
        args.customer = args.user_alias
    if args.customer:
        if args.file:
            raise UsageError("give a FILE or --customer, not both")
        lines: Any = [json.dumps(_event_from_flags(args))]
    elif args.file in (None, "-"):
        lines = sys.stdin
    else:
        try:
            lines = open(args.file, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror}") from None
    credentials = credentials_of(args).for_role("producer")
    nc = await connect(servers_of(args), name="shoal-publish", credentials=credentials)
    js = nc.jetstream()
    skipped = 0
    pending: list[tuple[int, asyncio.Future[Any]]] = []
    try:
        # The engine declares the streams; a producer may not (least privilege).
        async with permission_guard(nc):
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if not text:
                    continue
                problem, subject, msg_id = _route(text)
                if problem:
                    print(f"line {number}: {problem}; skipped", file=sys.stderr)
                    skipped += 1
                    continue
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                pending.append(
                    (number, await js.publish_async(subject, text.encode("utf-8"), headers=headers))
                )
            results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    finally:
        if lines is not sys.stdin and hasattr(lines, "close"):
            lines.close()
        await nc.close()
    # nats-py tells a 503 (no stream takes the subject) apart for JetStream publishes.
    if any(isinstance(r, nats.js.errors.NoStreamResponseError) for r in results):
        raise BrokerError(
            f"stream {EVENTS_STREAM} does not exist on this NATS server, so nothing was "
            "stored: start the engine (`shoal serve`) once, it creates the streams"
        )
    failed = 0
    for (number, _), result in zip(pending, results, strict=True):
        if isinstance(result, BaseException):
            failed += 1
            print(f"line {number}: not stored by the broker: {result!r}", file=sys.stderr)
    sent = len(pending) - failed
    tail = "".join(
        f", {n} {what}" for n, what in ((skipped, "line(s) skipped"), (failed, "failed")) if n
    )
    print(f"published {sent} event(s){tail}", file=sys.stderr)
    return 1 if skipped or failed else 0


def _route(line: str) -> tuple[str | None, str, str | None]:
    """(problem, subject, message id) of one JSON line; the engine validates the rest."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {e.msg} at column {e.colno}", "", None
    if not isinstance(doc, dict):
        return "not a JSON object", "", None
    user = doc.get("userId")
    if not isinstance(user, str) or not user:
        return "missing `userId` (a non-empty string)", "", None
    msg_id = doc.get("messageId")
    # Header values must be ASCII; a non-ASCII id is still deduplicated by the engine.
    header = msg_id if isinstance(msg_id, str) and msg_id.isascii() and msg_id else None
    return None, event_subject(user), header


# tail -------------------------------------------------------------------------------------


async def _tail(args: argparse.Namespace) -> int:
    credentials = credentials_of(args).for_role("subscriber")
    nc = await connect(servers_of(args), name="shoal-tail", credentials=credentials)
    out: TextIO = sys.stdout
    human = out.isatty()
    encoder = msgspec.json.Encoder()
    try:
        with contextlib.suppress(anyio.get_cancelled_exc_class()):
            async with permission_guard(nc):
                async for t in iter_transitions(
                    nc, segment_filter(args.segment), from_start=args.from_start
                ):
                    if human:
                        out.write(_readable(t) + "\n")
                    else:
                        out.write(encoder.encode(t).decode() + "\n")
                    out.flush()
    finally:
        await nc.close()
    return 0


def _readable(t: Transition) -> str:
    cause = t.cause
    why = (
        "time"
        if cause.__struct_config__.tag == "time"
        else (
            f"event {getattr(cause, 'message_id', '')}".strip()
            if cause.__struct_config__.tag == "event"
            else "definition"
        )
    )
    arrow = "->" if t.change == "entered" else "<-"
    return (
        f"{format_instant(to_instant(t.at))}  {t.customer_id} {arrow} {t.segment} "
        f"({t.change}, {why}, v{t.version})"
    )


if __name__ == "__main__":
    sys.exit(main())
