"""Erasing forgotten customers from the broker's streams, one message at a time.

A message is deleted with ``$JS.API.STREAM.MSG.DELETE`` without ``no_erase``, which makes
nats-server overwrite it in its files (subject, headers and payload), where a purge only
drops it from the index and leaves the bytes until the block is compacted. So each message
of the customer is found and deleted by its sequence:

- ``SHOAL_EVENTS``: the messages on the customer's stored subject before its order
  (imported ones included); the order itself (it names the customer) is erased last, by
  :meth:`BrokerEraser.erase_events`, once the rest is done;
- ``SHOAL_REJECTED``: the rejections of messages on the customer's subjects, or whose
  payload's ``userId`` is the customer;
- ``SHOAL_SEGMENTS``: the customer's transitions but the ``forgotten`` exits. Transition
  subjects name the segment, not the customer (subscribers filter on them), so the stream
  is read and each transition's customer decoded: one pass per round of erasures, whatever
  their number;
- the partition's progress records naming the customer, once a snapshot of the partition
  taken after the erasure stands for them (:func:`erase_progress`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from protocol._errors import BrokerError, SubjectError
from protocol._ownership import PROGRESS_DECODER
from protocol._subjects import (
    EVENTS_STREAM,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    customer_of_event_subject,
    progress_subject,
    stored_event_subject,
)
from protocol._types import Rejection
from protocol.nats._refusals import permission_guard
from protocol.nats._stream import read_stream


class _Cause(msgspec.Struct):
    kind: str = ""


class _Whose(msgspec.Struct):
    """What erasure reads of a transition: whose it is, and why."""

    customer_id: str = ""
    cause: _Cause = msgspec.field(default_factory=_Cause)


class _Payload(msgspec.Struct):
    userId: str | None = None  # noqa: N815 - the wire name


_whose = msgspec.json.Decoder(_Whose)
_rejection = msgspec.json.Decoder(Rejection)
_payload = msgspec.json.Decoder(_Payload)


def _customer_of_subject(subject: str) -> str | None:
    try:
        return customer_of_event_subject(subject)
    except SubjectError:
        return None


class BrokerEraser:
    """Erases forgotten customers' messages from ``SHOAL_EVENTS``, ``SHOAL_REJECTED`` and
    ``SHOAL_SEGMENTS`` (the engine's port ``actors.engine.Eraser``).

    Args:
        nc: a connection with the engine role's permissions.
        partitions: how many partitions ``SHOAL_EVENTS`` has.
    """

    def __init__(self, nc: Client, partitions: int) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._partitions = partitions

    async def erase_customers(self, erasures: Sequence[tuple[str, int, int]]) -> None:
        """Erase each (customer id, partition, order position) (see the module's
        documentation), but the orders.

        Raises:
            BrokerError: the broker did not answer or refused; what was erased stays so,
                and the rest is found again by the next attempt.
        """
        if not erasures:
            return
        ids = {customer_id for customer_id, _, _ in erasures}
        async with permission_guard(self._nc):
            for customer_id, _, order in erasures:
                subject = stored_event_subject(customer_id, self._partitions)
                seqs = [
                    d.stream_sequence
                    async for chunk in read_stream(self._nc, EVENTS_STREAM, subject, through=order)
                    for d in chunk
                ]
                await self._delete(EVENTS_STREAM, [q for q in seqs if q != order])
            await self._delete(REJECTED_STREAM, await self._rejections(ids))
            await self._delete(SEGMENTS_STREAM, await self._transitions(ids))

    async def erase_events(self, sequences: Sequence[int]) -> None:
        """Erase these messages of ``SHOAL_EVENTS``.

        Raises:
            BrokerError: the broker did not answer or refused.
        """
        async with permission_guard(self._nc):
            await self._delete(EVENTS_STREAM, sequences)

    async def _rejections(self, ids: Collection[str]) -> list[int]:
        found: list[int] = []
        async for chunk in read_stream(self._nc, REJECTED_STREAM, REJECTED_SUBJECT):
            for d in chunk:
                try:
                    r = _rejection.decode(d.data)
                except msgspec.DecodeError:
                    continue
                if _customer_of_subject(r.subject) in ids:
                    found.append(d.stream_sequence)
                    continue
                if r.payload is not None:
                    try:
                        user = _payload.decode(r.payload).userId
                    except msgspec.DecodeError:
                        user = None
                    if user in ids:
                        found.append(d.stream_sequence)
        return found

    async def _transitions(self, ids: Collection[str]) -> list[int]:
        found: list[int] = []
        async for chunk in read_stream(self._nc, SEGMENTS_STREAM, SEGMENTS_WILDCARD):
            for d in chunk:
                try:
                    whose = _whose.decode(d.data)
                except msgspec.DecodeError:
                    continue
                if whose.customer_id in ids and whose.cause.kind != "forgotten":
                    found.append(d.stream_sequence)
        return found

    async def _delete(self, stream: str, sequences: Sequence[int]) -> None:
        await erase_messages(self._js, stream, sequences)


async def erase_messages(js: JetStreamContext, stream: str, sequences: Sequence[int]) -> None:
    """Delete these messages of ``stream`` (nats-server overwrites them in its files).

    Raises:
        BrokerError: the broker did not answer or refused.
    """
    for seq in sequences:
        try:
            await js.delete_msg(stream, seq)
        except nats.js.errors.APIError as e:
            if not _gone(e):
                raise BrokerError(f"cannot erase message {seq} of {stream}: {e}") from e
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot erase message {seq} of {stream}: {e}") from e


_DELETE_FAILED = 10057
"""JetStream's error code for a message delete that failed, with its reason."""
_GONE = ("no message found", "stream store EOF")
"""The reasons that say there is nothing to delete: erased already (by an attempt before
this one), or never written. Seen on nats-server 2.15.1 as a 500, not a 404."""


def _gone(e: nats.js.errors.APIError) -> bool:
    """Whether a refused delete found no message at its sequence (a 404 is no stream)."""
    return e.err_code == _DELETE_FAILED and (e.description or "") in _GONE


async def erase_progress(
    nc: Client, partition: int, customer_ids: Collection[str], *, through: int
) -> int:
    """Erase ``partition``'s progress records up to stream position ``through`` that name
    any of ``customer_ids``; return how many. Call it once a snapshot of the partition whose
    progress bound is ``through`` or later is stored: a new owner reads only the records
    after its snapshot's bound.

    Raises:
        BrokerError: the broker did not answer or refused.
    """
    ids = set(customer_ids)
    found: list[int] = []
    async with permission_guard(nc):
        async for chunk in read_stream(
            nc, SEGMENTS_STREAM, progress_subject(partition), through=through
        ):
            for d in chunk:
                try:
                    record = PROGRESS_DECODER.decode(d.data)
                except msgspec.DecodeError:
                    continue
                if any(customer_id in ids for customer_id, _ in record.versions):
                    found.append(d.stream_sequence)
        await erase_messages(nc.jetstream(), SEGMENTS_STREAM, found)
    return len(found)
