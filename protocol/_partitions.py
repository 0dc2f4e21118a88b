"""Partitions: which of a fixed number of partitions a customer belongs to, as the broker
computes it (the stream's subject transform ``{{partition(P,1)}}``)."""

from __future__ import annotations

import functools

from ._subjects import escape_token, token_partition

DEFAULT_PARTITIONS = 32
"""Partitions of a new ``SHOAL_EVENTS`` unless chosen otherwise. It is fixed for the
stream's life: changing it is a migration."""


@functools.lru_cache(maxsize=65536)
def partition(customer_id: str, partitions: int) -> int:
    """The partition of ``customer_id`` among ``partitions``: FNV-1a (32 bits) over the
    UTF-8 bytes of the escaped subject token the broker sees, modulo ``partitions``, as
    nats-server's ``partition()`` subject-transform function computes it
    (``SHOAL_EVENTS`` stores the customer's events under it). Cached: each transition
    published asks it for its header.

    Raises:
        SubjectError: the id is empty.
        ValueError: ``partitions`` is not positive.
    """
    if partitions < 1:
        raise ValueError(f"the number of partitions must be positive, not {partitions}")
    return token_partition(escape_token(customer_id), partitions)


def partition_consumer(prefix: str, partition: int | str, claim: int | None = None) -> str:
    """The durable consumer of one partition of ``SHOAL_EVENTS`` under the claim of stream
    sequence ``claim``: ``<prefix>-<partition>-<claim>``; without a claim (before claims),
    ``<prefix>-<partition>``. ``serve --consumer`` gives the prefix (the default is
    ``shoal-engine``); ``partition`` may be ``unpartitioned``, the consumer of the messages
    stored without a partition."""
    if claim is None:
        return f"{prefix}-{partition}"
    return f"{prefix}-{partition}-{claim}"
