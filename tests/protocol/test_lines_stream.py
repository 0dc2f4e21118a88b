"""protocol.read_history and its spill (protocol._spill): a file of history into time order in
bounded memory, the same events, order and reports as sorting it all in memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Event, InvalidEvent, SpillError, event_from_line, read_history, to_instant
from protocol._spill import Spill, SpillFiles
from tests.history_lines import visit

_END = to_instant(datetime(9999, 12, 31, tzinfo=UTC))


def in_memory(lines: list[bytes]) -> tuple[list[Event], list[tuple[int, int]], list[int]]:
    """What replay did before it streamed: every event in a list, a dict of every key, one
    stable sort (the reference)."""
    events: list[Event] = []
    seen: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int]] = []
    skipped: list[int] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            event = event_from_line(raw.strip(), now=_END)
        except InvalidEvent:
            skipped.append(number)
            continue
        first = seen.setdefault((event.customer_id, event.message_id), number)
        if first != number:
            repeats.append((number, first))
            continue
        events.append(event)
    events.sort(key=lambda e: e.received)
    return events, repeats, skipped


def streamed(
    lines: Iterable[bytes], run: int, directory: Path
) -> tuple[list[Event], list[tuple[int, int]], list[int], bool, int]:
    repeats: list[tuple[int, int]] = []
    skipped: list[int] = []
    with read_history(
        lines,
        on_skip=lambda n, _: skipped.append(n),
        on_repeat=lambda n, first: repeats.append((n, first)),
        directory=directory,
        run=run,
    ) as history:
        events = list(history)
        assert history.skipped == len(skipped)
        return events, repeats, skipped, history.spilled, history.events


_lines = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from("abc"),
            st.integers(0, 5),  # few instants: many ties, which keep their file order
            st.sampled_from([None, "m1", "m2", "m3"]),  # None: an id from the content
        ).map(
            lambda t: visit(
                t[0],
                f"2025-05-0{t[1] + 1}T10:00:00Z",
                **({} if t[2] is None else {"messageId": t[2]}),
            ).encode()
        ),
        st.sampled_from([b"", b"nonsense", b'{"type":"track","userId":"a","event":"V"}']),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(lines=_lines, run=st.integers(1, 7))
def test_the_same_events_order_and_reports_as_sorting_in_memory(
    lines: list[bytes], run: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("spill")
    events, repeats, skipped, spilled, count = streamed(lines, run, directory)
    assert (events, repeats, skipped) == in_memory(lines)
    assert count == len(events)
    assert spilled == (len(lines) - len(skipped) - lines.count(b"") >= run)
    assert os.listdir(directory) == []  # closed: its temporary files are gone


def test_an_in_order_input_is_one_run_read_back_without_a_merge(tmp_path: Path) -> None:
    files = SpillFiles(tmp_path)
    spill: Spill[tuple[int, str]] = Spill(tuple[int, str], files, run=10)
    for i in range(95):
        spill.add((i // 3, f"{i:03}"))
    [directory] = tmp_path.iterdir()
    assert [p.name for p in directory.iterdir()] == ["run-1"]
    assert list(spill.sorted()) == [(i // 3, f"{i:03}") for i in range(95)]
    files.close()
    assert list(tmp_path.iterdir()) == []


def test_out_of_order_runs_beyond_the_fan_in_are_merged_in_stages(tmp_path: Path) -> None:
    files = SpillFiles(tmp_path)
    spill: Spill[tuple[int, int]] = Spill(tuple[int, int], files, run=2)
    items = [((i * 7919) % 301, i) for i in range(301)]  # 151 runs, each out of order
    for item in items:
        spill.add(item)
    assert list(spill.sorted()) == sorted(items)
    files.close()


def test_temporary_files_go_under_tmpdir_and_are_removed_when_iteration_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    lines = [visit(c, f"2025-05-0{d}T10:00:00Z").encode() for d in (3, 2, 1) for c in "abcd"]
    with read_history(lines, run=2) as history:
        [directory] = tmp_path.iterdir()
        assert directory.name.startswith("shoal-spill-")
        first = next(iter(history))
        assert first.customer_id == "a"
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_reading_removes_what_was_written(tmp_path: Path) -> None:
    def lines() -> Iterator[bytes]:
        for c in "abcdef":
            yield visit(c).encode()
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="went away"):
        read_history(lines(), run=2, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_directory_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SpillError) as e:
        read_history([visit(c).encode() for c in "abc"], run=2, directory=missing)
    assert str(e.value) == (
        f"cannot write temporary files in {missing}: No such file or directory (free some "
        "space, or set TMPDIR to a directory with room)"
    )
