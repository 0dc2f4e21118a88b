"""The store's schema: its tables, its version, and getting a file ready to be used.

The file format is fixed: a store written by an older shoal of the same schema version
opens as it is, and one of an older version is upgraded in place. A store of a later version
than this shoal's (written by a newer shoal) is refused before anything is written to it.
"""

from __future__ import annotations

from typing import Literal

from ._db import Db
from ._definitions import DEFINITIONS_TABLE
from ._errors import StoreFormatError
from ._forgotten import FORGOTTEN_TABLE
from ._retention import RETENTION_TABLE

SCHEMA_VERSION = 5
"""2 added the snapshots table, 3 the definitions table, 4 the erasure and retention tables,
5 the events' stream positions; a store of an older version is upgraded in place when opened
for writing."""

_UPGRADABLE = (1, 2, 3, 4)
"""Older versions that only lack tables :data:`_SCHEMA` creates, and the events' column
``stream_seq``: upgraded by creating them."""

Synchronous = Literal["NORMAL", "FULL"]
"""SQLite's ``synchronous`` level: ``NORMAL`` (WAL: a power cut may lose the last
transactions, never corrupts) or ``FULL`` (every commit reaches the disk before it returns)."""

MMAP_BYTES = 1 << 32
"""How much of the file SQLite may map into memory (it caps this at its build's limit)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL,
    stream_seq INTEGER,
    UNIQUE (customer_id, message_id)
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    segment TEXT NOT NULL,
    at INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (customer_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    customer_id TEXT PRIMARY KEY,
    format INTEGER NOT NULL,
    needs TEXT NOT NULL,
    log_seq INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_deadline ON snapshots (deadline, customer_id);
"""
_SCHEMA += DEFINITIONS_TABLE
_SCHEMA += RETENTION_TABLE
_SCHEMA += FORGOTTEN_TABLE
# An event's ``stream_seq`` is its position in the events stream (NULL: logged without one,
# by an offline import or by a shoal before schema 5): where the stream may be cut once the
# log's cut folded it (retention).
# A snapshot is one customer's state as of the event log position ``log_seq`` (every event
# up to it that is the customer's is folded in, none after). ``deadline`` is indexed so that
# a restarting engine can load first the customers whose time-based changes are due first.
# The outbox is append-only and published in ``seq`` order, so what is published is a
# prefix: one number in ``meta`` (published_through) marks it, instead of rewriting rows.


async def prepare_for_writing(db: Db, synchronous: Synchronous, *, doing: str) -> int | None:
    """Check the version, set the journal up, create what is missing, and upgrade the
    version.

    Returns:
        The version the store had when it was older than :data:`SCHEMA_VERSION` and was
        just upgraded; None otherwise (a new store, or one of this version).

    Raises:
        StoreFormatError: the file was written by an incompatible version (a later one
            included): nothing was written to it.
        StoreError: it cannot be prepared (``doing`` says what failed).
    """
    found = await _version(db, doing=doing)
    if found is not None and found != SCHEMA_VERSION and found not in _UPGRADABLE:
        # Before anything is written: a newer shoal's file is left as that shoal wrote it.
        raise StoreFormatError(db.path, found, SCHEMA_VERSION)
    await db.execute("PRAGMA journal_mode=WAL", doing=doing)
    await db.execute(f"PRAGMA synchronous={synchronous}", doing=doing)
    await db.script(_SCHEMA, doing=doing)
    if found is None:
        await db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
            doing=doing,
        )
        return None
    if found == SCHEMA_VERSION:
        return None
    # The versions before only lack tables (snapshots, definitions, the erasure and
    # retention tables), which _SCHEMA just created, and the events' stream positions.
    columns = await db.rows("PRAGMA table_info(events)", doing=doing)
    if all(c[1] != "stream_seq" for c in columns):
        await db.execute("ALTER TABLE events ADD COLUMN stream_seq INTEGER", doing=doing)
    await db.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'",
        (str(SCHEMA_VERSION),),
        doing=doing,
    )
    return found


async def _version(db: Db, *, doing: str) -> int | None:
    """The schema version the file records (None: a new file, without one).

    Raises:
        StoreFormatError: it records one that is not a number.
    """
    has_meta = await db.one(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'", doing=doing
    )
    if has_meta is None:
        return None
    row = await db.one("SELECT value FROM meta WHERE key = 'schema_version'", doing=doing)
    if row is None:
        return None
    try:
        return int(row[0])
    except ValueError:
        raise StoreFormatError(db.path, str(row[0]), SCHEMA_VERSION) from None


async def check_for_reading(db: Db, meta: dict[str, str]) -> None:
    """Check that a store opened read only (its ``meta`` given) can be read.

    Raises:
        StoreFormatError: it was written by an incompatible version.
    """
    try:
        version = int(meta.get("schema_version", 0))
    except ValueError:
        raise StoreFormatError(db.path, meta["schema_version"], SCHEMA_VERSION) from None
    # Older versions lack only tables readers of events do not need (snapshots,
    # definitions, the erasure and retention tables: read as none), and the events' stream
    # positions (read only by the log's cut, which writes).
    if version not in (*_UPGRADABLE, SCHEMA_VERSION):
        raise StoreFormatError(db.path, version, SCHEMA_VERSION)
