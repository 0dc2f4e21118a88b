"""The shared copy of the definitions in force: the JetStream KV bucket ``SHOAL_DEFINITIONS``.

A stored record (:class:`protocol.StoredDefinitions`, its lists' ids included) can be far
larger than one NATS message (the server's ``max_payload``, 1 MiB by default), so it is
chunked within the bucket:

- ``chunk.<digest>.<n>``: the record's bytes, in pieces that fit a message, under a key
  named for the SHA-256 of the whole record (its first 32 hex digits);
- ``current``: a small head naming them (version, digest, size, number of chunks).

The chunks are written first and the head last, so a reader sees the old record or the new
one, never a mix; the old chunks are purged once the head names the new ones. A head whose
chunks are missing, or whose bytes do not match its digest, reads as corrupt.

Several engines share the bucket: a new version is written by :meth:`DefinitionsKV.propose`,
whose head is a compare-and-set on the revision of the head it read, so the versions form
one sequence (two engines proposing the same next version: one wins, the other is told).

Only the engine's role may use the bucket (``shoal auth permissions``): operators change the
definitions through the query API, which the engine applies and stores.
"""

from __future__ import annotations

import hashlib

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from protocol._definitions import (
    DEFINITIONS_BUCKET,
    DEFINITIONS_STREAM,
    MAX_STORED_DEFINITIONS_BYTES,
    StoredDefinitions,
    StoredDefinitionsError,
    decode_definitions,
    encode_definitions,
)
from protocol._errors import BrokerError
from protocol.nats._formats import stamp
from protocol.nats._refusals import permission_guard

HEAD_KEY = "current"
"""The key of the head that names the chunks of the record in force."""
_CHUNK_MARGIN = 16 << 10
"""Bytes of a message kept for its subject and headers: a chunk is ``max_payload`` less this."""
_MIN_CHUNK = 4 << 10


