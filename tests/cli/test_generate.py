"""actors.population and ``shoal generate``: a seeded, reproducible synthetic population, in
receive order, that shoal's own inbound decoder accepts line by line."""

from __future__ import annotations

import collections
import hashlib
import io
import json

import msgspec
import pytest

from actors import load_segments, replay
from actors.population import (
    DEFAULT_START,
    from_segment_spec,
    generate,
    history_end,
    to_segment_spec,
    write_history,
)
from protocol import DAY, decode_event, event_subject
from tests.helpers import run


def test_same_arguments_same_events_and_another_seed_others() -> None:
    a = list(generate(200, 60, seed=3))
    assert a == list(generate(200, 60, seed=3))
    assert a != list(generate(200, 60, seed=4))


def test_events_come_in_receive_order_within_the_period() -> None:
    events = list(generate(300, 120, seed=1))
    assert [e.received for e in events] == sorted(e.received for e in events)
    assert all(DEFAULT_START <= e.at <= e.received < history_end(120) for e in events)
    assert len({(e.customer_id, e.message_id) for e in events}) == len(events)
    late = sum(1 for e in events if e.at < e.received)
    assert 0 < late < len(events) // 10


def test_the_population_looks_like_a_club() -> None:
    events = list(generate(400, 180, seed=2))
    names = collections.Counter(e.name or e.kind for e in events)
    assert set(names) == {
        "identify",
        "Visit",
        "Email Opened",
        "Email Link Clicked",
        "Order Completed",
    }
    assert names["Visit"] > names["Email Opened"] > names["Email Link Clicked"]
    # Every customer introduces itself with its plan and renewal date before anything else.
    first: dict[str, str] = {}
    for e in sorted(events, key=lambda e: e.at):
        first.setdefault(e.customer_id, e.kind)
    assert len(first) == 400 and set(first.values()) == {"identify"}
    # Visits follow a weekly rhythm: weekdays busier than the weekend, on average.
    weekday = collections.Counter(((e.at // DAY) + 3) % 7 for e in events if e.name == "Visit")
    assert min(weekday[d] for d in range(5)) > 0 and weekday[6] < max(weekday.values())
    # The default segments all have members at some point.
    entered = {t.segment for t in replay(events, load_segments()) if t.change == "entered"}
    assert entered == set(load_segments().names)


def test_segment_spec_lines_are_what_shoal_accepts() -> None:
    for event in list(generate(50, 60, seed=5))[:400]:
        message = to_segment_spec(event)
        data = msgspec.json.encode(message)
        assert from_segment_spec(json.loads(data)) == event
        decoded = decode_event(
            data,
            event_subject(event.customer_id),
            received=event.received,
            default_message_id="unused",
        )
        assert decoded == event


def test_command_line_writes_json_lines() -> None:
    done = run("generate", "--customers", "20", "--days", "30", "--seed", "7")
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert [from_segment_spec(json.loads(line)) for line in lines] == list(generate(20, 30, 7))
    buffer = io.BytesIO()
    assert write_history(generate(20, 30, 7), buffer) == len(lines)
    assert buffer.getvalue() == done.stdout.encode()


# sha256 of what `python scripts/generate.py --customers 300 --days 60 --seed 3` wrote at
# ddd092d (before the generator became actors.population and `shoal generate`).
SCRIPT_SHA256 = "6ba340a64326402fbb463f76570df9d51f5c82a8c89b76545559ba88393992e6"


def test_command_line_writes_what_the_script_wrote() -> None:
    done = run("generate", "--customers", "300", "--days", "60", "--seed", "3")
    assert done.returncode == 0
    assert hashlib.sha256(done.stdout.encode()).hexdigest() == SCRIPT_SHA256


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--days", "0"], "--customers and --days must be positive"),
        (["--customers", "-3"], "--customers and --days must be positive"),
        (
            ["--start", "2025-01-06"],
            "--start: timestamp '2025-01-06' is not an ISO-8601 date and time with a UTC offset "
            "(for example 2026-11-22T10:00:00+01:00 or 2026-11-22T09:00:00Z)",
        ),
    ],
)
def test_command_line_refuses_bad_arguments(argv: list[str], message: str) -> None:
    done = run("generate", *argv)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr == f"shoal: error: {message}\n"


@pytest.mark.parametrize("customers, days", [(0, 10), (10, 0)])
def test_nothing_to_generate_is_an_error(customers: int, days: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        next(generate(customers, days))
