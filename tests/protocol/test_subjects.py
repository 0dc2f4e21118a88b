"""Subjects and subject tokens: escaping customer ids, event and segment subjects."""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    SEGMENTS_WILDCARD,
    SubjectError,
    customer_of_event_subject,
    customer_of_stored_subject,
    escape_token,
    event_subject,
    header_token,
    partition,
    segment_filter,
    segment_subject,
    stored_event_subject,
    unescape_token,
    validate_segment_name,
)
from protocol._subjects import partition_transform, partitions_of_transform, token_partition

# Text that is likely to hit the reserved characters, besides arbitrary text.
_reserved_heavy = st.text(
    alphabet=st.sampled_from(list(".*>% \t\n\x00\x1f\x7f\u3000\xa0aZ9é_-:")), min_size=1
)
ids = st.one_of(st.text(min_size=1), _reserved_heavy)


# --- escape_token ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer_id", "token"),
    [
        ("alice", "alice"),
        ("a.b c", "a%2Eb%20c"),
        ("*", "%2A"),
        (">", "%3E"),
        ("100%", "100%25"),
        ("tab\there", "tab%09here"),
        ("nl\n", "nl%0A"),
        ("del\x7f", "del%7F"),
        ("nul\x00", "nul%00"),
        ("zoë", "zoë"),
        ("wide\u3000space", "wide%E3%80%80space"),
        ("nbsp\xa0", "nbsp%C2%A0"),
        ("user:42/x", "user:42/x"),
    ],
)
def test_escape_token_examples(customer_id: str, token: str) -> None:
    assert escape_token(customer_id) == token


def test_escape_token_rejects_empty_id() -> None:
    with pytest.raises(SubjectError, match="^a customer id cannot be empty$"):
        escape_token("")


@given(ids)
def test_escape_unescape_round_trip(customer_id: str) -> None:
    assert unescape_token(escape_token(customer_id)) == customer_id


@given(ids)
def test_escaped_token_holds_no_reserved_character(customer_id: str) -> None:
    token = escape_token(customer_id)
    assert token
    for ch in token:
        assert ch not in ".*>"
        assert not ch.isspace()
        assert unicodedata.category(ch) != "Cc"


@given(ids)
def test_escape_token_keeps_ids_without_reserved_characters(customer_id: str) -> None:
    if not any(c in ".*>%" or c.isspace() or unicodedata.category(c) == "Cc" for c in customer_id):
        assert escape_token(customer_id) == customer_id


@given(st.text(alphabet=st.sampled_from(list("%0123456789ABCDEFabcdef.*> aé")), min_size=1))
def test_unescape_accepts_only_canonical_tokens(token: str) -> None:
    try:
        customer_id = unescape_token(token)
    except SubjectError:
        return
    assert escape_token(customer_id) == token


@given(ids)
def test_unescape_rejects_lower_case_hex(customer_id: str) -> None:
    token = escape_token(customer_id)
    lowered = token.replace("%2E", "%2e").replace("%3E", "%3e").replace("%2A", "%2a")
    lowered = lowered.replace("%7F", "%7f").replace("%0A", "%0a").replace("%A0", "%a0")
    if lowered != token:
        with pytest.raises(SubjectError, match="bad escape"):
            unescape_token(lowered)


@given(st.text(min_size=1).filter(lambda s: any(c not in ".*>%" for c in s)))
def test_unescape_rejects_escaped_characters_that_need_no_escape(customer_id: str) -> None:
    # Escape every character, reserved or not: only reserved ones may be escaped.
    token = "".join(f"%{b:02X}" for b in customer_id.encode("utf-8"))
    if token != escape_token(customer_id):
        with pytest.raises(SubjectError, match="is not in canonical form"):
            unescape_token(token)


def test_unescape_rejects_empty_token() -> None:
    with pytest.raises(SubjectError, match="^the customer token is empty$"):
        unescape_token("")


@pytest.mark.parametrize("token", ["a.b", "a b", "*", ">", "x\ty", "a\x7f"])
def test_unescape_rejects_unescaped_reserved_character(token: str) -> None:
    with pytest.raises(SubjectError) as e:
        unescape_token(token)
    assert str(e.value) == f"customer token {token!r} holds a character that must be escaped"


@pytest.mark.parametrize(("token", "position"), [("a%2eb", 1), ("a%2", 1), ("%", 0), ("ab%G1", 2)])
def test_unescape_rejects_bad_escape(token: str, position: int) -> None:
    with pytest.raises(SubjectError) as e:
        unescape_token(token)
    assert str(e.value) == (
        f"customer token {token!r} has a bad escape at position {position}: "
        "'%' must be followed by two upper-case hex digits"
    )


