"""Partition leases and engine heartbeats: the JetStream KV bucket ``SHOAL_LEASES``.

Several engines share the partitions of ``SHOAL_EVENTS``; the bucket says who owns which:

- ``partition.<p>``: a partition's lease, a :class:`~protocol._ownership.LeaseRecord` naming
  its engine, written with a per-message TTL (``Nats-TTL``, whole seconds). Its revision
  (the message's stream sequence) is the lease's number: a renewal or a release must expect
  it (``Nats-Expected-Last-Subject-Sequence``), so only the holder can do either.
- ``engine.<id>``: an engine's heartbeat, an :class:`~protocol.EngineInfo`, with a TTL too.

A key is free when it holds no message, or when its last message is a tombstone: a release
(a purge, ``KV-Operation: PURGE``) or the server's marker of an expiry
(``Nats-Marker-Reason: MaxAge``). A claim expects the tombstone's sequence, or 0 for an
empty key; nats-py's ``KeyValue.create`` does not take a marker for a tombstone, so it is
not used.

Why server markers (the stream's ``subject_delete_marker_ttl``): without them a lease that
expires vanishes without a message, and a watcher never learns that it is free. With them
the expiry is a message like any other, which :meth:`LeaseBucket.watch` delivers about a
second after the TTL. The markers, and the tombstones of releases, last :data:`MARKER_TTL`:
long enough for a watcher that lost its consumer (a reconnection, a new leader) to resume
from its last sequence and still find them; short enough that the keys of engines that are
gone do not pile up.

How the whole bucket is read (:meth:`LeaseBucket.holders`, the start of a watch): one
direct batch read (``$JS.API.DIRECT.GET`` with ``multi_last``, nats-server 2.11 and later),
which answers each key's last message as of one stream sequence, in one request, with no
consumer made. Measured on one server with 64 leases and 8 heartbeats, median of 30:
``keys()`` then a ``get`` per key 25.9 ms (9.9 ms with the gets concurrent); an ephemeral
consumer delivering the last message per subject 5.3 ms; the direct batch read 5.0 ms. The
consumer was also wrong under load: while the keys were renewed continuously, its messages'
``num_pending`` said 0 from the first message on, so a reader that stops there (as nats-py's
``KeyValue.keys`` does) misses keys; the direct batch read answered all 64, 300 times out
of 300. Its limit: the server answers at most 1024 keys in one read.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RawStreamMsg,
    StorageType,
    StreamConfig,
)

from protocol._errors import (
    BrokerError,
    EngineIdInUse,
    LeaseLost,
    Unconfirmed,
    UnreadableRecord,
)
from protocol._ownership import (
    ENGINE_INFO_DECODER,
    LEASE_DECODER,
    EngineInfo,
    LeaseRecord,
)
from protocol._subjects import (
    LEASES_BUCKET,
    LEASES_STREAM,
    heartbeat_key,
    lease_key,
    validate_engine_id,
)
from protocol.nats._formats import checked_format, format_metadata, log_upgrade
from protocol.nats._refusals import permission_guard

MARKER_TTL = 300
"""Seconds a free key's tombstone (the server's expiry marker, or a release) is kept."""
_PREFIX = f"$KV.{LEASES_BUCKET}."
_DIRECT_GET = f"$JS.API.DIRECT.GET.{LEASES_STREAM}"
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = 10071
"""The broker's error code: the subject's last sequence is not the one expected."""
_IN_FLIGHT = 10164
"""A clustered stream's error code: another write checking the subject is in flight."""
_NO_MESSAGE = 10037
_NO_STREAM = 10059
_WRONG_LAST_SAID = re.compile(r"wrong last sequence: (\d+)")
_CLAIM_ATTEMPTS = 3
_WATCH_HEARTBEAT = 2.0
"""Seconds between a watch consumer's idle heartbeats: two missed ones (a lost consumer)
make nats-py recreate it from the last sequence delivered."""
_WATCH_INACTIVE = 30.0
"""Seconds the server keeps a watch's consumer once nobody listens (a lost connection)."""
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Lease:
    """A partition's lease, held by the engine that claimed or renewed it last."""

    partition: int
    engine: str
    revision: int
    """The key's revision this lease wrote: the next renewal or release expects it."""
    ttl: int
    """Its time to live, in seconds."""
    sent: float
    """When the claim or renewal that wrote it was sent (``time.monotonic()``)."""

    @property
    def deadline(self) -> float:
        """Until when (``time.monotonic()``) the lease is surely held: the broker stamped it
        after it was sent, and keeps it ``ttl`` seconds from then (on the broker's clock,
        which must not jump). Stop the partition's work before it, unless renewed."""
        return self.sent + self.ttl


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a partition's lease, as the bucket says now."""

    partition: int
    engine: str
    revision: int
    written: int
    """When it was claimed or last renewed (the broker's clock, microseconds since the
    epoch)."""
    ttl: int | None
    """Its time to live in seconds (None if its message does not say)."""

    def age(self, now: int) -> float:
        """Seconds since it was written, at the instant ``now`` (microseconds since the
        epoch; the two hosts' clocks may differ)."""
        return max(0, now - self.written) / 1e6


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An engine's last heartbeat."""

    engine: str
    info: EngineInfo
    revision: int
    written: int
    """When it was written (the broker's clock, microseconds since the epoch)."""
    ttl: int | None
    """Its time to live in seconds (None if its message does not say)."""

    def age(self, now: int) -> float:
        """Seconds since it was written, at the instant ``now`` (microseconds since the
        epoch)."""
        return max(0, now - self.written) / 1e6


