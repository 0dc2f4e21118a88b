"""One command line (issue 17, item 10): ``--version``, global options before or after the
command, one exit-code table for every command, output files that never stay half written,
and one validator for ``replay FILE`` and ``import`` (only ``import`` checks times against
now)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from actors import DefinitionError
from protocol import ApiError, InvalidEvent, UnknownCustomer, UnknownSegment
from store import StoreMissingError
from tests.helpers import SHOAL, free_port, run


def test_version() -> None:
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"shoal {importlib.metadata.version('shoal')}\n")


def test_log_level_before_or_after_the_command() -> None:
    for args in (
        ("--log-level", "error", "generate", "--customers", "1", "--days", "1"),
        ("generate", "--customers", "1", "--days", "1", "--log-level", "error"),
        ("auth", "permissions", "producer", "--log-level", "debug"),
        ("segments", "--log-level", "warning", "list", "--help"),
    ):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)


GOOD = json.dumps(
    {"type": "track", "userId": "a", "event": "Visit", "timestamp": "2026-01-01T10:00:00Z"}
)


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        # 3: bad input, whichever command reads it.
        (("segments", "validate", "{bad}"), 3, "{bad}: segment 'x': "),
        (("replay", "{lines}"), 3, None),
        # 4: not found.
        (
            ("segments", "validate", "{tmp}/missing.toml"),
            4,
            "{tmp}/missing.toml: cannot read it: [Errno 2] No such file or directory",
        ),
        (
            ("replay", "--data-dir", "{tmp}/nowhere"),
            4,
            "no event log at {tmp}/nowhere/shoal.db (give `shoal serve`'s --data-dir, or a "
            "FILE of events)",
        ),
        (
            ("replay", "{tmp}/missing.jsonl"),
            4,
            "cannot read {tmp}/missing.jsonl: No such file or directory",
        ),
        (
            ("rebuild", "--from-stream", "--data-dir", "{tmp}"),
            4,
            "{tmp}/nats holds no broker store to rebuild from; give the engine's server with "
            "--nats URL",
        ),
        (
            ("replay", "{lines}", "--transitions", "{tmp}/no/such/dir/t.jsonl"),
            4,
            "cannot write {tmp}/no/such/dir/t.jsonl: No such file or directory",
        ),
    ],
)
def test_one_exit_code_table(
    tmp_path: Path, args: tuple[str, ...], code: int, error: str | None
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[segments.x]\nrule = \"count('Visit' >= 1\"\n")
    lines = tmp_path / "lines.jsonl"
    lines.write_text(GOOD + "\nnot json\n")
    names = {"bad": str(bad), "lines": str(lines), "tmp": str(tmp_path)}
    done = run(*(a.format(**names) for a in args), cwd=tmp_path)
    assert done.returncode == code, done.stderr
    if error is not None:
        assert done.stderr.startswith(f"shoal: error: {error.format(**names)}"), done.stderr
    assert "Traceback" not in done.stderr


def test_exit_codes_of_the_packages_errors() -> None:
    from scripts._errors import ExitCode, exit_code

    assert exit_code(UnknownSegment("vip", ("a",))) == ExitCode.NOT_FOUND
    assert exit_code(UnknownCustomer("ann")) == ExitCode.NOT_FOUND
    assert exit_code(ApiError("no", code="400")) == ExitCode.BAD_INPUT
    assert exit_code(ApiError("engine failed")) == ExitCode.FAILURE
    assert exit_code(InvalidEvent("bad")) == ExitCode.BAD_INPUT
    assert exit_code(DefinitionError("bad rule", source="s.toml")) == ExitCode.BAD_INPUT
    assert exit_code(StoreMissingError(Path("x.db"))) == ExitCode.NOT_FOUND


def test_ctrl_c_leaves_output_files_as_they_were(tmp_path: Path) -> None:
    out, sizes = tmp_path / "transitions.jsonl", tmp_path / "sizes.csv"
    out.write_text("the last run's\n")
    replay = subprocess.Popen(
        [*SHOAL, "replay", "-", "--transitions", str(out), "--sizes", str(sizes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert replay.stdin is not None
        replay.stdin.write((GOOD + "\n").encode())
        replay.stdin.flush()
        # The outputs are opened before the work: it is under way once they exist.
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob(".*.part"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        replay.send_signal(signal.SIGINT)
        time.sleep(0.5)
        replay.stdin.close()  # the read under way ends; then the interruption is seen
        replay.wait(30)
    finally:
        if replay.poll() is None:
            replay.kill()
        replay.wait()
        for pipe in (replay.stdin, replay.stdout, replay.stderr):
            if pipe is not None:
                pipe.close()
    assert replay.returncode == 130
    assert out.read_text() == "the last run's\n"
    assert not sizes.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transitions.jsonl"]
    # Complete, it takes its name, with the mode a new file gets.
    lines = tmp_path / "lines.jsonl"
    lines.write_text(GOOD + "\n")
    done = run("replay", str(lines), "--transitions", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.jsonl", "transitions.jsonl"]
    assert json.loads(out.read_text())["customer_id"] == "a"
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_replay_and_import_share_one_validator_only_import_checks_now(tmp_path: Path) -> None:
    lines = tmp_path / "history.jsonl"
    lines.write_text(
        "\n".join(
            [
                GOOD,
                json.dumps(
                    {
                        "type": "track",
                        "userId": "b",
                        "event": "Visit",
                        "timestamp": "2099-01-01T00:00:00Z",
                    }
                ),
                json.dumps({"type": "track", "userId": "c", "event": "Visit"}),
                json.dumps({"type": "page", "userId": "d", "timestamp": "2026-01-01T10:00:00Z"}),
            ]
        )
        + "\n"
    )
    replayed = run("replay", str(lines))
    imported = run(
        "import", str(lines), "--data-dir", str(tmp_path / "data"), "--port", str(free_port())
    )
    assert (replayed.returncode, imported.returncode) == (3, 3)
    same = [
        "line 3: missing required field `timestamp` (a file has no receive time: each event "
        "needs its instant); skipped",
        "line 4: unknown type 'page': expected 'track' or 'identify'; skipped",
    ]
    # A backtest runs on a virtual clock: replay applies the line of 2099, and says so.
    assert replayed.stderr.splitlines() == [
        *same,
        "note: 1 event(s) are stamped more than 300 s after now (the latest at "
        "2099-01-01T00:00:00.000Z): a replay runs on a virtual clock and applies them, "
        "`shoal import` (which checks times against now) would refuse them",
        "2 line(s) skipped",
    ]
    err = imported.stderr.splitlines()
    assert err[0].startswith("line 2: timestamp '2099-01-01T00:00:00Z' is ")
    assert err[1:] == [
        *same,
        "imported 1 event(s), 0 duplicate(s), 3 line(s) skipped; the next `shoal serve` "
        "applies them",
    ]
