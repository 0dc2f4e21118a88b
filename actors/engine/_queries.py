"""Queries: what the query service reads of a running engine, without holding up its loop."""

from __future__ import annotations

import heapq
import itertools

import anyio.lowlevel

from ._partition import Partition

_SCAN_SLICE = 20_000
"""Customers looked at between two checkpoints of a scan."""


async def members(
    partition: Partition, segment: str, *, after: str | None, limit: int
) -> list[tuple[str, int]]:
    """Up to ``limit`` members of the segment in memory, in id order, after the id
    ``after``: each id with the instant it entered the segment.

    It looks at every customer in memory, a slice at a time, letting the event loop run
    between slices (about 10 ms per slice).
    """
    ids = list(partition.customers)
    page: list[tuple[str, int]] = []
    for i in range(0, len(ids), _SCAN_SLICE):
        customers = partition.customers  # a switch of definitions may replace it meanwhile
        found = [
            (cid, entered)
            for cid in ids[i : i + _SCAN_SLICE]
            if (after is None or cid > after)
            and (c := customers.get(cid)) is not None
            and (entered := c.members.get(segment)) is not None
        ]
        if found:
            # Ids are unique: the pairs sort by id alone.
            page = heapq.nsmallest(limit, itertools.chain(page, found))
        await anyio.lowlevel.checkpoint()
    return page


async def search(partition: Partition, prefix: str, *, limit: int) -> list[str]:
    """Up to ``limit`` ids of the customers in memory that start with ``prefix``, in id
    order, a slice at a time as :func:`members`."""
    ids = list(partition.customers)
    page: list[str] = []
    for i in range(0, len(ids), _SCAN_SLICE):
        found = [cid for cid in ids[i : i + _SCAN_SLICE] if cid.startswith(prefix)]
        if found:
            page = heapq.nsmallest(limit, itertools.chain(page, found))
        await anyio.lowlevel.checkpoint()
    return page