class ChangeKind(enum.StrEnum):
    """What happened to a key of the leases bucket."""

    CLAIMED = "claimed"
    """A lease was written by another engine than the last one seen holding it."""
    RENEWED = "renewed"
    """A lease was written again by the engine seen holding it."""
    RELEASED = "released"
    """A lease was released, or a heartbeat stopped."""
    EXPIRED = "expired"
    """A lease or a heartbeat outlived its TTL (the server's marker)."""
    BEAT = "beat"
    """An engine's heartbeat was written."""


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """One change :meth:`LeaseBucket.watch` saw: to a lease (``partition`` set) or to an
    engine's heartbeat (``partition`` None)."""

    kind: ChangeKind
    partition: int | None
    engine: str | None
    """The lease's holder after a claim or renewal, its last known holder after a release
    or an expiry (None if not seen); the heartbeat's engine."""
    revision: int
    written: int
    """When the change was stored (the broker's clock, microseconds since the epoch)."""
    initial: bool
    """Part of the state the watch started from, not a change made since."""


@dataclass(frozen=True, slots=True)
class _Stored:
    """A key's message, however it was read."""

    key: str
    revision: int
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    written: int = 0
    """The broker's timestamp (microseconds since the epoch)."""

    @property
    def freed(self) -> ChangeKind | None:
        """How the key was freed, if this message is a tombstone."""
        if self.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return ChangeKind.RELEASED
        reason = self.headers.get("Nats-Marker-Reason")
        if reason is None:
            return None
        return ChangeKind.EXPIRED if reason == "MaxAge" else ChangeKind.RELEASED

    @property
    def ttl(self) -> int | None:
        ttl = self.headers.get("Nats-TTL", "").removesuffix("s")
        return int(ttl) if ttl.isascii() and ttl.isdigit() else None

    @property
    def where(self) -> str:
        return f"{_PREFIX}{self.key} at revision {self.revision}"


class _WrongLast(Exception):
    """A conditional write found another last sequence (``current``; 0: the key is empty)."""

    def __init__(self, current: int | None) -> None:
        self.current = current


