"""protocol.decode_event under its limits: nesting, integers, strings, keys, timestamps, time
zones and subjects; each refused with its exact reason and kind, never with another error.
And the rejection of a message too large to publish: cut, with its size and hash."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from protocol import InvalidEvent, Rejection, decode_event, event_from_line, to_instant
from protocol._limits import (
    MAX_DEPTH,
    MAX_ID_CHARS,
    MAX_ITEMS,
    MAX_KEYS,
    MAX_NAME_CHARS,
    MAX_STRING_CHARS,
)
from protocol._types import encode_rejection
from protocol.memory import MemoryBroker, MemorySink

RECEIVED = to_instant(datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC))
SUBJECT = "shoal.events.alice"


def decode(data: bytes, subject: str = SUBJECT) -> Any:
    return decode_event(data, subject, received=RECEIVED, default_message_id="seq-7")


def refused(data: bytes, subject: str = SUBJECT) -> tuple[str, str]:
    with pytest.raises(InvalidEvent) as e:
        decode(data, subject)
    return e.value.kind, e.value.reason


def track(**extra: Any) -> bytes:
    return json.dumps({"type": "track", "userId": "alice", "event": "Visit", **extra}).encode()


def identify(**traits: Any) -> bytes:
    return json.dumps({"type": "identify", "userId": "alice", "traits": traits}).encode()


def nested(depth: int) -> bytes:
    """A track whose properties hold ``a`` nested so that the deepest array is at ``depth``
    (the event object is level 1, its properties level 2)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return (
        b'{"type":"track","userId":"alice","event":"Visit","properties":{"a":'
        + inner.encode()
        + b"}}"
    )


# --- nesting ------------------------------------------------------------------------------


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert "a" in decode(nested(MAX_DEPTH)).properties


def test_nesting_one_past_the_limit() -> None:
    path = "$.properties.a" + "[0]" * (MAX_DEPTH - 2)
    assert refused(nested(MAX_DEPTH + 1)) == (
        "depth",
        f"JSON nested deeper than the limit of 32 levels - at `{path}`",
    )


@pytest.mark.parametrize("depth", [1_000, 30_000])
def test_json_nested_a_thousand_deep_is_refused_not_a_recursion_error(depth: int) -> None:
    assert refused(nested(depth)) == ("depth", "JSON nested deeper than the limit of 32 levels")


def test_deep_json_in_an_ignored_field_is_refused_too() -> None:
    data = track(context=0).replace(b"0}", b"[" * 5000 + b"]" * 5000 + b"}")
    assert refused(data)[0] == "depth"


def test_deep_nesting_in_a_line_of_history_is_a_reason() -> None:
    for line in (
        b'{"userId":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"userId":"a","properties":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
    ):
        with pytest.raises(InvalidEvent):
            event_from_line(line, now=RECEIVED)


# --- numbers ------------------------------------------------------------------------------


def test_an_integer_over_64_bits() -> None:
    assert refused(identify(visits=10**30)) == (
        "integer",
        "integer out of range: integers must fit in 64 bits (-9223372036854775808 to "
        "9223372036854775807) - at `$.traits.visits`",
    )


def test_the_64_bit_bounds_are_accepted() -> None:
    traits = decode(identify(low=-(2**63), high=2**63 - 1)).traits
    assert traits == {"low": -(2**63), "high": 2**63 - 1}
    assert refused(identify(x=[1, {"y": 2**63}]))[1].endswith("- at `$.traits.x[1].y`")
    assert refused(identify(x=-(2**63) - 1))[0] == "integer"


def test_an_integer_of_thousands_of_digits_is_not_quoted() -> None:
    kind, reason = refused(track(properties={"n": 0}).replace(b'"n": 0', b'"n": ' + b"9" * 5000))
    assert len(reason) < 200, (kind, reason)


def test_a_float_beyond_double_range() -> None:
    data = track(properties={"f": 0}).replace(b'"f": 0', b'"f": 1e400')
    assert refused(data) == (
        "invalid",
        "invalid event: Number out of range - at `$.properties[...]`",
    )


