"""Ctrl-C while a command's work runs in a worker thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import anyio
    from scripts._signals import in_thread

    order = []
    started = threading.Event()

    def work() -> None:
        started.set()
        time.sleep(0.5)
        order.append("thread ended")

    def interrupt() -> None:
        started.wait()
        os.kill(os.getpid(), signal.SIGINT)

    async def main() -> None:
        threading.Thread(target=interrupt).start()
        try:
            await in_thread(work)
        finally:
            order.append("cleaned up")

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        print(" / ".join(order))
    """
)


def test_ctrl_c_waits_for_the_worker_thread_before_the_clean_up() -> None:
    """``anyio.run`` cancels the main task on Ctrl-C the asyncio way, which returns from
    ``anyio.to_thread.run_sync`` at once with its thread still running: what the caller
    removes on the way out (a replay's temporary files) could be written again after. With
    ``in_thread``, the clean-up comes after the thread's end."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "thread ended / cleaned up\n",
        "",
    )
