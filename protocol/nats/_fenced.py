"""Fenced output: a partition's transitions published as atomic batches that the broker
stores only while the partition's last claim is the publisher's own.

Each batch is the partition's next transitions (at most :data:`MAX_BATCH` - 1) and, last,
its progress record (``shoal.progress.<partition>``), which carries the commit and the
fence: ``Nats-Expected-Last-Subject-Sequence`` of ``shoal.fence.<partition>`` must be the
claim. The broker then stores the whole batch or none of it: after another engine claimed
the partition, none (error 10071), so a paused owner that wakes up cannot publish.

On a replicated stream, a fenced publish is refused while another one checking the same
fence subject is still in flight (error 10164, see ../shared/NOTES-cluster.md item 4), so
each partition has one batch in flight at a time; partitions go concurrently.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client

from protocol._errors import ProtocolError
from protocol._ownership import PROGRESS_DECODER, Progress
from protocol._ports import FencedOut, PublishError
from protocol._subjects import PARTITION_HEADER, progress_subject, segment_subject
from protocol._types import Transition
from protocol.nats._fences import fence_headers, is_fenced_error
from protocol.nats._stream import read_stream
from protocol.nats._wire import Wire

_KILL_AT = "SHOAL_KILL_AT_BATCH"
"""For the tests of crashes around a commit: ``before:N`` or ``after:N`` makes the process
SIGKILL itself just before sending the commit of its N-th atomic batch, or just after the
broker confirmed it (before the engine learns of it)."""
MAX_BATCH = 1000
"""The most messages nats-server takes in one atomic batch (10199 past it)."""
CONCURRENT_BATCHES = 10
"""Batches one engine has open at a time: the server refuses a 51st on one stream (10210),
and several engines share that."""
DUPLICATE_IN_BATCH = 10201
"""A message id in the batch is one the stream holds (within its duplicate window)."""
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Outcome:
    """What became of one publish of transitions over several partitions."""

    confirmed: set[int] = field(default_factory=set)
    """Indices of the transitions given that the broker stored (or held already)."""
    fenced: dict[int, str] = field(default_factory=dict)
    """Partitions refused by their fence, with the broker's words."""
    failed: list[str] = field(default_factory=list)
    """Other failures, for the error."""
    progress: dict[int, int] = field(default_factory=dict)
    """Per partition, the stream sequence of the last progress record stored."""


