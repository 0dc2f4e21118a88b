"""actors.watch_segments: a segments file applied again when it changes or when asked."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import structlog

from actors import ActorsError, FileStamp, SegmentSet, file_stamp, watch_segments

ONE = "[segments.one]\nrule = \"count('Visit') >= 1\"\n"
TWO = ONE + "[segments.two]\nrule = \"count('Visit') >= 2\"\n"
BROKEN = ONE + "[segments.two]\nrule = \"count('Visit') >= \"\n"
POLL = 0.01


class Applied:
    """An engine's ``apply_segments`` stand-in: records the names of what it was given."""

    def __init__(self) -> None:
        self.names: list[tuple[str, ...]] = []
        self._changed = anyio.Event()

    async def __call__(self, segments: SegmentSet) -> None:
        self.names.append(tuple(segments.names))
        self._changed.set()
        self._changed = anyio.Event()

    async def next(self) -> tuple[str, ...]:
        with anyio.fail_after(5):
            await self._changed.wait()
        return self.names[-1]


def write(path: Path, text: str) -> None:
    """Replace the file, with a new mtime even on a coarse clock."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def watching(
    path: Path,
    apply: Callable[[SegmentSet], Awaitable[object]],
    body: Callable[[anyio.abc.ObjectSendStream[object]], Awaitable[None]],
    *,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
) -> None:
    """Run the watcher on ``path`` (as read now) while ``body`` runs, then stop it."""
    send, receive = anyio.create_memory_object_stream[object](1)
    stamp = file_stamp(path)
    with send, receive:
        await _watch_while(path, apply, body, send, receive, stamp, sleep)


async def _watch_while(
    path: Path,
    apply: Callable[[SegmentSet], Awaitable[object]],
    body: Callable[[anyio.abc.ObjectSendStream[object]], Awaitable[None]],
    send: anyio.abc.ObjectSendStream[object],
    receive: anyio.abc.ObjectReceiveStream[object],
    stamp: FileStamp,
    sleep: Callable[[float], Awaitable[object]],
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: watch_segments(
                path, apply, stamp=stamp, asked=receive, poll=POLL, settle=0.01, sleep=sleep
            )
        )
        with anyio.fail_after(10):
            await body(send)
        tg.cancel_scope.cancel()


async def test_a_changed_file_is_applied_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(ONE)
    applied = Applied()

    async def body(_: object) -> None:
        await anyio.sleep(POLL * 10)
        assert applied.names == []  # nothing changed: nothing applied
        write(path, TWO)
        assert await applied.next() == ("one", "two")
        await anyio.sleep(POLL * 10)
        assert applied.names == [("one", "two")]  # once per change

    await watching(path, applied, body)


async def test_asked_applies_the_file_even_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(ONE)
    applied = Applied()

    async def body(ask: anyio.abc.ObjectSendStream[object]) -> None:
        await ask.send("SIGHUP")
        assert await applied.next() == ("one",)

    await watching(path, applied, body)


async def test_an_invalid_file_changes_nothing_until_fixed(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(ONE)
    applied = Applied()

    async def body(_: object) -> None:
        with structlog.testing.capture_logs() as logs:
            write(path, BROKEN)
            with anyio.fail_after(5):
                while not logs:
                    await anyio.sleep(POLL)
        assert [(x["event"], x["log_level"]) for x in logs] == [
            ("segments not reloaded, the previous ones stay in force", "error")
        ]
        assert str(logs[0]["error"]).startswith(f"{path}: segment 'two': ")
        assert applied.names == []
        write(path, TWO)
        assert await applied.next() == ("one", "two")

    await watching(path, applied, body)


async def test_a_file_still_being_written_is_read_once_it_holds_still(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(ONE)
    applied = Applied()
    settles: list[float] = []

    async def sleep(seconds: float) -> None:
        settles.append(seconds)
        if len(settles) == 1:
            write(path, TWO)  # the writer is not done yet: half a file, then all of it
        await anyio.sleep(0)

    async def body(_: object) -> None:
        write(path, TWO[: len(ONE) + 10])
        assert await applied.next() == ("one", "two")
        assert settles == [0.01, 0.01]

    await watching(path, applied, body, sleep=sleep)


async def test_the_watch_ends_when_the_engine_has_stopped(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(ONE)

    async def stopped(_: SegmentSet) -> None:
        raise ActorsError("the engine is not running")

    send, receive = anyio.create_memory_object_stream[object](1)
    with send, receive, anyio.fail_after(5):
        await send.send("SIGHUP")
        await watch_segments(path, stopped, stamp=file_stamp(path), asked=receive, poll=POLL)


def test_file_stamp_tells_a_change_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    assert file_stamp(path) is None
    path.write_text(ONE)
    before = file_stamp(path)
    assert before is not None
    write(path, TWO)
    assert file_stamp(path) not in (before, None)
