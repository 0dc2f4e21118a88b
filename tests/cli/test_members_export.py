"""``shoal members SEGMENT --format csv|jsonl`` (the whole segment, with ``true_since``) and
``shoal customer --search PREFIX``, against ``shoal serve`` as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from protocol import DEFAULT_PARTITIONS
from scripts._export import atomic_output
from tests.helpers import NatsServer, Proc, run

SEGMENTS = """
[segments.visitor]
rule = "count('Visit') >= 1"

[segments.gold]
rule = "trait('plan') = 'gold'"
"""
USERS = [f"c{i:04d}" for i in range(1, 31)]


def visit(user: str, day: int) -> str:
    return json.dumps(
        {
            "type": "track",
            "userId": user,
            "event": "Visit",
            "timestamp": f"2026-01-{day:02d}T09:00:00.250Z",
            "messageId": f"{user}-v",
        }
    )


@pytest.fixture
def served(nats_server: NatsServer, tmp_path: Path, procs: list[Proc]) -> str:
    """``shoal serve`` on the test's broker with 30 visitors (c0001 to c0030; c000N visited on
    day N of January 2026, c00NN on day NN mod 28 + 1) and one gold customer; its URL."""
    url = nats_server.url
    seg_file = tmp_path / "segments.toml"
    seg_file.write_text(SEGMENTS)
    serve = Proc(
        "serve", "--data-dir", str(tmp_path / "data"), "--nats", url, "--segments", str(seg_file)
    )
    procs.append(serve)
    serve.wait_err("shoal is serving")
    lines = [visit(u, i % 28 + 1) for i, u in enumerate(USERS, 1)]
    lines.append(json.dumps({"type": "identify", "userId": "zed", "traits": {"plan": "gold"}}))
    done = run("publish", "--nats", url, stdin="\n".join(lines))
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 20
    while run("members", "visitor", "--count", "--nats", url).stdout != "30\n":
        assert time.monotonic() < deadline, "the engine did not apply the events"
        time.sleep(0.2)
    return url


def expected_rows() -> list[tuple[str, str]]:
    return [(u, f"2026-01-{i % 28 + 1:02d}T09:00:00.250000Z") for i, u in enumerate(USERS, 1)]


@pytest.mark.slow
def test_members_export_the_whole_segment(served: str, tmp_path: Path) -> None:
    url = served
    done = run("members", "visitor", "--format", "csv", "--nats", url)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows[0] == ["customer_id", "true_since"]
    assert [tuple(r) for r in rows[1:]] == expected_rows()
    assert done.stderr == "exported 30 member(s) of visitor\n"

    done = run("members", "visitor", "--format", "jsonl", "--nats", url)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(d["customer_id"], d["true_since"]) for d in lines] == expected_rows()
    assert all(set(d) == {"customer_id", "true_since"} for d in lines)

    # To a file: complete, and no temporary file left beside it.
    out = tmp_path / "out" / "visitors.csv"
    out.parent.mkdir()
    out.write_text("an older export\n")
    done = run("members", "visitor", "--format", "csv", "--output", str(out), "--nats", url)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    assert done.stderr == f"exported 30 member(s) of visitor to {out}\n"
    assert out.read_text().splitlines()[1] == "c0001,2026-01-02T09:00:00.250000Z"
    assert len(out.read_text().splitlines()) == 31
    assert sorted(p.name for p in out.parent.iterdir()) == ["visitors.csv"]

    # --json keeps its meaning: one JSON line holding the reply (a page).
    done = run("members", "gold", "--json", "--nats", url)
    reply = json.loads(done.stdout)
    assert (reply["members"], reply["true_since"]) == (["zed"], [reply["true_since"][0]])


@pytest.mark.slow
def test_members_export_errors(served: str, tmp_path: Path) -> None:
    url = served
    out = tmp_path / "vip.csv"
    done = run("members", "vip", "--format", "csv", "--output", str(out), "--nats", url)
    assert (done.returncode, done.stdout, done.stderr) == (
        4,
        "",
        "shoal: error: unknown segment 'vip'; the segments defined are: visitor, gold\n",
    )
    assert list(tmp_path.glob("*.csv*")) == [] and list(tmp_path.glob(".vip*")) == []
    for more, flag in (
        (["--json"], "--json"),
        (["--limit", "5"], "--limit"),
        (["--cursor", "c0001"], "--cursor"),
        (["--count"], "--count"),
    ):
        done = run("members", "visitor", "--format", "csv", *more, "--nats", url)
        assert (done.returncode, done.stderr) == (
            2,
            f"shoal: error: --format exports the whole segment: give no {flag}\n",
        )
    done = run("members", "visitor", "--output", str(out), "--nats", url)
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --output goes with --format csv|jsonl (the whole segment)\n",
    )
    done = run(
        "members", "visitor", "--format", "csv", "--output", str(tmp_path / "no" / "x.csv"),
        "--nats", url,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        4,  # not found, as export and replay say it
        f"shoal: error: cannot write {tmp_path / 'no' / 'x.csv'}: No such file or directory\n",
    )
    folder = tmp_path / "a-folder"
    folder.mkdir()
    done = run("members", "visitor", "--format", "csv", "--output", str(folder), "--nats", url)
    assert (done.returncode, done.stderr) == (
        2,
        f"shoal: error: cannot write {folder}: Is a directory\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_interrupted_export_leaves_no_file_and_the_old_one_whole(tmp_path: Path) -> None:
    out = tmp_path / "members.csv"
    out.write_text("the last export\n")
    with pytest.raises(KeyboardInterrupt), atomic_output(str(out)) as f:
        f.write("customer_id,true_since\nc1,")
        raise KeyboardInterrupt
    assert out.read_text() == "the last export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["members.csv"]
    with atomic_output(str(out)) as f:
        f.write("customer_id,true_since\n")
    assert out.read_text() == "customer_id,true_since\n"
    assert [p.name for p in tmp_path.iterdir()] == ["members.csv"]


@pytest.mark.slow
def test_customer_search(served: str) -> None:
    url = served
    done = run("customer", "--search", "c001", "--nats", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"c00{i:02d}" for i in range(10, 20)]
    assert done.stderr == "10 customer(s) whose id starts with 'c001'\n"

    done = run("customer", "--search", "c00", "--limit", "3", "--nats", url)
    assert done.stdout.splitlines() == ["c0001", "c0002", "c0003"]
    assert done.stderr == (
        "3 customer(s) whose id starts with 'c00'; more match: give a longer prefix\n"
    )
    done = run("customer", "--search", "c003", "--json", "--nats", url)
    assert json.loads(done.stdout) == {
        "prefix": "c003",
        "customers": ["c0030"],
        "more": False,
        "complete": True,
        # Gathered from every engine (one here, owning every partition).
        "partition_count": DEFAULT_PARTITIONS,
        "partitions": list(range(DEFAULT_PARTITIONS)),
        "missing_partitions": [],
    }

    done = run("customer", "--search", "nobody", "--nats", url)
    assert (done.returncode, done.stdout, done.stderr) == (
        4,
        "",
        "0 customer(s) whose id starts with 'nobody'\n",
    )
    for args, message in (
        (["--search", "x" * 257], "--search PREFIX is 257 characters long; a customer id has "
         "at most 256"),
        (["c0001", "--search", "c"], "give a customer ID or --search PREFIX, not both"),
        ([], "give a customer ID, or --search PREFIX"),
        (["--search", "c", "--limit", "0"], "--limit must be between 1 and 1000"),
    ):  # fmt: skip
        done = run("customer", *args, "--nats", url)
        assert (done.returncode, done.stderr) == (2, f"shoal: error: {message}\n")
