"""``shoal publish`` and ``shoal tail`` as a user runs them (issue 17, items 5 and 6): local
validation with the engine's reasons, acknowledgements with stream sequences, flag mistakes,
stdin only when asked or piped, one Ctrl-C; an unknown segment, a closed pipe, ``--from``."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from protocol import EventCause, Transition
from tests.helpers import SHOAL, NatsServer, Proc, declare_streams, run

SEGMENTS = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.gold]
rule = "trait('plan') = 'gold'"
"""


def visit(user: str, **extra: object) -> str:
    return json.dumps({"type": "track", "userId": user, "event": "Visit", **extra})


@pytest.fixture
def engine(nats_server: NatsServer, tmp_path: Path, procs: list[Proc]) -> Iterator[str]:
    """A ``shoal serve`` on the test's server, with SEGMENTS; its URL."""
    seg_file = tmp_path / "segments.toml"
    seg_file.write_text(SEGMENTS)
    serve = Proc(
        "serve",
        *("--data-dir", str(tmp_path / "data"), "--nats", nats_server.url),
        *("--segments", str(seg_file)),
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    yield nats_server.url


# publish ----------------------------------------------------------------------------------


def test_publish_validates_as_the_engine_does_and_reports_sequences(
    nats_server: NatsServer,
) -> None:
    declare_streams(nats_server.url)
    lines = [
        visit("a", messageId="m1"),
        visit("b", timestamp="2099-01-01T00:00:00Z"),
        json.dumps({"type": "identify", "userId": "c", "traits": {"plan": "gold"}}),
        json.dumps({"type": "page", "userId": "d"}),
        visit("a", messageId="m1"),
    ]
    done = run("publish", "--nats", nats_server.url, "--json", stdin="\n".join(lines) + "\n")
    assert done.returncode == 3  # bad input: two lines were not sent
    err = done.stderr.splitlines()
    assert err[0].startswith("line 2: timestamp '2099-01-01T00:00:00Z' is ") and err[0].endswith(
        "at most 300 s ahead is allowed; not sent"
    )
    assert err[1:] == [
        "line 4: unknown type 'page': expected 'track' or 'identify'; not sent",
        "published 2 event(s): SHOAL_EVENTS sequences 1 to 2; 1 already stored (sequence 1), "
        "the same Nats-Msg-Id: not again; 2 line(s) not valid, not sent",
    ]
    assert [json.loads(x) for x in done.stdout.splitlines()] == [
        {"line": 1, "stream": "SHOAL_EVENTS", "seq": 1, "duplicate": False},
        {"line": 3, "stream": "SHOAL_EVENTS", "seq": 2, "duplicate": False},
        {"line": 5, "stream": "SHOAL_EVENTS", "seq": 1, "duplicate": True},
    ]
    done = run("publish", "--nats", nats_server.url, "--customer", "e", "--event", "Visit")
    assert (done.returncode, done.stderr) == (0, "published 1 event(s): SHOAL_EVENTS sequence 3\n")


def test_publish_before_the_engine_created_the_stream(nats_server: NatsServer) -> None:
    done = run("publish", "--nats", nats_server.url, "--customer", "a", "--event", "Visit")
    assert (done.returncode, done.stderr) == (
        1,
        "shoal: error: the engine has not created stream SHOAL_EVENTS on this NATS server yet, "
        "so nothing was stored: start `shoal serve` once (it creates the streams), then "
        "publish again\n",
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ("--customer", "a", "--event", "Visit", "--trait", "plan=gold"),
            "--trait is a trait of an identify event: with --event give --prop",
        ),
        (
            ("--customer", "a", "--identify", "--prop", "plan=gold"),
            "--prop is a property of a track event: with --identify give --trait",
        ),
        (
            ("--event", "Visit", "--message-id", "m1"),
            "--event, --message-id: only with --customer ID (to build one event)",
        ),
    ],
)
def test_publish_flag_mistakes_are_usage_errors(args: tuple[str, ...], problem: str) -> None:
    # No broker at all: the flags are checked first.
    done = run("publish", "--nats", "nats://127.0.0.1:1", *args)
    assert (done.returncode, done.stderr) == (2, f"shoal: error: {problem}\n")


def _on_a_terminal(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    """``shoal ARGS`` with a terminal as stdin (the other end returned, to type on)."""
    typing, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*SHOAL, *args], stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    os.close(terminal)
    return proc, typing


