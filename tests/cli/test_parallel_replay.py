"""``shoal replay --processes``: its checks, and what a dead worker process does."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from actors import load_segments, replay
from actors.population import generate, history_end
from scripts._parallel_replay import ParallelReplay, ReplayWorkerError
from tests.helpers import run


@pytest.mark.parametrize("value", ["0", "65"])
def test_processes_out_of_range_is_a_usage_error(tmp_path: Path, value: str) -> None:
    source = tmp_path / "h.jsonl"
    source.write_text("")
    done = run("replay", str(source), "--processes", value)
    assert done.returncode == 2
    assert f"--processes must be from 1 to 64, not {value}" in done.stderr


def test_workers_replay_what_one_replay_does() -> None:
    segments = load_segments()
    events = list(generate(40, 60, seed=2))
    expected = list(replay(events, segments, until=history_end(60)))
    got = []
    with ParallelReplay(segments, 2) as split:
        for i in range(0, len(events), 300):
            got += split.apply_all(events[i : i + 300])
        got += split.advance(history_end(60))
        assert split.customers == 40
    assert got == expected


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    events = list(generate(10, 10, seed=2))
    with ParallelReplay(load_segments(), 2) as split:
        split.apply_all(events[:10])
        worker = split._workers[1]
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(ReplayWorkerError, match="replay worker 1 died"):
            split.apply_all(events[10:20])
            split.advance(history_end(10))


def test_a_worker_reports_its_error_and_the_replay_raises_it() -> None:
    segments = load_segments()
    with ParallelReplay(segments, 2) as split:
        split._inboxes[0].put(("events", 0, b"", b"\xc1 not msgpack"))  # as a bad piece
        split._out.append(0)
        with pytest.raises(ReplayWorkerError, match=r"replay worker 0 failed:(.|\n)*DecodeError"):
            split.advance(history_end(10))
