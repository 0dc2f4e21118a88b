"""Fences: a partition's claims, on ``shoal.fence.<partition>`` in the transitions stream.

The lease (:mod:`protocol.nats._leases`) says who should own a partition; the fence makes
sure that nobody else's output is stored. An owner claims the partition by publishing a
:class:`~protocol.FenceClaim` that expects the previous claim (its stream sequence, or 0 for
the first) to be the last message on the fence subject, and publishes each of the
partition's messages expecting its own claim to be that last message still
(:func:`fence_headers`). Once another engine claims, every publish under the old claim is
refused with error 10071, "wrong last sequence: N", N being the new claim.

A clustered stream also refuses, with error 10164 and no number, a publish that checks a
subject while another publish checking it is in flight: that is the publisher's own
collision, not a fence (send one fenced publish, or one batch, at a time per partition).
"""

from __future__ import annotations

import re

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from protocol._errors import BrokerError, Fenced, Unconfirmed, UnreadableRecord
from protocol._ownership import FENCE_DECODER, FenceClaim
from protocol._subjects import fence_subject

FENCED_OUT = 10071
"""The broker's error code when a subject's last sequence is not the one expected: under a
fence, another engine claimed the partition."""
IN_FLIGHT = 10164
"""A clustered stream's error code when another publish checking the same subject is in
flight: not a fence; one at a time per partition avoids it."""
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
_NO_MESSAGE = 10037
_WRONG_LAST_SAID = re.compile(r"wrong last sequence: (\d+)")
_encoder = msgspec.json.Encoder()


def fence_headers(partition: int, claim: int) -> dict[str, str]:
    """The headers of a publish fenced by claim ``claim`` (its stream sequence) on
    ``partition``: the broker stores it only while that claim is the last on the fence.

    A new dict each call: nats-py adds headers (``Nats-TTL``) to the dict it is given.
    """
    return {_EXPECTED: str(claim), _EXPECTED_SUBJECT: fence_subject(partition)}


def is_fenced_error(err_code: int | None, description: str | None = None) -> bool:
    """Whether the broker refused a fenced publish because another engine claimed the
    partition (error 10071, "wrong last sequence: N"); False for anything else, error 10164
    (the publisher's own messages in flight) included. ``description`` is enough when the
    code is lost (nats-py's ``KeyWrongLastSequenceError`` keeps only the description)."""
    if err_code is not None:
        return err_code == FENCED_OUT
    return _WRONG_LAST_SAID.fullmatch(description or "") is not None


def fenced(partition: int, err_code: int | None, description: str | None) -> Fenced | None:
    """The :class:`~protocol.Fenced` a refused fenced publish on ``partition`` means, with
    the claim that fenced it; None when the refusal means something else."""
    if not is_fenced_error(err_code, description):
        return None
    m = _WRONG_LAST_SAID.search(description or "")
    return Fenced(partition, fence_subject(partition), int(m.group(1)) if m else None)


async def last_claim(
    js: JetStreamContext, stream: str, partition: int
) -> tuple[int, FenceClaim] | None:
    """The last claim on ``partition`` in ``stream``, with its stream sequence; None when
    it was never claimed.

    Raises:
        UnreadableRecord: the last message on the fence subject is not a claim.
        BrokerError: the broker does not answer, or has no such stream.
    """
    subject = fence_subject(partition)
    try:
        msg = await js.get_msg(stream, subject=subject)
    except nats.js.errors.NotFoundError as e:
        if e.err_code in (None, _NO_MESSAGE):
            return None
        raise BrokerError(f"cannot read {subject} in stream {stream}: {_said(e)}") from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read {subject} in stream {stream}: {_said(e)}") from e
    seq = int(msg.seq or 0)
    try:
        claim = FENCE_DECODER.decode(msg.data or b"")
    except msgspec.DecodeError as e:
        raise UnreadableRecord(f"{subject} at sequence {seq} of stream {stream}", str(e)) from e
    if claim.partition != partition:
        raise UnreadableRecord(
            f"{subject} at sequence {seq} of stream {stream}",
            f"it claims partition {claim.partition}",
        )
    return seq, claim


async def claim_at(
    js: JetStreamContext, stream: str, partition: int, seq: int
) -> FenceClaim | None:
    """The claim on ``partition`` stored at sequence ``seq`` of ``stream``; None when that
    message is gone or is not one.

    Raises:
        BrokerError: the broker does not answer.
    """
    try:
        msg = await js.get_msg(stream, seq)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read message {seq} of stream {stream}: {_said(e)}") from e
    if msg.subject != fence_subject(partition):
        return None
    try:
        claim = FENCE_DECODER.decode(msg.data or b"")
    except msgspec.DecodeError:
        return None
    return claim if claim.partition == partition else None


async def claim_fence(
    js: JetStreamContext, stream: str, partition: int, claim: FenceClaim, expected: int
) -> int:
    """Publish ``claim`` on ``partition``'s fence, expecting the claim of sequence
    ``expected`` (0: none) to be the last: from then on, only publishes fenced by the new
    claim are stored.

    Returns:
        The new claim's stream sequence (for :func:`fence_headers`).

    Raises:
        ValueError: ``claim`` is not for ``partition``, or does not replace ``expected``.
        Fenced: the last claim is another (its sequence said): read it again.
        Unconfirmed: the broker did not confirm (another claim was in flight, no answer):
            read the last claim to tell whether this one was stored.
        BrokerError: the broker refused otherwise.
    """
    if claim.partition != partition or claim.previous != expected:
        raise ValueError(
            f"a claim on partition {partition} replacing claim {expected} cannot be {claim!r}"
        )
    subject = fence_subject(partition)
    try:
        ack = await js.publish(
            subject, _encoder.encode(claim), stream=stream, headers={_EXPECTED: str(expected)}
        )
    except nats.js.errors.APIError as e:
        refused = fenced(partition, e.err_code, e.description)
        if refused is not None:
            raise refused from e
        if e.err_code == IN_FLIGHT or isinstance(e, nats.js.errors.ServiceUnavailableError):
            raise Unconfirmed("a claim", subject, _said(e)) from e
        raise BrokerError(f"the broker refused a claim on {subject}: {_said(e)}") from e
    except (TimeoutError, nats.errors.Error) as e:
        raise Unconfirmed("a claim", subject, _said(e)) from e
    return int(ack.seq)


def _said(e: Exception) -> str:
    if isinstance(e, nats.js.errors.APIError):
        return f"{e.description or 'no description'} (error {e.err_code or e.code})"
    return str(e) or type(e).__name__