@pytest.mark.parametrize(
    ("token", "canonical"),
    [("%41", "A"), ("%C3%A9", "é"), ("%2E.", "%2E%2E"), ("a%2Eb c", "a%2Eb%20c")],
)
def test_unescape_rejects_non_canonical_escape(token: str, canonical: str) -> None:
    with pytest.raises(SubjectError) as e:
        unescape_token(token)
    assert str(e.value) == (
        f"customer token {token!r} is not in canonical form; escape the id as {canonical!r}"
    )


@pytest.mark.parametrize("token", ["%FF", "%C3", "a%E3%80"])
def test_unescape_rejects_escapes_that_are_not_utf8(token: str) -> None:
    with pytest.raises(SubjectError) as e:
        unescape_token(token)
    assert str(e.value) == f"customer token {token!r} escapes bytes that are not UTF-8"


# --- event subjects ----------------------------------------------------------------------


def test_event_subject_escapes_the_customer() -> None:
    assert event_subject("alice") == "shoal.events.alice"
    assert event_subject("a.b c") == "shoal.events.a%2Eb%20c"


def test_event_subject_rejects_empty_customer() -> None:
    with pytest.raises(SubjectError, match="^a customer id cannot be empty$"):
        event_subject("")


@given(ids)
def test_customer_of_event_subject_round_trip(customer_id: str) -> None:
    assert customer_of_event_subject(event_subject(customer_id)) == customer_id


def test_customer_of_event_subject_rejects_other_prefix() -> None:
    with pytest.raises(SubjectError) as e:
        customer_of_event_subject("shoal.segments.active.entered")
    assert str(e.value) == ("subject 'shoal.segments.active.entered' is not under 'shoal.events.'")


def test_customer_of_event_subject_rejects_prefix_without_dot() -> None:
    with pytest.raises(SubjectError) as e:
        customer_of_event_subject("shoal.events")
    assert str(e.value) == "subject 'shoal.events' is not under 'shoal.events.'"


def test_customer_of_event_subject_rejects_two_tokens() -> None:
    with pytest.raises(SubjectError) as e:
        customer_of_event_subject("shoal.events.a.b")
    assert str(e.value) == (
        "subject 'shoal.events.a.b' must have exactly one customer token after "
        "'shoal.events.' (escape '.' in customer ids as %2E)"
    )


def test_customer_of_event_subject_rejects_empty_token() -> None:
    with pytest.raises(SubjectError, match="^the customer token is empty$"):
        customer_of_event_subject("shoal.events.")


@pytest.mark.parametrize("wildcard", ["*", ">"])
def test_customer_of_event_subject_rejects_wildcard_token(wildcard: str) -> None:
    # SHOAL_EVENTS stores a hand-published literal wildcard as it is, with no partition.
    for parse in (customer_of_event_subject, customer_of_stored_subject):
        with pytest.raises(SubjectError) as e:
            parse(f"shoal.events.{wildcard}")
        assert str(e.value) == (
            f"subject 'shoal.events.{wildcard}' was published by hand on a wildcard subject "
            "and stored without a partition: it names no customer (publish each event on "
            "shoal.events.<customer>)"
        )


# --- partitions ----------------------------------------------------------------------------


def test_partition_is_fnv1a_of_the_escaped_token() -> None:
    # FNV-1a 32-bit of b"a" is 0xE40C292C; of b"" would be the offset basis.
    assert partition("a", 1 << 16) == 0xE40C292C % (1 << 16)
    assert partition("a", 32) == 0xE40C292C % 32
    # The escaped token is hashed: "a.b" as the broker sees it, "a%2Eb".
    assert partition("a.b", 1000) == token_partition("a%2Eb", 1000)
    assert partition("café", 7) == token_partition("café", 7)


def test_partition_refuses_no_partitions_and_empty_ids() -> None:
    with pytest.raises(ValueError, match="must be positive, not 0"):
        partition("a", 0)
    with pytest.raises(SubjectError, match="cannot be empty"):
        partition("", 32)


@given(st.text(min_size=1, max_size=30), st.integers(min_value=1, max_value=128))
def test_stored_event_subject_round_trip(customer_id: str, partitions: int) -> None:
    subject = stored_event_subject(customer_id, partitions)
    p = partition(customer_id, partitions)
    assert 0 <= p < partitions
    assert subject == f"shoal.events.{p}.{escape_token(customer_id)}"
    assert customer_of_stored_subject(subject) == (p, customer_id)
    assert customer_of_event_subject(subject) == customer_id


