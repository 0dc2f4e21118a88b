"""Publishing imported history into ``SHOAL_EVENTS``: what ``shoal import`` does.

An import is framed, in each partition, by two markers,
``shoal.events.<partition>.ctl.import.<id>.begin`` and ``.end`` (subjects only the operator
role may publish). Each event between them goes on its customer's usual subject
``shoal.events.<customer>`` with three headers: ``Nats-Msg-Id`` (the broker drops a repeat
within its duplicate window), ``Shoal-Import`` (the import's id) and ``Shoal-Received-At``
(its original receive instant). The engine logs those events without applying them one by
one, and at the end marker rebuilds the customers they touched (README, Import).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from protocol._errors import BrokerError
from protocol._lines import event_line
from protocol._subjects import (
    EVENTS_STREAM,
    IMPORT_HEADER,
    RECEIVED_HEADER,
    event_subject,
    import_marker_subject,
)
from protocol._types import Event
from protocol.nats._connect import StreamNeedsMigration, stream_partitions

WINDOW = 1_000
"""Events published at most before waiting for the broker's acknowledgements."""


@dataclass
class Published:
    """What an import's publishing did."""

    import_id: str
    published: int = 0
    """Events the broker stored."""
    duplicates: int = 0
    """Events the broker dropped as repeats (within its duplicate window)."""


def new_import_id() -> str:
    """A fresh import id: random, so nobody who cannot read the stream can guess it."""
    return secrets.token_hex(16)


def import_msg_id(event: Event) -> str:
    """An imported event's ``Nats-Msg-Id``: ASCII, bounded, the same for the same customer
    and ``messageId`` (so importing twice within the broker's window stores it once)."""
    digest = hashlib.sha256(f"{event.customer_id}\0{event.message_id}".encode()).hexdigest()
    return f"import:{digest[:40]}"


def _nothing(_: int) -> None:
    pass


async def publish_import(
    nc: Client,
    events: AsyncIterable[Sequence[Event]],
    *,
    import_id: str | None = None,
    on_progress: Callable[[int], None] = _nothing,
) -> Published:
    """Publish ``events`` (in the order to log them: receive order) as one import, between
    its begin and end markers, and wait for the broker to store every one.

    Args:
        nc: a connection of the operator role (or one with no permissions enforced).
        events: validated events (:func:`protocol.event_from_line`), in pieces.
        import_id: the import's id (default: a fresh random one).
        on_progress: called with the number of events confirmed since last time.

    Raises:
        BrokerError: the stream does not exist, or the broker did not store a message (the
            import is then left open: run it again, repeats are dropped).
    """
    js = nc.jetstream()
    done = Published(import_id or new_import_id())
    marker = {IMPORT_HEADER: done.import_id}

    async def markers(stage: str) -> None:
        # One in each partition: each partition's consumer reads its own, in order with
        # its events (so an import begins before its first event in every partition, and
        # ends after its last).
        await asyncio.gather(
            *(
                js.publish(
                    import_marker_subject(done.import_id, stage, p),
                    b"",
                    stream=EVENTS_STREAM,
                    headers=marker,
                )
                for p in range(partitions)
            )
        )

    found = await stream_partitions(js)
    if found is None:
        raise StreamNeedsMigration(EVENTS_STREAM, None, None)
    partitions = found
    try:
        await markers("begin")
        pending: list[asyncio.Future[Any]] = []
        async for piece in events:
            for event in piece:
                headers = {
                    "Nats-Msg-Id": import_msg_id(event),
                    IMPORT_HEADER: done.import_id,
                    RECEIVED_HEADER: str(event.received),
                }
                pending.append(
                    await js.publish_async(
                        event_subject(event.customer_id),
                        event_line(event),
                        stream=EVENTS_STREAM,
                        headers=headers,
                    )
                )
                if len(pending) >= WINDOW:
                    await _confirmed(pending, done, on_progress)
                    pending = []
        await _confirmed(pending, done, on_progress)
        await markers("end")
    except nats.js.errors.NoStreamResponseError as e:
        raise BrokerError(
            f"stream {EVENTS_STREAM} does not exist on this NATS server, so nothing was "
            "stored: start the engine (`shoal serve`) once, it creates the streams"
        ) from e
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"the import was not stored by the broker: {e}") from e
    return done


async def _confirmed(
    pending: list[asyncio.Future[Any]], done: Published, on_progress: Callable[[int], None]
) -> None:
    for ack in await asyncio.gather(*pending):
        if ack.duplicate:
            done.duplicates += 1
        else:
            done.published += 1
    if pending:
        on_progress(len(pending))
