"""The partitions' snapshots: the JetStream Object Store bucket ``SHOAL_SNAPSHOTS``, one
object ``partition-<p>`` per partition (a :class:`~protocol._ownership.PartitionSnapshot`).

The bucket is laid out as every Object Store is (ADR-20), so the ``nats object`` tools and
nats-py's ``ObjectStore`` read it: stream ``OBJ_SHOAL_SNAPSHOTS``, an object's bytes in
chunks on ``$O.SHOAL_SNAPSHOTS.C.<nuid>``, its info (JSON: size, chunks, SHA-256 digest,
headers) on ``$O.SHOAL_SNAPSHOTS.M.<name in base64url>``, the last message there being the
one in force. The snapshot's facts (partition, through, progress, claim, ...) are in the
info's headers, so :meth:`SnapshotStore.list` shows them without downloading anything.

Objects are written and read here rather than by nats-py 2.16's ``ObjectStore``: its
``get`` read a 41 MB snapshot in 1.3 s (1 MiB chunks) to 4.2 s (128 KiB), where this reads
it in 0.16 s (its ordered consumer answers flow control from a 0.25 s poll, and it joins
the bytes chunk by chunk); it waits forever when an object's chunks are missing, and reads
any size; its ``put`` purges only the chunks of the object it saw before uploading, so a
replacement made meanwhile leaves chunks behind. Here the info is written expecting the one
read before (``Nats-Expected-Last-Subject-Sequence``, retried), so whoever replaces an
object purges exactly the chunks of the one it replaced.

The body is msgpack, stored as it is by default: on one node, zlib (level 1) made a 41 MB
snapshot of 100k customers 2.8 times smaller, but its put took 2.6 times as long (405 ms
against 153) and its get 1.25 times (200 ms against 160) (``scripts/bench/snapshots.py``).
``compress=True`` stores it compressed, for when disk or replication traffic matter more;
the info says which (header ``Shoal-Encoding``), and a reader takes either.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import uuid
import zlib
from collections.abc import Mapping

import anyio.to_thread
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from protocol._errors import BrokerError
from protocol._formats import check_format
from protocol._ownership import FIRST_SNAPSHOT_FORMAT, SNAPSHOT_FORMAT, PartitionSnapshot
from protocol._subjects import SNAPSHOTS_BUCKET
from protocol._time import format_instant
from protocol.nats._erase import erase_messages
from protocol.nats._formats import stamp
from protocol.nats._refusals import permission_guard
from protocol.nats._stream import read_stream

OBJECT_STREAM = f"OBJ_{SNAPSHOTS_BUCKET}"
"""The stream behind the bucket."""
_WHAT = f"Object Store bucket {SNAPSHOTS_BUCKET}"
_CHUNKS = f"$O.{SNAPSHOTS_BUCKET}.C."
_INFOS = f"$O.{SNAPSHOTS_BUCKET}.M."
DEFAULT_MAX_BYTES = 2 << 30
"""The largest object :meth:`SnapshotStore.get` downloads (and body it decompresses)."""
DEFAULT_CHUNK_SIZE = 1 << 20
"""Bytes per chunk (at most the server's ``max_payload``): 1 MiB put a 41 MB snapshot in
153 ms against 212 for the Object Store's default of 128 KiB, in an eighth of the
messages; gets took the same."""
PLAIN = "msgpack"
"""``Shoal-Encoding`` of a body stored as msgpack."""
ZLIB = "msgpack+zlib"
"""``Shoal-Encoding`` of a body stored as zlib-compressed msgpack."""
_ENCODINGS = (PLAIN, ZLIB)
_NOT_FOUND_STREAM = 10059
_WRONG_LAST_SEQUENCE = 10071
_REPLACE_ATTEMPTS = 5
"""How often an info is written again when another writer replaced the object meanwhile."""
_READ_ATTEMPTS = 3
"""How often a download starts over when the object was replaced while it was read."""
_FETCH_BYTES = 16 << 20
"""Chunks asked for at once while downloading: about this many bytes."""
_NAME = re.compile(r"partition-(0|[1-9][0-9]{0,8})")
_NUID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What an object's chunks may be named after (a subject token, no wildcard)."""

_H_FORMAT = "Shoal-Format"
_H_ENCODING = "Shoal-Encoding"
_H_PARTITION = "Shoal-Partition"
_H_PARTITIONS = "Shoal-Partitions"
_H_THROUGH = "Shoal-Through"
_H_PROGRESS = "Shoal-Progress"
_H_ENGINE = "Shoal-Engine"
_H_CLAIM = "Shoal-Claim"
_H_TAKEN_AT = "Shoal-Taken-At"
_H_CUSTOMERS = "Shoal-Customers"
_H_CHUNK_SEQS = "Shoal-Chunk-Sequences"


class SnapshotUnusable(BrokerError):
    """The snapshot of ``partition`` stored in ``SHOAL_SNAPSHOTS`` cannot be used:
    another format or number of partitions, corrupt, or too large (``reason`` says which).
    Rebuild the partition from the events stream instead."""

    def __init__(self, partition: int, reason: str) -> None:
        super().__init__(
            f"the snapshot of partition {partition} in Object Store bucket {SNAPSHOTS_BUCKET} "
            f"cannot be used: {reason}; rebuild the partition from the events stream"
        )
        self.partition = partition
        self.reason = reason


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A stored snapshot as its object info describes it (nothing downloaded)."""

    partition: int
    partitions: int
    """How many partitions it was taken with (0: its info does not say)."""
    format: int
    """Its :data:`~protocol._ownership.SNAPSHOT_FORMAT` (0: its info does not say)."""
    encoding: str
    """How the body is stored: ``msgpack`` or ``msgpack+zlib``."""
    through: int
    progress: int
    engine: str
    claim: int
    taken_at: int
    """When it was taken (the owner's clock, microseconds since the epoch)."""
    customers: int
    size: int
    """Bytes stored (compressed, if it is)."""
    chunks: int
    problem: str | None = None
    """Why :meth:`SnapshotStore.get` would refuse it, as far as its info tells; None when
    nothing does (its bytes may still be corrupt)."""


class _Link(msgspec.Struct, kw_only=True, omit_defaults=True):
    bucket: str = ""
    name: str | None = None


class _Options(msgspec.Struct, kw_only=True, omit_defaults=True):
    link: _Link | None = None
    max_chunk_size: int | None = None


class _ObjectInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An Object Store object's info, as ADR-20 (and nats-py's ``api.ObjectInfo``) write it.
    Header values are lists, as Go's ``nats.Header`` has them; a single string is taken too."""

    name: str
    description: str | None = None
    headers: dict[str, list[str] | str] | None = None
    options: _Options | None = None
    bucket: str = ""
    nuid: str = ""
    size: int = 0
    mtime: str = ""
    chunks: int = 0
    digest: str = ""
    deleted: bool = False


_info_decoder = msgspec.json.Decoder(_ObjectInfo)
_info_encoder = msgspec.json.Encoder()
_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(PartitionSnapshot)


def object_name(partition: int) -> str:
    """The name of ``partition``'s object: ``partition-<p>``."""
    if partition < 0:
        raise ValueError(f"a partition is a number from 0, not {partition}")
    return f"partition-{partition}"


def _info_subject(name: str) -> str:
    return _INFOS + base64.urlsafe_b64encode(name.encode()).decode()


def _digest(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def _digest_matches(stated: str, sha256: bytes) -> bool:
    kind, _, value = stated.partition("=")
    try:
        return kind.upper() == "SHA-256" and base64.urlsafe_b64decode(value) == sha256
    except ValueError:  # binascii.Error
        return False


def _ranges(seqs: list[int]) -> str:
    """``1-4,9-9``: sorted sequences as ranges (one object's chunks are mostly adjacent)."""
    out: list[str] = []
    for seq in sorted(seqs):
        if out and int(out[-1].split("-")[1]) == seq - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{seq}"
        else:
            out.append(f"{seq}-{seq}")
    return ",".join(out)


def _unranges(text: str) -> list[int] | None:
    """The sequences of :func:`_ranges`; None when ``text`` is not such (then read)."""
    seqs: list[int] = []
    try:
        for part in text.split(","):
            first, last = (int(x) for x in part.split("-"))
            if last < first or last - first > 1_000_000:
                return None
            seqs.extend(range(first, last + 1))
    except ValueError:
        return None
    return seqs


def _header(info: _ObjectInfo, key: str) -> str | None:
    value = (info.headers or {}).get(key)
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _number(info: _ObjectInfo, key: str) -> int:
    value = _header(info, key)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def _encode(snapshot: PartitionSnapshot, compress: bool) -> tuple[bytes, str]:
    data = _snapshot_encoder.encode(snapshot)
    if compress:
        data = zlib.compress(data, 1)
    return data, _digest(data)


def _decode(partition: int, body: bytearray, encoding: str, limit: int) -> PartitionSnapshot:
    raw: bytes | bytearray = body
    if encoding == ZLIB:
        inflate = zlib.decompressobj()
        try:
            raw = inflate.decompress(body, limit + 1)
        except zlib.error as e:
            raise SnapshotUnusable(partition, f"its body does not decompress: {e}") from e
        if len(raw) > limit or inflate.unconsumed_tail:
            raise SnapshotUnusable(
                partition, f"its body decompresses to more than the limit of {limit} bytes"
            )
        if not inflate.eof:
            raise SnapshotUnusable(partition, "its compressed body is cut short")
    try:
        return _snapshot_decoder.decode(raw)
    except msgspec.DecodeError as e:  # ValidationError included
        raise SnapshotUnusable(partition, f"its body is not a snapshot: {e}") from e


class SnapshotStore:
    """The partitions' snapshots in the Object Store bucket ``SHOAL_SNAPSHOTS``.

    Args:
        nc: a client from :func:`~protocol.nats.connect` (its refusals become
            :class:`~protocol.PermissionDenied`).
        partitions: how many partitions the events stream has: a snapshot taken with
            another number is refused.
        js: the JetStream context to use (default: ``nc.jetstream()``).
        max_bytes: the largest object downloaded, and body decompressed; a larger one is
            refused (default 2 GiB): what the network sends is bounded.
        chunk_size: bytes per chunk written (at most the server's ``max_payload``).
        compress: store bodies zlib-compressed (smaller, slower to write; see the module).
        timeout: seconds to wait for the broker's next chunk while downloading.
    """

    def __init__(
        self,
        nc: Client,
        *,
        partitions: int,
        js: JetStreamContext | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compress: bool = False,
        timeout: float = 5.0,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        if max_bytes < 1 or chunk_size < 1:
            raise ValueError("max_bytes and chunk_size must be positive")
        self._nc = nc
        self._js = js if js is not None else nc.jetstream()
        self._partitions = partitions
        self._max_bytes = max_bytes
        self._chunk_size = chunk_size
        self._compress = compress
        self._timeout = timeout

    async def ensure(self, replicas: int | None = None) -> None:
        """Create the bucket (file storage, ``replicas`` copies, None: 1) unless it exists;
        an existing bucket is used as it is, but for this shoal's format recorded in its
        stream's metadata (added to one made without).

        Raises:
            FormatTooNewError: a newer shoal made the bucket.
            BrokerError: it cannot be found or created (:class:`~protocol.PermissionDenied`
                when the credentials may not).
        """
        async with permission_guard(self._nc):
            try:
                try:
                    await self._js.stream_info(OBJECT_STREAM)
                except nats.js.errors.NotFoundError:
                    pass
                else:
                    await stamp(self._js, OBJECT_STREAM, _WHAT)
                    return
                await self._js.create_object_store(
                    SNAPSHOTS_BUCKET,
                    description="shoal: each partition's latest snapshot (see the README)",
                    storage=StorageType.FILE,
                    replicas=replicas or 1,
                )
                await stamp(self._js, OBJECT_STREAM, _WHAT)
            except nats.js.errors.BadRequestError as e:
                # Made meanwhile by another engine, with other settings: use it.
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.stream_info(OBJECT_STREAM)
                    await stamp(self._js, OBJECT_STREAM, _WHAT)
                    return
                raise BrokerError(
                    f"cannot create Object Store bucket {SNAPSHOTS_BUCKET}: {e}"
                ) from e
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(
                    f"cannot create Object Store bucket {SNAPSHOTS_BUCKET}: {e}"
                ) from e

    async def put(self, snapshot: PartitionSnapshot) -> SnapshotInfo:
        """Store ``snapshot`` as its partition's object, in place of the one stored: the
        chunks first, then the info naming them, then the replaced object's chunks purged.
        A reader sees the old snapshot or the new one, never a mix.

        Raises:
            ValueError: it was taken with another number of partitions than this store's.
            SnapshotUnusable: it is larger than the store's ``max_bytes`` encoded.
            BrokerError: the bucket does not exist (:meth:`ensure`), or the broker does not
                answer or refuses.
        """
        p = snapshot.partition
        name = object_name(p)
        if not 0 <= p < snapshot.partitions:
            raise ValueError(f"partition {p} is not one of {snapshot.partitions} partitions")
        if snapshot.partitions != self._partitions:
            raise ValueError(
                f"the snapshot of partition {p} was taken with {snapshot.partitions} "
                f"partitions, this store keeps those of {self._partitions}"
            )
        data, digest = await anyio.to_thread.run_sync(_encode, snapshot, self._compress)
        if len(data) > self._max_bytes:
            raise SnapshotUnusable(
                p, f"it is {len(data)} bytes encoded, over the limit of {self._max_bytes}"
            )
        encoding = ZLIB if self._compress else PLAIN
        chunk = max(1, min(self._chunk_size, self._nc.max_payload))
        nuid = uuid.uuid4().hex
        chunks = _CHUNKS + nuid
        info = _ObjectInfo(
            name=name,
            description=(
                f"shoal: partition {p} of {snapshot.partitions}, "
                f"{len(snapshot.customers)} customers through {snapshot.through}"
            ),
            headers={k: [v] for k, v in _headers(snapshot, encoding).items()},
            options=_Options(max_chunk_size=chunk),
            bucket=SNAPSHOTS_BUCKET,
            nuid=nuid,
            size=len(data),
            mtime=format_instant(snapshot.taken_at),
            chunks=(len(data) + chunk - 1) // chunk,
            digest=digest,
        )
        where = f"the snapshot of partition {p} to Object Store bucket {SNAPSHOTS_BUCKET}"
        async with permission_guard(self._nc):
            try:
                seq, old = await self._current(name)
                if seq is None:
                    raise BrokerError(
                        f"cannot write {where}: the bucket does not exist (ensure it first)"
                    )
                seqs: list[int] = []
                try:
                    for i in range(0, len(data), chunk):
                        ack = await self._js.publish(chunks, data[i : i + chunk])
                        seqs.append(ack.seq)
                    # Where its chunks are, so that whoever replaces it erases them by
                    # sequence without reading them (see _erase_chunks).
                    info.headers = {**(info.headers or {}), _H_CHUNK_SEQS: [_ranges(seqs)]}
                    old = await self._replace(name, info, seq, old)
                except BaseException:
                    # Unless the info was stored after all (its ack lost): then the chunks
                    # are the object's. Left behind when that cannot be told.
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        _, now = await self._current(name)
                        if now is None or now.nuid != nuid:
                            for chunk_seq in seqs:
                                await self._js.delete_msg(OBJECT_STREAM, chunk_seq)
                    raise
                if old is not None and old.nuid and old.nuid != nuid:
                    await self._erase_chunks(old)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot write {where}: {e}") from e
        return self._describe(p, info)

    async def _erase_chunks(self, old: _ObjectInfo) -> None:
        """Erase the chunks of a replaced object one by one: a purge would leave their
        bytes (customers' data, some maybe forgotten since) in the stream's files until
        compaction, where a delete overwrites them. By the sequences its info lists, taken
        from the broker's acknowledgements when the chunks were written, and deleted
        without reading them back (that would download the whole object on every
        replacement; only engines may write the bucket); an object written before its info
        listed them has its chunks found by reading their subject."""
        listed = _header(old, _H_CHUNK_SEQS)
        seqs = _unranges(listed) if listed else None
        if seqs is None:
            seqs = [
                d.stream_sequence
                async for part in read_stream(self._nc, OBJECT_STREAM, _CHUNKS + old.nuid)
                for d in part
            ]
        await erase_messages(self._js, OBJECT_STREAM, seqs)

    async def _replace(
        self, name: str, info: _ObjectInfo, seq: int, old: _ObjectInfo | None
    ) -> _ObjectInfo | None:
        """Write ``info`` as ``name``'s, expecting the info at ``seq`` (``old``) to be in
        force, again on the newer one while another writer replaces it meanwhile; the info
        it replaced."""
        subject = _info_subject(name)
        body = _info_encoder.encode(info)
        for attempt in range(_REPLACE_ATTEMPTS):
            try:
                await self._js.publish(
                    subject,
                    body,
                    headers={
                        "Nats-Rollup": "sub",
                        "Nats-Expected-Last-Subject-Sequence": str(seq),
                    },
                )
                return old
            except nats.js.errors.APIError as e:
                if e.err_code != _WRONG_LAST_SEQUENCE or attempt == _REPLACE_ATTEMPTS - 1:
                    raise
            current, old = await self._current(name)
            seq = current or 0
        raise AssertionError("unreachable")  # pragma: no cover

    async def _current(self, name: str) -> tuple[int | None, _ObjectInfo | None]:
        """The stream sequence of ``name``'s info in force (0: it has none; None: the bucket
        does not exist) and that info (None: none, or not JSON)."""
        try:
            msg = await self._js.get_last_msg(OBJECT_STREAM, _info_subject(name))
        except nats.js.errors.NotFoundError as e:
            return (None if e.err_code == _NOT_FOUND_STREAM else 0), None
        try:
            info = _info_decoder.decode(msg.data or b"")
        except msgspec.DecodeError:
            info = None
        return int(msg.seq or 0), info

    async def get(self, partition: int) -> PartitionSnapshot | None:
        """The snapshot stored for ``partition``, or None when none is.

        Raises:
            FormatTooNewError: a newer shoal took it (its format is later than this
                shoal's): refused, not rebuilt over.
            SnapshotUnusable: it is of an older format or another number of partitions,
                larger than ``max_bytes``, or corrupt (its info, a missing chunk, its digest,
                its body).
            BrokerError: the broker does not answer or refuses.
        """
        async with permission_guard(self._nc):
            try:
                found = await self._fetch(partition)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(
                    f"cannot read the snapshot of partition {partition} from Object Store "
                    f"bucket {SNAPSHOTS_BUCKET}: {e}"
                ) from e
        if found is None:
            return None
        info, body = found
        encoding = _header(info, _H_ENCODING) or PLAIN
        snapshot = await anyio.to_thread.run_sync(
            _decode, partition, body, encoding, self._max_bytes
        )
        _check_format(partition, snapshot.format)
        problem = self._problem(snapshot.format, snapshot.partitions, encoding)
        if problem is None and snapshot.partition != partition:
            problem = f"it holds partition {snapshot.partition}"
        if problem is not None:
            raise SnapshotUnusable(partition, problem)
        return snapshot

    async def _fetch(self, partition: int) -> tuple[_ObjectInfo, bytearray] | None:
        """The info and bytes of ``partition``'s object (None: there is none), read again
        when it is replaced while read."""
        name = object_name(partition)
        for _ in range(_READ_ATTEMPTS):
            info = await self._usable(partition, name)
            if info is None:
                return None
            body = await self._download(partition, info)
            if body is not None:
                return info, body
        raise SnapshotUnusable(partition, f"it was replaced while read, {_READ_ATTEMPTS} times")

    async def _usable(self, partition: int, name: str) -> _ObjectInfo | None:
        """``name``'s info in force (None: there is none), checked as far as it tells."""
        try:
            msg = await self._js.get_last_msg(OBJECT_STREAM, _info_subject(name))
        except nats.js.errors.NotFoundError:
            return None  # no bucket, or no such object
        try:
            info = _info_decoder.decode(msg.data or b"")
        except msgspec.DecodeError as e:
            raise SnapshotUnusable(partition, f"its object info is not readable: {e}") from e
        if info.deleted:
            return None
        _check_format(partition, _number(info, _H_FORMAT))
        d = self._describe(partition, info)
        if d.problem is not None:
            raise SnapshotUnusable(partition, d.problem)
        return info

    async def _download(self, partition: int, info: _ObjectInfo) -> bytearray | None:
        """The bytes of the object ``info`` describes, checked against its size and digest;
        None when the object was replaced meanwhile (its chunks purged)."""
        consumer = f"shoal-snapshot-{uuid.uuid4().hex[:16]}"
        created = await self._js.add_consumer(
            OBJECT_STREAM,
            ConsumerConfig(
                name=consumer,
                filter_subject=_CHUNKS + info.nuid,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=max(30.0, 4 * self._timeout),
            ),
        )
        try:
            if (created.num_pending or 0) < info.chunks:
                await self._missing(partition, info, created.num_pending or 0)
                return None
            sub = await self._js.pull_subscribe_bind(consumer=consumer, stream=OBJECT_STREAM)
            body = bytearray()
            h = hashlib.sha256()
            got = 0
            batch = max(1, _FETCH_BYTES // max(1, info.size // max(1, info.chunks)))
            try:
                while got < info.chunks:
                    try:
                        msgs = await sub.fetch(min(batch, info.chunks - got), self._timeout)
                    except nats.errors.TimeoutError:
                        await self._missing(partition, info, got)
                        return None
                    for m in msgs:
                        body += m.data
                        h.update(m.data)
                        if len(body) > info.size:
                            raise SnapshotUnusable(
                                partition, f"its chunks hold more than its {info.size} bytes"
                            )
                    got += len(msgs)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._js.delete_consumer(OBJECT_STREAM, consumer)
        if len(body) != info.size:
            raise SnapshotUnusable(
                partition, f"its chunks hold {len(body)} bytes, its info says {info.size}"
            )
        if not _digest_matches(info.digest, h.digest()):
            raise SnapshotUnusable(partition, "its bytes do not match its SHA-256 digest")
        return body

    async def _missing(self, partition: int, info: _ObjectInfo, found: int) -> None:
        """Return when the object was replaced (its chunks purged by the writer); else
        raise :class:`SnapshotUnusable`: they are missing."""
        _, now = await self._current(object_name(partition))
        if now is None or now.nuid != info.nuid:
            return None
        raise SnapshotUnusable(
            partition, f"{info.chunks - found} of its {info.chunks} chunks are missing"
        )

    async def list(self) -> dict[int, SnapshotInfo]:
        """The snapshots stored, by partition, as their infos describe them (nothing is
        downloaded); an object not named ``partition-<p>`` is left out.

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        out: dict[int, SnapshotInfo] = {}
        async with permission_guard(self._nc):
            try:
                try:
                    state = (
                        await self._js.stream_info(OBJECT_STREAM, subjects_filter=_INFOS + ">")
                    ).state
                except nats.js.errors.NotFoundError:
                    return out
                for subject in sorted(state.subjects or {}):
                    try:
                        name = base64.urlsafe_b64decode(subject[len(_INFOS) :]).decode()
                    except ValueError:
                        continue  # not an object's info (UnicodeDecodeError included)
                    m = _NAME.fullmatch(name)
                    if m is None:
                        continue
                    p = int(m.group(1))
                    try:
                        msg = await self._js.get_last_msg(OBJECT_STREAM, subject)
                    except nats.js.errors.NotFoundError:
                        continue  # deleted meanwhile
                    try:
                        info = _info_decoder.decode(msg.data or b"")
                    except msgspec.DecodeError as e:
                        info = _ObjectInfo(name=name)
                        out[p] = self._describe(p, info, f"its object info is not readable: {e}")
                        continue
                    if not info.deleted:
                        out[p] = self._describe(p, info)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(
                    f"cannot list the snapshots in Object Store bucket {SNAPSHOTS_BUCKET}: {e}"
                ) from e
        return out

    async def delete(self, partition: int) -> bool:
        """Delete ``partition``'s snapshot (its info marked deleted, its chunks purged);
        False when none was stored.

        Raises:
            BrokerError: the broker does not answer or refuses.
        """
        name = object_name(partition)
        async with permission_guard(self._nc):
            try:
                seq, old = await self._current(name)
                if not seq or (old is not None and old.deleted):
                    return False
                gone = _ObjectInfo(name=name, bucket=SNAPSHOTS_BUCKET, deleted=True)
                old = await self._replace(name, gone, seq, old)
                if old is not None and old.nuid:
                    await self._js.purge_stream(OBJECT_STREAM, subject=_CHUNKS + old.nuid)
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(
                    f"cannot delete the snapshot of partition {partition} from Object Store "
                    f"bucket {SNAPSHOTS_BUCKET}: {e}"
                ) from e
        return True

    def _problem(self, fmt: int, partitions: int, encoding: str) -> str | None:
        if not FIRST_SNAPSHOT_FORMAT <= fmt <= SNAPSHOT_FORMAT:
            said = f"format {fmt}" if fmt else "no format"
            return (
                f"it is of {said}, this engine reads formats {FIRST_SNAPSHOT_FORMAT} to "
                f"{SNAPSHOT_FORMAT}"
            )
        if partitions != self._partitions:
            return (
                f"it was taken with {partitions} partitions, the events stream has "
                f"{self._partitions}"
            )
        if encoding not in _ENCODINGS:
            return f"its body is encoded as {encoding!r}, not one of {', '.join(_ENCODINGS)}"
        return None

    def _describe(
        self, partition: int, info: _ObjectInfo, problem: str | None = None
    ) -> SnapshotInfo:
        encoding = _header(info, _H_ENCODING) or PLAIN
        fmt = _number(info, _H_FORMAT)
        partitions = _number(info, _H_PARTITIONS)
        if problem is None:
            problem = self._problem(fmt, partitions, encoding)
        if problem is None and _number(info, _H_PARTITION) != partition:
            problem = f"its info names partition {_header(info, _H_PARTITION)}"
        if problem is None and info.size > self._max_bytes:
            problem = f"it is {info.size} bytes, over the limit of {self._max_bytes}"
        if problem is None and (
            _NUID.fullmatch(info.nuid) is None
            or info.chunks > info.size
            or (info.size and not info.chunks)
        ):
            problem = f"its info says {info.size} bytes in {info.chunks} chunks named {info.nuid!r}"
        return SnapshotInfo(
            partition=partition,
            partitions=partitions,
            format=fmt,
            encoding=encoding,
            through=_number(info, _H_THROUGH),
            progress=_number(info, _H_PROGRESS),
            engine=_header(info, _H_ENGINE) or "",
            claim=_number(info, _H_CLAIM),
            taken_at=_number(info, _H_TAKEN_AT),
            customers=_number(info, _H_CUSTOMERS),
            size=info.size,
            chunks=info.chunks,
            problem=problem,
        )


def _check_format(partition: int, fmt: int) -> None:
    """Refuse the snapshot of ``partition`` when a newer shoal took it: its customers may be
    in a form this one would misread, and a retention may have removed the events that
    would rebuild them."""
    check_format(
        f"the snapshot of partition {partition} in Object Store bucket {SNAPSHOTS_BUCKET}",
        fmt,
        SNAPSHOT_FORMAT,
    )


def _headers(snapshot: PartitionSnapshot, encoding: str) -> Mapping[str, str]:
    return {
        _H_FORMAT: str(snapshot.format),
        _H_ENCODING: encoding,
        _H_PARTITION: str(snapshot.partition),
        _H_PARTITIONS: str(snapshot.partitions),
        _H_THROUGH: str(snapshot.through),
        _H_PROGRESS: str(snapshot.progress),
        _H_ENGINE: snapshot.engine,
        _H_CLAIM: str(snapshot.claim),
        _H_TAKEN_AT: str(snapshot.taken_at),
        _H_CUSTOMERS: str(len(snapshot.customers)),
    }
