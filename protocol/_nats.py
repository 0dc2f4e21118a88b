"""The NATS edge: connecting, declaring streams, consuming events, publishing results.

Nothing here knows about SQLite or about segment rules: it moves bytes and acknowledgements.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ._errors import BrokerError, ProtocolError
from ._subjects import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
    segment_subject,
)
from ._time import from_instant
from ._types import Rejection, Transition

_CONNECT_TIMEOUT = 5.0
_FIRST_CONNECT_ATTEMPTS = 3
_transition_encoder = msgspec.json.Encoder()


class PublishError(ProtocolError):
    """A message could not be published and confirmed; it is kept for another try."""


async def connect(servers: Sequence[str], *, name: str = "shoal") -> Client:
    """Connect to NATS, reconnecting for ever after a drop once connected.

    Raises:
        BrokerError: no server could be reached at first.
    """
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e) or type(e).__name__)

    try:
        # nats-py applies max_reconnect_attempts to the first connection too, and -1 would
        # retry an unreachable server for ever: bound the first, then reconnect for ever.
        nc = await nats.connect(
            servers=list(servers),
            name=name,
            connect_timeout=_CONNECT_TIMEOUT,
            allow_reconnect=True,
            max_reconnect_attempts=_FIRST_CONNECT_ATTEMPTS,
            reconnect_time_wait=0.5,
            error_cb=on_error,
        )
    except (TimeoutError, OSError, nats.errors.Error) as e:
        why = errors[-1] if errors else (str(e) or type(e).__name__)
        raise BrokerError(f"cannot reach NATS at {', '.join(servers)}: {why}") from e
    nc.options["max_reconnect_attempts"] = -1
    return nc


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How long the broker keeps messages and for how long it drops duplicates.

    ``segments_duplicate_window`` must outlast an engine restart: a transition published
    again after a crash carries the same ``Nats-Msg-Id`` and is dropped inside it.
    """

    events_duplicate_window: float = 120.0
    segments_duplicate_window: float = 600.0
    rejected_max_age: float = 30 * 24 * 3600.0


async def ensure_streams(js: JetStreamContext, settings: StreamSettings | None = None) -> None:
    """Create the three streams, or update them to this configuration (idempotent).

    Raises:
        BrokerError: JetStream is not enabled, or a stream cannot be created or updated.
    """
    s = settings or StreamSettings()
    configs = [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=s.events_duplicate_window,
        ),
        StreamConfig(
            name=SEGMENTS_STREAM,
            subjects=[SEGMENTS_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=s.segments_duplicate_window,
        ),
        StreamConfig(
            name=REJECTED_STREAM,
            subjects=[REJECTED_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=s.rejected_max_age,
        ),
    ]
    for config in configs:
        try:
            try:
                await js.stream_info(config.name)  # type: ignore[arg-type]
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
            else:
                await js.update_stream(config)
        except nats.js.errors.ServiceUnavailableError as e:
            raise BrokerError(
                "JetStream is not enabled on the NATS server (start it with -js)"
            ) from e
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot set up stream {config.name}: {e}") from e


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event message as delivered by the broker."""

    subject: str
    data: bytes
    stream_sequence: int
    received: int
    """When the broker stored it: microseconds since the epoch."""
    pending: int
    """How many messages the consumer had still to deliver after this one."""
    msg_id: str | None
    """The ``Nats-Msg-Id`` header, when the producer set one."""


class DeliveryGapError(ProtocolError):
    """A delivery was skipped: acknowledging past it would lose it, so the engine must stop
    and restart from the broker's acknowledgement floor."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(
            f"consumer delivery {expected} never reached the engine (next was {got}); "
            "stopping so that it is delivered again on restart"
        )
        self.expected = expected
        self.got = got


