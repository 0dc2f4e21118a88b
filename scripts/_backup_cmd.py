"""``shoal backup DIR`` and ``shoal restore DIR``: a consistent copy of a deployment, taken while
the engine runs, and the deployment brought back from it onto an empty broker and data
directory.

Shoal's state is in two places, the data directory (``shoal.db``) and the broker (its
streams and buckets), and a copy must hold both so that they agree. The store is copied
first (SQLite's online backup), then the streams, each with the broker's own snapshot
(:data:`protocol.BACKUP_STREAMS`, in that order). Every stream then holds at least what the
store recorded: the events it committed, the transitions it published. What the streams
hold beyond it (what the engine did between the two copies, and the events it had not
taken yet) the restored engine takes from the stream again, as after a crash: the events
after the store's positions are applied in stream order, and make the same transitions with
the same versions. The streams keep their sequences, so the store's positions still name
the same messages.

A backup is a directory: ``manifest.json`` (written last: a directory without one is no
backup), ``shoal.db``, ``streams/<stream>.tar.s2``, and the data directory's ``engine-id``
and role keys (``auth/``) when it has them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from nats.aio.client import Client

from protocol import (
    BACKUP_STREAMS,
    EVENTS_STREAM,
    KEYS_DIR,
    LEASES_STREAM,
    REQUIRED_STREAMS,
)
from protocol._definitions import DEFINITIONS_STREAM
from protocol.nats import (
    StreamNotFound,
    connect,
    restore_stream,
    snapshot_stream,
    stream_info,
)
from store import SCHEMA_VERSION, Store

from ._claiming import ENGINE_ID_FILE
from ._connection import add_data_dir_options, credentials_of, engine_servers, servers_of
from ._errors import BadInput, CliError, NotFound, UsageError

_logger = structlog.get_logger("shoal.restore")

FORMAT = 1
"""The backup format this shoal writes, and the newest it restores."""
MANIFEST = "manifest.json"
STORE_FILE = "shoal.db"
STREAMS_DIR = "streams"


class StoreCopy(msgspec.Struct, frozen=True, kw_only=True):
    """The store in a backup: its file, and where it stood."""

    file: str
    bytes: int
    sha256: str
    schema_version: int
    stream_through: int | None
    """The position in ``SHOAL_EVENTS`` through which the store committed every message."""
    partitions_through: dict[int, int]
    """The same for each partition."""
    events: int
    """The last position of the store's event log."""
    transitions: int
    """The last position of the store's outbox (committed transitions)."""


class StreamEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A stream in a backup: its snapshot's file, and the broker's configuration and state
    of the stream at the snapshot."""

    stream: str
    file: str
    bytes: int
    sha256: str
    messages: int
    first_seq: int
    last_seq: int
    config: dict[str, Any]
    state: dict[str, Any]


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """``manifest.json``: what a backup holds, to check it before restoring it."""

    format: int
    shoal: str
    """The version of the shoal that made it."""
    created: str
    """When the backup began (UTC, ISO 8601): the store's copy is of that moment."""
    engine_id: str | None
    keys: bool
    """Whether the data directory's role keys are in it (``auth/``)."""
    store: StoreCopy
    streams: list[StreamEntry]


class _FormatOnly(msgspec.Struct):
    format: int


def register(sub: Any) -> None:
    """Add the ``backup`` and ``restore`` commands to the ``shoal`` subparsers ``sub``."""
    backup = sub.add_parser(
        "backup",
        help="copy the store and the streams into a new directory, while the engine runs",
        description="Copy the data directory's store (SQLite's online backup), its engine id "
        f"and keys, then the broker's streams ({', '.join(BACKUP_STREAMS)}: those that exist) "
        "with the broker's own snapshots, into DIR, consistently, while the engine runs. "
        "It connects with the engine's credentials.",
    )
    backup.add_argument("dir", type=Path, metavar="DIR", help="a new or empty directory")
    backup.add_argument(
        "--nats",
        action="append",
        metavar="URL",
        help="the engine's NATS server (default: NATS_URL, else nats://127.0.0.1:4222, the "
        "embedded broker's)",
    )
    backup.set_defaults(run=_backup)

    restore = sub.add_parser(
        "restore",
        help="bring a backup back onto an empty broker and data directory",
        description="Restore a backup made by `shoal backup`: the streams onto a broker that "
        "has none of shoal's, then the store, engine id and keys into a data directory that "
        "has no store. Then start the engine: it goes on from the backup, and versions go on "
        "from it. Events published after the backup began are not in it: publish them again "
        "(with their messageId).",
    )
    restore.add_argument("dir", type=Path, metavar="DIR", help="the backup's directory")
    add_data_dir_options(restore)
    restore.set_defaults(run=_restore)


