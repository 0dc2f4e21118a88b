"""structlog set-up: readable key-value lines on a terminal, JSON lines otherwise, with
every secret the command was given scrubbed from what it prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from store import SCHEMA_VERSION, Store

from ._connection import credentials_of, servers_of

_HIDDEN = "***"


class Scrubber:
    """Replaces known secrets by ``***`` in text and in log events.

    The last defence: URLs are redacted and credentials kept out of messages where they
    are made (``protocol.nats.redact``); this catches what a library or a new log line
    lets through.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is hidden whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _HIDDEN)
        return text

    def processor(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: scrubs every value of ``event``."""
        if self._secrets:
            for key, value in event.items():
                event[key] = self._scrub_value(value)
        return event

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list | tuple):
            return [self._scrub_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._scrub_value(v) for k, v in value.items()}
        if value is None or isinstance(value, int | float):
            return value
        # Anything else is printed through its repr (an exception, a path): scrub that.
        shown = repr(value)
        scrubbed = self(shown)
        return value if scrubbed == shown else scrubbed


def secrets_of(args: argparse.Namespace) -> list[str]:
    """The secrets a command was given: password and token (options or environment), and
    those in its NATS URLs (``--nats``, ``NATS_URL``)."""
    urls = [*servers_of(args), *os.environ.get("NATS_URL", "").split(",")]
    return credentials_of(args).secrets(urls)


def configure_logging(level: str = "info", *, scrubber: Scrubber | None = None) -> None:
    """Send structured logs to stderr, rendered for a person or for a machine, with the
    secrets ``scrubber`` knows scrubbed."""
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            (scrubber or Scrubber()).processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _SslEofNoise) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_SslEofNoise())


class _SslEofNoise(logging.Filter):
    """Drops asyncio's warning at the end of every TLS connection nats-py made: nats-py
    upgrades the socket with a stream protocol that asyncio does not know is over TLS, so
    asyncio warns when the server closes it. It is not the user's to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def log_store_upgrade(store: Store) -> None:
    """Say that ``store`` was just upgraded in place to this shoal's schema, if it was."""
    if store.upgraded_from is not None:
        structlog.get_logger("shoal.upgrade").info(
            "upgraded in place",
            what=f"the store {store.path}",
            from_format=store.upgraded_from,
            to_format=SCHEMA_VERSION,
        )
