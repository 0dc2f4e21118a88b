"""``shoal migrate``: bring a data directory and an events stream made by an earlier shoal
(``SHOAL_EVENTS`` without partitions) to this version, or re-split a partitioned one into
another number of partitions (``--partitions P``), while the engine is stopped.

The stream is read whole and kept in ``<data-dir>/migrate/`` (written and synced before
anything is deleted), then replaced by a partitioned one that holds the same messages in the
same order (a partitioned one's: what the engine had committed first, see
:class:`protocol.nats._migrate.Repartitioner`), republished as one import
(:mod:`protocol.nats._migrate`). Each partition's
consumer starts just after what the old engine had committed, and the store's positions are
set to match, so the engine goes on with the tail the old one had not read, and with the
next transition versions. ``migrate/state.json`` records the steps done: after a crash
anywhere, running the command again finishes the migration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterable, Container, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import msgspec
import nats.js.errors
from nats.aio.client import Client
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from protocol import (
    DEFAULT_PARTITIONS,
    EVENTS_STREAM,
    LEASES_STREAM,
    REJECTED_STREAM,
    BrokerError,
    Delivery,
    StoredDefinitionsError,
    decode_definitions,
    encode_definitions,
    partition_consumer,
)
from protocol.nats import (
    DefinitionsKV,
    LeaseBucket,
    connect,
    last_claims,
    permission_guard,
    rejected_positions,
)
from protocol.nats._migrate import (
    OldMessage,
    Outgoing,
    Planner,
    Repartitioner,
    Switch,
    consumer_floor,
    dump_stream,
    finish_stream,
    replace_stream,
    republish,
    seal_stream,
    start_consumers,
    stream_form,
)
from store import Store, StoredRow, StoreLockedError

from ._connection import add_data_dir_options, credentials_of, engine_servers
from ._errors import CliError, NotFound, UsageError
from ._import_cmd import _progress, _Rate

STATE_DIR = "migrate"
"""The folder of the data directory that holds a migration under way."""
_STATE = "state.json"
_MESSAGES = "messages.msgpack"
_STOP_AFTER = "SHOAL_MIGRATE_STOP_AFTER"
"""Tests only: the step after which the command stops as if it crashed (``dumped``,
``replaced``, ``republished``)."""
_piece_decoder = msgspec.msgpack.Decoder(list[OldMessage])
_LENGTH = 8
"""Bytes of the length before each piece of the dump."""


class _State(msgspec.Struct, kw_only=True):
    """What ``migrate/state.json`` records of a migration under way."""

    stage: str
    """``dumped`` (the old stream is read and kept), then ``republished`` (the new stream is
    filled and in its final form)."""
    migration_id: str
    partitions: int
    committed: int
    """The old stream position through which the old engine had committed."""
    old_messages: int
    open_imports: dict[str, int]
    """The store's open imports when the migration began (the old engine's)."""
    rejected: list[int]
    """The old positions the old engine rejected (``SHOAL_REJECTED`` names them)."""
    old_partitions: int | None = None
    """The old stream's partitions (None: made by an earlier shoal, without)."""
    committed_in: dict[int, int] = {}
    """A partitioned old stream's: by old partition, the old position through which the
    engine had committed it."""
    switch: Switch | None = None
    """The store's record of the definitions in force when the migration began, if they
    replaced earlier ones (its positions are the old stream's)."""


class _Stopped(CliError):
    """Tests only: the command stopped after a step, on purpose."""


def register(sub: Any) -> None:
    """Add the ``migrate`` command to the ``shoal`` subparsers ``sub``."""
    p = sub.add_parser(
        "migrate",
        help="migrate a data directory and events stream made by an earlier shoal, or "
        "re-partition them, while the engine is stopped",
        description=f"Replace a {EVENTS_STREAM} made by an earlier shoal (without "
        "partitions) by a partitioned one holding the same messages in the same order, and "
        "set the engine's consumers and store to go on where the old engine stopped: the "
        "one manual step of an upgrade; or, with --partitions P, re-split a partitioned "
        "stream into P partitions. Resumable: after a failure, run it again.",
    )
    add_data_dir_options(p)
    p.add_argument(
        "--consumer",
        default="shoal-engine",
        help="the engine's durable consumer (this version: the prefix of each partition's)",
    )
    p.add_argument(
        "--partitions",
        type=_positive,
        default=None,
        metavar="P",
        help="partitions of the new stream (default: those of a partitioned stream, which "
        f"then has nothing to migrate; {DEFAULT_PARTITIONS} for one made by an earlier shoal)",
    )
    p.set_defaults(run=_migrate)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


