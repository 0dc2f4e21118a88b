"""The format of the streams and buckets shoal declares: recorded in each one's ``metadata``
(``shoal_format``), added to one made before formats were recorded, and a newer one refused
(see :mod:`protocol._formats`)."""

from __future__ import annotations

from collections.abc import Mapping

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from protocol._errors import BrokerError
from protocol._formats import FORMAT_KEY, STREAM_FORMAT, metadata_format

_logger = structlog.get_logger("shoal.upgrade")
_SERVER_KEYS = "_nats."
"""The prefix of the metadata keys nats-server sets itself (2.11 and later): not ours to
send back."""


def format_metadata(existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``metadata`` to declare a stream or bucket with: the keys someone else put there
    kept (the server's own left to it), and this shoal's format."""
    kept = {k: v for k, v in (existing or {}).items() if not k.startswith(_SERVER_KEYS)}
    return kept | {FORMAT_KEY: str(STREAM_FORMAT)}


def checked_format(what: str, existing: StreamConfig) -> int:
    """The format an existing stream or bucket records (0: none, made by shoal 484eaec or
    earlier).

    Raises:
        FormatTooNewError: a newer shoal made it (its format is later than this shoal's).
    """
    return metadata_format(what, existing.metadata, STREAM_FORMAT)


def log_upgrade(what: str, found: int) -> None:
    """Say that ``what`` (of format ``found``) was just declared in this shoal's format."""
    if found < STREAM_FORMAT:
        _logger.info("upgraded in place", what=what, from_format=found, to_format=STREAM_FORMAT)


async def stamp(js: JetStreamContext, stream: str, what: str) -> None:
    """Record this shoal's format in the existing ``stream`` (that holds the bucket ``what``,
    made by nats-py's own helpers, which take no metadata), when it records none or an older
    one; refuse it when a newer shoal made it.

    Raises:
        FormatTooNewError: its format is later than this shoal's.
        BrokerError: the broker does not answer or refuses.
    """
    try:
        config = (await js.stream_info(stream)).config
        found = checked_format(what, config)
        if found == STREAM_FORMAT:
            return
        config.metadata = format_metadata(config.metadata)
        await js.update_stream(config)
    except (TimeoutError, nats.errors.Error) as e:
        raise BrokerError(f"cannot record the format of {what}: {e}") from e
    log_upgrade(what, found)