class LeaseBucket:
    """The leases and heartbeats in the KV bucket ``SHOAL_LEASES``, for one client.

    Every write the broker does not confirm raises :class:`~protocol.Unconfirmed` (retry it
    until your own deadline); a lease or heartbeat that is no longer the caller's raises
    :class:`~protocol.LeaseLost`. Other refusals raise :class:`~protocol.BrokerError`.
    """

    def __init__(self, nc: Client, *, timeout: float = 2.0) -> None:
        """A client of the bucket over ``nc`` (a client from :func:`~protocol.nats.connect`,
        for permission errors to name the role). ``timeout``: seconds each request to the
        broker may take."""
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._timeout = timeout

    async def ensure(self, replicas: int | None = None) -> None:
        """Create the bucket, or update it to this configuration (idempotent): one value
        per key, per-message TTLs, the server's markers of expiries kept
        :data:`MARKER_TTL` seconds, direct reads, ``replicas`` copies (None: as many as
        an existing bucket has, else 1).

        Raises:
            FormatTooNewError: a newer shoal made the bucket.
            BrokerError: JetStream is not enabled, or the bucket cannot be created or
                updated.
        """
        if replicas is not None and not 1 <= replicas <= 5:
            raise ValueError(f"a stream has 1 to 5 replicas, not {replicas}")
        # As nats-py's create_key_value makes a bucket, so that `nats kv` reads it too.
        config = StreamConfig(
            name=LEASES_STREAM,
            description="shoal: who owns which partition, and the engines' heartbeats",
            subjects=[f"{_PREFIX}>"],
            storage=StorageType.FILE,
            num_replicas=replicas or 1,
            max_msgs_per_subject=1,
            max_msgs=-1,
            max_consumers=-1,
            discard=DiscardPolicy.NEW,
            deny_delete=True,
            allow_rollup_hdrs=True,
            allow_msg_ttl=True,
            subject_delete_marker_ttl=MARKER_TTL,
            allow_direct=True,
            duplicate_window=120,
            metadata=format_metadata(),
        )
        what = f"KV bucket {LEASES_BUCKET}"
        async with permission_guard(self._nc):
            try:
                try:
                    info = await self._js.stream_info(LEASES_STREAM)
                except nats.js.errors.NotFoundError:
                    await self._js.add_stream(config)
                else:
                    found = checked_format(what, info.config)
                    if replicas is None:
                        config.num_replicas = info.config.num_replicas
                    config.metadata = format_metadata(info.config.metadata)
                    await self._js.update_stream(config)
                    log_upgrade(what, found)
            except nats.js.errors.ServiceUnavailableError as e:
                raise BrokerError(
                    "JetStream is not enabled on the NATS server (start it with -js)"
                ) from e
            except (TimeoutError, nats.errors.Error) as e:
                raise BrokerError(f"cannot set up KV bucket {LEASES_BUCKET}: {_said(e)}") from e

    async def claim(self, partition: int, engine_id: str, ttl: int) -> Lease | Holder:
        """Take ``partition``'s lease for ``engine_id`` for ``ttl`` seconds if it is free.

        Returns:
            The lease; or, when an engine holds it, who (``engine`` may be ``engine_id``
            itself: an earlier run's lease, or a claim that was not confirmed, which
            expires after its TTL).

        Raises:
            Unconfirmed: the broker did not answer (the claim may be stored: a retry
                returns a :class:`Holder` naming ``engine_id`` then).
            UnreadableRecord: the lease holds a value shoal did not write.
            BrokerError: the broker refused.
        """
        _check_ttl(ttl)
        key = lease_key(partition)
        value = _encoder.encode(LeaseRecord(engine=validate_engine_id(engine_id)))
        sent = time.monotonic()
        written = await self._create(key, value, ttl, "a claim")
        if isinstance(written, int):
            return Lease(
                partition=partition, engine=engine_id, revision=written, ttl=ttl, sent=sent
            )
        return _holder(partition, written)

    async def renew(self, lease: Lease, ttl: int | None = None) -> Lease:
        """Write ``lease`` again, for ``ttl`` seconds more (default: its own TTL), if it is
        still the caller's.

        A renewal whose earlier try was not confirmed but stored is recognized (the key
        holds a later revision naming the same engine) and renewed over.

        Raises:
            LeaseLost: it expired, or another engine took it.
            Unconfirmed: the broker did not confirm (retry until ``lease.deadline``).
            BrokerError: the broker refused otherwise.
        """
        ttl = lease.ttl if ttl is None else ttl
        _check_ttl(ttl)
        key = lease_key(lease.partition)
        value = _encoder.encode(LeaseRecord(engine=lease.engine))
        sent = time.monotonic()
        try:
            revision = await self._cas(key, value, lease.revision, ttl, "renewing the lease")
        except _WrongLast as e:
            lost = LeaseLost(
                key, lease.engine, lease.revision, e.current, partition=lease.partition
            )
        else:
            return replace(lease, revision=revision, ttl=ttl, sent=sent)
        last = await self._read(key, "renewing the lease")
        if last is None or last.freed is not None or last.revision == lease.revision:
            raise lost
        if _lease_record(last).engine != lease.engine:
            raise LeaseLost(
                key, lease.engine, lease.revision, last.revision, partition=lease.partition
            )
        # An earlier try was stored after all: renew over it.
        sent = time.monotonic()
        try:
            revision = await self._cas(key, value, last.revision, ttl, "renewing the lease")
        except _WrongLast as e:
            raise LeaseLost(
                key, lease.engine, lease.revision, e.current, partition=lease.partition
            ) from None
        return replace(lease, revision=revision, ttl=ttl, sent=sent)

    async def release(self, lease: Lease) -> bool:
        """Free ``lease`` if it is still the caller's (idempotent).

        Returns:
            True if released; False if it was no longer the caller's (expired, taken,
            released already).

        Raises:
            Unconfirmed: the broker did not confirm (a retry returns False if it was).
            BrokerError: the broker refused otherwise.
        """
        return await self._purge(lease_key(lease.partition), lease.revision, "the release")

    async def holders(self) -> dict[int, Holder]:
        """Every partition's lease that is held, by partition (free ones are left out).

        On a clustered bucket any replica may answer: one that lags shows the leases as
        they were a moment ago.

        Raises:
            UnreadableRecord: a lease holds a value shoal did not write.
            BrokerError: the broker does not answer, or the bucket holds more than 1024
                leases.
        """
        found: dict[int, Holder] = {}
        for stored in (await self._last_messages("partition.*"))[0]:
            partition = _partition_of(stored.key)
            if partition is not None and stored.freed is None:
                found[partition] = _holder(partition, stored)
        return found

    async def engines(self) -> dict[str, Heartbeat]:
        """Every engine's live heartbeat, by engine id (a lagging replica may answer, as
        for :meth:`holders`).

        Raises:
            UnreadableRecord: a heartbeat holds a value shoal did not write.
            BrokerError: the broker does not answer, or the bucket holds more than 1024
                heartbeats.
        """
        found: dict[str, Heartbeat] = {}
        for stored in (await self._last_messages("engine.*"))[0]:
            engine = _engine_of(stored.key)
            if engine is not None and stored.freed is None:
                found[engine] = _heartbeat(engine, stored)
        return found

    async def beat(
        self, engine_id: str, info: EngineInfo, ttl: int, previous: int | None = None
    ) -> int:
        """Write ``engine_id``'s heartbeat, for ``ttl`` seconds: its first when ``previous``
        is None, else over the heartbeat of revision ``previous``.

        Returns:
            The heartbeat's revision, for the next beat.

        Raises:
            EngineIdInUse: a first heartbeat found a live one of another run (its
                ``info.started`` differs): another engine with this id, or an earlier run.
            LeaseLost: the heartbeat of revision ``previous`` expired, or another engine
                wrote it (the engine may start again with ``previous=None``).
            Unconfirmed: the broker did not confirm (retry: a beat whose earlier try was
                stored is recognized by ``info.started``).
            BrokerError: the broker refused otherwise.
        """
        _check_ttl(ttl)
        key = heartbeat_key(engine_id)
        value = _encoder.encode(info)
        if previous is None:
            written = await self._create(key, value, ttl, "the first heartbeat")
            if isinstance(written, int):
                return written
            if _heartbeat(engine_id, written).info.started != info.started:
                raise EngineIdInUse(engine_id, written.revision, written.ttl)
            previous = written.revision
        try:
            return await self._cas(key, value, previous, ttl, "a heartbeat")
        except _WrongLast as e:
            lost = LeaseLost(key, engine_id, previous, e.current)
        last = await self._read(key, "a heartbeat")
        if last is None or last.freed is not None or last.revision == previous:
            raise lost
        if _heartbeat(engine_id, last).info.started != info.started:
            raise LeaseLost(key, engine_id, previous, last.revision)
        # An earlier try was stored after all: beat over it.
        try:
            return await self._cas(key, value, last.revision, ttl, "a heartbeat")
        except _WrongLast as e:
            raise LeaseLost(key, engine_id, previous, e.current) from None

    async def stop_beating(self, engine_id: str, revision: int | None = None) -> bool:
        """Remove ``engine_id``'s heartbeat: whatever it is, or only if still at
        ``revision`` (idempotent).

        Returns:
            True if removed; False if ``revision`` was no longer the last.

        Raises:
            Unconfirmed: the broker did not confirm.
            BrokerError: the broker refused otherwise.
        """
        return await self._purge(heartbeat_key(engine_id), revision, "stopping the heartbeat")

    def watch(self) -> LeaseWatch:
        """The changes to the bucket, as they are stored: first the state it is in (each
        key's last message, ``initial`` set, in the order written), then every claim,
        renewal, release, expiry and heartbeat. Use it as ``async with bucket.watch() as
        changes: async for change in changes: ...``.

        It misses nothing while connected: a lost consumer is made again from the last
        sequence seen (nats-py's ordered consumer), and tombstones last :data:`MARKER_TTL`
        seconds. After a longer outage, read :meth:`holders` again.
        """
        return LeaseWatch(self)

    # -- the broker ------------------------------------------------------------------------

    async def _create(self, key: str, value: bytes, ttl: int, what: str) -> int | _Stored:
        """Write ``value`` to ``key`` if it is free: its revision, or the live message that
        holds the key."""
        for _ in range(_CLAIM_ATTEMPTS):
            last = await self._read(key, what)
            if last is not None and last.freed is None:
                return last
            try:
                return await self._cas(key, value, last.revision if last else 0, ttl, what)
            except _WrongLast:
                continue  # written in between: look again
        raise Unconfirmed(what, _PREFIX + key, f"the key changed {_CLAIM_ATTEMPTS} times meanwhile")

    async def _cas(self, key: str, value: bytes, expected: int, ttl: int, what: str) -> int:
        # A new dict each time: nats-py adds Nats-TTL to the one it is given.
        return await self._publish(key, value, {_EXPECTED: str(expected)}, ttl, what)

    async def _purge(self, key: str, expected: int | None, what: str) -> bool:
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        if expected is not None:
            headers[_EXPECTED] = str(expected)
        try:
            # A tombstone with a TTL goes once watchers had time to see it; unlike a
            # deletion's, a purge's expiry leaves no marker behind.
            await self._publish(key, b"", headers, MARKER_TTL, what)
        except _WrongLast:
            return False
        return True

    async def _publish(
        self, key: str, value: bytes, headers: dict[str, str], ttl: int, what: str
    ) -> int:
        subject = _PREFIX + key
        async with _translated(self._nc, subject, write=what):
            try:
                ack = await self._js.publish(subject, value, headers=headers, msg_ttl=ttl)
            except nats.js.errors.APIError as e:
                if e.err_code == _WRONG_LAST:
                    raise _WrongLast(_said_last(e.description)) from e
                raise
        return int(ack.seq)

    async def _read(self, key: str, during: str) -> _Stored | None:
        """The key's last message (from the stream's leader), None if it has none; read
        ``during`` a write, which a failed read leaves unconfirmed."""
        subject = _PREFIX + key
        async with _translated(self._nc, subject, write=during):
            try:
                msg = await self._js.get_msg(LEASES_STREAM, subject=subject)
            except nats.js.errors.NotFoundError as e:
                if e.err_code in (None, _NO_MESSAGE):
                    return None
                raise
        return _from_raw(key, msg)

    async def _last_messages(self, keys: str) -> tuple[list[_Stored], int]:
        """The last message of each key matching ``keys``, as of one stream sequence, in the
        order written; and that sequence (0 when no key matches). One direct batch read."""
        where = f"KV bucket {LEASES_BUCKET}"
        inbox = self._nc.new_inbox()
        found: list[_Stored] = []
        async with _translated(self._nc, where, write=None):
            sub = await self._nc.subscribe(inbox)
            try:
                request = json.dumps({"multi_last": [_PREFIX + keys]}).encode()
                await self._nc.publish(_DIRECT_GET, request, reply=inbox)
                while True:
                    msg = await sub.next_msg(timeout=self._timeout)
                    headers = dict(msg.headers or {})
                    status = headers.get("Status")
                    if status is None:
                        found.append(_from_direct(msg.data, headers))
                        continue
                    if status == "404":  # no key matches
                        return found, 0
                    pending = headers.get("Nats-Num-Pending", "0")
                    if status == "204" and pending == "0":  # the end of the batch
                        return found, int(headers.get("Nats-UpTo-Sequence") or 0)
                    refused = BrokerError(_refused_read(where, status, headers, pending))
                    if status == "503":
                        # No replica answers for now (a node lost, a leader being elected):
                        # as transient as the broker's own 503s are to its callers.
                        raise refused from nats.js.errors.ServiceUnavailableError(
                            code=503, description="no responders"
                        )
                    raise refused
            finally:
                await sub.unsubscribe()