def _parse_ack_reply(reply: str) -> tuple[int, int, int, int]:
    """(stream sequence, consumer sequence, timestamp in µs, pending) from an ack subject.

    nats-py's ``Msg.metadata`` goes through a float and loses microseconds, hence our own.
    """
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[7]) // 1000, int(t[8])
    if len(t) >= 11:  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>...
        return int(t[7]), int(t[8]), int(t[9]) // 1000, int(t[10])
    raise ProtocolError(f"not a JetStream ack subject: {reply!r}")


class EventFeed:
    """The engine's durable consumer on ``SHOAL_EVENTS``, delivering in micro-batches.

    A push consumer with ``AckPolicy.ALL``: the broker delivers up to ``max_in_flight``
    unacknowledged messages into a buffer, :meth:`take` hands them out in order, and
    :meth:`ack_taken` acknowledges a whole batch with one message (its last). ``max_in_flight``
    bounds memory: when the engine is slow the broker waits.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        durable: str = "shoal-engine",
        filter_subject: str = EVENTS_WILDCARD,
        max_in_flight: int = 20_000,
        ack_wait: float = 30.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._durable = durable
        self._filter = filter_subject
        self._max_in_flight = max_in_flight
        self._ack_wait = ack_wait
        self._buffer: deque[Msg] = deque()
        self._ready = asyncio.Event()
        self._sub: Any = None
        self._last_taken: Msg | None = None
        self._last_cseq = 0
        self.pending_at_start = 0
        """Messages waiting for this consumer when it started, delivered or not (its backlog)."""

    async def start(self) -> None:
        """Create or bind the durable consumer and start receiving.

        Raises:
            BrokerError: the consumer cannot be created or bound.
        """

        async def on_msg(msg: Msg) -> None:
            self._buffer.append(msg)
            self._ready.set()

        try:
            start = await self._reset_consumer()
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot set up consumer {self._durable!r}: {e}") from e
        config = ConsumerConfig(
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
            opt_start_seq=start,
            max_ack_pending=self._max_in_flight,
            ack_wait=self._ack_wait,
        )
        try:
            # flow_control and idle_heartbeat must be given to subscribe() itself: it
            # overwrites the ConsumerConfig's flow_control with its own argument.
            self._sub = await self._js.subscribe(
                self._filter,
                durable=self._durable,
                stream=EVENTS_STREAM,
                cb=on_msg,
                manual_ack=True,
                config=config,
                flow_control=True,
                idle_heartbeat=5.0,
                # The broker sends at most max_in_flight unacknowledged messages, so the
                # client never has to drop one as a slow consumer.
                pending_msgs_limit=self._max_in_flight * 2,
                pending_bytes_limit=self._max_in_flight * 2 * 1024 * 1024,
            )
            info = await self._sub.consumer_info()
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot start consumer {self._durable!r}: {e}") from e
        # Delivered but not yet in our buffer counts too: it is on its way to us.
        self.pending_at_start = int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def _reset_consumer(self) -> int | None:
        """Delete an existing durable consumer; return the stream sequence to resume from.

        A previous engine may have stopped (or died) holding deliveries it never
        acknowledged: the broker would resend them only after ``ack_wait``, and meanwhile
        they do not count as pending, so the engine would not know to wait for them.
        Recreating the consumer just past its acknowledgement floor brings them back at once,
        counted in the backlog, and applies this version's consumer settings.

        Raises:
            BrokerError: another engine is consuming from it right now.
        """
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            return None
        if info.push_bound:
            raise BrokerError(
                f"consumer {self._durable!r} of stream {EVENTS_STREAM} is in use by another "
                "engine; stop it, or give this engine another consumer name (--consumer)"
            )
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await self._js.delete_consumer(EVENTS_STREAM, self._durable)
        return int(floor or 0) + 1

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` buffered deliveries, in order, without waiting."""
        out: list[Delivery] = []
        buf = self._buffer
        while buf and len(out) < limit:
            msg = buf.popleft()
            seq, cseq, received, pending = _parse_ack_reply(msg.reply)
            # With AckPolicy.ALL one ack covers every earlier delivery, so a delivery the
            # client dropped (slow consumer) must stop us before we acknowledge past it.
            if self._last_cseq and cseq > self._last_cseq + 1:
                raise DeliveryGapError(self._last_cseq + 1, cseq)
            self._last_cseq = max(self._last_cseq, cseq)
            headers = msg.headers
            out.append(
                Delivery(
                    subject=msg.subject,
                    data=msg.data,
                    stream_sequence=seq,
                    received=received,
                    pending=pending,
                    msg_id=headers.get("Nats-Msg-Id") if headers else None,
                )
            )
            self._last_taken = msg
        if not buf:
            self._ready.clear()
        return out

    @property
    def buffered(self) -> int:
        """How many deliveries are waiting in the buffer."""
        return len(self._buffer)

    def oldest_buffered_received(self) -> int | None:
        """The receive instant of the oldest buffered delivery, if any."""
        if not self._buffer:
            return None
        return _parse_ack_reply(self._buffer[0].reply)[2]

    async def wait(self) -> None:
        """Return when deliveries are buffered."""
        await self._ready.wait()

    async def ack_taken(self) -> None:
        """Acknowledge every delivery handed out by :meth:`take` so far (one message)."""
        last = self._last_taken
        if last is None:
            return
        self._last_taken = None
        await self._nc.publish(last.reply, b"+ACK")

    async def stop(self) -> None:
        """Stop receiving; the durable consumer stays on the broker. Idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


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
    """

    def __init__(self, nc: Client, *, timeout: float = 10.0) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._timeout = timeout
        self._prefix = nc.new_inbox()
        self._sub: Any = None
        self._batches: dict[str, _Acks] = {}
        self._ids = itertools.count()

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
        """
        if not transitions:
            return
        token = str(next(self._ids))
        acks = self._batches[token] = _Acks(len(transitions))
        reply = f"{self._prefix}.{token}"
        try:
            for t in transitions:
                await self._nc.publish(
                    segment_subject(t.segment, t.change),
                    _transition_encoder.encode(t),
                    reply=reply,
                    headers={"Nats-Msg-Id": t.msg_id},
                )
            with anyio.fail_after(self._timeout):
                await acks.done.wait()
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

    async def publish_rejection(
        self,
        *,
        reason: str,
        subject: str,
        data: bytes,
        received: int,
        stream_sequence: int | None,
    ) -> None:
        """Publish a :class:`Rejection` on ``shoal.rejected`` and wait for the broker.

        Raises:
            PublishError: it was not confirmed.
        """
        try:
            text: str | None = data.decode("utf-8")
            b64 = None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(data).decode("ascii")
        body = Rejection(
            reason=reason,
            subject=subject,
            received_at=from_instant(received),
            stream_sequence=stream_sequence,
            payload=text,
            payload_base64=b64,
        )
        headers = None
        if stream_sequence is not None:
            headers = {"Nats-Msg-Id": f"rejected:{stream_sequence}:{received}"}
        try:
            await self._js.publish(
                REJECTED_SUBJECT,
                msgspec.json.encode(body),
                headers=headers,
                timeout=self._timeout,
            )
        except (TimeoutError, nats.errors.Error) as e:
            raise PublishError(f"could not publish a rejection: {e}") from e


async def iter_transitions(
    nc: Client, filter_subject: str, *, from_start: bool = False
) -> AsyncIterator[Transition]:
    """Transitions on ``filter_subject`` as they are published (and, with ``from_start``,
    all that ``SHOAL_SEGMENTS`` still holds first, through an ordered consumer)."""
    decoder = msgspec.json.Decoder(Transition)
    sub: Any
    if from_start:
        js = nc.jetstream()
        sub = await js.subscribe(filter_subject, ordered_consumer=True)
    else:
        sub = await nc.subscribe(filter_subject)
    try:
        async for msg in sub.messages:
            yield decoder.decode(msg.data)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
