"""Definitions persist: the definitions in force are stored each time they are applied, and a
start resumes them.

Two copies, written together: the engine's store (SQLite, ``store.definitions``) and the
shared KV bucket ``SHOAL_DEFINITIONS`` on the broker (``protocol.nats.DefinitionsKV``). Each
holds a :class:`protocol.StoredDefinitions`: the definitions (their text and their lists'
ids), a version one more than the last, when they were applied, and from where (the served
file with its path and content hash, or the API with the name and client the request gave).

At a start (:meth:`DefinitionsKeeper.resume`):

1. The two copies are read. The one with the higher version wins, and the other is written
   again from it (a wiped broker, a copied data directory); at equal versions that differ,
   the store's copy wins. A copy that cannot be read counts as missing.
2. The served file (``shoal serve --segments FILE``, or the shipped default) takes effect
   only when its content changed since it was last applied from a file: its content hash
   (its text and its lists' ids) differs from the one stored. Otherwise the stored
   definitions stay in force, those applied over the API included, so a restart causes no
   transitions. Nothing stored (a first start): the served file takes effect.

The engine logs one line saying which it chose and why (``definitions chosen at start``),
and one for each copy it repaired (``definitions copy repaired``). A record of an older
format (without ``format``: shoal 484eaec or earlier) is written again in this shoal's, in
both copies (``upgraded in place``); one of a later format is refused
(:class:`~protocol.FormatTooNewError`), never read or written over.

Several engines share the bucket, each with its own store. Versions are one sequence: a new
one is proposed to the bucket (:meth:`DefinitionsKeeper.propose`, a compare-and-set on its
head) before the engine switches to it; an engine that loses the race does not switch, and
its requester is told (:class:`~actors.DefinitionsConflict`). Every engine follows the
bucket (:meth:`DefinitionsKeeper.newer`, then the engine's switch): a newer version there
is switched to and stored locally as the same version (:meth:`DefinitionsKeeper.adopted`),
with this engine's own positions (``applied_through``) for the partitions it switched. At
a start, a bucket ahead of the store is followed the same way; equal versions that differ
otherwise than by their positions are settled in the bucket's favour, so engines never
keep two records of one version.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Mapping

import anyio
import msgspec
import structlog

from actors._clock import Clock
from actors._errors import DefinitionError, DefinitionsConflict
from actors.rules import SegmentSet, parse_segments, stored_text
from protocol import (
    DEFINITIONS_FORMAT,
    ApiOrigin,
    BrokerError,
    DefinitionsApplied,
    DefinitionsBoard,
    FileOrigin,
    FormatTooNewError,
    Origin,
    StoredDefinitions,
    StoredDefinitionsError,
    decode_definitions,
    encode_definitions,
    format_instant,
    from_instant,
    to_instant,
)
from store import Store, StoredRow

_HASH_SHOWN = 12
"""Hex digits of a content hash shown in the log."""


def content_hash(segments: SegmentSet) -> str:
    """SHA-256 (hex) of the text ``segments`` were parsed from and of their lists' ids (read
    from list files or given by value): what tells a changed served file."""
    h = hashlib.sha256((segments.text or "").encode())
    for name in sorted(segments.lists):
        h.update(b"\0" + name.encode() + b"\0")
        h.update("\n".join(sorted(segments.lists[name])).encode())
    return h.hexdigest()


async def served_origin(segments: SegmentSet, path: str) -> FileOrigin:
    """The origin of ``segments`` read from the served file ``path`` (hashed in a worker
    thread: list files may be large)."""
    digest = await anyio.to_thread.run_sync(content_hash, segments)
    return FileOrigin(path=path, content_hash=digest)


def _record(
    segments: SegmentSet,
    *,
    version: int,
    applied_at: int,
    origin: Origin,
    last_file: FileOrigin | None,
    applied_through: dict[int, int] | None,
) -> StoredDefinitions:
    return StoredDefinitions(
        version=version,
        applied_at=from_instant(applied_at),
        origin=origin,
        last_file=last_file,
        fingerprint=segments.fingerprint,
        source=segments.source,
        toml=stored_text(segments),
        lists={name: sorted(ids) for name, ids in segments.lists.items()},
        applied_through=applied_through,
    )


def segments_of(d: StoredDefinitions) -> SegmentSet:
    """The definitions ``d`` holds, parsed again.

    Raises:
        DefinitionError: they no longer parse (a later shoal's stricter limits), or parse
            to definitions that evaluate differently (their fingerprint differs).
    """
    lists: Mapping[str, frozenset[str]] = {name: frozenset(ids) for name, ids in d.lists.items()}
    segments = parse_segments(d.toml, source=d.source, lists=lists)
    if segments.fingerprint != d.fingerprint:
        raise DefinitionError(
            f"stored version {d.version} reads back as fingerprint {segments.fingerprint}, "
            f"not {d.fingerprint}",
            source=d.source,
        )
    return segments


def _described(origin: Origin) -> dict[str, str | None]:
    """The log fields of an origin (no secrets: paths, hashes, names)."""
    if isinstance(origin, FileOrigin):
        return {
            "origin": "file",
            "source": origin.path,
            "content_hash": origin.content_hash[:_HASH_SHOWN],
        }
    return {"origin": "api", "source": origin.source, "client": origin.client}


class DefinitionsKeeper:
    """Stores the definitions in force in the engine's store and, when given, the shared
    ``board`` (``SHOAL_DEFINITIONS``); resumes them at a start.

    Give it to the :class:`~actors.Engine` (``keeper=``): each switch to new definitions is
    stored once made. ``clock`` is the engine's: it stamps ``applied_at``.
    """

    def __init__(self, store: Store, board: DefinitionsBoard | None, clock: Clock) -> None:
        self._store = store
        self._board = board
        self._clock = clock
        self._current: StoredDefinitions | None = None
        self._logger = structlog.get_logger("shoal.definitions")
        self._proposed = 0
        """The latest version this engine stored in the bucket and is switching to."""
        self._followed = 0
        """The latest version this engine took from the bucket (another engine's)."""
        self._refused: set[tuple[int, str]] = set()
        """Versions of the bucket not followed, and why: logged once each."""
        self.pending: SegmentSet | None = None
        """The served file's definitions, when :meth:`resume` chose them over stored ones
        that are still usable: the engine starts under the stored definitions and then
        switches to these, as a reload does, so that every customer is rebuilt under them
        and the changes carry the instant of the switch (``at``) and the instant each rule
        became true (``true_since``), not instants from before the file changed."""

    @property
    def current(self) -> StoredDefinitions | None:
        """The stored record of the definitions in force (None before :meth:`resume`)."""
        return self._current

    def applied_info(self) -> DefinitionsApplied | None:
        """Version, applied-at and origin of the definitions in force, for ``status``."""
        d = self._current
        if d is None:
            return None
        origin = d.origin
        if isinstance(origin, FileOrigin):
            return DefinitionsApplied(
                version=d.version,
                applied_at=d.applied_at,
                origin="file",
                source=origin.path,
                content_hash=origin.content_hash,
            )
        return DefinitionsApplied(
            version=d.version,
            applied_at=d.applied_at,
            origin="api",
            source=origin.source,
            client=origin.client,
        )

    # At start -------------------------------------------------------------------------------

    async def resume(self, served: SegmentSet, path: str) -> SegmentSet:
        """The definitions to start with: the stored ones, unless the served file ``path``
        (read as ``served``) changed since it was last applied from a file (see the module).
        Stores the served file's definitions when they take effect, and repairs a copy that
        is missing, unreadable or behind.

        Raises:
            FormatTooNewError: a copy is of a later format than this shoal's.
            StoreError: the store cannot be read or written.
            BrokerError: the broker does not answer.
        """
        file = await served_origin(served, path)
        stored = await self._reconciled()
        reason: str
        if stored is None:
            reason = "no definitions stored yet: the served file takes effect"
        elif stored.last_file is None or stored.last_file.content_hash != file.content_hash:
            was = "no file" if stored.last_file is None else stored.last_file.path
            reason = (
                f"the served file changed since it was last applied from a file ({was}, "
                f"version {stored.version} in force): it takes effect"
            )
            try:
                now_in_force = await anyio.to_thread.run_sync(segments_of, stored)
            except DefinitionError:
                pass  # not usable: the served file takes effect at once (below)
            else:
                # Started under what is in force, then switched to the file (see pending):
                # stored as the next version once the switch is made.
                self._current = stored
                self.pending = served
                self._logger.info(
                    "definitions chosen at start",
                    chose="served file",
                    why=reason + ", by a switch once the engine runs",
                    version=stored.version + 1,
                    origin="file",
                    source=file.path,
                    content_hash=file.content_hash[:_HASH_SHOWN],
                    served_file=file.path,
                    served_hash=file.content_hash[:_HASH_SHOWN],
                    previous_version=stored.version,
                    fingerprint=served.fingerprint,
                )
                return now_in_force
        else:
            same = (
                isinstance(stored.origin, FileOrigin)
                and stored.origin.content_hash == file.content_hash
            )
            try:
                segments = served if same else await anyio.to_thread.run_sync(segments_of, stored)
            except DefinitionError as e:
                reason = (
                    f"the stored definitions (version {stored.version}) cannot be used: {e}; "
                    "the served file takes effect"
                )
                self._logger.error("stored definitions not usable", error=str(e))
            else:
                self._current = stored
                why = (
                    "the served file is unchanged since it was applied"
                    if same
                    else "the served file is unchanged since it was last applied from it, so "
                    "the definitions applied over the API after it stay in force"
                )
                self._log_choice("stored", why, stored, file)
                return segments
        self._current = await self._store_new(served, file, stored)
        self._log_choice("served file", reason, self._current, file, previous=stored)
        return served

    def _log_choice(
        self,
        chose: str,
        why: str,
        d: StoredDefinitions,
        file: FileOrigin,
        previous: StoredDefinitions | None = None,
    ) -> None:
        self._logger.info(
            "definitions chosen at start",
            chose=chose,
            why=why,
            version=d.version,
            applied_at=format_instant(to_instant(d.applied_at)),
            **_described(d.origin),
            served_file=file.path,
            served_hash=file.content_hash[:_HASH_SHOWN],
            previous_version=None if previous is None else previous.version,
            fingerprint=d.fingerprint,
        )

    async def _read_local(self) -> StoredDefinitions | str | None:
        row = await self._store.definitions.get()
        if row is None:
            return None
        where = f"the store {self._store.path}"
        try:
            d = decode_definitions(row.body, where)
        except StoredDefinitionsError as e:
            return e.problem
        if d.version != row.version:
            return f"the row says version {row.version}, its record {d.version}"
        return d

    async def _read_shared(self) -> StoredDefinitions | str | None:
        if self._board is None:
            return None
        try:
            return await self._board.load()
        except StoredDefinitionsError as e:
            return e.problem

    async def _reconciled(self) -> StoredDefinitions | None:
        """The stored definitions in force, by version; a copy missing, unreadable or behind
        is written again from the other."""
        local, shared = await self._read_local(), await self._read_shared()
        board = self._board
        good_local = local if isinstance(local, StoredDefinitions) else None
        good_shared = shared if isinstance(shared, StoredDefinitions) else None
        if good_local is None and good_shared is None:
            for where, problem in ((self._store.path, local), (self._where(), shared)):
                if isinstance(problem, str):
                    self._logger.warning(
                        "stored definitions not readable", copy=str(where), problem=problem
                    )
            return None
        if good_shared is not None and (
            good_local is None
            or good_shared.version > good_local.version
            or (good_shared.version == good_local.version and not _same(good_shared, good_local))
        ):
            # Followed now, at this store's positions: every event it holds was applied
            # under the definitions before (none, for a new store: it switched nothing).
            adopted = _at(good_shared, dict(self._store.partitions_through))
            await self._repair_local(adopted, local)
            self._followed = adopted.version
            return await self._upgraded(adopted, good_shared)
        assert good_local is not None
        if board is not None and (good_shared is None or good_shared.version < good_local.version):
            await self._repair_shared(board, good_local, shared)
        # What the bucket now holds of this version: its own record, or the store's (repaired).
        if good_shared is not None and good_shared.version == good_local.version:
            return await self._upgraded(good_local, good_shared)
        return await self._upgraded(good_local, good_local)

    async def _upgraded(self, d: StoredDefinitions, shared: StoredDefinitions) -> StoredDefinitions:
        """``d`` (the record in force, as the store holds it) in this shoal's format: written
        again in the store, and ``shared`` (the bucket's record of that version) in the
        bucket, when of an older format. Logged (``upgraded in place``)."""
        if d.format >= DEFINITIONS_FORMAT and shared.format >= DEFINITIONS_FORMAT:
            return d
        found = min(d.format, shared.format)
        new = msgspec.structs.replace(d, format=DEFINITIONS_FORMAT)
        copies: list[str] = []
        if d.format < DEFINITIONS_FORMAT:
            await self._store.definitions.put(_row(new))
            copies.append(f"the store {self._store.path}")
        board = self._board
        if board is not None and shared.format < DEFINITIONS_FORMAT:
            try:
                # Unless another engine stored a later version meanwhile (followed then).
                if await board.head_version() == shared.version:
                    await board.save(msgspec.structs.replace(shared, format=DEFINITIONS_FORMAT))
                    copies.append(board.where)
            except BrokerError as e:
                # Still readable as it is; upgraded at a next start.
                self._logger.warning(
                    "definitions copy not upgraded", copy=board.where, error=str(e)
                )
        if copies:
            self._logger.info(
                "upgraded in place",
                what="the stored definitions",
                copies=copies,
                version=d.version,
                from_format=found,
                to_format=DEFINITIONS_FORMAT,
            )
        return new

    def _where(self) -> str:
        return "no shared copy" if self._board is None else self._board.where

    @staticmethod
    def _why(copy: StoredDefinitions | str | None, other: StoredDefinitions) -> str:
        if copy is None:
            return "it holds none (wiped, or never written)"
        if isinstance(copy, str):
            return f"it cannot be read ({copy})"
        if copy.version < other.version:
            return f"it holds version {copy.version}, behind"
        return (
            f"it holds another record of version {copy.version}; the bucket's copy wins a tie "
            "(engines sharing it keep one record per version)"
        )

    async def _repair_local(
        self, good: StoredDefinitions, was: StoredDefinitions | str | None
    ) -> None:
        await self._store.definitions.put(_row(good))
        self._logger.warning(
            "definitions copy repaired",
            repaired=f"the store {self._store.path}",
            from_copy=self._where(),
            version=good.version,
            why=self._why(was, good),
        )

    async def _repair_shared(
        self, board: DefinitionsBoard, good: StoredDefinitions, was: StoredDefinitions | str | None
    ) -> None:
        try:
            if isinstance(was, str):
                # Unreadable: replaced, unless it names a later version (another engine's,
                # being written: followed once running).
                head = await board.head_version()
                stored = head is None or head <= good.version
                if stored:
                    await board.save(good)
            else:
                # Missing or behind: unless another engine stored a version meanwhile.
                stored = await board.propose(good)
            if not stored:
                self._logger.warning(
                    "definitions copy not repaired",
                    copy=board.where,
                    version=good.version,
                    error="another engine stored a later version meanwhile: it is followed",
                )
                return
        except BrokerError as e:
            self._logger.warning(
                "definitions copy not repaired",
                copy=board.where,
                version=good.version,
                error=str(e),
            )
            return
        self._logger.warning(
            "definitions copy repaired",
            repaired=board.where,
            from_copy=f"the store {self._store.path}",
            version=good.version,
            why=self._why(was, good),
        )

    # Switching -------------------------------------------------------------------------

    async def applied(self, segments: SegmentSet, origin: Origin | None) -> None:
        """Store ``segments``, just switched to, as the next version (``origin`` None: over
        the API, under their own name): :meth:`propose` then :meth:`in_force`.

        Raises:
            DefinitionsConflict: another engine stored that version first.
            StoreError: the store cannot be written.
        """
        await self.in_force(await self.propose(segments, origin))

    async def propose(
        self,
        segments: SegmentSet,
        origin: Origin | None,
        owned: Collection[int] | None = None,
    ) -> StoredDefinitions:
        """The record of ``segments`` as the next version, stored in the bucket (a
        compare-and-set on its head: versions are one sequence among the engines sharing
        it), before the engine switches to them. Call it on the engine's main loop between
        two batches: the record's positions (``applied_through``, for the partitions
        ``owned``, every one the store knows when None) are the store's at that instant.

        A broker that does not answer does not stop the switch: it is logged, and the next
        start copies the record there from the store.

        Raises:
            DefinitionsConflict: the bucket holds that version or a later one (another
                engine's): these are not applied; every engine follows the bucket's.
        """
        before = self._current
        version = (before.version if before else 0) + 1
        board = self._board
        if board is not None:
            try:
                head = await board.head_version()
                if head is not None and head >= version:
                    raise await self._conflict(board, version)
            except BrokerError:
                pass  # tried again below, and logged there
        through = self._store.partitions_through
        positions = (
            dict(through) if owned is None else {p: through.get(p, 0) for p in sorted(owned)}
        )
        d = await self._record(segments, origin or ApiOrigin(source=segments.source), positions)
        if board is not None:
            try:
                won = await board.propose(d)
            except BrokerError as e:
                self._logger.warning(
                    "definitions not stored on the broker; the next start copies them there "
                    "from the store",
                    copy=board.where,
                    version=d.version,
                    error=str(e),
                )
            else:
                if not won:
                    raise await self._conflict(board, version)
        self._proposed = d.version
        return d

    async def _conflict(self, board: DefinitionsBoard, version: int) -> DefinitionsConflict:
        try:
            winner = await board.load()
        except (BrokerError, StoredDefinitionsError, FormatTooNewError):
            winner = None
        conflict = DefinitionsConflict(
            version,
            None if winner is None else winner.version,
            None if winner is None else _described(winner.origin)["source"],
        )
        self._logger.warning("definitions not applied", error=str(conflict))
        return conflict

    async def in_force(self, d: StoredDefinitions) -> None:
        """``d`` (from :meth:`propose`) is in force: stored in the engine's store.

        Raises:
            StoreError: the store cannot be written.
        """
        await self._store.definitions.put(_row(d))
        self._current = d

    async def newer(self) -> tuple[StoredDefinitions, SegmentSet] | None:
        """The definitions the bucket holds, when newer than those in force (or proposed by
        this engine), parsed: for the engine to switch to (then :meth:`adopted`). None when
        there are none, or they cannot be used: a record that does not read or parse is
        logged once (an error) and never applied; the broker not answering, a warning.
        """
        board = self._board
        if board is None:
            return None
        known = max(self._proposed, 0 if self._current is None else self._current.version)
        try:
            head = await board.head_version()
            if head is None or head <= known:
                return None
            d = await board.load()
        except BrokerError as e:
            self._logger.warning("cannot read the shared definitions", error=str(e))
            return None
        except StoredDefinitionsError as e:
            # Often a moment's: another engine replaced the record while it was read.
            self._refuse(None, e.problem, error=False)
            return None
        except FormatTooNewError as e:
            # A newer shoal's record: never switched to, and never written over.
            self._refuse(None, str(e), error=True)
            return None
        if d is None or d.version <= known:
            return None
        try:
            segments = await anyio.to_thread.run_sync(segments_of, d)
        except DefinitionError as e:
            self._refuse(d, str(e), error=True)
            return None
        return d, segments

    def _refuse(self, d: StoredDefinitions | None, problem: str, *, error: bool) -> None:
        key = (0 if d is None else d.version, problem)
        if key in self._refused:
            return
        self._refused.add(key)
        log = self._logger.error if error else self._logger.warning
        log(
            "shared definitions not followed",
            copy=self._where(),
            version=None if d is None else d.version,
            problem=problem,
            in_force=None if self._current is None else self._current.version,
        )

    async def adopted(self, d: StoredDefinitions, owned: Collection[int] | None = None) -> None:
        """``d``, another engine's version read from the bucket (:meth:`newer`), is in force
        here now: stored in the engine's store as that same version, with this engine's
        positions for the partitions ``owned`` (every one the store knows when None), taken
        on the engine's main loop between two batches.

        Raises:
            StoreError: the store cannot be written.
        """
        through = self._store.partitions_through
        positions = (
            dict(through) if owned is None else {p: through.get(p, 0) for p in sorted(owned)}
        )
        mine = _at(d, positions)
        await self._store.definitions.put(_row(mine))
        self._current = mine
        self._followed = mine.version

    def followed_already(self, segments: SegmentSet, origin: Origin | None) -> bool:
        """Whether ``segments``, read from this engine's served file (``origin``), are what
        another engine stored from its own copy of the file and this one follows already:
        with several engines, each one's file changed alike, the first to apply it stores
        the version and the others, following it, need not store another."""
        d = self._current
        return (
            d is not None
            and d.version == self._followed
            and isinstance(origin, FileOrigin)
            and isinstance(d.origin, FileOrigin)
            and d.origin.content_hash == origin.content_hash
            and d.fingerprint == segments.fingerprint
        )

    async def _record(
        self, segments: SegmentSet, origin: Origin, positions: dict[int, int]
    ) -> StoredDefinitions:
        before = self._current
        last_file = origin if isinstance(origin, FileOrigin) else None
        if last_file is None and before is not None:
            last_file = before.last_file
        make = functools.partial(
            _record,
            segments,
            version=(before.version if before else 0) + 1,
            applied_at=self._clock.now(),
            origin=origin,
            last_file=last_file,
            # Applied between two batches: every event committed so far was applied under
            # the definitions before, every later one is applied under these. The first
            # ones of a store replace none.
            applied_through=None if before is None else positions,
        )
        return await anyio.to_thread.run_sync(make)

    async def _store_new(
        self, segments: SegmentSet, origin: Origin, before: StoredDefinitions | None
    ) -> StoredDefinitions:
        """At a start: the served file stored as the version after ``before``."""
        self._current = before
        d = await self._record(segments, origin, dict(self._store.partitions_through))
        await self._store.definitions.put(_row(d))
        if self._board is not None:
            try:
                if not await self._board.propose(d):
                    # Another engine stored this version first: the next look at the
                    # bucket follows it.
                    self._logger.warning(
                        "definitions not stored on the broker: another engine stored "
                        f"version {d.version} first; it is followed",
                        copy=self._board.where,
                        version=d.version,
                    )
            except BrokerError as e:
                self._logger.warning(
                    "definitions not stored on the broker; the next start copies them there "
                    "from the store",
                    copy=self._board.where,
                    version=d.version,
                    error=str(e),
                )
        return d


def _at(d: StoredDefinitions, positions: dict[int, int]) -> StoredDefinitions:
    """``d`` with this engine's positions, when it replaced earlier definitions."""
    if d.applied_through is None:
        return d
    return msgspec.structs.replace(d, applied_through=positions)


def _same(a: StoredDefinitions, b: StoredDefinitions) -> bool:
    """Whether two records are the same version's, but for the positions each engine keeps
    of its own partitions."""
    # Nor their formats: the same record, one copy upgraded before the other.
    return msgspec.structs.replace(a, applied_through=None, format=0) == msgspec.structs.replace(
        b, applied_through=None, format=0
    )


def _row(d: StoredDefinitions) -> StoredRow:
    return StoredRow(
        version=d.version, applied_at=to_instant(d.applied_at), body=encode_definitions(d)
    )