def _end(proc: subprocess.Popen[bytes], typing: int) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    os.close(typing)


def test_publish_on_a_terminal_without_input_is_a_usage_error(nats_server: NatsServer) -> None:
    proc, typing = _on_a_terminal("publish", "--nats", nats_server.url)
    try:
        _, err = proc.communicate(timeout=30)  # it used to wait for lines typed
    finally:
        _end(proc, typing)
    assert proc.returncode == 2
    assert err.decode() == (
        "shoal: error: give a FILE of JSON lines, '-' to type them on stdin, or one event with "
        "--customer ID --event NAME (or --identify); stdin is read without '-' only from a "
        "pipe\n"
    )


def test_publish_from_a_terminal_stops_at_one_ctrl_c(nats_server: NatsServer) -> None:
    declare_streams(nats_server.url)
    proc, typing = _on_a_terminal("publish", "-", "--nats", nats_server.url, "--json")
    try:
        os.write(typing, (visit("a") + "\n").encode())
        assert proc.stdout is not None
        # Its acknowledgement: the line was read and sent, and publish waits for more.
        assert json.loads(proc.stdout.readline())["seq"] == 1
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # one Ctrl-C is enough: it used to need two
    finally:
        _end(proc, typing)
    assert proc.returncode == 130


# tail -------------------------------------------------------------------------------------


def test_tail_of_an_unknown_segment_lists_the_known_ones(engine: str) -> None:
    done = run("tail", "vip", "--nats", engine, timeout=30)  # it used to wait for ever
    assert (done.returncode, done.stdout, done.stderr) == (
        4,
        "",
        "shoal: error: unknown segment 'vip'; the segments defined are: visitor, gold\n",
    )


def test_tail_says_when_no_engine_can_check_the_segment(
    nats_server: NatsServer, procs: list[Proc]
) -> None:
    tail = Proc("tail", "vip", "--nats", nats_server.url)
    procs.append(tail)
    line = tail.wait_err("shoal tail: warning")
    assert line.startswith(
        "shoal tail: warning: segment 'vip' is not checked, no engine answered (no shoal "
        "engine answers on shoal.api.segments"
    )
    assert line.endswith("; waiting for its transitions")
    assert tail.popen.poll() is None  # it tails all the same: the engine may come later


def test_tail_ends_quietly_when_its_reader_goes(engine: str, procs: list[Proc]) -> None:
    assert run("publish", "--nats", engine, stdin=visit("a") + "\n").returncode == 0
    tail = subprocess.Popen(
        [*SHOAL, "tail", "visitor", "--from-start", "--nats", engine],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["customer_id"] == "a"
        tail.stdout.close()  # as `head -1` exits
        # A transition after that is written to a pipe nobody reads.
        assert run("publish", "--nats", engine, stdin=visit("b") + "\n").returncode == 0
        _, err = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.communicate()
    assert (tail.returncode, err) == (0, b"")


def test_tail_from_an_instant(engine: str, procs: list[Proc]) -> None:
    assert run("publish", "--nats", engine, stdin=visit("early") + "\n").returncode == 0
    first = Proc("tail", "visitor", "--from-start", "--nats", engine)
    procs.append(first)
    assert json.loads(first.out_lines(1)[0])["customer_id"] == "early"  # stored by now
    since = datetime.now(UTC).isoformat()
    assert run("publish", "--nats", engine, stdin=visit("late") + "\n").returncode == 0
    tail = Proc("tail", "visitor", "--from", since, "--nats", engine)
    procs.append(tail)
    assert json.loads(tail.out_lines(1)[0])["customer_id"] == "late"
    done = run("tail", "--from", "yesterday", "--nats", engine)
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --from 'yesterday' is not a date (2026-01-31) or an ISO-8601 date and "
        "time (2026-01-31T09:00:00Z)\n",
    )


def test_a_transition_for_people_is_to_the_millisecond() -> None:
    from scripts._tail_cmd import readable

    t = Transition(
        customer_id="alice",
        segment="visitor",
        change="entered",
        at=datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC),
        cause=EventCause(message_id="m1"),
        version=1,
    )
    assert readable(t) == "2026-11-22T10:00:00.123Z  alice -> visitor (entered, event m1, v1)"