def _version() -> str:
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# backup -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _new_backup(target: Path) -> Iterator[None]:
    """Make ``target`` (it must not exist, or be empty) for a backup, readable by its owner
    only (it holds the keys); remove what was written of it if the backup fails."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{target} is not empty: back up into a new or empty directory")
    made = not target.exists()
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make {target}: {e.strerror or e}") from e
    try:
        yield
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for child in target.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


async def _backup(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    target: Path = args.dir
    source = data_dir / STORE_FILE
    if not source.is_file():
        raise NotFound(f"{source} does not exist: give the engine's --data-dir")
    created = datetime.datetime.now(datetime.UTC)
    with _new_backup(target):
        nc = await connect(
            servers_of(args),
            name="shoal-backup",
            credentials=credentials_of(args).for_role("engine"),
        )
        try:
            manifest = await _take_backup(nc, data_dir, target, created)
        finally:
            await nc.close()
        _write_manifest(target, manifest)
    print(_summary("backed up", target, manifest))
    return 0


async def _take_backup(
    nc: Client, data_dir: Path, target: Path, created: datetime.datetime
) -> Manifest:
    # The definitions in force before the store is copied: a change during the backup
    # would be in the streams' copy but not in the store's, and an engine restored from
    # them would switch again, at another instant, making different transitions under
    # versions the copy already holds. Such a backup is refused (try again).
    before = await stream_info(nc, DEFINITIONS_STREAM)
    async with await Store.open_read_only(data_dir / STORE_FILE) as store:
        await store.backup(target / STORE_FILE)
    copy = target / STORE_FILE
    async with await Store.open_read_only(copy) as taken:
        store_copy = StoreCopy(
            file=STORE_FILE,
            bytes=copy.stat().st_size,
            sha256=await anyio.to_thread.run_sync(_sha256, copy),
            schema_version=SCHEMA_VERSION,
            stream_through=taken.stream_through,
            partitions_through=dict(taken.partitions_through),
            events=taken.events.last_seq,
            transitions=taken.outbox.last_seq,
        )
    (target / STREAMS_DIR).mkdir(mode=0o700)
    entries: list[StreamEntry] = []
    for stream in BACKUP_STREAMS:
        file = f"{STREAMS_DIR}/{stream}.tar.s2"
        try:
            got = await snapshot_stream(nc, stream, target / file)
        except StreamNotFound:
            if stream in REQUIRED_STREAMS:
                raise NotFound(
                    f"stream {stream} does not exist on the broker: is it the engine's? "
                    "(give its server with --nats URL)"
                ) from None
            (target / file).unlink(missing_ok=True)
            continue
        state = got.state
        entries.append(
            StreamEntry(
                stream=stream,
                file=file,
                bytes=got.bytes,
                sha256=got.sha256,
                messages=int(state.get("messages", 0)),
                first_seq=int(state.get("first_seq", 0)),
                last_seq=int(state.get("last_seq", 0)),
                config=got.config,
                state=state,
            )
        )
    _check_consistent(store_copy, entries, before)
    engine_id = _copy_identity(data_dir, target)
    return Manifest(
        format=FORMAT,
        shoal=_version(),
        created=created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        engine_id=engine_id,
        keys=(target / KEYS_DIR).is_dir(),
        store=store_copy,
        streams=entries,
    )


def _check_consistent(
    store: StoreCopy, streams: list[StreamEntry], definitions_before: dict[str, Any] | None
) -> None:
    """Refuse a copy whose parts do not fit: the events stream ends before the store's
    position (another broker than the engine's), or the definitions changed meanwhile."""
    by_name = {s.stream: s for s in streams}
    events = by_name[EVENTS_STREAM]
    through = max([store.stream_through or 0, *store.partitions_through.values()])
    if through > events.last_seq:
        raise CliError(
            f"the store committed {EVENTS_STREAM} through position {through}, but the "
            f"broker's {EVENTS_STREAM} ends at {events.last_seq}: is this the broker of this "
            "data directory? (give its server with --nats URL)"
        )
    seq_before = (
        int(definitions_before.get("state", {}).get("last_seq", 0))
        if definitions_before is not None
        else 0
    )
    defs = by_name.get(DEFINITIONS_STREAM)
    seq_after = defs.last_seq if defs is not None else 0
    if seq_after != seq_before:
        raise CliError(
            "the segment definitions changed during the backup: it would not be consistent. "
            "Run it again"
        )


def _copy_identity(data_dir: Path, target: Path) -> str | None:
    """Copy the data directory's engine id and role keys into the backup (the keys with
    their modes: they are secrets); return the id."""
    engine_id = None
    id_file = data_dir / ENGINE_ID_FILE
    if id_file.is_file():
        shutil.copy2(id_file, target / ENGINE_ID_FILE)
        engine_id = id_file.read_text(encoding="utf-8").strip()
    keys = data_dir / KEYS_DIR
    if keys.is_dir():
        shutil.copytree(keys, target / KEYS_DIR)
        (target / KEYS_DIR).chmod(0o700)
    return engine_id


def _write_manifest(target: Path, manifest: Manifest) -> None:
    # Written last, and whole or not at all: its presence marks a complete backup.
    temp = target / (MANIFEST + ".tmp")
    temp.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    with temp.open("rb") as f:
        os.fsync(f.fileno())
    temp.replace(target / MANIFEST)


def _summary(done: str, target: Path, manifest: Manifest) -> str:
    streams = ", ".join(f"{s.stream} ({s.messages} messages)" for s in manifest.streams)
    through = manifest.store.stream_through
    return (
        f"{done} {target}: the store (through {EVENTS_STREAM} position {through}, "
        f"{manifest.store.events} events, {manifest.store.transitions} transitions), "
        f"{streams}; taken at {manifest.created}"
    )


# restore ----------------------------------------------------------------------------------


def read_manifest(backup: Path) -> Manifest:
    """The manifest of the backup in ``backup``, checked: a format this shoal reads, and
    every file present with the size and checksum it had.

    Raises:
        NotFound: no backup there (no manifest: none, or one that did not finish).
        BadInput: the manifest is unreadable, of a newer format, or a file is missing or
            damaged.
    """
    path = backup / MANIFEST
    if not path.is_file():
        raise NotFound(
            f"{path} does not exist: {backup} is not a backup made by `shoal backup` (or "
            "one that did not finish)"
        )
    raw = path.read_bytes()
    try:
        found = msgspec.json.decode(raw, type=_FormatOnly).format
    except msgspec.DecodeError as e:
        raise BadInput(f"{path} is damaged: {e}") from e
    if found > FORMAT:
        raise BadInput(
            f"{backup} is a backup of format {found}, made by a newer shoal: this one "
            f"({_version()}) restores format {FORMAT} and older. Restore it with the shoal "
            "that made it, or a newer one"
        )
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except msgspec.DecodeError as e:
        raise BadInput(f"{path} is damaged: {e}") from e
    if manifest.store.schema_version > SCHEMA_VERSION:
        raise BadInput(
            f"{backup}'s store has schema version {manifest.store.schema_version}, newer "
            f"than this shoal's ({SCHEMA_VERSION}): restore it with a newer shoal"
        )
    names = {s.stream for s in manifest.streams}
    if missing := sorted(REQUIRED_STREAMS - names):
        raise BadInput(f"{path} is damaged: it has no copy of {', '.join(missing)}")
    for name, size, digest in [
        (manifest.store.file, manifest.store.bytes, manifest.store.sha256),
        *((s.file, s.bytes, s.sha256) for s in manifest.streams),
    ]:
        file = backup / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BadInput(f"{path} is damaged: it names a file outside the backup ({name})")
        if not file.is_file():
            raise BadInput(f"{backup} is damaged: {file} is missing")
        if file.stat().st_size != size or _sha256(file) != digest:
            raise BadInput(
                f"{backup} is damaged: {file} is not the file the backup wrote (its size or "
                "checksum differs)"
            )
    return manifest


async def _restore_streams(
    args: argparse.Namespace, backup: Path, data_dir: Path, manifest: Manifest
) -> None:
    """Restore the backup's streams onto the broker (``--nats``, else the embedded one on
    the data directory's broker store, stopped again at the end), which must have none of
    shoal's."""
    async with contextlib.AsyncExitStack() as stack:
        servers = await engine_servers(stack, args, data_dir)
        credentials = credentials_of(args).for_role("engine")
        nc = await connect(servers, name="shoal-restore", credentials=credentials)
        stack.push_async_callback(nc.close)
        await _check_empty_broker(nc, manifest)
        for entry in manifest.streams:
            state = await restore_stream(
                nc, entry.stream, entry.config, entry.state, backup / entry.file
            )
            got = (int(state.get("messages", 0)), int(state.get("last_seq", 0)))
            # The broker copies a stream from its live files, and counts it as the copy
            # begins: a message the engine deleted meanwhile (a replaced snapshot's chunk,
            # an erasure, a probe) is counted and not copied. Fewer is that; more, or
            # another last sequence, is not this backup (the files' checksums were checked).
            if got[1] != entry.last_seq or got[0] > entry.messages:
                raise CliError(
                    f"stream {entry.stream} was restored with {got[0]} messages through "
                    f"{got[1]}, the backup holds {entry.messages} through {entry.last_seq}"
                )
            if got[0] < entry.messages:
                _logger.info(
                    "messages deleted while the backup copied the stream",
                    stream=entry.stream,
                    deleted=entry.messages - got[0],
                )


def _check_empty_data_dir(data_dir: Path) -> None:
    held = [
        data_dir / name
        for name in (STORE_FILE, f"{STORE_FILE}-wal", ENGINE_ID_FILE)
        if (data_dir / name).exists()
    ]
    if held:
        raise UsageError(
            f"{data_dir} is not empty ({', '.join(str(p) for p in held)}): restore into a "
            "data directory that has no store (a new --data-dir)"
        )


async def _check_empty_broker(nc: Client, manifest: Manifest) -> None:
    held = []
    for stream in (*(s.stream for s in manifest.streams), LEASES_STREAM):
        info = await stream_info(nc, stream)
        if info is not None:
            held.append(f"{stream} ({int(info.get('state', {}).get('messages', 0))} messages)")
    if held:
        raise UsageError(
            f"the broker holds shoal's streams already: {', '.join(held)}. Restore onto a "
            "broker without them (a new one, or one whose shoal streams you deleted)"
        )


async def _restore(args: argparse.Namespace) -> int:
    backup: Path = args.dir
    data_dir: Path = args.data_dir
    manifest = await anyio.to_thread.run_sync(read_manifest, backup)
    _check_empty_data_dir(data_dir)
    made = not data_dir.exists()
    keys = data_dir / KEYS_DIR
    copy_keys = manifest.keys and not keys.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if copy_keys:
            # Before the embedded broker starts: it admits these keys, and makes none anew.
            shutil.copytree(backup / KEYS_DIR, keys)
            keys.chmod(0o700)
        await _restore_streams(args, backup, data_dir, manifest)
        if (backup / ENGINE_ID_FILE).is_file():
            # The same engine: its claims in SHOAL_SEGMENTS are its own, not another
            # engine's partitions to take over.
            shutil.copy2(backup / ENGINE_ID_FILE, data_dir / ENGINE_ID_FILE)
        # The store last: a restore that failed before leaves no store, and an engine
        # started on the streams alone is refused by its startup check (its store is behind
        # them).
        temp = data_dir / (STORE_FILE + ".restoring")
        await anyio.to_thread.run_sync(shutil.copyfile, backup / manifest.store.file, temp)
        temp.replace(data_dir / STORE_FILE)
    except BaseException:
        # What this restore made of the data directory goes (the embedded broker's store
        # with it); streams restored on a broker of one's own (--nats) stay there.
        if made:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            if copy_keys:
                shutil.rmtree(keys, ignore_errors=True)
            for name in (ENGINE_ID_FILE, STORE_FILE + ".restoring"):
                (data_dir / name).unlink(missing_ok=True)
        raise
    print(_summary("restored", backup, manifest) + f"; into {data_dir}")
    print(
        f"start the engine on it (shoal serve --data-dir {data_dir}); events published "
        f"after {manifest.created} are not in the backup: publish them again, with their "
        "messageId"
    )
    return 0
