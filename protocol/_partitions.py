"""Partitions: which of a fixed number of partitions a customer belongs to, as the broker
computes it (the stream's subject transform ``{{partition(P,1)}}``)."""

from __future__ import annotations

from ._subjects import escape_token

DEFAULT_PARTITIONS = 32
"""Partitions of a new ``SHOAL_EVENTS`` unless chosen otherwise."""


def partition(customer_id: str, partitions: int) -> int:
    """The partition of ``customer_id`` among ``partitions``: FNV-1a (32 bits) over the
    UTF-8 bytes of the escaped subject token the broker sees, modulo ``partitions``, as
    nats-server's ``partition()`` subject-transform function computes it."""
    h = 0x811C9DC5
    for b in escape_token(customer_id).encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions
