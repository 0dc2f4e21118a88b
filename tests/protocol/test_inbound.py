"""protocol.decode_event: what is accepted, and the exact reason for what is not."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from protocol import (
    DEFAULT_MAX_EVENT_BYTES,
    HOUR,
    MAX_FUTURE_SKEW,
    SECOND,
    Event,
    InvalidEvent,
    decode_event,
    event_subject,
    parse_timestamp,
    to_instant,
)

RECEIVED = to_instant(datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC))
SUBJECT = "shoal.events.alice"


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def decode(data: bytes, subject: str = SUBJECT, **kw: Any) -> Event:
    return decode_event(data, subject, received=RECEIVED, default_message_id="seq-7", **kw)


def reason(data: bytes, subject: str = SUBJECT, **kw: Any) -> str:
    with pytest.raises(InvalidEvent) as e:
        decode(data, subject, **kw)
    assert str(e.value) == e.value.reason
    return e.value.reason


def track(**extra: Any) -> bytes:
    return payload(type="track", userId="alice", event="Visit", **extra)


# --- rejections --------------------------------------------------------------------------


def test_invalid_event_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode(b"{")


def test_payload_over_size_limit() -> None:
    data = track(properties={"pad": "x" * 100})
    assert reason(data, max_bytes=len(data) - 1) == (
        f"payload is {len(data)} bytes, over the limit of {len(data) - 1} bytes"
    )


def test_payload_over_default_size_limit() -> None:
    data = track(properties={"pad": "x" * DEFAULT_MAX_EVENT_BYTES})
    assert reason(data) == (
        f"payload is {len(data)} bytes, over the limit of {DEFAULT_MAX_EVENT_BYTES} bytes"
    )


def test_payload_exactly_at_size_limit_is_accepted() -> None:
    data = track()
    assert decode(data, max_bytes=len(data)).name == "Visit"


def test_invalid_json() -> None:
    assert reason(b'{"type": "track",') == "invalid JSON: Input data was truncated"


def test_empty_payload() -> None:
    assert reason(b"") == "invalid JSON: Input data was truncated"


def test_payload_not_an_object() -> None:
    assert reason(b"[1, 2]") == "invalid event: Expected `object`, got `array`"


def test_payload_a_string() -> None:
    assert reason(b'"hello"') == "invalid event: Expected `object`, got `str`"


def test_field_of_wrong_type() -> None:
    assert reason(payload(type="track", userId=42, event="Visit")) == (
        "invalid event: Expected `str | null`, got `int` - at `$.userId`"
    )


def test_properties_not_an_object() -> None:
    assert reason(track(properties=[1])) == (
        "invalid event: Expected `object | null`, got `array` - at `$.properties`"
    )


def test_missing_type() -> None:
    assert reason(payload(userId="alice", event="Visit")) == (
        "missing required field `type` ('track' or 'identify')"
    )


def test_null_type_counts_as_missing() -> None:
    assert reason(payload(type=None, userId="alice", event="Visit")) == (
        "missing required field `type` ('track' or 'identify')"
    )


def test_unknown_type() -> None:
    assert reason(payload(type="page", userId="alice")) == (
        "unknown type 'page': expected 'track' or 'identify'"
    )


def test_type_is_case_sensitive() -> None:
    assert reason(payload(type="Track", userId="alice", event="Visit")) == (
        "unknown type 'Track': expected 'track' or 'identify'"
    )


def test_missing_user_id() -> None:
    assert reason(payload(type="track", event="Visit")) == "missing required field `userId`"


def test_user_id_not_matching_subject() -> None:
    assert reason(payload(type="track", userId="bob", event="Visit")) == (
        "userId 'bob' does not match the customer 'alice' of subject 'shoal.events.alice'"
    )


def test_user_id_compared_with_unescaped_customer() -> None:
    # The subject token a%2Eb is the customer "a.b"; the escaped form is not the id.
    data = payload(type="track", userId="a%2Eb", event="Visit")
    assert reason(data, "shoal.events.a%2Eb") == (
        "userId 'a%2Eb' does not match the customer 'a.b' of subject 'shoal.events.a%2Eb'"
    )


def test_track_without_event() -> None:
    assert reason(payload(type="track", userId="alice")) == (
        "missing required field `event` (the event name) on a track event"
    )


def test_track_with_empty_event_name() -> None:
    assert reason(payload(type="track", userId="alice", event="")) == (
        "field `event` (the event name) must not be empty"
    )


def test_empty_message_id() -> None:
    assert reason(track(messageId="")) == "field `messageId` must not be empty when given"


def test_unparseable_timestamp() -> None:
    assert reason(track(timestamp="yesterday")) == (
        "timestamp 'yesterday' is not an ISO-8601 date and time with a UTC offset "
        "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)"
    )


def test_timestamp_without_offset() -> None:
    assert reason(track(timestamp="2026-11-22T08:00:00")) == (
        "timestamp '2026-11-22T08:00:00' is not an ISO-8601 date and time with a UTC offset "
        "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)"
    )


def test_timestamp_date_only() -> None:
    assert reason(track(timestamp="2026-11-22")) == (
        "timestamp '2026-11-22' is not an ISO-8601 date and time with a UTC offset "
        "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)"
    )


def test_timestamp_more_than_300_s_ahead() -> None:
    assert reason(track(timestamp="2026-11-22T09:05:01Z")) == (
        "timestamp '2026-11-22T09:05:01Z' is 301 s ahead of the time the event was "
        "received (2026-11-22T09:00:00Z); at most 300 s ahead is allowed"
    )


def test_timestamp_one_microsecond_over_the_skew_is_rejected() -> None:
    with pytest.raises(InvalidEvent, match="at most 300 s ahead is allowed$"):
        decode(track(timestamp="2026-11-22T09:05:00.000001Z"))


def test_wrong_subject_shape() -> None:
    assert reason(track(), "shoal.events.alice.extra") == (
        "subject 'shoal.events.alice.extra' must have exactly one customer token after "
        "'shoal.events.' (escape '.' in customer ids as %2E)"
    )


def test_subject_not_under_events() -> None:
    assert reason(track(), "orders.alice") == "subject 'orders.alice' is not under 'shoal.events.'"


def test_subject_with_non_canonical_token() -> None:
    assert reason(track(), "shoal.events.%61lice") == (
        "customer token '%61lice' is not in canonical form; escape the id as 'alice'"
    )


def test_size_is_checked_before_anything_else() -> None:
    assert reason(b"not json", "bad", max_bytes=3).startswith("payload is 8 bytes")


# --- accepted events ---------------------------------------------------------------------


def test_valid_track_event() -> None:
    data = track(
        properties={"club": "north"},
        timestamp="2026-11-22T10:00:00+02:00",
        messageId="m-1",
    )
    assert decode(data) == Event(
        kind="track",
        customer_id="alice",
        name="Visit",
        properties={"club": "north"},
        traits={},
        at=RECEIVED - HOUR,
        received=RECEIVED,
        message_id="m-1",
    )


def test_valid_identify_event() -> None:
    data = payload(
        type="identify",
        userId="alice",
        traits={"plan": "gold", "age": 40},
        timestamp="2026-11-22T08:30:00Z",
        messageId="m-2",
    )
    assert decode(data) == Event(
        kind="identify",
        customer_id="alice",
        name=None,
        properties={},
        traits={"plan": "gold", "age": 40},
        at=RECEIVED - 1800 * SECOND,
        received=RECEIVED,
        message_id="m-2",
    )


def test_identify_ignores_event_and_properties() -> None:
    data = payload(type="identify", userId="alice", event="Visit", properties={"a": 1})
    e = decode(data)
    assert (e.name, e.properties, e.traits) == (None, {}, {})


def test_track_ignores_traits() -> None:
    assert decode(track(traits={"plan": "gold"})).traits == {}


def test_track_without_properties_has_empty_properties() -> None:
    assert decode(track()).properties == {}


def test_identify_without_traits_has_empty_traits() -> None:
    assert decode(payload(type="identify", userId="alice")).traits == {}


def test_no_timestamp_counts_from_received() -> None:
    assert decode(track()).at == RECEIVED


def test_null_timestamp_counts_from_received() -> None:
    assert decode(track(timestamp=None)).at == RECEIVED


def test_default_message_id_when_none_given() -> None:
    assert decode(track()).message_id == "seq-7"


def test_given_message_id_wins_over_default() -> None:
    assert decode(track(messageId="abc")).message_id == "abc"


def test_timestamp_exactly_300_s_ahead_is_accepted_and_counts_from_received() -> None:
    e = decode(track(timestamp="2026-11-22T09:05:00Z"))
    assert MAX_FUTURE_SKEW == 300 * SECOND
    assert e.at == RECEIVED
    assert e.received == RECEIVED


def test_timestamp_slightly_ahead_counts_from_received() -> None:
    assert decode(track(timestamp="2026-11-22T09:00:00.5Z")).at == RECEIVED


def test_timestamp_in_the_past_is_kept_exactly() -> None:
    e = decode(track(timestamp="2025-01-02T03:04:05.123456Z"))
    assert e.at == to_instant(datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC))


def test_extra_segment_spec_fields_are_ignored() -> None:
    data = track(
        anonymousId="anon-1",
        context={"ip": "10.0.0.1", "library": {"name": "analytics.js"}},
        integrations={"All": True},
        sentAt="2026-11-22T09:00:00Z",
        version=2,
    )
    e = decode(data)
    assert (e.kind, e.customer_id, e.name) == ("track", "alice", "Visit")


def test_escaped_customer_id() -> None:
    data = payload(type="track", userId="a.b c", event="Visit")
    e = decode(data, "shoal.events.a%2Eb%20c")
    assert e.customer_id == "a.b c"


def test_non_ascii_customer_id() -> None:
    data = payload(type="identify", userId="zoë", traits={"plan": "gold"})
    assert decode(data, event_subject("zoë")).customer_id == "zoë"


def test_customer_id_with_percent() -> None:
    data = payload(type="track", userId="100%", event="Visit")
    assert decode(data, "shoal.events.100%25").customer_id == "100%"


# --- parse_timestamp ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T09:00:00Z", RECEIVED),
        ("2026-11-22T10:00:00+01:00", RECEIVED),
        ("2026-11-22T04:30:00-04:30", RECEIVED),
        ("2026-11-22T09:00:00.000001+00:00", RECEIVED + 1),
    ],
)
def test_parse_timestamp(text: str, expected: int) -> None:
    assert parse_timestamp(text) == expected