# --- strings and sizes --------------------------------------------------------------------


def test_string_lengths() -> None:
    assert decode(track(properties={"s": "x" * MAX_STRING_CHARS})).properties["s"]
    assert refused(track(properties={"s": "x" * (MAX_STRING_CHARS + 1)})) == (
        "length",
        "string of 16385 characters, over the limit of 16384 - at `$.properties.s`",
    )
    assert refused(track(properties={"k" * (MAX_NAME_CHARS + 1): 1})) == (
        "length",
        "key of 257 characters, over the limit of 256 - at `$.properties.kkkkkkkkkkkkkkkk...`",
    )
    assert refused(track(event="E" * (MAX_NAME_CHARS + 1))) == (
        "length",
        "field `event` (the event name) has 257 characters, over the limit of 256",
    )
    assert refused(track(messageId="m" * (MAX_ID_CHARS + 1))) == (
        "length",
        "message id of 257 characters, over the limit of 256",
    )
    long_id = "c" * (MAX_ID_CHARS + 1)
    assert refused(track(userId=long_id), "shoal.events." + long_id) == (
        "length",
        "customer id of 257 characters, over the limit of 256",
    )


def test_keys_and_items() -> None:
    many = {f"k{i}": i for i in range(MAX_KEYS + 1)}
    assert refused(identify(**many)) == (
        "length",
        "object has 1001 keys, over the limit of 1000 - at `$.traits`",
    )
    assert refused(track(properties={"l": list(range(MAX_ITEMS + 1))})) == (
        "length",
        "array has 10001 items, over the limit of 10000 - at `$.properties.l`",
    )


def test_long_texts_are_quoted_cut() -> None:
    kind, reason = refused(json.dumps({"type": "x" * 10_000, "userId": "alice"}).encode())
    assert (
        kind == "type" and reason == f"unknown type '{'x' * 64}...': expected 'track' or 'identify'"
    )


# --- timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stamp",
    ["0001-01-01T00:30:00+01:00", "0001-01-01T00:00:00Z", "1899-12-31T23:59:59Z"],
)
def test_timestamps_before_1900(stamp: str) -> None:
    assert refused(track(timestamp=stamp)) == (
        "timestamp",
        f"timestamp {stamp!r} is out of range: events must be stamped from "
        "1900-01-01T00:00:00Z to before 3000-01-01T00:00:00Z",
    )


def test_the_range_of_timestamps() -> None:
    assert decode(track(timestamp="1900-01-01T00:00:00Z")).at == to_instant(
        datetime(1900, 1, 1, tzinfo=UTC)
    )
    line = track(timestamp="3000-01-01T00:00:00Z")
    with pytest.raises(InvalidEvent, match="out of range"):
        event_from_line(line, now=RECEIVED)


def test_a_very_long_timestamp_is_quoted_cut() -> None:
    kind, reason = refused(track(timestamp="2026" * 10_000))
    assert kind == "timestamp" and len(reason) < 300


# --- time zones ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "shown"),
    [
        ("America", "'America'"),
        ("x" * 300, repr("x" * 64 + "...")),
        ("../../../etc/passwd", "'../../../etc/passwd'"),
        ("europe/london", "'europe/london'"),
        ("", "''"),
        (5, "of type int"),
        (["Europe/London"], "of type list"),
    ],
)
def test_a_timezone_zoneinfo_does_not_know(zone: object, shown: str) -> None:
    assert refused(identify(timezone=zone)) == (
        "timezone",
        f"trait `timezone` {shown} is not a time zone name zoneinfo knows: give an IANA "
        "name such as 'Europe/London', or null",
    )


def test_known_timezones_and_null_are_accepted() -> None:
    for zone in ("Europe/London", "America/New_York", "UTC", None):
        assert decode(identify(timezone=zone)).traits == {"timezone": zone}
    # Only identify traits are time zones: a property of that name is any value.
    assert decode(track(properties={"timezone": "America"})).properties


# --- subjects -----------------------------------------------------------------------------


def test_a_subject_that_is_not_utf8() -> None:
    subject = b"shoal.events.p\xff".decode("utf-8", "surrogateescape")
    assert refused(track(userId="p"), subject) == (
        "subject",
        "subject 'shoal.events.p\\xff' is not valid UTF-8 (bytes that are not are shown as \\xNN)",
    )


def test_the_rejection_of_such_a_subject_can_be_written() -> None:
    subject = b"shoal.events.p\xff".decode("utf-8", "surrogateescape")
    r, body = encode_rejection(
        reason="r",
        subject=subject,
        data=b"{}",
        received=RECEIVED,
        stream_sequence=1,
        max_bytes=1 << 20,
    )
    assert r.subject == "shoal.events.p\\xff"
    assert msgspec.json.decode(body, type=Rejection).subject == "shoal.events.p\\xff"


# --- rejections too large to publish ------------------------------------------------------


def cut(data: bytes, max_bytes: int, reason: str = "invalid JSON") -> tuple[Rejection, bytes]:
    return encode_rejection(
        reason=reason,
        subject=SUBJECT,
        data=data,
        received=RECEIVED,
        stream_sequence=9,
        max_bytes=max_bytes,
    )


def test_a_rejection_that_fits_is_whole_with_its_size_and_hash() -> None:
    r, body = cut(b"not json", 1 << 20)
    assert (r.payload, r.truncated, r.payload_bytes) == ("not json", False, 8)
    assert r.payload_sha256 == hashlib.sha256(b"not json").hexdigest()
    assert msgspec.json.decode(body, type=Rejection) == r


@pytest.mark.parametrize(
    "data",
    [
        b"x" * 5000,
        b"\x01" * 5000,  # six bytes of JSON each
        'é"\\'.encode() * 2000,
        b"\xff\xfe" * 3000,  # not UTF-8: base64
    ],
)
@pytest.mark.parametrize("max_bytes", [400, 1000, 4096])
def test_a_rejection_too_large_is_cut_to_fit(data: bytes, max_bytes: int) -> None:
    r, body = cut(data, max_bytes)
    assert len(body) <= max_bytes
    assert max_bytes - len(body) < 10  # the payload fills what is left
    assert msgspec.json.decode(body, type=Rejection) == r
    assert r.truncated and r.payload_bytes == len(data)
    assert r.payload_sha256 == hashlib.sha256(data).hexdigest()
    assert r.reason == "invalid JSON" and r.subject == SUBJECT
    if r.payload is not None:
        assert data.decode().startswith(r.payload)
    else:
        assert r.payload_base64 is not None and data.startswith(base64.b64decode(r.payload_base64))


def test_a_reason_too_long_for_the_broker_is_cut_too() -> None:
    r, body = cut(b"{}", 300, reason="why " * 200)
    assert len(body) <= 300 and r.truncated and r.reason.endswith("...")
    assert r.payload == ""


def test_an_old_rejection_still_decodes() -> None:
    old = (
        b'{"reason":"r","subject":"shoal.events.a","received_at":"2026-11-22T09:00:00Z",'
        b'"stream_sequence":1,"payload":"x","payload_base64":null}'
    )
    r = msgspec.json.decode(old, type=Rejection)
    assert (r.payload_bytes, r.payload_sha256, r.truncated) == (None, None, False)


async def test_the_memory_sink_cuts_as_the_nats_sink_does() -> None:
    broker = MemoryBroker(lambda: RECEIVED)
    sink = MemorySink(broker, max_payload=1024)
    data = b"x" * 5000
    await sink.publish_rejection(
        reason="invalid JSON", subject=SUBJECT, data=data, received=RECEIVED, stream_sequence=9
    )
    (r,) = broker.rejections
    assert r == cut(data, 1024 - 256)[0]
    assert r.truncated and r.payload_bytes == 5000
