"""A replay split by partition over worker processes (``shoal replay --processes N``).

The customers are split as the broker splits them (:func:`protocol.partition`); each worker
process replays its customers' items against the clock of every step
(:class:`actors.PartReplay`), and this process merges the workers' transitions back into the
order one replay gives (:func:`actors.merge_parts`): the same transitions, byte for byte.

Pieces are pipelined: a piece goes to every worker before the transitions of the one before
it are read back, so the workers are busy while this process reads and writes. At most two
pieces are out at a time, so memory stays bounded by the pieces, not by the log.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from array import array
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import msgspec

from actors import NO_CLOCK, Customer, PartReplay, SegmentSet, merge_parts, parse_segments
from actors.rules import stored_text
from protocol import Event, Transition, partition

from ._errors import CliError

_Own = list[tuple[int, Event]]
_Keyed = list[tuple[int, int, datetime | None, Transition]]
_encoder = msgspec.msgpack.Encoder()
_POLL = 1.0
"""Seconds between looks at whether the workers are still alive, while waiting for one."""


class ReplayWorkerError(CliError):
    """A worker process of a replay failed (its error is in the message) or died."""


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _work(text: str, source: str, lists: Any, inbox: Any, outbox: Any) -> None:
    """A worker: replay the items sent, answer each piece with its keyed transitions."""
    try:
        part = PartReplay(parse_segments(text, source=source, lists=lists))
        events = msgspec.msgpack.Decoder(_Own)
        while (message := inbox.get()) is not None:
            kind, first, clocks_bytes, body = message
            clocks = array("q")
            clocks.frombytes(clocks_bytes)
            own: Sequence[tuple[int, Event | Customer]]
            if kind == "events":
                own = events.decode(body)
            else:
                own = [(step, Customer.from_snapshot(cid, snap)) for step, cid, snap in body]
            keyed = part.feed(first, clocks, own)
            outbox.put(("ok", part.customers, _encoder.encode(keyed)))
    except BaseException:  # reported to the parent, which raises it
        outbox.put(("error", 0, traceback.format_exc()))


class ParallelReplay:
    """A replay (:class:`actors.Replayer`) of ``segments`` over ``processes`` worker
    processes. Use it as a context manager: leaving it stops the workers.

    Raises:
        ReplayWorkerError: from any call, when a worker failed or died.
    """

    def __init__(self, segments: SegmentSet, processes: int) -> None:
        if processes < 2:
            raise ValueError("a parallel replay needs at least 2 processes")
        self._n = processes
        self._step = 0
        self._customers = [0] * processes
        self._parts: dict[str, int] = {}
        self._out: deque[int] = deque()  # pieces sent and not read back
        self._decoder = msgspec.msgpack.Decoder(_Keyed)
        context = mp.get_context("spawn")  # no fork: the caller runs threads
        text = stored_text(segments)
        self._inboxes: list[Any] = [context.Queue() for _ in range(processes)]
        self._outboxes: list[Any] = [context.Queue() for _ in range(processes)]
        self._workers: list[BaseProcess] = [
            context.Process(
                target=_work,
                args=(text, segments.source, segments.lists, inbox, outbox),
                name=f"shoal-replay-{i}",
                daemon=True,
            )
            for i, (inbox, outbox) in enumerate(zip(self._inboxes, self._outboxes, strict=True))
        ]
        for w in self._workers:
            w.start()

    def __enter__(self) -> ParallelReplay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (at once: what they were doing is not wanted)."""
        for w in self._workers:
            if w.is_alive():
                w.terminate()
        for w in self._workers:
            w.join()
        for q in (*self._inboxes, *self._outboxes):
            q.close()
            q.cancel_join_thread()  # a worker gone, nothing will read what is left

    @property
    def customers(self) -> int:
        """How many customers the workers hold, as of the last piece read back."""
        return sum(self._customers)

    def _part(self, customer_id: str) -> int:
        p = self._parts.get(customer_id)
        if p is None:
            p = self._parts[customer_id] = partition(customer_id, self._n)
        return p

    def _send(self, kind: str, clocks: array[int], owns: list[Any]) -> None:
        first = self._step
        self._step += len(clocks)
        body = clocks.tobytes()
        for inbox, own in zip(self._inboxes, owns, strict=True):
            inbox.put((kind, first, body, _encoder.encode(own) if kind == "events" else own))
        self._out.append(first)

    def _read(self) -> list[Transition]:
        """The transitions of the oldest piece out, merged."""
        self._out.popleft()
        parts: list[_Keyed] = []
        for i, outbox in enumerate(self._outboxes):
            while True:
                try:
                    status, customers, body = outbox.get(timeout=_POLL)
                    break
                except queue.Empty:
                    if not self._workers[i].is_alive():
                        raise ReplayWorkerError(
                            f"replay worker {i} died (exit code {self._workers[i].exitcode})"
                        ) from None
            if status != "ok":
                raise ReplayWorkerError(f"replay worker {i} failed:\n{body}")
            self._customers[i] = customers
            parts.append(self._decoder.decode(body))
        return list(merge_parts(parts))

    def start_from_all(self, bases: Sequence[Customer]) -> list[Transition]:
        """Start each of ``bases`` in its worker; their transitions (waited for)."""
        if not bases:
            return []
        owns: list[list[tuple[int, str, bytes]]] = [[] for _ in range(self._n)]
        for step, c in enumerate(bases, self._step):
            owns[self._part(c.customer_id)].append((step, c.customer_id, c.snapshot()))
        self._send("bases", array("q", [NO_CLOCK]) * len(bases), owns)
        out: list[Transition] = []
        while self._out:
            out += self._read()
        return out

    def apply_all(self, events: Sequence[Event]) -> list[Transition]:
        """Send ``events`` to their workers; the transitions of the piece before, if any."""
        if not events:
            return []
        owns: list[_Own] = [[] for _ in range(self._n)]
        for step, e in enumerate(events, self._step):
            owns[self._part(e.customer_id)].append((step, e))
        self._send("events", array("q", [e.received - 1 for e in events]), owns)
        out: list[Transition] = []
        while len(self._out) > 1:
            out += self._read()
        return out

    def advance(self, until: int) -> list[Transition]:
        """Run every worker's clock on to ``until``; every transition not read back yet."""
        self._send("events", array("q", [until]), [[] for _ in range(self._n)])
        out: list[Transition] = []
        while self._out:
            out += self._read()
        return out
