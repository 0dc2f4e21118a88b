"""``shoal``: run the engine, publish events, watch transitions, check segments files.

Each command parses its arguments and calls package APIs; errors a user can fix are one
line on stderr (``shoal: error: ...``) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import structlog

from actors import (
    ActorsError,
    DefinitionError,
    DefinitionsConflict,
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
from actors.rules import check_retention
from protocol import Ownership
from protocol.nats import (
    DEFAULT_LEASE_TTL,
    Claims,
    Credentials,
    DefinitionsKV,
    LeaseBucket,
    SnapshotStore,
    StreamSettings,
    connect,
    declared,
    ensure_streams,
    permission_guard,
    redact,
)
from store import Store

from . import (
    _auth_cmd,
    _backup_cmd,
    _cluster_cmd,
    _generate_cmd,
    _history_cmd,
    _import_cmd,
    _migrate_cmd,
    _publish_cmd,
    _query_cmd,
    _rebuild_cmd,
    _rejected_cmd,
    _replay_cmd,
    _tail_cmd,
)
from ._claiming import engine_id_of
from ._connection import (
    add_connection_options,
    credentials_of,
    engine_servers,
    explain,
)
from ._errors import REPORTED, ExitCode, NotFound, UsageError, exit_code
from ._logging import Scrubber, configure_logging, log_store_upgrade, secrets_of
from ._retention import add_retain
from ._serving import Serving, metrics_view
from ._signals import stop_on_signal

_CONNECTING = {
    "serve": "engine",
    "import": "operator",
    "publish": "producer",
    "tail": "subscriber",
    "rebuild": "engine",
    "migrate": "engine",
    "status": "operator",
    "customer": "operator",
    "explain": "operator",
    "members": "operator",
    "unpark": "operator",
    "forget": "operator",
    "rejected": "operator",
    "backup": "engine",
    "restore": "engine",
}
"""The commands that connect to NATS, and the role each acts as: they take the credential
options and --data-dir, whose key of their role they use when given no credentials."""
_SEGMENTS_CONNECTING = {"list": "subscriber", "apply": "operator", "validate": "operator"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shoal`` console script; returns the exit status (the table of
    :mod:`scripts._errors`, the same for every command)."""
    parser = _parser()
    args = parser.parse_args(argv)
    scrub = Scrubber(secrets_of(args))
    configure_logging(args.log_level, scrubber=scrub)
    try:
        code: int = anyio.run(args.run, args)
        return code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - unwrap task-group errors for one clear line
        if _find(e, (BrokenPipeError,)) is not None and _reader_gone():
            # The reader stopped early (`shoal tail | head`): not an error. Point stdout at
            # /dev/null so that the interpreter's last flush does not fail on the pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return ExitCode.OK
        known = _find(e, REPORTED)
        if known is None:
            raise
        print(f"shoal: error: {scrub(explain(known, args))}", file=sys.stderr)
        return exit_code(known)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (its write end then reports
    ``POLLERR``): a broken pipe elsewhere (a socket) is an error like any other."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return False


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


def _lease_ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds, 1 to 3600")
    return value


