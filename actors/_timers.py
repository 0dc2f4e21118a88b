"""One shared timer structure for all customers: a heap of (instant, customer).

A customer has at most one pending deadline: the next instant at which any of its segments
can change without a new event. Replacing it leaves the old heap entry in place; the entry
is skipped when popped because it no longer matches (lazy deletion, as NOTES.md measured:
about 190 bytes and 0.3 us per push).
"""

from __future__ import annotations

import heapq


class TimerQueue:
    """Pending deadlines of many customers; at most one per customer."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._due: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._due)

    def set(self, customer_id: str, instant: int | None) -> None:
        """Make ``instant`` the customer's deadline (``None`` clears it)."""
        current = self._due.get(customer_id)
        if current == instant:
            return
        if instant is None:
            del self._due[customer_id]
            return
        self._due[customer_id] = instant
        heapq.heappush(self._heap, (instant, customer_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._compact()

    def get(self, customer_id: str) -> int | None:
        """The customer's pending deadline, if any."""
        return self._due.get(customer_id)

    def next(self) -> int | None:
        """The earliest pending deadline, if any."""
        heap, due = self._heap, self._due
        while heap:
            instant, cid = heap[0]
            if due.get(cid) == instant:
                return instant
            heapq.heappop(heap)
        return None

    def pop_due(self, until: int, limit: int) -> list[str]:
        """Remove and return up to ``limit`` customers whose deadline is at or before ``until``,
        earliest first."""
        out: list[str] = []
        heap, due = self._heap, self._due
        while heap and len(out) < limit:
            instant, cid = heap[0]
            if instant > until:
                break
            heapq.heappop(heap)
            if due.get(cid) == instant:
                del due[cid]
                out.append(cid)
        return out

    def _compact(self) -> None:
        self._heap = [(t, c) for c, t in self._due.items()]
        heapq.heapify(self._heap)