@pytest.mark.parametrize(
    "subject",
    [
        "shoal.events.alice",
        "shoal.events.x.alice",
        "shoal.events.07.alice",
        "shoal.events.1.",
        "shoal.events.1.a.b",
        "shoal.events.-1.a",
    ],
)
def test_customer_of_stored_subject_rejects_other_forms(subject: str) -> None:
    with pytest.raises(SubjectError) as e:
        customer_of_stored_subject(subject)
    assert str(e.value) == (
        f"subject {subject!r} is not a stored event subject shoal.events.<partition>.<customer> "
        "(a decimal partition, then one customer token; escape '.' in customer ids as %2E)"
    )


def test_partition_transform_and_back() -> None:
    src, dest = partition_transform(32)
    assert (src, dest) == ("shoal.events.*", "shoal.events.{{partition(32,1)}}.{{wildcard(1)}}")
    assert partitions_of_transform(src, dest) == 32
    assert partitions_of_transform(src, "shoal.events.{{ partition(7, 1) }}.{{wildcard(1)}}") == 7
    assert partitions_of_transform(None, None) is None
    assert partitions_of_transform("shoal.events.>", dest) is None
    assert partitions_of_transform(src, "shoal.events.{{wildcard(1)}}") is None


def test_customer_of_event_subject_rejects_non_canonical_token() -> None:
    with pytest.raises(SubjectError, match="is not in canonical form"):
        customer_of_event_subject("shoal.events.%61")


# --- segment subjects --------------------------------------------------------------------


def test_segment_subject_entered_and_exited() -> None:
    assert segment_subject("active", "entered") == "shoal.segments.active.entered"
    assert segment_subject("lapsing-2_b", "exited") == "shoal.segments.lapsing-2_b.exited"


def test_segment_subject_rejects_unknown_change() -> None:
    with pytest.raises(SubjectError) as e:
        segment_subject("active", "joined")
    assert str(e.value) == "change 'joined' must be 'entered' or 'exited'"


def test_segment_subject_rejects_bad_segment_name() -> None:
    with pytest.raises(SubjectError) as e:
        segment_subject("a.b", "entered")
    assert str(e.value) == (
        "segment name 'a.b' must be 1 to 128 letters, digits, '_' or '-' "
        "(it is used as a subject token)"
    )


def test_segment_filter_for_all_segments() -> None:
    assert segment_filter() == SEGMENTS_WILDCARD == "shoal.segments.>"
    assert segment_filter(None) == "shoal.segments.>"


def test_segment_filter_for_one_segment() -> None:
    assert segment_filter("active") == "shoal.segments.active.*"


def test_segment_filter_rejects_bad_segment_name() -> None:
    with pytest.raises(SubjectError, match="^segment name '>' must be 1 to 128"):
        segment_filter(">")


@pytest.mark.parametrize("name", ["a", "active", "Lapsing_2", "x-y", "0", "a" * 128])
def test_validate_segment_name_accepts(name: str) -> None:
    assert validate_segment_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a" * 129, "a.b", "a b", "a*", "a>", "zoë", "a\n", "a:b", "a/b", "٣"]
)
def test_validate_segment_name_rejects(name: str) -> None:
    with pytest.raises(SubjectError) as e:
        validate_segment_name(name)
    assert str(e.value) == (
        f"segment name {name!r} must be 1 to 128 letters, digits, '_' or '-' "
        "(it is used as a subject token)"
    )


# --- header_token ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer_id", "token"),
    [
        ("alice", "alice"),
        ("a.b", "a%2Eb"),
        ("zoë", "zo%C3%AB"),
        ("ë.x", "%C3%AB%2Ex"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("100%", "100%25"),
    ],
)
def test_header_token_examples(customer_id: str, token: str) -> None:
    assert header_token(customer_id) == token


def test_header_token_rejects_empty_id() -> None:
    with pytest.raises(SubjectError, match="^a customer id cannot be empty$"):
        header_token("")


@given(ids)
def test_header_token_is_printable_ascii_and_reversible(customer_id: str) -> None:
    token = header_token(customer_id)
    assert token.isascii()
    assert all(0x21 <= ord(c) < 0x7F for c in token)
    assert unquote(token, errors="strict") == customer_id


def test_reserved_characters_are_whitespace_and_control_characters_over_all_unicode() -> None:
    import sys

    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        reserved = ch in ".*>%" or ch.isspace() or unicodedata.category(ch) == "Cc"
        assert (escape_token("a" + ch) != "a" + ch) == reserved, hex(code)
