"""Wiring an engine to NATS: its two ports on one connection, and reading transitions as
they are published."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from protocol._errors import BrokerError
from protocol._subjects import EVENTS_STREAM, SEGMENTS_STREAM
from protocol._time import from_instant
from protocol._types import Transition, shown_subject
from protocol.nats._connect import StreamSettings, ensure_streams
from protocol.nats._partitioned import FeedClaim, PartitionedFeed
from protocol.nats._publisher import Publisher
from protocol.nats._refusals import permission_guard

_logger = structlog.get_logger("shoal.tail")


async def iter_transitions(
    nc: Client,
    filter_subject: str,
    *,
    from_start: bool = False,
    since: int | None = None,
) -> AsyncIterator[Transition]:
    """Transitions on ``filter_subject`` as they are published; with ``from_start``, all
    that ``SHOAL_SEGMENTS`` still holds first, or with ``since`` (an instant) those it
    stored from then on, through an ordered consumer. A message that is not a transition is
    skipped, with a warning."""
    decoder = msgspec.json.Decoder(Transition)
    sub: Any
    if from_start or since is not None:
        js = nc.jetstream()
        config = (
            None
            if since is None
            else ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=from_instant(since)
            )
        )
        # The stream named: else nats-py asks the broker which stream holds the subject, an
        # API a subscriber may not use.
        sub = await js.subscribe(
            filter_subject, stream=SEGMENTS_STREAM, ordered_consumer=True, config=config
        )
    else:
        sub = await nc.subscribe(filter_subject)
    try:
        async for msg in sub.messages:
            try:
                transition = decoder.decode(msg.data)
            except msgspec.DecodeError:
                # Only the engine may publish there, but whoever may publish to any stream
                # can have JetStream send its acknowledgement to any subject: not ours.
                _logger.warning("not a transition; skipped", subject=shown_subject(msg.subject))
                continue
            yield transition
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def jetstream_ports(
    nc: Client,
    *,
    consumer: str = "shoal-engine",
    max_in_flight: int = 20_000,
    streams: StreamSettings | None = None,
    claims: Mapping[int | None, FeedClaim] | None = None,
) -> tuple[PartitionedFeed, Publisher]:
    """Declare the streams, then make an engine's ports on ``nc``: its event source (a
    durable consumer per partition, named ``<consumer>-<partition>``, or as ``claims``
    says: then only the partitions claimed are read) and its transition sink, which stamps
    each transition with its customer's partition.

    Raises:
        BrokerError: the streams cannot be declared (:class:`~protocol.PermissionDenied`
            when the credentials may not; :class:`StreamNeedsMigration` when
            ``SHOAL_EVENTS`` was made by an earlier shoal).
    """
    js = nc.jetstream()
    async with permission_guard(nc):
        partitions = await ensure_streams(js, streams)
    owned = None if claims is None else sorted(p for p in claims if p is not None)
    try:
        events = await js.stream_info(EVENTS_STREAM)
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot read stream {EVENTS_STREAM}: {e}") from e
    feed = PartitionedFeed(
        nc,
        js,
        prefix=consumer,
        partitions=partitions,
        owned=owned,
        max_in_flight=max_in_flight,
        claims=claims,
        # A replicated stream's deadline barrier needs probes (PartitionedFeed.fence).
        replicated=(events.config.num_replicas or 1) > 1,
    )
    return feed, Publisher(nc, partitions=partitions)