async def _migrate(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    if not args.nats and not (data_dir / "nats").is_dir():
        raise NotFound(
            f"{data_dir / 'nats'} holds no broker store to migrate; give the engine's server "
            "with --nats URL"
        )
    if not (data_dir / "shoal.db").is_file():
        raise NotFound(f"{data_dir / 'shoal.db'} does not exist: no data directory to migrate")
    async with contextlib.AsyncExitStack() as stack:
        # Taken first: it fails at once if the engine is running.
        try:
            store = await Store.open(data_dir / "shoal.db")
        except StoreLockedError as e:
            raise CliError(
                f"{e.path} is in use by a running engine: stop it (`shoal serve`), then migrate"
            ) from e
        stack.push_async_callback(store.close)
        servers = await engine_servers(stack, args, data_dir)
        credentials = credentials_of(args).for_role("engine")
        nc = await connect(servers, name="shoal-migrate", credentials=credentials)
        stack.push_async_callback(nc.close)
        async with permission_guard(nc):
            await _run(nc, store, data_dir / STATE_DIR, args)
    return 0


async def _run(nc: Client, store: Store, work: Path, args: argparse.Namespace) -> None:
    """Take the migration from where ``work`` says it is (or from the start) to its end."""
    js = nc.jetstream()
    state = _load_state(work)
    form, last, found = await stream_form(js)
    if state is None:
        if form == "partitioned" and args.partitions in (None, found):
            _remove(work)
            print(f"{EVENTS_STREAM} is partitioned ({found} partitions): nothing to migrate")
            return
        if form == "sealed" and args.partitions in (None, found):
            # Sealed by a re-partitioning that stopped before it recorded anything.
            raise UsageError(
                f"stream {EVENTS_STREAM} ({found} partitions) is sealed by a re-partitioning "
                "that stopped before it began: run it again with --partitions P"
            )
        if form == "missing":
            raise NotFound(
                f"stream {EVENTS_STREAM} does not exist on this NATS server: nothing to "
                "migrate (`shoal serve` creates it)"
            )
        if form == "staging":
            raise CliError(
                f"stream {EVENTS_STREAM} is in the middle of a migration, but {work} is "
                "gone: the messages it was made from are lost, and it cannot be finished"
            )
        state = await _dump(nc, store, work, args, found)
    elif args.partitions not in (None, state.partitions):
        raise UsageError(
            f"the migration under way ({work}) makes {state.partitions} partitions: run it "
            f"with --partitions {state.partitions} to finish it"
        )
    planner: Planner | Repartitioner
    dump = work / _MESSAGES

    def messages() -> Iterator[Outgoing]:
        if isinstance(planner, Repartitioner):
            return planner.messages(lambda only: read_dump(dump, only))
        return planner.messages(read_dump(dump))

    if state.old_partitions is None:
        planner = Planner(
            migration_id=state.migration_id,
            partitions=state.partitions,
            committed=state.committed,
            rejected=set(state.rejected),
        )
    else:
        planner = Repartitioner(
            migration_id=state.migration_id,
            partitions=state.partitions,
            old_partitions=state.old_partitions,
            committed=state.committed_in,
            rejected=set(state.rejected),
            switch=state.switch,
        )
    # A first pass counts (and finds where the engine goes on); the republishing reads the
    # dump again: in bounded memory, however large the old stream.
    unread = last_seq = 0  # old messages past what was committed (a marker gives several)
    for m in messages():
        if m.old_seq > state.committed and m.old_seq != last_seq:
            unread += 1
        last_seq = m.old_seq
    if isinstance(planner, Repartitioner):
        unread = planner.unread  # its committed part is no prefix: counted by partition
    total = planner.count
    if state.stage == "dumped":
        form, last, found = await stream_form(js)
        if form == "partitioned" and found == state.partitions:
            pass  # filled and finished before a stop, not yet recorded
        else:
            if form in ("old", "sealed", "missing"):
                await replace_stream(js)
                _stop_here("replaced")
                last = 0
            elif form != "staging":
                raise CliError(
                    f"stream {EVENTS_STREAM} was changed during the migration (it is "
                    f"{form}): cannot finish it"
                )
            if last > total:
                raise CliError(
                    f"stream {EVENTS_STREAM} holds {last} messages, more than the "
                    f"{total} the migration publishes: something else "
                    "published into it; cannot finish the migration"
                )
            with _progress(
                TextColumn("republishing"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
            ) as (progress, _):
                task = progress.add_task("republish", total=total, completed=last)
                await republish(
                    js,
                    messages(),
                    start=last,
                    on_progress=lambda n: progress.advance(task, n),
                )
            await finish_stream(js, state.partitions)
        state.stage = "republished"
        _write_json(work / _STATE, msgspec.json.encode(state))
        _stop_here("republished")
    through = planner.through
    await start_consumers(js, args.consumer, state.partitions, through)
    if state.old_partitions is None:
        imports = open_imports(
            state.open_imports, state.migration_id, store.events.last_seq, state.partitions
        )
    else:
        imports = repartitioned_imports(
            state.open_imports, state.migration_id, store.events.last_seq, state.partitions
        )
    await store.reset_stream_positions(
        through, dict.fromkeys(range(state.partitions), through), imports
    )
    if isinstance(planner, Repartitioner) and state.switch is not None:
        await _renumber_definitions(
            nc, store, state.switch.version, planner.definitions[state.switch.version]
        )
    _remove(work)
    if isinstance(planner, Repartitioner):
        _report_repartitioned(planner, state, args.consumer, unread)
        return
    print(
        f"{EVENTS_STREAM}: {planner.events} events and {planner.markers} import markers of the "
        f"old stream ({state.old_messages} messages) republished into "
        f"{state.partitions} partitions as import {state.migration_id}"
        + (f"; {len(planner.dropped)} left out (no event subject)" if planner.dropped else "")
        + (
            f"; {len(planner.rejected)} the old engine rejected left out (kept in "
            f"{REJECTED_STREAM})"
            if planner.rejected
            else ""
        )
        + f". The engine goes on after position {through} (consumers "
        f"{partition_consumer(args.consumer, 0)} to "
        f"{partition_consumer(args.consumer, state.partitions - 1)}): {unread} messages the "
        "old engine had not read, then the import's end markers"
    )


def _report_repartitioned(
    planner: Repartitioner, state: _State, consumer: str, unread: int
) -> None:
    print(
        f"{EVENTS_STREAM}: {planner.events} events and the markers of {planner.markers} "
        f"imports and {len(planner.definitions)} definitions switches of the old stream "
        f"({state.old_messages} messages in {state.old_partitions} partitions) republished "
        f"into {state.partitions} partitions as import {state.migration_id}"
        + (
            f"; {len(planner.dropped)} left out (stored without a partition, or no known subject)"
            if planner.dropped
            else ""
        )
        + (
            f"; {len(planner.rejected)} the engine rejected left out (kept in {REJECTED_STREAM})"
            if planner.rejected
            else ""
        )
        + f". The engine goes on after position {planner.through} (consumers "
        f"{partition_consumer(consumer, 0)} to "
        f"{partition_consumer(consumer, state.partitions - 1)}): {unread} messages the "
        "engine had not read, then the import's end markers"
    )


async def _renumber_definitions(
    nc: Client, store: Store, version: int, applied_through: dict[int, int]
) -> None:
    """Give the stored record of the definitions in force (``version``) the positions of
    the new stream, in the store and in ``SHOAL_DEFINITIONS``; and record its markers
    published (the new stream holds them in every partition)."""
    row = await store.definitions.get()
    if row is None or row.version != version:
        return
    where = f"the store {store.path}"
    try:
        record = decode_definitions(row.body, where)
    except StoredDefinitionsError:
        return
    record = msgspec.structs.replace(record, applied_through=applied_through)
    await store.definitions.put(
        StoredRow(version=row.version, applied_at=row.applied_at, body=encode_definitions(record))
    )
    await store.definitions.set_marked(version)
    try:
        board = await DefinitionsKV.open(nc)
        await board.save(record)
    except BrokerError as e:
        # The engine repairs it from the store's copy at its start (a tie goes to the store).
        print(f"the definitions in {EVENTS_STREAM}'s KV copy not renumbered: {e}")


def repartitioned_imports(
    old: Mapping[str, int], migration_id: str, begun: int, partitions: int
) -> dict[str, int]:
    """The store's open imports once re-partitioned: an import the engine had open in some
    old partition (``old``: keys ``<id>@<old partition>``, the log position each began at)
    is open in every new one, from the earliest of those positions, as its end markers come
    in every new partition after what the engine had committed (see
    :class:`protocol.nats._migrate.Repartitioner`); and the migration's own, begun at
    ``begun``, in every new partition."""
    earliest: dict[str, int] = {}
    for key, at in old.items():
        import_id = key.partition("@")[0]
        earliest[import_id] = min(at, earliest.get(import_id, at))
    earliest[migration_id] = begun
    return {f"{import_id}@{p}": at for import_id, at in earliest.items() for p in range(partitions)}


def open_imports(
    old: Mapping[str, int], migration_id: str, begun: int, partitions: int
) -> dict[str, int]:
    """The store's open imports once migrated: those the old engine had open (``old``, by
    import id: the log position each began at) open in every partition, as their end
    markers are republished in each; and the migration's own, begun at ``begun`` (the log's
    last position), in every partition: the engine reads the unread tail as its events, and
    at its end markers reconciles the customers they touched."""
    out: dict[str, int] = {}
    for import_id, at in [*old.items(), (migration_id, begun)]:
        if "@" in import_id:  # already one partition's (not written by an earlier shoal)
            out[import_id] = at
            continue
        for p in range(partitions):
            out[f"{import_id}@{p}"] = at  # the engine's key (actors.engine._imports.open_key)
    return out


async def _refuse_while_engines_hold_partitions(nc: Client) -> None:
    """Refuse while an engine holds a partition's lease: it runs on this stream.

    Raises:
        CliError: one does.
    """
    js = nc.jetstream()
    try:
        await js.stream_info(LEASES_STREAM)
    except nats.js.errors.NotFoundError:
        return  # no engine ever claimed partitions here
    held = await LeaseBucket(nc).holders()
    if held:
        p, holder = min(held.items())
        raise CliError(
            f"engine {holder.engine!r} holds partition {p} of {EVENTS_STREAM}: an engine is "
            "running on this stream; stop it, then migrate"
        )


async def _dump(
    nc: Client, store: Store, work: Path, args: argparse.Namespace, old_partitions: int | None
) -> _State:
    """Seal the old stream, read it whole into ``work``, and record what the old engine had
    committed; return the state of the migration, now ``dumped``."""
    js = nc.jetstream()
    await _refuse_while_engines_hold_partitions(nc)
    names = [args.consumer]
    # Each partition's consumer: its last claim's, or the one before claims.
    consumer_of: dict[int, tuple[str, ...]] = {}
    if old_partitions is not None:
        claimed = await last_claims(js, args.consumer, old_partitions)
        consumer_of = {q: (c.name, *c.previous) for q, c in claimed.items() if q is not None}
        # The consumers before claims too: an engine of an earlier shoal may read them.
        names = list(
            dict.fromkeys(name for c in claimed.values() for name in (*c.previous, c.name))
        )
    floors: dict[str, int | None] = {}
    for name in names:
        floors[name], bound = await consumer_floor(js, name)
        if bound:
            raise CliError(
                f"consumer {name!r} of {EVENTS_STREAM} is in use: an engine is running "
                "on this stream; stop it, then migrate"
            )
    committed = store.stream_through
    if committed is None:
        committed = (floors[args.consumer] or 0) if old_partitions is None else 0
    committed_in: dict[int, int] = {}
    switch: Switch | None = None
    if old_partitions is not None:
        known = store.partitions_through
        for q in range(old_partitions):
            if q in known:
                committed_in[q] = known[q]
            elif not known and store.stream_through is not None:
                committed_in[q] = store.stream_through
            else:
                # The claim's consumer, or the one before claims when it has none.
                committed_in[q] = max(floors[name] or 0 for name in consumer_of[q])
        switch = await _switch_of(store)
    await seal_stream(js)
    rejected = sorted(await rejected_positions(nc))
    work.mkdir(parents=True, exist_ok=True)
    count = await _write_dump(work / _MESSAGES, dump_stream(nc))
    state = _State(
        stage="dumped",
        migration_id=f"migrate-{secrets.token_hex(8)}",
        partitions=args.partitions or DEFAULT_PARTITIONS,
        committed=committed,
        old_messages=count,
        open_imports=dict(store.open_imports),
        rejected=rejected,
        old_partitions=old_partitions,
        committed_in=committed_in,
        switch=switch,
    )
    _write_json(work / _STATE, msgspec.json.encode(state))
    _stop_here("dumped")
    return state


async def _switch_of(store: Store) -> Switch | None:
    """The store's record of the definitions in force, if they replaced earlier ones."""
    row = await store.definitions.get()
    if row is None:
        return None
    try:
        d = decode_definitions(row.body, f"the store {store.path}")
    except StoredDefinitionsError:
        return None
    if d.applied_through is None:
        return None
    return Switch(
        version=d.version,
        fingerprint=d.fingerprint,
        applied_at=d.applied_at,
        applied_through=dict(d.applied_through),
    )


async def _write_dump(path: Path, pieces: AsyncIterable[Sequence[Delivery]]) -> int:
    """Write the old stream's messages to ``path`` (a piece at a time, each a msgpack list of
    :class:`OldMessage` after its length), whole or not at all, and make it durable; return
    how many."""
    count = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        async for piece in pieces:
            frame = msgspec.msgpack.encode([OldMessage.of(d) for d in piece])
            await anyio.to_thread.run_sync(f.write, len(frame).to_bytes(_LENGTH, "big") + frame)
            count += len(piece)
        await anyio.to_thread.run_sync(_sync, f)
    os.replace(tmp, path)
    _sync_dir(path.parent)
    return count


def read_dump(path: Path, only: Container[int] | None = None) -> Iterator[list[OldMessage]]:
    """The old stream's messages :func:`_write_dump` wrote, a piece at a time: those of the
    pieces numbered in ``only`` (from 0; None: all), the others skipped unread."""
    with open(path, "rb") as f:
        n = 0
        while header := f.read(_LENGTH):
            size = int.from_bytes(header, "big")
            if only is None or n in only:
                yield _piece_decoder.decode(f.read(size))
            else:
                f.seek(size, os.SEEK_CUR)
            n += 1


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_state(work: Path) -> _State | None:
    path = work / _STATE
    if not path.is_file():
        return None
    return msgspec.json.decode(path.read_bytes(), type=_State)


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, and make it durable."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        _sync(f)
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _write_json(path: Path, data: bytes) -> None:
    _write(path, json.dumps(json.loads(data), indent=1).encode() + b"\n")


def _remove(work: Path) -> None:
    # The state first: without it, a run starts from the stream, not from a half-removed
    # folder.
    for name in (_STATE, _MESSAGES):
        (work / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        work.rmdir()


def _stop_here(step: str) -> None:
    if os.environ.get(_STOP_AFTER) == step:
        raise _Stopped(f"stopped after step {step!r} ({_STOP_AFTER})")
