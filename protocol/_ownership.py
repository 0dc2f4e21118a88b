"""Wire types of several engines sharing the partitions: a partition's claim (its fence
record) and how far its output got (its progress record), both in ``SHOAL_SEGMENTS``."""

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


class Progress(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """The last record of an atomic batch of a partition's transitions, on
    ``shoal.progress.<partition>``: stored with them or not at all."""

    claim: int
    """The claim (its stream sequence) the batch was published under."""
    versions: list[tuple[str, int]]
    """Each customer of the batch, with the version of its last transition in it."""


FENCE_DECODER = msgspec.json.Decoder(FenceClaim)
PROGRESS_DECODER = msgspec.json.Decoder(Progress)
