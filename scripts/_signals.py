"""Stopping a long-running command on SIGINT or SIGTERM, cleanly."""

from __future__ import annotations

import signal

import anyio
import structlog


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM (logged), so that what runs in it
    stops the clean way."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger("shoal").info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return