class _Head(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    sha256: str
    size: int
    chunks: int


_head_decoder = msgspec.json.Decoder(_Head)
_encoder = msgspec.json.Encoder()


def _chunk_key(digest: str, n: int) -> str:
    return f"chunk.{digest[:32]}.{n}"


class DefinitionsKV:
    """The definitions in force in the KV bucket ``SHOAL_DEFINITIONS`` (a
    :class:`protocol.DefinitionsBoard`). Make one with :meth:`open`."""

    def __init__(self, nc: Client, kv: KeyValue, *, chunk_size: int | None = None) -> None:
        self._nc = nc
        self._kv = kv
        self._chunk = chunk_size or max(_MIN_CHUNK, nc.max_payload - _CHUNK_MARGIN)

    @property
    def where(self) -> str:
        """``KV bucket SHOAL_DEFINITIONS``."""
        return f"KV bucket {DEFINITIONS_BUCKET}"

    @classmethod
    async def open(cls, nc: Client, *, chunk_size: int | None = None) -> DefinitionsKV:
        """The bucket on ``nc``, created when missing (one value per key, no history), with
        this shoal's format in its stream's metadata (added to one made without).

        Args:
            chunk_size: the largest chunk written (default: the server's ``max_payload``
                less room for the subject and headers).

        Raises:
            FormatTooNewError: a newer shoal made the bucket.
            BrokerError: it cannot be found or created (:class:`~protocol.PermissionDenied`
                when the credentials may not).
        """
        js = nc.jetstream()
        async with permission_guard(nc):
            try:
                try:
                    kv = await js.key_value(DEFINITIONS_BUCKET)
                except nats.js.errors.BucketNotFoundError:
                    kv = await js.create_key_value(
                        bucket=DEFINITIONS_BUCKET,
                        description="shoal: the segment definitions in force (see the README)",
                        history=1,
                        direct=False,
                    )
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot open KV bucket {DEFINITIONS_BUCKET}: {e}") from e
            await stamp(js, DEFINITIONS_STREAM, f"KV bucket {DEFINITIONS_BUCKET}")
        return cls(nc, kv, chunk_size=chunk_size)

    async def _get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return bytes(entry.value or b"")

    async def _head(self) -> tuple[_Head | None, int]:
        """The head and its revision (0: no head); a head that does not decode is None with
        its revision (a write replaces it)."""
        try:
            entry = await self._kv.get(HEAD_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        try:
            return _head_decoder.decode(bytes(entry.value or b"")), entry.revision or 0
        except msgspec.DecodeError:
            return None, entry.revision or 0

    async def head_version(self) -> int | None:
        """The version the head names (None: no head, or one that does not decode): one
        small read, to tell whether :meth:`load` would find newer definitions.

        Raises:
            BrokerError: the broker does not answer.
        """
        async with permission_guard(self._nc):
            try:
                head, _ = await self._head()
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot read {self.where}: {e}") from e
        return None if head is None else head.version

    async def load(self) -> StoredDefinitions | None:
        """The definitions stored in the bucket, or None when none are.

        Raises:
            StoredDefinitionsError: the head or its chunks are corrupt or missing.
            BrokerError: the broker does not answer.
        """
        where = self.where
        async with permission_guard(self._nc):
            try:
                raw = await self._get(HEAD_KEY)
                if raw is None:
                    return None
                try:
                    head = _head_decoder.decode(raw)
                except msgspec.DecodeError as e:
                    raise StoredDefinitionsError(where, f"its head: {e}") from e
                if not 0 < head.size <= MAX_STORED_DEFINITIONS_BYTES or not (
                    0 < head.chunks <= head.size
                ):
                    raise StoredDefinitionsError(
                        where, f"its head says {head.size} bytes in {head.chunks} chunks"
                    )
                parts: list[bytes] = []
                got = 0
                for n in range(head.chunks):
                    part = await self._get(_chunk_key(head.sha256, n))
                    if part is None:
                        raise StoredDefinitionsError(
                            where,
                            f"chunk {n + 1} of {head.chunks} of version {head.version} is missing",
                        )
                    got += len(part)
                    if got > head.size:
                        break
                    parts.append(part)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot read {where}: {e}") from e
        data = b"".join(parts)
        if len(data) != head.size or hashlib.sha256(data).hexdigest() != head.sha256:
            raise StoredDefinitionsError(
                where, f"the chunks of version {head.version} do not match their digest"
            )
        d = decode_definitions(data, where)
        if d.version != head.version:
            raise StoredDefinitionsError(
                where, f"the head says version {head.version}, the record {d.version}"
            )
        return d

    async def save(self, d: StoredDefinitions) -> None:
        """Store ``d`` in place of the record in force, whatever it is: chunks first, the
        head last, then the old chunks purged. (A new version goes through :meth:`propose`.)

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        await self._write(d, compare=False)

    async def propose(self, d: StoredDefinitions) -> bool:
        """Store ``d`` as the next version: only if the head names an older version (or
        none), and is still the head read when ``d``'s is written (a compare-and-set on its
        revision). False when another record won: the head names ``d.version`` or later,
        or changed meanwhile; nothing of ``d`` is left then (read the winner with
        :meth:`load`).

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        return await self._write(d, compare=True)

    async def _write(self, d: StoredDefinitions, *, compare: bool) -> bool:
        data = encode_definitions(d)
        digest = hashlib.sha256(data).hexdigest()
        size = self._chunk
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        head = _Head(version=d.version, sha256=digest, size=len(data), chunks=len(pieces))
        async with permission_guard(self._nc):
            try:
                old, revision = await self._head()
                if compare and old is not None and old.version >= d.version:
                    return False
                for n, piece in enumerate(pieces):
                    await self._kv.put(_chunk_key(digest, n), piece)
                if not compare:
                    await self._kv.put(HEAD_KEY, _encoder.encode(head))
                else:
                    try:
                        if revision:
                            await self._kv.update(HEAD_KEY, _encoder.encode(head), last=revision)
                        else:
                            await self._kv.create(HEAD_KEY, _encoder.encode(head))
                    except nats.js.errors.KeyWrongLastSequenceError:
                        # Another engine's head came first: its record is in force, and
                        # this one's chunks would only be litter.
                        now, _ = await self._head()
                        if now is None or now.sha256[:32] != digest[:32]:
                            await self._purge(digest, len(pieces))
                        return False
                if old is not None and old.sha256[:32] != digest[:32]:
                    await self._purge(old.sha256, old.chunks)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot write {self.where}: {e}") from e
        return True

    async def _purge(self, digest: str, chunks: int) -> None:
        for n in range(min(chunks, MAX_STORED_DEFINITIONS_BYTES // self._chunk + 1)):
            await self._kv.purge(_chunk_key(digest, n))