class BatchRefused(Exception):
    """The broker refused an atomic batch (its JSON error given)."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"{description} (error {err_code})")
        self.err_code = err_code
        self.description = description


async def _maybe_killed(moment: str, batch: int, nc: Client) -> None:
    """SIGKILL this process at ``moment`` of its ``batch``-th atomic batch, if
    :data:`_KILL_AT` asks for it (a crash test's hook; unset in production)."""
    if os.environ.get(_KILL_AT) == f"{moment}:{batch}":
        await nc.flush()  # what was sent before the crash reaches the broker
        os.kill(os.getpid(), signal.SIGKILL)


def _error_of(data: bytes) -> BatchRefused | None:
    """The broker's refusal in a JetStream reply, or None for an acknowledgement."""
    if b'"error"' not in data:
        return None
    try:
        err = json.loads(data)["error"]
        return BatchRefused(int(err.get("err_code", 0)), str(err.get("description", err)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return BatchRefused(0, data.decode("utf-8", "replace"))


class FencedPublisher:
    """Publishes transitions as fenced atomic batches, per partition."""

    def __init__(self, nc: Client, *, timeout: float) -> None:
        self._nc = nc
        self._wire = Wire(nc)
        self._js = nc.jetstream()
        self._timeout = timeout
        self._limiter = anyio.CapacityLimiter(CONCURRENT_BATCHES)
        self._prefix = uuid.uuid4().hex[:16]
        self._ids = 0

    async def publish(
        self,
        groups: Mapping[int, Sequence[tuple[int, Transition]]],
        claims: Mapping[int, int],
    ) -> Outcome:
        """Publish each partition's (index, transition) pairs in order, under its claim.

        Returns what was stored; never raises for a refusal (:func:`raise_for` turns the
        outcome into the error).
        """
        outcome = Outcome()
        async with anyio.create_task_group() as tg:
            for p, items in groups.items():
                tg.start_soon(self._partition, p, items, claims[p], outcome)
        return outcome

    async def _partition(
        self, p: int, items: Sequence[tuple[int, Transition]], claim: int, outcome: Outcome
    ) -> None:
        step = MAX_BATCH - 1
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            try:
                async with self._limiter:
                    try:
                        seq = await self._batch(p, chunk, claim)
                    except BatchRefused as e:
                        if e.err_code != DUPLICATE_IN_BATCH:
                            raise
                        # Some were stored before (a retry whose first answer was lost):
                        # one at a time, the broker says which, and stores the others.
                        seq = await self._one_by_one(p, chunk, claim)
            except BatchRefused as e:
                if is_fenced_error(e.err_code, e.description):
                    outcome.fenced[p] = e.description
                else:
                    outcome.failed.append(f"partition {p}: {e}")
                return
            except (TimeoutError, nats.errors.Error) as e:
                outcome.failed.append(f"partition {p}: {type(e).__name__} {e}".rstrip())
                return
            outcome.confirmed.update(i for i, _ in chunk)
            outcome.progress[p] = seq

    def _messages(
        self, p: int, chunk: Sequence[tuple[int, Transition]], claim: int
    ) -> list[tuple[str, bytes, dict[str, str]]]:
        out: list[tuple[str, bytes, dict[str, str]]] = []
        last: dict[str, int] = {}
        token = str(p)
        for _, t in chunk:
            out.append(
                (
                    segment_subject(t.segment, t.change),
                    _encoder.encode(t),
                    {"Nats-Msg-Id": t.msg_id, PARTITION_HEADER: token},
                )
            )
            last[t.customer_id] = t.version
        progress = Progress(claim=claim, versions=list(last.items()))
        out.append((progress_subject(p), _encoder.encode(progress), fence_headers(p, claim)))
        return out

    async def _batch(self, p: int, chunk: Sequence[tuple[int, Transition]], claim: int) -> int:
        """One atomic batch; the stream sequence of its progress record.

        Raises:
            BatchRefused: the broker refused it.
            TimeoutError, nats.errors.Error: no answer.
        """
        messages = self._messages(p, chunk, claim)
        self._ids += 1
        number = self._ids
        batch = {"Nats-Batch-Id": f"{self._prefix}-{number}"}
        nc, n = self._nc, len(messages)
        for i, (subject, body, headers) in enumerate(messages, 1):
            headers.update(batch)
            headers["Nats-Batch-Sequence"] = str(i)
            if i == n:
                headers["Nats-Batch-Commit"] = "1"
                await _maybe_killed("before", number, nc)
                reply = await nc.request(subject, body, timeout=self._timeout, headers=headers)
                stored = self._stored(reply.data, reply.headers)
                await _maybe_killed("after", number, nc)
                return stored
            if i == 1:
                # Its answer is empty once the batch is open; else why it is not.
                first = await nc.request(subject, body, timeout=self._timeout, headers=headers)
                if first.data or (first.headers or {}).get("Status") == "503":
                    self._stored(first.data, first.headers)
            else:
                await self._wire.publish(subject, body, headers)
                if i % 500 == 0:
                    await anyio.lowlevel.checkpoint()
        raise AssertionError("unreachable: a batch has at least two messages")

    async def _one_by_one(self, p: int, chunk: Sequence[tuple[int, Transition]], claim: int) -> int:
        """The batch's messages one at a time, each fenced: those the stream holds already
        are acknowledged as duplicates, the others stored. The sequence of the progress
        record."""
        fence = fence_headers(p, claim)
        seq = 0
        for subject, body, headers in self._messages(p, chunk, claim):
            headers.update(fence)
            reply = await self._nc.request(subject, body, timeout=self._timeout, headers=headers)
            seq = self._stored(reply.data, reply.headers)
        return seq

    @staticmethod
    def _stored(data: bytes, headers: dict[str, str] | None) -> int:
        if (headers or {}).get("Status") == "503":
            raise BatchRefused(503, "no stream is listening on the subject (503 no responders)")
        refused = _error_of(data)
        if refused is not None:
            raise refused
        ack: dict[str, Any] = json.loads(data)
        return int(ack["seq"])


def raise_for(outcome: Outcome, total: int) -> None:
    """Raise the error an incomplete :class:`Outcome` of ``total`` transitions stands for.

    Raises:
        FencedOut: a partition's fence refused its batch.
        PublishError: some were not stored for another reason.
    """
    confirmed = frozenset(outcome.confirmed)
    if outcome.fenced:
        raise FencedOut(outcome.fenced, confirmed=confirmed)
    if outcome.failed:
        raise PublishError(
            f"the broker stored {len(confirmed)} of {total} transitions: {outcome.failed[0]}",
            confirmed=confirmed,
        )


async def published_versions(
    nc: Client, stream: str, partition: int, *, after: int
) -> dict[str, int]:
    """Per customer of ``partition``, the last version its progress records after stream
    position ``after`` say was stored: what a new owner, rebuilding the partition from a
    snapshot taken at ``after``, must not publish again.

    Raises:
        BrokerError: the stream cannot be read.
        ProtocolError: a progress record is not one (the stream's subjects are shoal's).
    """
    versions: dict[str, int] = {}
    async for chunk in read_stream(nc, stream, progress_subject(partition), after=after):
        for d in chunk:
            try:
                record = PROGRESS_DECODER.decode(d.data)
            except msgspec.DecodeError as e:
                raise ProtocolError(
                    f"{d.subject} at position {d.stream_sequence} of {stream} is not a "
                    f"progress record: {e}"
                ) from e
            for customer_id, version in record.versions:
                if version > versions.get(customer_id, 0):
                    versions[customer_id] = version
    return versions