def _replicas(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of replicas, 1 to 5")
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
    p.add_argument("--version", action="version", version=f"shoal {_version()}")
    _add_log_level(p, top=True)
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
    serve.add_argument(
        "--consumer", default="shoal-engine", help="the prefix of the engine's consumers' names"
    )
    serve.add_argument(
        "--engine-id",
        default=None,
        metavar="ID",
        help="this engine's id among several (default: the one in the data directory, made "
        "at its first start from the host's name)",
    )
    serve.add_argument(
        "--lease-ttl",
        type=_lease_ttl,
        default=DEFAULT_LEASE_TTL,
        metavar="SECONDS",
        help="how long a partition's lease lives unless renewed: how soon another engine "
        "takes over from one that died (default %(default)s, whole seconds)",
    )
    serve.add_argument(
        "--replicas",
        type=_replicas,
        default=None,
        metavar="N",
        help="servers of a NATS cluster that hold each stream and bucket (3 on a 3-node "
        "cluster; default: as many as hold them now, 1 for new ones)",
    )
    serve.add_argument(
        "--snapshot-interval",
        type=_positive_seconds,
        default=EngineConfig().snapshot_interval,
        metavar="SECONDS",
        help="snapshot the customers that changed this often (default %(default)g); a "
        "restart replays the log written since the last round",
    )
    add_retain(
        serve,
        "cut events received longer ago than this (e.g. 400d) from the event log, keeping "
        "each customer's state; segments whose windows (within=...) reach further are "
        "refused (default: keep everything)",
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

    _publish_cmd.register(sub)
    _tail_cmd.register(sub)

    segs = sub.add_parser("segments", help="work with segments files")
    segs_sub = segs.add_subparsers(required=True, metavar="ACTION")
    validate = segs_sub.add_parser("validate", help="check a segments file, offline")
    validate.add_argument("file", type=Path, help="segments TOML file")
    add_retain(validate, "also refuse windows longer than this retention (e.g. 400d)")
    validate.set_defaults(run=_validate)
    _import_cmd.register(sub)
    _history_cmd.register(sub)
    _replay_cmd.register(sub)
    _query_cmd.register(sub, segs_sub)
    _generate_cmd.register(sub)
    _rebuild_cmd.register(sub)
    _migrate_cmd.register(sub)
    _rejected_cmd.register(sub)
    _auth_cmd.register(sub)
    _cluster_cmd.register(sub)
    _backup_cmd.register(sub)
    add_connection_options(p, top=True)
    for name, role in _CONNECTING.items():
        add_connection_options(sub.choices[name], top=False, role=role)
    for name, role in _SEGMENTS_CONNECTING.items():
        add_connection_options(segs_sub.choices[name], top=False, role=role)
    for command in _subcommands(p):
        _add_log_level(command, top=False)
    return p


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_log_level(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level`` on ``parser``: with its default on the top-level parser only, so that
    given before the subcommand it is not overwritten by a subcommand's default (the
    connection options work the same way, ``scripts._connection``)."""
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="info" if top else argparse.SUPPRESS,
        help="how much to log on stderr (default info); before or after the command",
    )


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser``: its subcommands, their actions, and so on."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse has no public walk of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *_subcommands(child)]
    return found


def _version() -> str:
    """shoal's package version, as installed."""
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


# serve ------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    logger = structlog.get_logger("shoal")
    path: Path | None = args.segments
    lists_dir = _lists_dir(path, args.lists_dir)
    stamp = file_stamp(path) if path is not None else None  # before reading: no change is missed
    segments = load_segments(path, lists_dir=lists_dir)
    check_retention(segments, args.retain)
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
        log_store_upgrade(store)
        servers = await engine_servers(stack, args, data_dir)
        credentials = credentials_of(args).for_role("engine")
        nc = await connect(servers, name="shoal-engine", credentials=credentials)
        stack.push_async_callback(nc.close)
        metrics = None
        if args.metrics_port is not None:
            # Imported only when asked for: prometheus-client is slow to import.
            from protocol.metrics import EngineMetrics

            metrics = EngineMetrics()
        # This engine's share of the partitions: claimed (a lease each, and its fence,
        # which fences out whoever published for it before) before anything is read or
        # published, and served term after term as engines come and go (_serving).
        clock = SystemClock()
        streams = StreamSettings(replicas=args.replicas)
        async with permission_guard(nc):
            partitions = await ensure_streams(nc.jetstream(), streams)
        leases = LeaseBucket(nc)
        await declared("the leases bucket", lambda: leases.ensure(args.replicas))
        snapshots = SnapshotStore(nc, partitions=partitions)
        await declared("the snapshots bucket", lambda: snapshots.ensure(args.replicas))
        claims = Claims(
            nc,
            leases,
            engine_id=engine_id_of(data_dir, args.engine_id),
            consumers=args.consumer,
            ttl=args.lease_ttl,
            now=clock.now,
        )
        await claims.start_beating()
        stack.push_async_callback(claims.release_all)
        # The definitions in force persist: those stored win unless the served file changed
        # since it was last applied (the keeper logs which it chose, and why).
        board = await declared("the definitions bucket", lambda: DefinitionsKV.open(nc))
        keeper = DefinitionsKeeper(store, board, clock)
        served = segments.source  # the path given, or the shipped file's name
        segments = await keeper.resume(segments, served)
        first = True

        async def started(engine: Engine) -> None:
            nonlocal first
            if first and keeper.pending is not None:
                # The served file changed since it was last applied: a switch, as a reload,
                # before queries are answered (see DefinitionsKeeper.pending).
                with contextlib.suppress(DefinitionsConflict):
                    # Another engine stored a version first (several started with the
                    # file changed): logged, and followed like any other engine's.
                    try:
                        await apply_file(keeper.pending)
                    except DefinitionError as e:  # what the cut log cannot serve
                        logger.error("segments not applied, the stored ones stay", error=str(e))
            first = False

        serving = Serving(
            nc=nc,
            store=store,
            clock=clock,
            streams=streams,
            partitions=partitions,
            claims=claims,
            leases=leases,
            snapshots=snapshots,
            keeper=keeper,
            segments=segments,
            consumers=args.consumer,
            config=EngineConfig(
                use_snapshots=not args.rebuild,
                snapshot_interval=args.snapshot_interval,
                retain=args.retain,
            ),
            observer=metrics,
            snapshot_every=args.snapshot_interval,
            serve_queries=functools.partial(
                _serve_queries,
                servers=servers,
                credentials=credentials,
                partitions=partitions,
                ownership=lambda: ownership(),
            ),
            on_started=started,
        )

        def ownership() -> Ownership:
            return serving.ownership()

        async def apply_file(new: SegmentSet) -> int:
            origin = await served_origin(new, served)
            while True:
                # Between terms (or a term ending first), the next term's engine applies it.
                engine = await serving.running_engine()
                try:
                    return await engine.apply_segments(new, origin=origin)
                except (DefinitionsConflict, DefinitionError):
                    raise
                except ActorsError:
                    await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, tg.cancel_scope)
            if metrics is not None:
                # Before the engine starts: the start-up (a rebuild) is watched too.
                await tg.start(
                    functools.partial(
                        metrics.serve,
                        metrics_view(serving),
                        broker=nc,
                        ownership=ownership,
                        host=args.metrics_host,
                        port=args.metrics_port,
                    )
                )
            await tg.start(serving.run)
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
    logger.info("shoal stopped", **dataclasses.asdict(serving.current.stats))
    return 0


async def _serve_queries(
    engine: Engine,
    owned: list[int],
    *,
    servers: list[str],
    credentials: Credentials,
    partitions: int,
    ownership: Callable[[], Ownership],
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await _query_cmd.serve_queries(
        engine,
        servers,
        credentials,
        partitions=partitions,
        owned=owned,
        ownership=ownership,
        task_status=task_status,
    )


def _lists_dir(segments: Path | None, lists_dir: Path | None) -> Path | None:
    """Where ``serve`` reads list files from: ``--lists-dir``, else the segments file's own
    directory."""
    if lists_dir is None:
        return None if segments is None else segments.parent
    if segments is None:
        raise UsageError("--lists-dir is for the list files of --segments FILE: give both")
    if not lists_dir.exists():
        raise NotFound(f"--lists-dir {lists_dir} does not exist")
    if not lists_dir.is_dir():
        raise UsageError(f"--lists-dir {lists_dir} is not a directory")
    return lists_dir


# segments validate --------------------------------------------------------------------------


async def _validate(args: argparse.Namespace) -> int:
    segments = load_segments(args.file)
    check_retention(segments, args.retain)
    names = segments.names
    plural = "" if len(names) == 1 else "s"
    print(f"{args.file}: ok, {len(names)} segment{plural} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
