"""The store of one engine: its parts in one SQLite file, and the transaction across them.

Each micro-batch is one transaction that appends its events to the log and the transitions
they caused to the outbox, and marks earlier transitions as published (and, in a round of
snapshots, stores customer states), so the parts never disagree after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import msgspec

from ._db import Db, chunks, placeholders
from ._definitions import Definitions
from ._errors import StoreError, StoreMissingError
from ._events import EventLog, LoggedEvent
from ._forgotten import Forgotten, ForgottenTable
from ._lock import WriterLock
from ._outbox import Outbox, OutboxEntry
from ._parked import Parked
from ._retention import CustomerBase, CutMark, Retention
from ._schema import MMAP_BYTES, Synchronous, check_for_reading, prepare_for_writing
from ._snapshots import Snapshot, SnapshotMarks, Snapshots

_STREAM_THROUGH = "stream_through"
_PARTITION_THROUGH = "stream_through."
"""``meta`` keys of :attr:`Store.partitions_through`: ``stream_through.<partition>``."""
_DROPPED = "dropped."
"""``meta`` keys of :attr:`Store.dropped`: ``dropped.<partition>``."""
_IMPORT = "import:"
"""``meta`` keys of the imports begun and not yet ended: ``import:<id>`` -> the event log
position when it began."""
"""The ``meta`` key of :attr:`Store.stream_through`."""


class Store:
    """The SQLite store of one engine: :attr:`events` (the log), :attr:`outbox` and
    :attr:`snapshots`, written together by :meth:`commit`, and :attr:`parked`.

    Open it with ``async with await Store.open(path) as store:``. Only one process may
    hold a store for writing at a time (a lock beside the file enforces it); any number may
    read it beside the writer (:meth:`open_read_only`).
    """

    def __init__(
        self,
        db: Db,
        lock: WriterLock | None,
        events: EventLog,
        outbox: Outbox,
        snapshots: Snapshots,
        parked: Parked,
        stream_through: int | None = None,
        imports: dict[str, int] | None = None,
        partitions_through: dict[int, int] | None = None,
        dropped: set[int] | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._db = db
        self._partitions_through = partitions_through or {}
        self._dropped: set[int] = set(dropped or ())
        self._imports = imports or {}
        self._lock = lock
        self._closed = False
        self._stream_through = stream_through
        self.events = events
        """The event log."""
        self.outbox = outbox
        """The transitions outbox."""
        self.snapshots = snapshots
        """The customers' snapshots and the marks of the last complete round."""
        self.parked = parked
        """The customers set aside after an error, until tried again."""
        self.definitions = Definitions(db)
        """The engine's copy of the definitions in force."""
        self.upgraded_from: int | None = None
        """The schema version the store had when :meth:`open` upgraded it in place to
        :data:`~store.SCHEMA_VERSION` (None: it was new, or of this version already)."""
        self.retention = retention or Retention(db, None)
        """The customers' bases and where the log was cut (retention)."""
        self.forgotten = ForgottenTable(db, {})
        """The customers forgotten (``shoal forget``), by the hash of their id."""

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._db.path

    @property
    def stream_through(self) -> int | None:
        """The events stream position up to which every message was committed (logged, or
        found a duplicate or rejected); None when no commit recorded one (a new store, or one
        written by a shoal before this was recorded). A consumer's acknowledgement floor past
        it means the store is behind the stream."""
        return self._stream_through

    @property
    def partitions_through(self) -> Mapping[int, int]:
        """Per partition of the events stream, the position up to which every message of
        that partition was committed (read it, don't change it). A partition's consumer
        whose acknowledgement floor is past its entry (or, without one, past
        :attr:`stream_through`) means the store is behind the stream."""
        return self._partitions_through

    @property
    def open_imports(self) -> dict[str, int]:
        """The imports begun and not yet ended (``shoal import``): import id -> the event
        log position when it began (read it, don't change it)."""
        return self._imports

    @classmethod
    async def open(cls, path: Path, *, synchronous: Synchronous = "NORMAL") -> Self:
        """Open (creating if needed) the store at ``path`` for writing.

        Args:
            path: the SQLite file.
            synchronous: ``NORMAL`` (WAL: a power cut may lose the last transactions, never
                corrupts) or ``FULL`` (every commit reaches the disk before it returns).

        Raises:
            StoreLockedError: another process has it open.
            StoreFormatError: it was written by an incompatible version.
            StoreError: it cannot be opened.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = WriterLock.acquire(path)
        try:
            db = await Db.connect(path, read_only=False)
        except BaseException:
            lock.release()
            raise
        doing = f"cannot initialise {path}"
        try:
            upgraded_from = await prepare_for_writing(db, synchronous, doing=doing)
            # Deleted rows are overwritten with zeros, not left in free pages: an erased
            # customer's data must leave the file's bytes (see :meth:`erase`).
            await db.execute("PRAGMA secure_delete=ON", doing=doing)
            store = await cls._assemble(db, lock, doing=doing)
            store.upgraded_from = upgraded_from
            return store
        except BaseException:
            try:
                await db.close()
            finally:
                lock.release()
            raise

    @classmethod
    async def open_read_only(cls, path: Path) -> Self:
        """Open an existing store for reading only, even while an engine writes to it.

        No lock is taken: in WAL mode a reader sees the last committed state and never
        blocks the writer. Replays, exports and history queries use this. Writing to it
        raises :class:`StoreError`.

        Raises:
            StoreFormatError: it was written by an incompatible version.
            StoreError: there is no store at ``path``, or it cannot be read.
        """
        if not path.is_file():
            raise StoreMissingError(path)
        db = await Db.connect(path, read_only=True)
        try:
            doing = f"cannot read {path}"
            await check_for_reading(db, await db.meta(doing=doing))
            return await cls._assemble(db, None, doing=doing)
        except BaseException:
            await db.close()
            raise

    @classmethod
    async def _assemble(cls, db: Db, lock: WriterLock | None, *, doing: str) -> Self:
        meta = await db.meta(doing=doing)
        retention = await Retention.load(db, meta)
        events = await EventLog.load(db, doing=doing)
        if retention.cut is not None and events.last_seq < retention.cut.through:
            # The whole log was cut: positions go on after the last one cut, never again.
            events._committed(retention.cut.through)
        store = cls(
            db,
            lock,
            events,
            await Outbox.load(db, meta, doing=doing),
            Snapshots.load(db, meta),
            await Parked.load(db, writable=lock is not None, doing=doing),
            int(meta[_STREAM_THROUGH]) if _STREAM_THROUGH in meta else None,
            {k[len(_IMPORT) :]: int(v) for k, v in meta.items() if k.startswith(_IMPORT)},
            {
                int(k[len(_PARTITION_THROUGH) :]): int(v)
                for k, v in meta.items()
                if k.startswith(_PARTITION_THROUGH)
            },
            {int(k[len(_DROPPED) :]) for k in meta if k.startswith(_DROPPED)},
            retention,
        )
        store.forgotten = await ForgottenTable.load(db, doing=doing)
        return store

    async def backup(self, target: Path) -> None:
        """Write a consistent copy of the store, as last committed, to the new file
        ``target`` (SQLite's online backup: an engine may go on writing meanwhile). The
        copy opens as any store does.

        Raises:
            StoreError: the store cannot be read, or ``target`` cannot be written.
        """
        if target.exists():
            raise StoreError(f"cannot back {self.path} up into {target}: it exists already")
        await self._db.backup(target)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the database and release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._db.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def bulk_reads(self, enabled: bool) -> None:
        """Make reads of much of the file in random order cheaper (on), or stop (off).

        On: SQLite reads through a memory map of the file instead of a ``read()`` per page
        into its small page cache. Snapshots in deadline order visit the table's pages in
        random order, each several times; mapped, that costs 40 % less (9 -> 5.6 us a row at
        200k customers). Turn it off once done: mapped pages count in the process's resident
        memory. (A larger page cache would help too, but the memory it took would stay.)

        Raises:
            StoreError: the setting cannot be changed.
        """
        await self._db.execute(
            f"PRAGMA mmap_size={MMAP_BYTES if enabled else 0}",
            doing=f"cannot configure {self._db.path}",
        )

    async def commit(
        self,
        events: Sequence[LoggedEvent],
        entries: Sequence[OutboxEntry] = (),
        published_through: int | None = None,
        *,
        snapshots: Sequence[Snapshot] | None = None,
        marks: SnapshotMarks | None = None,
        unparked: Sequence[str] = (),
        stream_through: int | None = None,
        partitions_through: Mapping[int, int] | None = None,
        imports: Mapping[str, int | None] | None = None,
        forget: Sequence[Forgotten] = (),
    ) -> list[int]:
        """Append events and outbox entries, advance the published mark, and store
        snapshots, atomically.

        Args:
            events: new log entries (their ``(customer_id, message_id)`` must be new).
            entries: new outbox entries, in the order they are to be published.
            published_through: every outbox entry up to this position is now confirmed
                published (ignored unless it moves the mark forward).
            snapshots: customer states replacing those stored (their ``log_seq`` must not be
                past the events appended before this call).
            marks: a round of snapshots is complete with this commit.
            unparked: customers no longer parked (see :attr:`parked`).
            stream_through: every message of the events stream up to this position is
                committed with this (ignored unless it moves :attr:`stream_through` forward).
            partitions_through: the same per partition (each entry ignored unless it moves
                that partition's position forward).
            imports: imports begun (id -> the event log position then) or ended (id ->
                None) with this commit (see :attr:`open_imports`).
            forget: customers forgotten with this commit: their events, snapshot, base and
                parking are deleted, and their erasure recorded (pending: see
                :meth:`erase`). Their ``forgotten`` exits are among ``entries``; each
                record's ``outbox_through`` is set here to the outbox's last position.

        Returns:
            The outbox positions assigned to ``entries``, in order.

        Raises:
            StoreError: nothing was written.
        """
        mark = published_through
        if mark is not None and mark <= self.outbox.published_through:
            mark = None
        through = stream_through
        if through is not None and through <= (self._stream_through or 0):
            through = None
        known = self._partitions_through
        moved = {p: seq for p, seq in (partitions_through or {}).items() if seq > known.get(p, 0)}
        if (
            not (events or entries or mark is not None or snapshots or marks or through or unparked)
            and not imports
            and not moved
            and not forget
        ):
            return []
        seqs = self.outbox._next_seqs(len(entries))
        if forget:
            # Everything committed up to here must be published before the broker's copies
            # are looked for: an unpublished transition of the customer would come after.
            through = seqs[-1] if seqs else self.outbox.last_seq
            forget = [msgspec.structs.replace(f, outbox_through=through) for f in forget]
        async with self._db.transaction():
            if forget:
                await self._delete_customers(
                    [f.customer_id or "" for f in forget], ("events", "snapshots")
                )
                # Their state as of the log's cut (retention) too.
                await self.retention._drop([f.customer_id or "" for f in forget])
                await self.parked._remove([f.customer_id or "" for f in forget])
                await self.forgotten._put(forget)
            last_event = await self.events._append(events)
            await self.outbox._append(entries, seqs)
            if mark is not None:
                await self.outbox._mark_published(mark)
            if snapshots:
                await self.snapshots._put(snapshots)
            if marks is not None:
                await self.snapshots._mark(marks)
            await self.parked._remove(unparked)
            if through is not None:
                await self._db.set_meta(_STREAM_THROUGH, str(through))
            for p, seq in moved.items():
                await self._db.set_meta(f"{_PARTITION_THROUGH}{p}", str(seq))
            for import_id, begun in (imports or {}).items():
                if begun is None:
                    await self._db.execute(
                        "DELETE FROM meta WHERE key = ?",
                        (_IMPORT + import_id,),
                        doing=self._db.writing,
                    )
                else:
                    await self._db.set_meta(_IMPORT + import_id, str(begun))
        if through is not None:
            self._stream_through = through
        known.update(moved)
        for import_id, begun in (imports or {}).items():
            if begun is None:
                self._imports.pop(import_id, None)
            else:
                self._imports[import_id] = begun
        self.events._committed(last_event)
        self.outbox._committed(seqs, mark)
        self.snapshots._committed(marks)
        self.parked._committed(unparked)
        if forget:
            self.parked._committed([f.customer_id or "" for f in forget])
            self.forgotten._committed(forget)
        return seqs

    async def _delete_customers(self, customer_ids: Sequence[str], tables: Sequence[str]) -> None:
        """Delete the rows of these customers from ``tables`` (inside a transaction)."""
        db = self._db
        for ids in chunks(customer_ids):
            marks = placeholders(len(ids))
            for table in tables:
                await db.execute(
                    f"DELETE FROM {table} WHERE customer_id IN ({marks})", ids, doing=db.writing
                )

    async def erase(self, done: Sequence[Forgotten]) -> None:
        """Finish the store's part of these erasures: delete their customers' transitions
        (published by now, their ``forgotten`` exits included: the broker keeps those),
        clear the id from their records, and checkpoint the write-ahead log into the file
        and truncate it, so that no copy of the deleted pages is left in it.

        Raises:
            StoreError: nothing was written (the checkpoint failing is logged by the caller
                and retried with the next erasure).
        """
        if not done:
            return
        finished = [msgspec.structs.replace(f, customer_id=None) for f in done]
        async with self._db.transaction():
            await self._delete_customers([f.customer_id or "" for f in done], ("transitions",))
            await self.forgotten._put(finished)
        self.forgotten._committed(finished)
        await self.checkpoint()

    async def remember_forgotten(self, rows: Sequence[Forgotten]) -> None:
        """Record erasures another engine did (a partition taken over: its snapshot's
        forgotten customers), or began (pending ones, with the id: this engine finishes
        them), keeping a record this store has of the same customer when it is newer.

        Raises:
            StoreError: nothing was written.
        """
        fresh = [
            f
            for f in rows
            if (mine := self.forgotten.get(f.hash)) is None
            or mine.order_seq < f.order_seq
            or (mine.order_seq == f.order_seq and f.pending and not mine.pending)
        ]
        if not fresh:
            return
        async with self._db.transaction():
            await self.forgotten._put(fresh)
        self.forgotten._committed(fresh)

    async def checkpoint(self) -> bool:
        """Copy the write-ahead log into the file and truncate it; False when a reader kept
        it from finishing (then the log still holds pages written before).

        Raises:
            StoreError: it failed.
        """
        return await self._db.checkpoint()

    async def reset_stream_positions(
        self,
        through: int | None,
        partitions: Mapping[int, int],
        imports: Mapping[str, int],
    ) -> None:
        """Replace the recorded events stream positions and open imports, in one transaction:
        for a migration to a new events stream, whose positions are not the old one's. The
        events' positions in the old stream are forgotten, and so are the positions the
        log's cut recorded for cutting it (:attr:`CutMark.partitions`).

        Args:
            through: the new :attr:`stream_through`.
            partitions: the new :attr:`partitions_through` (every other entry is removed).
            imports: the new :attr:`open_imports` (every other one is removed).

        Raises:
            StoreError: nothing was written.
        """
        db, writing = self._db, self._db.writing
        async with db.transaction():
            await db.execute(
                "DELETE FROM meta WHERE key = ? OR key LIKE ? OR key LIKE ?",
                (_STREAM_THROUGH, _PARTITION_THROUGH + "%", _IMPORT + "%"),
                doing=writing,
            )
            if through is not None:
                await db.set_meta(_STREAM_THROUGH, str(through))
            for p, seq in partitions.items():
                await db.set_meta(f"{_PARTITION_THROUGH}{p}", str(seq))
            for import_id, begun in imports.items():
                await db.set_meta(_IMPORT + import_id, str(begun))
            # The events' positions in the old stream, and where the log's cut let it be
            # cut, say nothing of the new one (retention cuts it again from later events).
            await db.execute(
                "UPDATE events SET stream_seq = NULL WHERE stream_seq IS NOT NULL",
                doing=writing,
            )
            cut = self.retention.cut
            mark = None if cut is None else await self.retention._drop_partitions(cut.partitions)
        if mark is not None:
            self.retention._committed(mark)
        self._stream_through = through
        self._partitions_through = dict(partitions)
        self._imports = dict(imports)

    async def customer_ids(self) -> set[str]:
        """Every customer the store holds anything of: events, transitions, a snapshot, or a
        parking.

        Raises:
            StoreError: it cannot be read.
        """
        rows = await self._db.rows(
            "SELECT customer_id FROM snapshots UNION SELECT customer_id FROM transitions "
            "UNION SELECT customer_id FROM events"
            + (" UNION SELECT customer_id FROM bases" if self.retention.cut is not None else ""),
            doing=f"cannot read {self._db.path}",
        )
        return {r[0] for r in rows} | {p.customer_id for p in self.parked.all()}

    async def drop_customers(
        self, customer_ids: Sequence[str], *, partitions: Iterable[int] = ()
    ) -> None:
        """Remove everything of these customers (their events, transitions, snapshot, base
        and parking) and the recorded positions of ``partitions``, in one transaction: their
        partition passed to another engine, which holds them now.

        Positions of the log and the outbox are not given again.

        Raises:
            StoreError: nothing was removed.
        """
        db = self._db
        dropped = list(partitions)
        async with db.transaction():
            for ids in chunks(customer_ids):
                marks = placeholders(len(ids))
                for table in ("events", "transitions", "snapshots"):
                    await db.execute(
                        f"DELETE FROM {table} WHERE customer_id IN ({marks})",
                        ids,
                        doing=db.writing,
                    )
            await self.parked._remove(list(customer_ids))
            await self.retention._drop(list(customer_ids))
            mark = await self.retention._drop_partitions(dropped)
            for p in dropped:
                await db.execute(
                    "DELETE FROM meta WHERE key = ?",
                    (f"{_PARTITION_THROUGH}{p}",),
                    doing=db.writing,
                )
                await db.set_meta(f"{_DROPPED}{p}", "1")
        self.parked._committed(customer_ids)
        if mark is not None:
            self.retention._committed(mark)
        for p in dropped:
            self._partitions_through.pop(p, None)
        self._dropped.update(dropped)

    @property
    def dropped(self) -> frozenset[int]:
        """The partitions :meth:`drop_customers` removed and :meth:`restored` did not
        give back: the store holds nothing of them, whatever claimed them last."""
        return frozenset(self._dropped)

    async def restored(self, partition: int) -> None:
        """``partition`` is the store's again (taken over: its history logged anew).

        Raises:
            StoreError: it cannot be recorded.
        """
        if partition in self._dropped:
            async with self._db.transaction():
                await self._db.execute(
                    "DELETE FROM meta WHERE key = ?",
                    (f"{_DROPPED}{partition}",),
                    doing=self._db.writing,
                )
            self._dropped.discard(partition)

    async def cut_log(self, bases: Sequence[CustomerBase], mark: CutMark) -> None:
        """Move the cut of the event log to ``mark``, in one transaction: store ``bases``
        (replacing those stored: each customer's state folded from its events up to
        ``mark.through``) and delete every event up to ``mark.through``.

        Positions of the log are not given again: :attr:`EventLog.last_seq` stays.

        Raises:
            StoreError: nothing was written.
        """
        cut = self.retention.cut
        if cut is not None and mark.through < cut.through:
            raise ValueError(f"the log is cut up to {cut.through} already, not {mark.through}")
        if mark.through > self.events.last_seq:
            raise ValueError(
                f"no event at {mark.through} yet: the log ends at {self.events.last_seq}"
            )
        async with self._db.transaction():
            await self.retention._cut_to(bases, mark)
        self.retention._committed(mark)

    async def import_events(self, events: Sequence[LoggedEvent]) -> int:
        """Append the events the log does not hold yet, in one transaction; return how many.

        Unlike :meth:`commit`, an event whose ``(customer_id, message_id)`` is already logged,
        or comes earlier in ``events``, is skipped rather than failing the write: imported
        history may overlap what the log holds, and importing it twice adds nothing. The new
        events get the next log positions, in the order given, as :meth:`commit` assigns
        them. The outbox, the snapshots and their marks are left alone, so an engine started
        afterwards finds these events in the tail after its last round of snapshots.

        Args:
            events: log entries (``seq`` is ignored); tens of thousands per call keep a large
                import fast.

        Returns:
            How many of ``events`` were new (the others were repeats).

        Raises:
            StoreError: nothing was written.
        """
        if not events:
            return 0
        async with self._db.transaction():
            added, last = await self.events._import(events)
        self.events._committed(last)
        return added
