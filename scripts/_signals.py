"""Stopping a long-running command on SIGINT or SIGTERM, cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio
import structlog

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM (logged), so that what runs in it
    stops the clean way."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger("shoal").info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


async def in_thread(fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
    """``fn(*args)`` in a worker thread (as ``anyio.to_thread.run_sync``), which has ended
    whenever this returns or raises.

    On Ctrl-C, ``anyio.run`` cancels the main task the asyncio way, which no cancel scope
    shields: ``run_sync`` then returns at once and leaves its thread running. What the
    caller cleans up on the way out (temporary files, say) would race that thread, which may
    write more after. So this waits for the thread first (blocking: the loop is stopping
    anyway), for as long as one call of ``fn`` takes; a second Ctrl-C ends the wait.
    """
    lock = threading.Lock()
    running = abandoned = False
    done = threading.Event()

    def call() -> _T:
        nonlocal running
        with lock:
            if abandoned:  # (anyio skips a call cancelled before it starts; this is sure)
                raise RuntimeError("abandoned: the caller stopped waiting")  # (seen by none)
            running = True
        try:
            return fn(*args)
        finally:
            done.set()

    try:
        return await anyio.to_thread.run_sync(call)
    except BaseException:
        with lock:
            abandoned = True
            started = running
        if started:
            done.wait()
        raise
