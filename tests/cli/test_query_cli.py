"""``shoal status|customer|explain|members|segments list|apply`` against ``shoal serve``, as a
user runs them: subprocesses, tables or JSON lines, one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest

from protocol import CustomerReply, SegmentsReply, StatusReply
from tests.helpers import NatsServer, Proc, run

SEGMENTS = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.gold]
rule = "trait('plan') = 'gold'"
"""
NEW = (
    SEGMENTS
    + """
[segments.loyal]
rule = "count('Visit') >= 2"
"""
)
BROKEN = """
[segments.visitor]
rule = "count('Visit' >= 1"
"""


@pytest.mark.slow
def test_operator_commands(nats_server: NatsServer, tmp_path: Path, procs: list[Proc]) -> None:  # noqa: F811
    url = nats_server.url
    seg_file = tmp_path / "segments.toml"
    seg_file.write_text(SEGMENTS)
    serve = Proc(
        "serve", "--data-dir", str(tmp_path / "data"), "--nats", url, "--segments", str(seg_file)
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    events = [
        {"type": "track", "userId": "alice", "event": "Visit", "messageId": "a1"},
        {"type": "identify", "userId": "alice", "traits": {"plan": "gold"}, "messageId": "a2"},
        {"type": "track", "userId": "bob", "event": "Visit", "messageId": "b1"},
    ]
    done = run("publish", "--nats", url, stdin="\n".join(json.dumps(e) for e in events))
    assert done.returncode == 0, done.stderr

    deadline = time.monotonic() + 20
    while True:
        done = run("status", "--nats", url, "--json")
        assert done.returncode == 0, done.stderr
        status = msgspec.json.decode(done.stdout, type=StatusReply)
        if status.events_applied == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (status.events_applied, status.customers, status.warm) == (3, 2, True)
    assert [(s.name, s.size) for s in status.segments] == [("visitor", 2), ("gold", 1)]
    done = run("status", "--nats", url)
    assert "engine" in done.stdout and "up, consumer shoal-engine" in done.stdout

    done = run("customer", "alice", "--nats", url, "--json")
    assert done.returncode == 0, done.stderr
    alice = msgspec.json.decode(done.stdout, type=CustomerReply)
    assert [m.segment for m in alice.segments] == ["visitor", "gold"]
    assert alice.traits == {"plan": "gold"}
    done = run("customer", "alice", "--nats", url)
    assert "alice" in done.stdout and "visitor" in done.stdout and '"gold"' in done.stdout

    done = run("customer", "carol", "--nats", url)
    assert (done.returncode, done.stdout, done.stderr) == (
        4,
        "",
        "shoal: error: unknown customer 'carol'\n",
    )

    done = run("members", "visitor", "--nats", url, "--limit", "1")
    assert (done.returncode, done.stdout) == (0, "alice\n"), done.stderr
    assert done.stderr == "1 of 2 member(s); next page: --cursor alice\n"
    done = run("members", "visitor", "--nats", url, "--cursor", "alice")
    assert (done.stdout, done.stderr) == ("bob\n", "1 of 2 member(s)\n")
    done = run("members", "gold", "--nats", url, "--count")
    assert done.stdout == "1\n"
    done = run("members", "vip", "--nats", url)
    assert (done.returncode, done.stderr) == (
        4,
        "shoal: error: unknown segment 'vip'; the segments defined are: visitor, gold\n",
    )

    done = run("explain", "alice", "gold", "--nats", url)
    assert done.returncode == 0, done.stderr
    assert "gold: member since" in done.stdout and "trait('plan') = 'gold'" in done.stdout

    done = run("segments", "list", "--nats", url, "--json")
    listed = msgspec.json.decode(done.stdout, type=SegmentsReply)
    assert [(s.name, s.size) for s in listed.segments] == [("visitor", 2), ("gold", 1)]

    broken, new = tmp_path / "broken.toml", tmp_path / "new.toml"
    broken.write_text(BROKEN)
    new.write_text(NEW)
    done = run("segments", "validate", str(new))  # offline, as before
    assert done.stdout == f"{new}: ok, 3 segments (visitor, gold, loyal)\n"
    done = run("segments", "validate", str(new), "--nats", url)
    assert done.stdout.splitlines()[1] == f"{new}: on the engine, applying it adds loyal"
    done = run("segments", "apply", str(broken), "--nats", url)
    assert done.returncode == 3  # bad input
    assert done.stderr.startswith(f"shoal: error: {broken}: segment 'visitor': rule ")
    done = run("segments", "apply", str(new), "--nats", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{new}: applied (adds loyal); 0 transition(s)\n"
    done = run("segments", "list", "--nats", url)
    assert "loyal" in done.stdout

    assert serve.stop() == 0
    done = run("status", "--nats", url, "--timeout", "1")
    assert (done.returncode, done.stderr) == (
        1,
        "shoal: error: no shoal engine answers on shoal.api.status (is `shoal serve` running, "
        "and connected to this NATS server?)\n",
    )