class LeaseWatch(AbstractAsyncContextManager["LeaseWatch"]):
    """The changes to the leases bucket (see :meth:`LeaseBucket.watch`): an async context
    manager, and an async iterator of :class:`LeaseChange` inside it."""

    def __init__(self, bucket: LeaseBucket) -> None:
        self._bucket = bucket
        self._sub: Any = None
        self._initial: list[_Stored] = []
        self._holders: dict[int, str | None] = {}

    async def __aenter__(self) -> LeaseWatch:
        """Start watching: the state first (one direct batch read, as of a stream
        sequence), then a consumer of every change after that sequence.

        Raises:
            BrokerError: the broker does not answer, there is no bucket, or it holds more
                than 1024 keys.
        """
        bucket = self._bucket
        state, upto = await bucket._last_messages(">")
        config = ConsumerConfig(
            deliver_subject=bucket._nc.new_inbox(),
            filter_subject=f"{_PREFIX}>",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if upto else DeliverPolicy.ALL,
            opt_start_seq=upto + 1 if upto else None,
            # nats-py's ordered consumer: a gap in the deliveries, or two idle heartbeats
            # missed, make it recreate the consumer from the last stream sequence seen.
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=_WATCH_HEARTBEAT,
            max_deliver=1,
            ack_wait=22 * 3600,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=_WATCH_INACTIVE,
        )
        async with _translated(bucket._nc, f"KV bucket {LEASES_BUCKET}", write=None):
            info = await bucket._js.add_consumer(LEASES_STREAM, config)
            self._sub = await bucket._js.subscribe_bind(
                LEASES_STREAM, config, info.name, ordered_consumer=True
            )
        self._initial = sorted(state, key=lambda s: s.revision, reverse=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self._bucket._nc.is_closed:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # the connection is going: the server drops the consumer anyway

    def __aiter__(self) -> LeaseWatch:
        return self

    async def __anext__(self) -> LeaseChange:
        """The next change, as soon as it is stored.

        Raises:
            UnreadableRecord: a lease holds a value shoal did not write.
            BrokerError: the connection is closed.
        """
        if self._sub is None:
            raise StopAsyncIteration
        while self._initial:
            change = self._change(self._initial.pop(), initial=True)
            if change is not None:
                return change
        while True:
            try:
                msg = await self._sub.next_msg(timeout=None)
            except nats.errors.Error as e:
                raise BrokerError(f"cannot watch KV bucket {LEASES_BUCKET}: {_said(e)}") from e
            change = self._change(_from_delivered(msg), initial=False)
            if change is not None:
                return change

    def _change(self, stored: _Stored, *, initial: bool) -> LeaseChange | None:
        freed = stored.freed
        partition = _partition_of(stored.key)
        if partition is not None:
            before = self._holders.get(partition)
            if freed is None:
                engine: str | None = _lease_record(stored).engine
                kind = ChangeKind.RENEWED if engine == before else ChangeKind.CLAIMED
            else:
                engine, kind = before, freed
            self._holders[partition] = engine if freed is None else None
        else:
            engine = _engine_of(stored.key)
            if engine is None:
                return None  # not shoal's
            kind = ChangeKind.BEAT if freed is None else freed
        return LeaseChange(
            kind=kind,
            partition=partition,
            engine=engine,
            revision=stored.revision,
            written=stored.written,
            initial=initial,
        )


# -- reading messages ----------------------------------------------------------------------


def _check_ttl(ttl: int) -> None:
    # The broker takes whole seconds, at least one (NATS refuses "0" with error 10165).
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise ValueError(f"a TTL is a whole number of seconds, at least 1, not {ttl!r}")


def _said_last(description: str | None) -> int | None:
    """The last sequence the broker reported in "wrong last sequence: N"."""
    m = _WRONG_LAST_SAID.search(description or "")
    return int(m.group(1)) if m else None


def _partition_of(key: str) -> int | None:
    kind, _, token = key.partition(".")
    if kind != "partition" or not (token.isascii() and token.isdigit()):
        return None
    return int(token)


def _engine_of(key: str) -> str | None:
    kind, _, engine = key.partition(".")
    return engine if kind == "engine" and engine else None


def _micros(at: datetime.datetime | None) -> int:
    if at is None:
        return 0
    return (at - _EPOCH) // datetime.timedelta(microseconds=1)


def _from_raw(key: str, msg: RawStreamMsg) -> _Stored:
    return _Stored(
        key=key,
        revision=int(msg.seq or 0),
        data=msg.data or b"",
        headers=dict(msg.headers or {}),
        written=_micros(msg.time),
    )


def _from_delivered(msg: Msg) -> _Stored:
    meta = msg.metadata
    return _Stored(
        key=msg.subject[len(_PREFIX) :],
        revision=meta.sequence.stream,
        data=msg.data,
        headers=dict(msg.headers or {}),
        written=_micros(meta.timestamp),
    )


def _from_direct(data: bytes, headers: dict[str, str]) -> _Stored:
    # A direct read's answer: the message's own headers, and the server's Nats-* ones.
    return _Stored(
        key=headers.get("Nats-Subject", "")[len(_PREFIX) :],
        revision=int(headers.get("Nats-Sequence") or 0),
        data=data,
        headers=headers,
        written=_parse_time(headers.get("Nats-Time-Stamp", "")),
    )


def _parse_time(text: str) -> int:
    """Microseconds since the epoch of an RFC 3339 time with up to nanoseconds
    (``2026-12-06T23:03:27.123456789Z``); 0 if it is not one."""
    whole, _, fraction = text.removesuffix("Z").partition(".")
    try:
        at = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    except ValueError:
        return 0
    digits = (fraction + "000000")[:6]
    return _micros(at) + (int(digits) if digits.isdigit() else 0)


def _lease_record(stored: _Stored) -> LeaseRecord:
    try:
        return LEASE_DECODER.decode(stored.data)
    except msgspec.DecodeError as e:
        raise UnreadableRecord(stored.where, str(e)) from e


def _holder(partition: int, stored: _Stored) -> Holder:
    return Holder(
        partition=partition,
        engine=_lease_record(stored).engine,
        revision=stored.revision,
        written=stored.written,
        ttl=stored.ttl,
    )


def _heartbeat(engine: str, stored: _Stored) -> Heartbeat:
    try:
        info = ENGINE_INFO_DECODER.decode(stored.data)
    except msgspec.DecodeError as e:
        raise UnreadableRecord(stored.where, str(e)) from e
    return Heartbeat(
        engine=engine,
        info=info,
        revision=stored.revision,
        written=stored.written,
        ttl=stored.ttl,
    )


def _refused_read(where: str, status: str, headers: dict[str, str], pending: str) -> str:
    if status == "413":
        return (
            f"cannot read {where}: it holds more than 1024 keys of one kind, more than one "
            "direct read answers"
        )
    if status == "503":
        return (
            f"cannot read {where}: no replica answers direct reads (is the bucket made, by "
            "an engine of this version?)"
        )
    if status == "204":
        return f"cannot read {where}: the answer stopped with {pending} keys left"
    description = headers.get("Description") or "no description"
    return f"cannot read {where}: status {status} ({description})"


def _said(e: Exception) -> str:
    if isinstance(e, nats.js.errors.NoStreamResponseError):
        return f"no stream answered: is KV bucket {LEASES_BUCKET} made?"
    if isinstance(e, nats.js.errors.APIError):
        return f"{e.description or 'no description'} (error {e.err_code or e.code})"
    return str(e) or type(e).__name__


@asynccontextmanager
async def _translated(nc: Client, where: str, *, write: str | None) -> AsyncIterator[None]:
    """nats-py's errors as shoal's, for a read of ``where`` or a ``write`` to it: a write
    with no answer as :class:`Unconfirmed`, any other failure as a :class:`BrokerError`."""
    async with permission_guard(nc, where):
        try:
            yield
        except nats.js.errors.APIError as e:
            if isinstance(e, nats.js.errors.NotFoundError) and e.err_code == _NO_STREAM:
                raise BrokerError(
                    f"KV bucket {LEASES_BUCKET} does not exist: an engine makes it as it starts"
                ) from e
            busy = e.err_code == _IN_FLIGHT or isinstance(e, nats.js.errors.ServiceUnavailableError)
            if write is not None and busy:
                raise Unconfirmed(write, where, _said(e)) from e
            if write is not None:
                raise BrokerError(f"the broker refused {write} on {where}: {_said(e)}") from e
            raise BrokerError(f"cannot read {where}: {_said(e)}") from e
        except (TimeoutError, nats.errors.Error) as e:
            if write is not None:
                raise Unconfirmed(write, where, _said(e)) from e
            raise BrokerError(f"cannot read {where}: {_said(e)}") from e
