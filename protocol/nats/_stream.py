"""Reading a stream once from its start, up to where it ended when asked: what a store is
rebuilt from (``shoal rebuild --from-stream``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from protocol._errors import BrokerError
from protocol._ports import Delivery
from protocol._subjects import EVENTS_STREAM, REJECTED_STREAM, REJECTED_SUBJECT
from protocol._time import from_instant, to_instant
from protocol._types import Rejection
from protocol.nats._feed import _parse_ack_reply, delivery_of

_rejection = msgspec.json.Decoder(Rejection)
_IDLE = 5.0
"""Seconds without a message after which the broker is taken to have stopped sending."""


async def read_stream(
    nc: Client,
    stream: str,
    filter_subject: str,
    *,
    through: int | None = None,
    since: int | None = None,
    after: int | None = None,
    chunk: int = 10_000,
    pending_limit: int | None = None,
) -> AsyncGenerator[list[Delivery], None]:
    """The messages of ``stream`` on ``filter_subject``, in stream order, from its start (or
    the first stored at or after the instant ``since``, or the first after position
    ``after``) up to position ``through`` (default:
    its last message when this is called), in lists of up to ``chunk``. Each is given as the
    engine's source delivers it (stream position, receive instant, ``Nats-Msg-Id``). An
    ordered consumer reads them; no durable state is changed. Messages the client drops while
    the reader is busy (more than ``pending_limit`` queued, default two chunks) are read
    again: a gap in the consumer's delivery sequence starts it over past the last one kept.

    Raises:
        BrokerError: the stream does not exist, or the broker stops answering.
    """
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError as e:
        raise BrokerError(f"stream {stream} does not exist") from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {stream}: {e}") from e
    last = int(info.state.last_seq or 0)
    if through is not None:
        last = min(last, through)
    if not info.state.messages or last < max(int(info.state.first_seq or 0), (after or 0) + 1):
        return
    sub: Any = None
    try:
        start = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if after:
            start = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            )
        if since is not None:
            # Only when a message is stored after it: nats-py's ordered consumer takes the
            # first heartbeat of one starting past the end for a gap, and starts again from
            # the stream's first message.
            try:
                newest = await js.get_msg(stream, subject=filter_subject)
            except nats.js.errors.NotFoundError:
                return
            if newest.time is None or to_instant(newest.time) < since:
                return
            start = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=from_instant(since)
            )
        out: list[Delivery] = []
        kept: int | None = None  # the stream position of the last message handed out or held
        while True:
            sub = await js.subscribe(
                filter_subject,
                stream=stream,
                config=start,
                ordered_consumer=True,
                pending_msgs_limit=max(pending_limit or chunk * 2, 1),
            )
            consumer = await sub.consumer_info()
            delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
            if not consumer.num_pending and not delivered:
                break  # nothing (more) on the filter: nothing will come
            finished = False
            last_cseq = 0
            kept_before = kept
            while True:
                msg = _queued(sub)
                if msg is None:
                    await _answer_flow_control(nc, sub)
                    try:
                        msg = await sub.next_msg(timeout=_IDLE)
                    except nats.errors.TimeoutError:
                        # A flow-control request dropped with the rest stalls the consumer:
                        # start over, unless the last start brought nothing either.
                        if kept == kept_before:
                            raise
                        break
                seq, cseq, received, pending = _parse_ack_reply(msg.reply)
                if cseq != last_cseq + 1:
                    # Dropped from the client's queue while the reader was busy: nats-py's
                    # ordered consumer counts them as seen and would not fetch them again
                    # (nor would it after a reset of its own). Start over past the last kept.
                    break
                last_cseq = cseq
                if seq > last:
                    finished = True
                    break
                out.append(delivery_of(msg, seq, received, pending))
                kept = seq
                if seq == last or pending == 0:
                    finished = True
                    break
                if len(out) >= chunk:
                    await _answer_flow_control(nc, sub)
                    yield out
                    out = []
            if finished:
                break
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            sub = None
            if kept is not None:
                start = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=kept + 1
                )
        if out:
            yield out
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {stream}: {e}") from e
    finally:
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


def _queued(sub: Any) -> Msg | None:
    """The next message the client holds for ``sub`` already (None: none yet), taken off
    its queue as nats-py's ``next_msg`` takes it, but without the task, timer and uuid that
    ``next_msg`` makes for every message: those were most of the cost of reading a stream
    (a partition taken over reads all of its events). nats-py's private attributes, read
    as 2.16 has them: a client without them reads with ``next_msg`` only (None here)."""
    queue = getattr(sub, "_pending_queue", None)
    if queue is None or not hasattr(sub, "_pending_size") or queue.empty():
        return None
    msg: Msg = queue.get_nowait()
    sub._pending_size -= len(msg.data)
    queue.task_done()
    return msg


async def _answer_flow_control(nc: Client, sub: Any) -> None:
    """Answer the broker's flow-control request once what it counted is taken (what
    nats-py's ``next_msg`` does after each message); the ordered consumer's own task does
    the same only every 250 ms."""
    jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
    if jsi is None or not hasattr(jsi, "_fcr") or not hasattr(jsi, "_fciseq"):
        return
    jsi._active = True
    reply = jsi._fcr
    if reply and jsi.get_js_delivered() >= jsi._fciseq:
        jsi._fcr = None
        await nc.publish(reply)


async def rejected_positions(nc: Client) -> set[int]:
    """The positions of ``SHOAL_EVENTS`` that ``SHOAL_REJECTED`` names: the messages the
    engine rejected (none when there is no ``SHOAL_REJECTED``). Only the rejections stored
    since ``SHOAL_EVENTS`` was made count: an older one names a position of an earlier stream
    (one ``shoal migrate`` replaced).

    Raises:
        BrokerError: ``SHOAL_EVENTS`` does not exist, or the broker stops answering.
    """
    js = nc.jetstream()
    try:
        created = (await js.stream_info(EVENTS_STREAM)).created
    except nats.js.errors.NotFoundError as e:
        raise BrokerError(f"stream {EVENTS_STREAM} does not exist") from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {EVENTS_STREAM}: {e}") from e
    try:
        await js.stream_info(REJECTED_STREAM)
    except nats.js.errors.NotFoundError:
        return set()  # never made: nothing was rejected
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {REJECTED_STREAM}: {e}") from e
    since = to_instant(created) if created is not None else None
    found: set[int] = set()
    async for chunk in read_stream(nc, REJECTED_STREAM, REJECTED_SUBJECT):
        for d in chunk:
            if since is not None and d.received < since:
                continue
            try:
                seq = _rejection.decode(d.data).stream_sequence
            except msgspec.DecodeError:
                continue  # not shoal's: names nothing
            if seq is not None:
                found.add(seq)
    return found
