"""Connecting to NATS and declaring the streams shoal uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from protocol._errors import BrokerError
from protocol._subjects import (
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    REJECTED_STREAM,
    REJECTED_SUBJECT,
    SEGMENTS_STREAM,
    SEGMENTS_WILDCARD,
)

_CONNECT_TIMEOUT = 5.0
_FIRST_CONNECT_ATTEMPTS = 3


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
