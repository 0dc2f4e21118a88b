"""The checks ``shoal backup`` makes of its copy before writing the manifest: the store's
positions fit in the events stream copied after it, and the definitions did not change
while it ran (end to end: ``tests/system/test_backup.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from protocol import EVENTS_STREAM
from scripts._backup_cmd import StoreCopy, StreamEntry, _check_consistent
from scripts._errors import CliError

DEFINITIONS = "KV_SHOAL_DEFINITIONS"


def store(through: int, partitions: dict[int, int] | None = None) -> StoreCopy:
    return StoreCopy(
        file="shoal.db",
        bytes=1,
        sha256="",
        schema_version=3,
        stream_through=through,
        partitions_through=partitions or {},
        events=through,
        transitions=0,
    )


def stream(name: str, last: int) -> StreamEntry:
    return StreamEntry(
        stream=name,
        file=f"streams/{name}.tar.s2",
        bytes=1,
        sha256="",
        messages=last,
        first_seq=1,
        last_seq=last,
        config={},
        state={},
    )


def info(last: int) -> dict[str, Any]:
    return {"state": {"last_seq": last}}


def test_a_copy_whose_streams_hold_what_the_store_recorded_passes() -> None:
    _check_consistent(
        store(90, {3: 95}), [stream(DEFINITIONS, 4), stream(EVENTS_STREAM, 100)], info(4)
    )
    _check_consistent(store(0), [stream(EVENTS_STREAM, 0)], None)


def test_an_events_stream_behind_the_store_is_another_broker() -> None:
    with pytest.raises(CliError) as e:
        _check_consistent(store(90, {3: 120}), [stream(EVENTS_STREAM, 100)], None)
    assert str(e.value) == (
        "the store committed SHOAL_EVENTS through position 120, but the broker's SHOAL_EVENTS "
        "ends at 100: is this the broker of this data directory? (give its server with "
        "--nats URL)"
    )


@pytest.mark.parametrize(("before", "after"), [(4, 5), (None, 1)])
def test_definitions_changed_during_the_backup_are_refused(before: int | None, after: int) -> None:
    with pytest.raises(CliError) as e:
        _check_consistent(
            store(10),
            [stream(DEFINITIONS, after), stream(EVENTS_STREAM, 10)],
            None if before is None else info(before),
        )
    assert str(e.value) == (
        "the segment definitions changed during the backup: it would not be consistent. "
        "Run it again"
    )
