"""protocol.event_from_line, event_line and events_from_lines: history as Segment Spec JSON
lines, validated as live events."""

from __future__ import annotations

import re

import pytest

from protocol import (
    SECOND,
    Event,
    InvalidEvent,
    event_from_line,
    event_line,
    events_from_lines,
    parse_timestamp,
)
from tests.history_lines import NOW, T1, T2, line, visit


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "invalid JSON: Input data was truncated"),
        ("[]", "invalid event: Expected `object`, got `array`"),
        (line(type="track", event="Visit", timestamp=T1), "missing required field `userId`"),
        (
            line(type="track", userId=7, event="Visit", timestamp=T1),
            "invalid event: Expected `str | null`, got `int` - at `$.userId`",
        ),
        (visit(""), "invalid `userId`: a customer id cannot be empty"),
        (
            line(type="track", userId="a", event="Visit"),
            "missing required field `timestamp` (a file has no receive time: each event "
            "needs its instant)",
        ),
        (
            line(type="alias", userId="a", timestamp=T1),
            "unknown type 'alias': expected 'track' or 'identify'",
        ),
        (
            line(type="track", userId="a", timestamp=T1),
            "missing required field `event` (the event name) on a track event",
        ),
        (
            visit("a", "2025-06-01T09:05:00.000001Z"),
            "timestamp '2025-06-01T09:05:00.000001Z' is 300.000001 s ahead of the time the "
            "event was received (2025-06-01T09:00:00Z); at most 300 s ahead is allowed",
        ),
        (
            visit("a", "2026-11-22 09:00"),
            "timestamp '2026-11-22 09:00' is not an ISO-8601 date and time with a UTC offset "
            "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
        ),
        (visit("a", messageId=""), "field `messageId` must not be empty when given"),
    ],
)
def test_each_bad_line_has_the_reason_a_live_event_would(text: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as e:
        event_from_line(text.encode(), now=NOW)
    assert e.value.reason == reason


def test_a_timestamp_a_little_ahead_counts_from_now() -> None:
    event = event_from_line(visit("a", "2025-06-01T09:04:00Z").encode(), now=NOW)
    assert (event.at, event.received) == (NOW, NOW)


def test_message_id_without_one_follows_the_content_not_its_spelling() -> None:
    def message_id(text: str) -> str:
        return event_from_line(text.encode(), now=NOW).message_id

    one = message_id(f'{{"type":"track","userId":"a","event":"V","timestamp":"{T1}"}}')
    same = message_id(f'{{ "timestamp": "{T1}", "event": "V", "userId": "a", "type": "track" }}')
    assert one == same
    assert re.fullmatch(r"import:[0-9a-f]{32}", one)
    assert message_id(f'{{"type":"track","userId":"a","event":"W","timestamp":"{T1}"}}') != one


def test_an_event_line_is_read_back_as_the_same_event() -> None:
    track = Event(
        kind="track",
        customer_id="ann",
        name="Order Completed",
        properties={"total": 12.5, "note": "café"},
        traits={},
        at=NOW - 5 * SECOND + 7,
        received=NOW,
        message_id="js:1@1",
    )
    identify = Event(
        kind="identify",
        customer_id="zoë",
        name=None,
        properties={},
        traits={"plan": "gold", "gone": None},
        at=NOW,
        received=NOW,
        message_id="m-2",
    )
    # Byte for byte: `shoal export` writes these lines.
    assert event_line(track) == (
        b'{"type":"track","userId":"ann","event":"Order Completed",'
        b'"properties":{"total":12.5,"note":"caf\xc3\xa9"},'
        b'"timestamp":"2025-06-01T08:59:55.000007Z","messageId":"js:1@1",'
        b'"receivedAt":"2025-06-01T09:00:00Z"}'
    )
    assert event_line(identify) == (
        b'{"type":"identify","userId":"zo\xc3\xab","traits":{"plan":"gold","gone":null},'
        b'"timestamp":"2025-06-01T09:00:00Z","messageId":"m-2","receivedAt":"2025-06-01T09:00:00Z"}'
    )
    # receivedAt is read back (issue 17, item 3): an export imports back exactly.
    assert event_from_line(event_line(track), now=NOW) == track
    assert event_from_line(event_line(identify), now=NOW) == identify


def test_without_received_at_the_timestamp_stands_for_it() -> None:
    event = event_from_line(visit("a", "2025-06-01T08:00:00Z").encode(), now=NOW)
    assert event.at == event.received == NOW - 3600 * SECOND


@pytest.mark.parametrize(
    ("received_at", "reason"),
    [
        (
            "2025-06-01T09:10:00Z",
            "receivedAt '2025-06-01T09:10:00Z' is ahead of now (2025-06-01T09:00:00Z): an "
            "event cannot have been received in the future",
        ),
        (
            "2025-06-01T07:00:00Z",
            "timestamp '2025-06-01T08:00:00Z' is 3600 s ahead of receivedAt "
            "(2025-06-01T07:00:00Z); at most 300 s ahead is allowed",
        ),
        (
            "yesterday",
            "receivedAt 'yesterday' is not an ISO-8601 date and time with a UTC offset (for "
            "example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
        ),
    ],
)
def test_a_bad_received_at_is_refused(received_at: str, reason: str) -> None:
    line = (
        '{"type":"track","userId":"a","event":"V","timestamp":"2025-06-01T08:00:00Z",'
        f'"receivedAt":"{received_at}"}}'
    )
    with pytest.raises(InvalidEvent) as e:
        event_from_line(line.encode(), now=NOW)
    assert e.value.reason == reason


def test_a_file_of_lines_in_timestamp_order_with_skips_and_repeats() -> None:
    skipped: list[tuple[int, str]] = []
    repeats: list[tuple[int, int]] = []
    lines: list[str | bytes] = [
        visit("a", T2, messageId="late"),
        b"",
        visit("b", messageId="early"),
        "nonsense",
        visit("a", T1, messageId="late"),  # the same customer and id: applied once
        visit("c", T2, messageId="tie"),  # equal timestamps keep their file order
        visit("a", "2999-01-01T00:00:00Z", messageId="far"),  # a file has no "ahead"
    ]
    events = events_from_lines(
        [x if isinstance(x, bytes) else x.encode() for x in lines],
        on_skip=lambda n, r: skipped.append((n, r)),
        on_repeat=lambda n, first: repeats.append((n, first)),
    )
    assert [(e.customer_id, e.message_id) for e in events] == [
        ("b", "early"),
        ("a", "late"),
        ("c", "tie"),
        ("a", "far"),
    ]
    assert [e.received for e in events] == [e.at for e in events]
    assert events[1].at == parse_timestamp(T2)
    assert skipped == [(4, "invalid JSON: JSON is malformed: invalid character (byte 4)")]
    assert repeats == [(5, 1)]
    assert events_from_lines([]) == []
