"""The engine's event source on NATS: a durable push consumer of ``SHOAL_EVENTS``,
delivering in micro-batches and acknowledged up to a position."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
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
)

from protocol._errors import BrokerError, ProtocolError
from protocol._partitions import DEFAULT_PARTITIONS
from protocol._ports import Delivery, StreamState
from protocol._subjects import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    IMPORT_HEADER,
    RECEIVED_HEADER,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
)
from protocol.nats._refusals import permission_guard
from protocol.nats._undecodable import tolerate_undecodable_subjects

_FLUSH_TIMEOUT = 5
_MAX_RETRY_DELAY = 2.0
"""Seconds at most between two attempts to restart the consumer while NATS is away."""
_BOUND_GRACE = 5.0
"""Seconds a consumer may look bound to someone else's subscription before it is refused."""
_CONNECTION_CHECK = 0.05
"""Seconds between two looks at the connection while waiting for the broker."""
_START_FOR = 60.0
"""Seconds a consumer's start is tried again while the broker is unavailable or slow."""
_logger = structlog.get_logger("shoal.feed")


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
    :meth:`ack` acknowledges a whole batch with one message (its last). ``max_in_flight``
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
        partitions: int = DEFAULT_PARTITIONS,
        partition: int | None = None,
        ready: asyncio.Event | None = None,
        on_arrival: Callable[[int], None] | None = None,
        previous: Sequence[str] = (),
        start_after: int = 0,
        trust_previous: bool = True,
        retire: Sequence[str] = (),
    ) -> None:
        """``previous``: the consumers earlier claims of the partition read (see
        :meth:`start`); ``start_after``: the stream position up to which everything is
        committed already, where a new consumer starts after; ``trust_previous``: whether the
        earlier consumers' floors count (False: they are deleted, their floors ignored, for
        a partition taken over from another engine's claim)."""
        tolerate_undecodable_subjects(nc)
        self._previous = [name for name in previous if name != durable]
        self._trust_previous = trust_previous
        # Deleted at start, their floors ignored (older claims', perhaps another engine's).
        self._retire_only = [name for name in retire if name != durable]
        self._retired_floor: int | None = None
        # Told the stream position of each delivery as it arrives (PartitionedFeed's).
        self._on_arrival = on_arrival
        self._partition = partition
        self._nc = nc
        self._js = js
        self._durable = durable
        self._filter = filter_subject
        self._max_in_flight = max_in_flight
        self._ack_wait = ack_wait
        self._partitions = partitions
        # Each delivery with its ack reply parsed once, as it arrives: (stream sequence,
        # consumer sequence, timestamp in µs, pending), None when it is not an ack reply.
        self._buffer: deque[tuple[Msg, tuple[int, int, int, int] | None]] = deque()
        # Set when a delivery arrives; shared by the feeds of one PartitionedFeed.
        self._ready = ready or asyncio.Event()
        self._sub: Any = None
        self._deliver: str | None = None
        # Bumped for each subscription: a message still queued for an old one is dropped.
        self._generation = 0
        self._reconnects = 0
        self._broken = False
        # Taken and not yet acknowledged: (stream sequence, message), in order.
        self._unacked: deque[tuple[int, Msg]] = deque()
        self._last_cseq = 0
        self._last_stamp = -(1 << 62)  # the broker's stamp of the latest delivery taken
        self._taken_through = 0
        self._acked_through = 0
        self._resume_from = start_after + 1
        self.redelivered = 0
        """Deliveries the broker resent after ``ack_wait`` of events already handed out,
        and skipped."""
        self.pending_at_start = 0
        """Messages waiting for this consumer when it (re)started, delivered or not (its
        backlog)."""
        self._catch_up = 0
        self._backlog_cap: int | None = None
        self._received_max = 0
        self._arrived_cseq = 0  # the consumer sequence of the latest delivery arrived
        # On a replicated stream: behind until a delivery at or past this position (the
        # probe published at the start) is taken (see behind_until()).
        self._behind_until = 0

    @property
    def consumer(self) -> str:
        """The durable consumer's name."""
        return self._durable

    @property
    def filter_subject(self) -> str:
        """The subjects it reads."""
        return self._filter

    @property
    def partitions(self) -> int:
        """How many partitions ``SHOAL_EVENTS`` splits customers into (as given)."""
        return self._partitions

    @property
    def needs_restart(self) -> bool:
        """True once a delivery went missing or the connection was lost since (re)start.

        :meth:`take` then hands out nothing past the loss; acknowledge what was taken and
        call :meth:`restart`.
        """
        return self._broken or self._nc.stats["reconnects"] != self._reconnects

    async def start(self) -> None:
        """Create or bind the durable consumer and start receiving.

        The consumers of earlier claims (``previous``) are deleted first, whoever reads them:
        their claim has passed, and the new consumer starts past their acknowledgement
        floors (and past ``start_after``).

        Raises:
            BrokerError: the consumer cannot be created or bound
                (:class:`~protocol.PermissionDenied` when the credentials may not).
        """
        # A replicated stream's consumers are made by its leader: while one is elected (a
        # node lost, the cluster busy), the broker says it is unavailable for a moment.
        give_up = anyio.current_time() + _START_FOR
        delay = 0.1
        own: str | None = None
        while True:
            try:
                async with permission_guard(self._nc):
                    # A try after one that failed may find the consumer bound to that try's
                    # subscription: its own, not another engine's.
                    await self._open(own=own)
                return
            except BrokerError:
                raise
            except (TimeoutError, nats.errors.Error) as e:
                # Not found: deleted while being made (the partition's next owner retired it,
                # or the broker lost it with a node): made again; a partition no longer this
                # engine's is dropped once its lease is seen lost, and its output is fenced.
                transient = isinstance(
                    e,
                    TimeoutError
                    | nats.errors.TimeoutError
                    | nats.js.errors.ServiceUnavailableError
                    | nats.js.errors.NotFoundError,
                )
                if not transient or anyio.current_time() >= give_up:
                    raise BrokerError(f"cannot start consumer {self._durable!r}: {e}") from e
                _logger.warning(
                    "consumer not started yet; retrying", consumer=self._durable, error=str(e)
                )
                own = self._deliver
                await self._close_subscription()
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)

    async def restart(self) -> None:
        """Start the consumer again just past the last acknowledged delivery.

        Call it once every delivery taken is committed and acknowledged: the buffer is
        dropped, and what was not acknowledged is delivered again at once, counted in
        :attr:`pending_at_start`. While the client is disconnected this waits for it to
        reconnect (it does so by itself); while the broker fails the requests, it tries
        again, at most 2 s apart.

        Raises:
            BrokerError: another engine consumes from the consumer now, the connection is
                closed for good, or the credentials may not
                (:class:`~protocol.PermissionDenied`).
        """
        delay = 0.1
        bound_since: float | None = None
        while True:
            await self._wait_connected()
            try:
                # The last acknowledgement reaches the broker before its floor is read.
                await self._nc.flush(timeout=_FLUSH_TIMEOUT)
                await self._close_subscription()
                async with permission_guard(self._nc):
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
        self._unacked.clear()
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
            try:
                parsed: tuple[int, int, int, int] | None = _parse_ack_reply(msg.reply)
            except (ProtocolError, ValueError):
                parsed = None  # take() says what is wrong with it
            if parsed is not None:
                if parsed[1] != self._arrived_cseq + 1:
                    # One on its way was lost: nothing past it arrives until the restart
                    # (what is past it must not be taken for arrived by PartitionedFeed).
                    self._broken = True
                    self._ready.set()
                    return
                self._arrived_cseq = parsed[1]
                if parsed[0] <= self._acked_through:
                    # Resent after ack_wait though acknowledged: the acknowledgement was lost
                    # (a leader changed). Acknowledged again, or it stays pending for ever
                    # (take() skips it: the engine applied it).
                    with contextlib.suppress(nats.errors.Error):
                        await self._nc.publish(msg.reply, b"+ACK")
            self._buffer.append((msg, parsed))
            if parsed is not None:
                if parsed[0] > self._received_max:
                    self._received_max = parsed[0]
                if self._on_arrival is not None:
                    self._on_arrival(parsed[0])
            self._ready.set()

        floor = await self._reset_consumer(own)
        # Past what the broker recorded, past what this feed acknowledged (its last
        # acknowledgement may not have reached the floor yet), and past where it last
        # started (in case the consumer itself was lost): all of that is committed.
        start = max(floor or 0, self._acked_through) + 1
        start = self._resume_from = max(start, self._resume_from)
        self._received_max = start - 1
        self._arrived_cseq = 0
        # Nothing before the start is ours to receive (see fence()), and everything from it
        # on is to be taken again, even what was taken before and not acknowledged: it is
        # not a resend of something handed out (see take()).
        self._taken_through = start - 1
        self._deliver = self._nc.new_inbox()
        # One filter: nats-server 2.15 serves a consumer of several (filter_subjects) about
        # 50 times slower once the stream holds thousands of subjects (one per customer).
        # The import markers are in each partition's own subjects, so that a partition's
        # filter reads them too, in stream order.
        subject, filters = self._filter, None
        config = ConsumerConfig(
            filter_subjects=filters,
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
            subject,
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
        self._catch_up = self.pending_at_start
        self._backlog_cap = 0 if self.pending_at_start else None

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
        for name in list(self._retire_only):
            await self._retire(name)
            self._retire_only.remove(name)
        # Kept across tries: a try that failed after retiring them must not forget it.
        for name in list(self._previous):
            floor = await self._retire(name)
            if floor is not None and self._trust_previous:
                self._retired_floor = max(self._retired_floor or 0, floor)
            self._previous.remove(name)
        retired = self._retired_floor
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            return retired
        if info.push_bound and (own is None or info.config.deliver_subject != own):
            raise _ConsumerInUse(self._durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await self._js.delete_consumer(EVENTS_STREAM, self._durable)
        return max(int(floor or 0), retired or 0)

    async def _retire(self, name: str) -> int | None:
        """Delete the consumer of an earlier claim; its acknowledgement floor (None: gone).
        An engine still reading it was fenced out: its deliveries stop with it."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, name)
        except nats.js.errors.NotFoundError:
            return None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(EVENTS_STREAM, name)
        _logger.info("consumer of an earlier claim deleted", consumer=name, by=self._durable)
        return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0

    async def _close_subscription(self) -> None:
        self._generation += 1
        sub, self._sub = self._sub, None
        self._buffer.clear()
        self._ready.clear()
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def buffered_positions(self) -> list[int]:
        """The stream positions of the deliveries buffered (not taken), in order."""
        return [parsed[0] for _, parsed in self._buffer if parsed is not None]

    def head(self) -> int | None:
        """The stream position of the first buffered delivery, if any."""
        if not self._buffer:
            return None
        parsed = self._buffer[0][1]
        return parsed[0] if parsed is not None else 0

    @property
    def received_max(self) -> int:
        """The furthest stream position that reached this feed since it (re)started (before
        any, the last it acknowledged): every one of its own up to it arrived, or was
        acknowledged."""
        return self._received_max

    @property
    def acked_through(self) -> int:
        """The stream position up to which every delivery of its own was acknowledged."""
        return self._acked_through

    @property
    def resumed_from(self) -> int:
        """The stream position it last (re)started from: every earlier one of its own was
        acknowledged."""
        return self._resume_from

    def take(self, limit: int, through: int | None = None) -> list[Delivery]:
        """Up to ``limit`` buffered deliveries, in order, without waiting; with ``through``,
        none past that stream position.

        Never one past a delivery that did not arrive: on such a gap this returns those
        before it, drops the rest of the buffer and sets :attr:`needs_restart`.
        """
        out: list[Delivery] = []
        buf = self._buffer
        while buf and len(out) < limit:
            msg, parsed = buf[0]
            seq, cseq, received, pending = parsed or _parse_ack_reply(msg.reply)
            if through is not None and seq > through:
                break
            buf.popleft()
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
            if seq <= self._taken_through:
                # Resent after ack_wait while the engine still held it (a slow batch): it
                # was handed out already and the batch's acknowledgement covers it. Handing
                # it out again would reject (and count) a bad event twice.
                self.redelivered += 1
                continue
            out.append(delivery_of(msg, seq, received, pending, self._partition))
            self._unacked.append((seq, msg))
            self._taken_through = max(self._taken_through, seq)
            self._last_stamp = max(self._last_stamp, received)
        if not buf:
            self._ready.clear()
        if out:
            # Behind while the broker holds more for us, or the backlog counted at start
            # (some of it possibly still on its way to the buffer) has not all been taken.
            self._catch_up -= len(out)
            last = out[-1]
            behind = last.pending or self._catch_up > 0 or self._taken_through < self._behind_until
            self._backlog_cap = last.received if behind else None
        return out

    @property
    def backlog_cap(self) -> int | None:
        """While behind (see :class:`~protocol.EventSource`), the receive instant of the
        latest delivery taken (0 before the first): the deliveries still to come are stamped
        no earlier. None once caught up."""
        return self._backlog_cap

    def caught_up(self) -> None:
        """A whole idle period went by without a delivery: nothing counted at start is still
        on its way (unless the probe of a replicated stream was not taken yet)."""
        self._catch_up = 0
        if self._taken_through >= self._behind_until:
            self._backlog_cap = None

    def behind_until(self, seq: int) -> None:
        """Stay behind (deadlines held to the receive instant of the latest delivery taken)
        until a delivery at or past stream position ``seq`` is taken.

        On a replicated stream, an event stamped before the consumer started may still be
        on its way to being stored, uncounted in its backlog: the engine publishes a probe
        in the partition after starting the consumer, and waits for it here. Every event
        stamped before the probe is stored before it, so comes first.
        """
        self._behind_until = seq
        if self._taken_through < seq and self._backlog_cap is None:
            self._backlog_cap = self._last_taken_stamp()

    def _last_taken_stamp(self) -> int:
        return 0 if self._last_stamp < 0 else self._last_stamp

    @property
    def started(self) -> bool:
        """Whether it is receiving (started, not stopped)."""
        return self._sub is not None

    @property
    def has_unacked(self) -> bool:
        """Whether deliveries taken are not yet acknowledged."""
        return bool(self._unacked)

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
            return max(self._last_stamp, self._stamp(-1))
        return self._last_stamp

    def oldest_buffered_received(self) -> int | None:
        """The receive instant of the oldest buffered delivery, if any."""
        if not self._buffer:
            return None
        return self._stamp(0)

    def _stamp(self, i: int) -> int:
        msg, parsed = self._buffer[i]
        return (parsed or _parse_ack_reply(msg.reply))[2]

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
        # Sent to us but not yet through the callback (it runs apart from this reply): no.
        # Counted in deliveries, not stream positions: a clustered server moves a filtered
        # consumer's delivered stream position on past messages it does not match.
        return self.sent_all(info)

    def sent_all(self, info: Any) -> bool:
        """Whether every delivery the consumer's ``info`` counts has reached this feed."""
        delivered = int(info.delivered.consumer_seq or 0) if info.delivered else 0
        return delivered <= self._arrived_cseq

    async def lag(self, *, timeout: float = 1.0) -> int | None:
        """How many events the broker holds for this consumer not yet acknowledged (stored
        and not yet sent, or sent and not yet acknowledged), asking the broker once; None
        when it does not answer."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable, timeout=timeout)
        except (TimeoutError, nats.errors.Error):
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def holds(self, partition: int, after: int, through: int) -> bool:
        # One consumer of every subject reports no partition floors: never asked.
        return True

    async def stream_state(self) -> StreamState:
        """``SHOAL_EVENTS``'s size and this consumer's acknowledgement floor (None: the
        consumer does not exist yet), asking the broker.

        Raises:
            BrokerError: the broker does not answer.
        """
        try:
            stream = await self._js.stream_info(EVENTS_STREAM)
            floor = await self.ack_floor()
            published = await transitions_published(self._js)
        except (TimeoutError, nats.errors.Error) as e:
            raise BrokerError(f"cannot read the state of stream {EVENTS_STREAM}: {e}") from e
        return StreamState(
            stream=EVENTS_STREAM,
            messages=int(stream.state.messages or 0),
            ack_floor=floor,
            published=published,
        )

    async def ack_floor(self) -> int | None:
        """The consumer's acknowledgement floor; before it exists, the furthest of the
        earlier claims' consumers it replaces; None when none exists.

        Raises:
            TimeoutError, nats.errors.Error: the broker does not answer.
        """
        found = await self.acknowledged()
        return None if found is None else found[1]

    async def acknowledged(self) -> tuple[str, int] | None:
        """As :meth:`ack_floor`, with the name of the consumer whose floor it is.

        Raises:
            TimeoutError, nats.errors.Error: the broker does not answer.
        """
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            pass
        else:
            return self._durable, int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        found: tuple[str, int] | None = None
        for name in self._previous if self._trust_previous else ():
            try:
                info = await self._js.consumer_info(EVENTS_STREAM, name)
            except nats.js.errors.NotFoundError:
                continue
            floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
            if found is None or floor > found[1]:
                found = name, floor
        return found

    async def wait(self) -> None:
        """Return when deliveries are buffered (or :attr:`needs_restart` may have turned)."""
        await self._ready.wait()

    async def ack(self, through: int) -> None:
        """Acknowledge every delivery taken up to stream position ``through`` (one message:
        with ``AckPolicy.ALL`` the acknowledgement of one covers every earlier one).

        Call it only once they are all committed: :meth:`restart` resumes past them.

        Raises:
            BrokerError: the connection to NATS is closed for good.
        """
        unacked = self._unacked
        last: Msg | None = None
        while unacked and unacked[0][0] <= through:
            last = unacked.popleft()[1]
        if last is None:
            return
        self._acked_through = max(self._acked_through, min(through, self._taken_through))
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

    async def stop(self) -> None:
        """Stop receiving; the durable consumer stays on the broker. Idempotent."""
        await self._close_subscription()


async def transitions_published(js: JetStreamContext) -> int:
    """How many transitions ``SHOAL_SEGMENTS`` holds (0 when it does not exist): published
    by an engine before.

    Raises:
        TimeoutError, nats.errors.Error: the broker does not answer.
    """
    try:
        # The stream also holds the partitions' claims and progress records: not counted.
        info = await js.stream_info(SEGMENTS_STREAM, subjects_filter=SEGMENTS_WILDCARD)
    except nats.js.errors.NotFoundError:
        return 0
    return sum((info.state.subjects or {}).values())


def delivery_of(
    msg: Msg, seq: int, received: int, pending: int, partition: int | None = None
) -> Delivery:
    """The :class:`Delivery` of a JetStream message (its ack reply already parsed), read by
    the consumer of ``partition`` (None: of several, or unknown)."""
    headers = msg.headers
    if not headers:
        return Delivery(
            subject=msg.subject,
            data=msg.data,
            stream_sequence=seq,
            received=received,
            pending=pending,
            msg_id=None,
            partition=partition,
        )
    return Delivery(
        subject=msg.subject,
        data=msg.data,
        stream_sequence=seq,
        received=received,
        pending=pending,
        msg_id=headers.get("Nats-Msg-Id"),
        import_id=headers.get(IMPORT_HEADER),
        received_at=headers.get(RECEIVED_HEADER),
        partition=partition,
    )
