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
import structlog
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
from ._ports import Delivery, PublishError
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
_FLUSH_TIMEOUT = 5
_MAX_RETRY_DELAY = 2.0
"""Seconds at most between two attempts to restart the consumer while NATS is away."""
_BOUND_GRACE = 5.0
"""Seconds a consumer may look bound to someone else's subscription before it is refused."""
_CONNECTION_CHECK = 0.05
"""Seconds between two looks at the connection while waiting for the broker."""
_logger = structlog.get_logger("shoal.feed")
_transition_encoder = msgspec.json.Encoder()


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


class _ConsumerInUse(BrokerError):
    def __init__(self, durable: str) -> None:
        super().__init__(
            f"consumer {durable!r} of stream {EVENTS_STREAM} is in use by another engine; "
            "stop it, or give this engine another consumer name (--consumer)"
        )


class EventFeed:
    """The engine's durable consumer on ``SHOAL_EVENTS``, delivering in micro-batches.

    A push consumer with ``AckPolicy.ALL``: the broker delivers up to ``max_in_flight``
    unacknowledged messages into a buffer, :meth:`take` hands them out in order, and
    :meth:`ack_taken` acknowledges a whole batch with one message (its last). ``max_in_flight``
    bounds memory: when the engine is slow the broker waits.

    One acknowledgement covers every earlier delivery, so the feed never hands out a delivery
    that follows one it did not receive. When a delivery is missing, or the connection was
    lost (deliveries on their way are lost with it), :attr:`needs_restart` turns true: the
    engine acknowledges what it took, then calls :meth:`restart`, which starts the consumer
    again just past what was acknowledged, so the broker delivers the rest at once rather
    than after ``ack_wait``.
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
        self._deliver: str | None = None
        # Bumped for each subscription: a message still queued for an old one is dropped.
        self._generation = 0
        self._reconnects = 0
        self._broken = False
        self._last_taken: Msg | None = None
        self._last_cseq = 0
        self._last_stamp = -(1 << 62)  # the broker's stamp of the latest delivery taken
        self._taken_through = 0
        self._acked_through = 0
        self._resume_from = 1
        self.pending_at_start = 0
        """Messages waiting for this consumer when it (re)started, delivered or not (its
        backlog)."""

    @property
    def consumer(self) -> str:
        """The durable consumer's name."""
        return self._durable

    @property
    def filter_subject(self) -> str:
        """The subjects it reads."""
        return self._filter

    @property
    def needs_restart(self) -> bool:
        """True once a delivery went missing or the connection was lost since (re)start.

        :meth:`take` then hands out nothing past the loss; acknowledge what was taken and
        call :meth:`restart`.
        """
        return self._broken or self._nc.stats["reconnects"] != self._reconnects

    async def start(self) -> None:
        """Create or bind the durable consumer and start receiving.

        Raises:
            BrokerError: the consumer cannot be created or bound.
        """
        try:
            await self._open(own=None)
        except BrokerError:
            raise
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot start consumer {self._durable!r}: {e}") from e

    async def restart(self) -> None:
        """Start the consumer again just past the last acknowledged delivery.

        Call it once every delivery taken is committed and acknowledged: the buffer is
        dropped, and what was not acknowledged is delivered again at once, counted in
        :attr:`pending_at_start`. While the client is disconnected this waits for it to
        reconnect (it does so by itself); while the broker fails the requests, it tries
        again, at most 2 s apart.

        Raises:
            BrokerError: another engine consumes from the consumer now, or the connection is
                closed for good.
        """
        delay = 0.1
        bound_since: float | None = None
        while True:
            await self._wait_connected()
            try:
                # The last acknowledgement reaches the broker before its floor is read.
                await self._nc.flush(timeout=_FLUSH_TIMEOUT)
                await self._close_subscription()
                await self._open(own=self._deliver)
            except _ConsumerInUse:
                # Give a subscription that just went away a moment to be noticed.
                now = anyio.current_time()
                if bound_since is None:
                    bound_since = now
                elif now - bound_since > _BOUND_GRACE:
                    raise
                await anyio.sleep(0.2)
            except (TimeoutError, nats.errors.Error) as e:
                if self._nc.is_closed:
                    raise BrokerError(
                        f"cannot restart consumer {self._durable!r}: the connection to NATS "
                        "is closed"
                    ) from e
                _logger.warning(
                    "consumer not restarted; retrying",
                    consumer=self._durable,
                    error=str(e) or type(e).__name__,
                    retry_in=delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
            else:
                if not self.needs_restart:
                    return
                # The connection dropped again meanwhile: what this subscription receives
                # is dropped, so start over.

    async def _wait_connected(self) -> None:
        """Return once the client is connected (it reconnects by itself).

        Raises:
            BrokerError: the connection is closed for good.
        """
        waited = False
        while not self._nc.is_connected:
            if self._nc.is_closed:
                raise BrokerError(
                    f"cannot restart consumer {self._durable!r}: the connection to NATS is closed"
                )
            if not waited:
                _logger.warning("waiting for NATS to restart the consumer", consumer=self._durable)
                waited = True
            await anyio.sleep(_CONNECTION_CHECK)

    async def _open(self, *, own: str | None) -> None:
        """Recreate the consumer past its acknowledgement floor, subscribe, count the backlog.

        ``own`` is the delivery subject of this feed's previous subscription: that consumer
        is not "in use by another engine" even if the broker still thinks it push-bound.
        """
        self._generation += 1
        generation = self._generation
        self._buffer.clear()
        self._ready.clear()
        self._last_taken = None
        self._last_cseq = 0
        self._broken = False
        self._reconnects = self._nc.stats["reconnects"]
        reconnects = self._reconnects

        async def on_msg(msg: Msg) -> None:
            if generation != self._generation:
                return  # queued for a subscription since given up
            if self._nc.stats["reconnects"] != reconnects:
                # Deliveries just before the drop may be lost, and acknowledging this one
                # would acknowledge them: leave it to restart() to deliver it again.
                self._ready.set()
                return
            self._buffer.append(msg)
            self._ready.set()

        floor = await self._reset_consumer(own)
        # Past what the broker recorded, past what this feed acknowledged (its last
        # acknowledgement may not have reached the floor yet), and past where it last
        # started (in case the consumer itself was lost): all of that is committed.
        start = max(floor or 0, self._acked_through) + 1
        start = self._resume_from = max(start, self._resume_from)
        # Nothing before the start is ours to receive (see fence()).
        self._taken_through = max(self._taken_through, start - 1)
        self._deliver = self._nc.new_inbox()
        config = ConsumerConfig(
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            max_ack_pending=self._max_in_flight,
            ack_wait=self._ack_wait,
            deliver_subject=self._deliver,
        )
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
        # Delivered but not yet in our buffer counts too: it is on its way to us.
        self.pending_at_start = int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def _reset_consumer(self, own: str | None) -> int | None:
        """Delete an existing durable consumer; return its acknowledgement floor (a stream
        sequence), or None when there was none.

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
        if info.push_bound and (own is None or info.config.deliver_subject != own):
            raise _ConsumerInUse(self._durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await self._js.delete_consumer(EVENTS_STREAM, self._durable)
        return int(floor or 0)

    async def _close_subscription(self) -> None:
        self._generation += 1
        sub, self._sub = self._sub, None
        self._buffer.clear()
        self._ready.clear()
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` buffered deliveries, in order, without waiting.

        Never one past a delivery that did not arrive: on such a gap this returns those
        before it, drops the rest of the buffer and sets :attr:`needs_restart`.
        """
        out: list[Delivery] = []
        buf = self._buffer
        while buf and len(out) < limit:
            msg = buf.popleft()
            seq, cseq, received, pending = _parse_ack_reply(msg.reply)
            # With AckPolicy.ALL one ack covers every earlier delivery: acknowledging past
            # a delivery that never reached us would lose it.
            if cseq != self._last_cseq + 1:
                _logger.warning(
                    "delivery gap; the consumer will restart",
                    consumer=self._durable,
                    expected=self._last_cseq + 1,
                    got=cseq,
                )
                self._broken = True
                buf.clear()
                break
            self._last_cseq = cseq
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
            self._taken_through = max(self._taken_through, seq)
            self._last_stamp = max(self._last_stamp, received)
        if not buf:
            self._ready.clear()
        return out

    @property
    def buffered(self) -> int:
        """How many deliveries are waiting in the buffer."""
        return len(self._buffer)

    @property
    def received_through(self) -> int:
        """The broker's stamp of the latest delivery that reached this feed (taken or in the
        buffer). The broker stamps in stream order, so every event still on its way to this
        feed is stamped no earlier."""
        if self._buffer:
            return max(self._last_stamp, _parse_ack_reply(self._buffer[-1].reply)[2])
        return self._last_stamp

    def oldest_buffered_received(self) -> int | None:
        """The receive instant of the oldest buffered delivery, if any."""
        if not self._buffer:
            return None
        return _parse_ack_reply(self._buffer[0].reply)[2]

    async def fence(self, *, timeout: float = 2.0) -> bool:
        """Whether every event the broker had stored when this was called has reached this
        feed (taken, or in the buffer), asking the broker once.

        The broker stamps an event when it stores it, but the event reaches the engine a
        little later: until it has, a deadline past its stamp must not fire (it would fire
        ahead of the event). A true answer rules that out for every instant before the call.
        Never raises: when the broker cannot answer (disconnected, slow), the answer is no.
        """
        if self._sub is None or not self._nc.is_connected or self.needs_restart:
            return False
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable, timeout=timeout)
        except (TimeoutError, nats.errors.Error):
            return False
        if info.num_pending:
            return False  # stored, not yet sent to us
        delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
        received = self._taken_through
        if self._buffer:
            received = max(received, _parse_ack_reply(self._buffer[-1].reply)[0])
        # Sent to us but not yet through the callback (it runs apart from this reply): no.
        return delivered <= received

    async def lag(self, *, timeout: float = 1.0) -> int | None:
        """How many events the broker holds for this consumer not yet acknowledged (stored
        and not yet sent, or sent and not yet acknowledged), asking the broker once; None
        when it does not answer."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable, timeout=timeout)
        except (TimeoutError, nats.errors.Error):
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def wait(self) -> None:
        """Return when deliveries are buffered (or :attr:`needs_restart` may have turned)."""
        await self._ready.wait()

    async def ack_taken(self) -> None:
        """Acknowledge every delivery handed out by :meth:`take` so far (one message).

        Call it only once they are all committed: :meth:`restart` resumes past them.

        Raises:
            BrokerError: the connection to NATS is closed for good.
        """
        last = self._last_taken
        if last is None:
            return
        self._last_taken = None
        self._acked_through = max(self._acked_through, self._taken_through)
        if not self._nc.is_connected and not self._nc.is_closed:
            # It would wait in the client's outgoing buffer, which a long outage can fill.
            # Once reconnected, needs_restart is true, and restart() resumes past it.
            return
        try:
            await self._nc.publish(last.reply, b"+ACK")
        except nats.errors.ConnectionClosedError as e:
            raise BrokerError(
                f"cannot acknowledge to consumer {self._durable!r}: the connection to NATS "
                "is closed"
            ) from e
        except nats.errors.Error:
            self._broken = True

    async def ack(self, through: int) -> None:
        """Acknowledge every delivery taken up to stream position ``through``."""
        await self.ack_taken()

    async def stop(self) -> None:
        """Stop receiving; the durable consumer stays on the broker. Idempotent."""
        await self._close_subscription()


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
        await self._connected()
        reconnects = self._nc.stats["reconnects"]
        token = str(next(self._ids))
        acks = self._batches[token] = _Acks(len(transitions))
        reply = f"{self._prefix}.{token}"
        try:
            for i, t in enumerate(transitions):
                if i % 500 == 499:
                    # nats-py's publish only buffers: let the loop serve others meanwhile.
                    await anyio.lowlevel.checkpoint()
                await self._nc.publish(
                    segment_subject(t.segment, t.change),
                    _transition_encoder.encode(t),
                    reply=reply,
                    headers={"Nats-Msg-Id": t.msg_id},
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
        await self._connected()
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


async def jetstream_ports(
    nc: Client,
    *,
    consumer: str = "shoal-engine",
    filter_subject: str = EVENTS_WILDCARD,
    max_in_flight: int = 20_000,
    streams: StreamSettings | None = None,
) -> tuple[EventFeed, Publisher]:
    """Declare the streams, then make an engine's ports on ``nc``: its event source (the
    durable ``consumer`` of ``filter_subject``) and its transition sink."""
    js = nc.jetstream()
    await ensure_streams(js, streams)
    feed = EventFeed(
        nc, js, durable=consumer, filter_subject=filter_subject, max_in_flight=max_in_flight
    )
    return feed, Publisher(nc)
