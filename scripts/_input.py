"""Lines of a file or of stdin, read without blocking the event loop.

A read from a terminal or a pipe can wait for ever. Done on the event loop, it keeps Ctrl-C
from being answered (asyncio retries the read after its signal handler, so a second Ctrl-C
was needed); done in an anyio worker thread, it keeps the process from exiting after
Ctrl-C (worker threads are joined). So a daemon thread reads, with plain ``os.read`` (the
buffered ``sys.stdin`` would hold its lock at exit), and hands batches of lines to the
loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator

import anyio
import anyio.from_thread
import anyio.lowlevel

_CHUNK = 1 << 16
PIECE = 10_000
"""Lines of a file read, and events of it replayed, per hop to a worker thread (``shoal
replay`` and ``shoal import``; the log goes by its chunks): Ctrl-C waits for one hop at most."""


async def read_lines(fd: int) -> AsyncIterator[list[bytes]]:
    """The lines of the open file descriptor ``fd`` (without their newline), in batches as
    they arrive, until its end. The caller closes ``fd`` (a thread may still be reading it
    if the iteration was cancelled: it ends with the process).

    Raises:
        OSError: ``fd`` cannot be read.
    """
    send, receive = anyio.create_memory_object_stream[list[bytes] | OSError](4)
    token = anyio.lowlevel.current_token()

    def hand(item: list[bytes] | OSError) -> None:
        anyio.from_thread.run(send.send, item, token=token)

    def pump() -> None:
        # The loop has gone (cancelled, or finished): nobody waits for the rest.
        with contextlib.suppress(anyio.RunFinishedError, anyio.BrokenResourceError):
            try:
                rest = b""
                while chunk := os.read(fd, _CHUNK):
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    if lines:
                        hand(lines)
                if rest:
                    hand([rest])
            except OSError as e:
                hand(e)
            finally:
                anyio.from_thread.run_sync(send.close, token=token)

    threading.Thread(target=pump, name="shoal input", daemon=True).start()
    async with receive:
        async for item in receive:
            if isinstance(item, OSError):
                raise item
            yield item
