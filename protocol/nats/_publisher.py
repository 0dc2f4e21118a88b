"""The engine's transition sink on NATS: transitions and rejections published to
JetStream, confirmed by the broker."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from protocol._partitions import partition
from protocol._ports import PublishError
from protocol._subjects import (
    PARTITION_HEADER,
    REJECTED_SUBJECT,
    segment_subject,
)
from protocol._types import REJECTION_HEADROOM, Transition, encode_rejection
from protocol.nats._fenced import FencedPublisher, raise_for
from protocol.nats._refusals import permission_guard
from protocol.nats._wire import Wire

_CONNECTION_CHECK = 0.05
"""Seconds between two looks at the connection while waiting for the broker."""
_transition_encoder = msgspec.json.Encoder()


class _Acks:
    """The broker's answers to one batch of publishes."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acked = 0
        self.errors: list[str] = []
        self.done = anyio.Event()

    def answer(self, error: str | None) -> None:
        self.acked += 1
        if error is not None:
            self.errors.append(error)
        if self.acked >= self.expected:
            self.done.set()


class Publisher:
    """Publishes transitions and rejections to JetStream and waits for the broker's word.

    Transitions go out as plain publishes that share one reply subject per batch, and the
    broker's acknowledgements are counted there: nats-py's ``publish_async`` makes a future
    and a ``PubAck`` per message, which measured as half of the engine's main-thread time.
    Call :meth:`start` before publishing and :meth:`close` after.

    Given the number of ``partitions`` of ``SHOAL_EVENTS``, each transition carries its
    customer's partition in the header ``Shoal-Partition``.

    Once a partition is claimed (:meth:`claim`), the publisher is *fenced*: each partition's
    transitions go out as atomic batches that the broker stores only while the claim is the
    partition's last (:mod:`._fenced`), and a transition of a partition not claimed is
    refused with :class:`~protocol.FencedOut`.
    """

    def __init__(self, nc: Client, *, timeout: float = 10.0, partitions: int | None = None) -> None:
        self._nc = nc
        self._partitions = partitions
        self._claims: dict[int, int] | None = None
        self._fenced = FencedPublisher(nc, timeout=timeout)
        self._wire = Wire(nc)
        self.progress: dict[int, int] = {}
        """Per partition claimed, the stream sequence of the last progress record stored
        (fenced publishing only)."""
        self._js = nc.jetstream()
        self._timeout = timeout
        self._prefix = nc.new_inbox()
        self._sub: Any = None
        self._batches: dict[str, _Acks] = {}
        self._ids = itertools.count()

    @property
    def partitions(self) -> int | None:
        """The number of partitions of ``SHOAL_EVENTS`` its transitions are stamped with
        (None: not told, and no ``Shoal-Partition`` header)."""
        return self._partitions

    def claim(self, partition: int, claim: int) -> None:
        """Publish ``partition``'s transitions fenced on ``claim`` (the stream sequence of
        its record on ``shoal.fence.<partition>``) from now on."""
        if self._partitions is None:
            raise ValueError("a publisher told no number of partitions cannot be fenced")
        if self._claims is None:
            self._claims = {}
        self._claims[partition] = claim

    def unclaim(self, partition: int) -> None:
        """Stop publishing ``partition``'s transitions (its claim passed, or was given up)."""
        if self._claims is not None:
            self._claims.pop(partition, None)
        self.progress.pop(partition, None)

    @property
    def claims(self) -> dict[int, int]:
        """The partitions claimed, each with its claim (a copy)."""
        return dict(self._claims or {})

    async def start(self) -> None:
        """Subscribe to the replies. Idempotent."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_reply)

    async def close(self) -> None:
        """Stop listening for replies. Idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        acks = self._batches.get(msg.subject.rpartition(".")[2])
        if acks is None:
            return  # a late answer for a batch already given up on
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            acks.answer("no stream is listening on the subject (503 no responders)")
        elif b'"error"' in msg.data:
            acks.answer(msg.data.decode("utf-8", "replace"))
        else:
            acks.answer(None)

    async def publish_transitions(self, transitions: Sequence[Transition]) -> None:
        """Publish each on its segment subject with ``Nats-Msg-Id``; return once all are stored.

        Raises:
            PublishError: some were not confirmed (the broker drops repeats by message id, so
                publishing the same transitions again is safe).
            PermissionDenied: the credentials may not publish them.
        """
        if not transitions:
            return
        await self._connected()
        if self._claims is not None:
            await self._publish_fenced(transitions, self._claims)
            return
        reconnects = self._nc.stats["reconnects"]
        token = str(next(self._ids))
        acks = self._batches[token] = _Acks(len(transitions))
        reply = f"{self._prefix}.{token}"
        # Their subjects as written, for an error to show (segment names have capitals).
        subjects = {segment_subject(t.segment, t.change) for t in transitions}
        try:
            async with permission_guard(self._nc, *subjects):
                for i, t in enumerate(transitions):
                    if i % 500 == 499:
                        # nats-py's publish only buffers: let the loop serve others meanwhile.
                        await anyio.lowlevel.checkpoint()
                    headers = {"Nats-Msg-Id": t.msg_id}
                    if self._partitions is not None:
                        headers[PARTITION_HEADER] = str(partition(t.customer_id, self._partitions))
                    await self._wire.publish(
                        segment_subject(t.segment, t.change),
                        _transition_encoder.encode(t),
                        headers,
                        reply,
                    )
                with anyio.fail_after(self._timeout):
                    while not acks.done.is_set():
                        with anyio.move_on_after(_CONNECTION_CHECK):
                            await acks.done.wait()
                        if self._nc.stats["reconnects"] != reconnects or not self._nc.is_connected:
                            # What was on its way when the connection dropped is lost, with
                            # its answers: no use waiting for them.
                            raise PublishError(
                                f"the connection to NATS dropped with {acks.acked} of "
                                f"{len(transitions)} transitions confirmed"
                            )
        except TimeoutError as e:
            raise PublishError(
                f"the broker confirmed {acks.acked} of {len(transitions)} transitions "
                f"within {self._timeout:g} s"
            ) from e
        except nats.errors.Error as e:
            raise PublishError(f"could not publish {len(transitions)} transitions: {e}") from e
        finally:
            del self._batches[token]
        if acks.errors:
            raise PublishError(
                f"the broker refused {len(acks.errors)} of {len(transitions)} transitions: "
                f"{acks.errors[0]}"
            )

    async def _publish_fenced(
        self, transitions: Sequence[Transition], claims: dict[int, int]
    ) -> None:
        partitions = self._partitions
        assert partitions is not None  # claim() refuses a publisher without
        groups: dict[int, list[tuple[int, Transition]]] = {}
        for i, t in enumerate(transitions):
            groups.setdefault(partition(t.customer_id, partitions), []).append((i, t))
        unclaimed = {p: "no claim of this engine" for p in groups if p not in claims}
        for p in unclaimed:
            del groups[p]
        subjects = {segment_subject(t.segment, t.change) for t in transitions}
        try:
            async with permission_guard(self._nc, *subjects):
                outcome = await self._fenced.publish(groups, claims)
        except nats.errors.Error as e:
            raise PublishError(f"could not publish {len(transitions)} transitions: {e}") from e
        self.progress.update(outcome.progress)
        outcome.fenced.update(unclaimed)
        raise_for(outcome, len(transitions))

    async def publish(self, transitions: Sequence[Transition]) -> None:
        """As :meth:`publish_transitions` (the :class:`TransitionSink` port)."""
        await self.publish_transitions(transitions)

    async def _connected(self) -> None:
        """Return once the client is connected; publishing meanwhile would only fill its
        outgoing buffer.

        Raises:
            PublishError: not connected within the timeout, or the connection is closed.
        """
        with anyio.move_on_after(self._timeout):
            while not self._nc.is_connected:
                if self._nc.is_closed:
                    raise PublishError("the connection to NATS is closed")
                await anyio.sleep(_CONNECTION_CHECK)
            return
        raise PublishError(f"not connected to NATS for {self._timeout:g} s")

    async def publish_markers(self, markers: Sequence[tuple[str, bytes, str]]) -> None:
        """Publish each (subject, body, message id) into ``SHOAL_EVENTS`` and wait for the
        broker to store it.

        Raises:
            PublishError: some were not confirmed.
            PermissionDenied: the credentials may not publish them.
        """
        if not markers:
            return
        await self._connected()
        try:
            async with permission_guard(self._nc, *(m[0] for m in markers)):
                futures = [
                    await self._js.publish_async(
                        subject, body, headers={"Nats-Msg-Id": msg_id}, wait_stall=self._timeout
                    )
                    for subject, body, msg_id in markers
                ]
                with anyio.fail_after(self._timeout):
                    for f in futures:
                        await f
        except (TimeoutError, nats.errors.Error) as e:
            raise PublishError(f"could not publish {len(markers)} markers: {e}") from e

    async def publish_rejection(
        self,
        *,
        reason: str,
        subject: str,
        data: bytes,
        received: int,
        stream_sequence: int | None,
    ) -> None:
        """Publish a :class:`Rejection` on ``shoal.rejected`` and wait for the broker; one that
        would not fit in the broker's maximum payload is cut (see :func:`encode_rejection`).

        Raises:
            PublishError: it was not confirmed.
            PermissionDenied: the credentials may not publish it.
        """
        rejection, body = encode_rejection(
            reason=reason,
            subject=subject,
            data=data,
            received=received,
            stream_sequence=stream_sequence,
            max_bytes=self._nc.max_payload - REJECTION_HEADROOM,
        )
        msg_id = rejection.msg_id
        headers = None if msg_id is None else {"Nats-Msg-Id": msg_id}
        await self._connected()
        try:
            async with permission_guard(self._nc, REJECTED_SUBJECT):
                await self._js.publish(
                    REJECTED_SUBJECT,
                    body,
                    headers=headers,
                    timeout=self._timeout,
                )
        except (TimeoutError, nats.errors.Error) as e:
            raise PublishError(f"could not publish a rejection: {e}") from e
