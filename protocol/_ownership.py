"""Wire types of several engines sharing the partitions: a partition's claim (its fence
record) and how far its output got (its progress record), both in ``SHOAL_SEGMENTS``; a
partition's lease and an engine's heartbeat, in the KV bucket ``SHOAL_LEASES``."""

from __future__ import annotations

import msgspec


class FenceClaim(msgspec.Struct, frozen=True, kw_only=True):
    """An engine's claim on a partition, published on ``shoal.fence.<partition>`` expecting
    the partition's previous claim (or none) as that subject's last message: whoever claims
    after it fences it out. Its stream sequence is the claim's number."""

    engine: str
    """The id of the engine that claims."""
    partition: int
    at: int
    """When it claimed (the engine's clock, microseconds since the epoch): for people."""
    previous: int = 0
    """The stream sequence of the claim it replaced (0: the partition's first)."""
    previous_engine: str | None = None
    """The engine of the claim it replaced."""
    consumers: str = "shoal-engine"
    """The prefix of the claim's consumers (``serve --consumer``): the partition's consumer
    is ``<consumers>-<partition>-<claim>``, which the next claim deletes."""


class Progress(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """The last record of an atomic batch of a partition's transitions, on
    ``shoal.progress.<partition>``: stored with them or not at all."""

    claim: int
    """The claim (its stream sequence) the batch was published under."""
    versions: list[tuple[str, int]]
    """Each customer of the batch, with the version of its last transition in it."""


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a partition's lease (``partition.<p>`` in ``SHOAL_LEASES``). The
    message's own TTL (``Nats-TTL``) is the lease's; its revision, the lease's number."""

    engine: str
    """The id of the engine that holds it."""


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The value of an engine's heartbeat (``engine.<id>`` in ``SHOAL_LEASES``): what the
    other engines need to balance the partitions. Fields added later must have defaults,
    so that every engine reads every other's."""

    started: int
    """When the engine started (its clock, microseconds since the epoch): for people, and
    to tell a restart from a long run."""
    partitions: int = 0
    """How many partitions it held at its last beat."""


FENCE_DECODER = msgspec.json.Decoder(FenceClaim)
LEASE_DECODER = msgspec.json.Decoder(LeaseRecord)
ENGINE_INFO_DECODER = msgspec.json.Decoder(EngineInfo)
PROGRESS_DECODER = msgspec.json.Decoder(Progress)


SNAPSHOT_FORMAT = 2
"""The format of :class:`PartitionSnapshot` this shoal writes: 2 added the retention bases
(:attr:`PartitionSnapshot.bases`). Format 1 is read too (no bases); a later one is refused,
one before 1 is not read (the partition is then rebuilt from the stream)."""
FIRST_SNAPSHOT_FORMAT = 1
"""The earliest format of :class:`PartitionSnapshot` this shoal reads."""


class PartitionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One partition's customers at a cut, in Object Store ``SHOAL_SNAPSHOTS`` (object
    ``partition-<p>``): the base a new owner rebuilds from, before the stream's tail.

    Taken between two turns of the owner's loop, and uploaded only once every transition
    it reflects was stored: so whoever loads it publishes what follows, and only that.
    """

    format: int = SNAPSHOT_FORMAT
    partition: int
    partitions: int
    """How many partitions ``SHOAL_EVENTS`` had (a snapshot of another split is not used)."""
    through: int
    """Every event of the partition up to this stream position is folded in, none after."""
    progress: int
    """The ``SHOAL_SEGMENTS`` sequence of the partition's last progress record it reflects
    (0: none): the records after it say what a new owner need not publish again."""
    needs: str
    """What the customers' facts were kept for (``Needs.fingerprint``)."""
    definitions: str
    """The fingerprint of the definitions it was taken under."""
    definitions_version: int | None = None
    taken_at: int
    """When (the owner's clock, microseconds since the epoch)."""
    engine: str
    claim: int
    """The claim it was taken under."""
    customer_format: int = 0
    """The format of the customers' stored forms (``actors``' snapshot format): a customer
    in another is rebuilt from its events."""
    customers: list[tuple[str, int, bytes]]
    """Each customer's id, next deadline (:data:`~protocol.NEVER`: none) and stored form
    (``Customer.snapshot``), in id order."""
    forgotten: list[tuple[str, int, int | None, int]] = []
    """The partition's forgotten customers (``shoal forget``): the hash of each id, its last
    version, until when its events are refused (None: not), and its order's stream
    position. A new owner keeps them, and logs none of their events before their order.
    Absent from snapshots taken before shoal had it: none."""
    bases: list[tuple[str, int, bytes]] = []
    """With retention (``serve --retain``): the bases of the partition's customers that have
    one at the owner (id, customer format, stored form: its facts folded from each of its
    events up to :attr:`bases_through`), in id order. A new owner keeps them as its own and
    logs only the partition's events after that position: the stream before it may be cut.
    Format 2; absent from format 1: none."""
    bases_through: int = 0
    """The stream position up to which every event of the partition is in :attr:`bases` (0:
    no bases, the new owner logs the partition's events from the stream's start)."""
    cut_at: int | None = None
    """The latest receive instant the owner's log cut had folded into bases (microseconds)."""
    cut_needs: str | None = None
    """What facts the bases keep (the owner's record, opaque here)."""
