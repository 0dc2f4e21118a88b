"""``python -m scripts.bench --compare REF``: its arguments, the order of its runs, its
medians and ratios, and its report, without running it (a full run takes minutes)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors.population import DEFAULT_START, generate, to_segment_spec
from protocol import DAY
from scripts.bench import _compare, _compare_run
from scripts.bench._common import ROOT
from scripts.bench._compare import Row, check_arguments, file_stem, order, ratio, rows, table
from scripts.bench._main import COMPARE_RESULTS, parse_args
from scripts.bench._suite import RESULTS


def test_compare_takes_modest_defaults() -> None:
    args = parse_args(["--compare", "ddd092d"])
    assert (
        args.compare,
        args.runs,
        args.replay_events,
        args.ingest_events,
        args.seed,
        args.deadlines,
    ) == ("ddd092d", 3, 50_000, 20_000, 14, False)
    assert args.out == COMPARE_RESULTS
    assert parse_args([]).out == RESULTS and parse_args([]).compare is None
    given = parse_args(["--compare", "main", "--runs", "5", "--ingest-events", "100"])
    assert (given.runs, given.replay_events, given.ingest_events) == (5, 50_000, 100)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "3"], "--runs: only with --compare REF"),
        (
            ["--replay-events", "10", "--seed", "1"],
            "--replay-events, --seed: only with --compare REF",
        ),
        (
            ["--compare", "main", "--quick", "--only", "replay"],
            "--compare measures replay and ingest alone; --quick, --only: for the suite only",
        ),
        (
            ["--compare", "main", "--profile"],
            "--compare measures replay and ingest alone; --profile: for the suite only",
        ),
        (["--compare", "main", "--runs", "0"], "--runs must be at least 1"),
        (["--compare", "main", "--ingest-events", "-5"], "--ingest-events must be at least 1"),
        (["--compare", " "], "--compare: ' ' is not a git ref"),
    ],
)
def test_bad_compare_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m scripts.bench: error: {message}"


def test_check_arguments_leaves_a_suite_run_alone() -> None:
    args = argparse.Namespace(
        compare=None, mode="quick", only=None, profile=True, **dict.fromkeys(_compare.DEFAULTS)
    )
    assert check_arguments(args) is None
    assert args.runs is None


def test_runs_alternate_each_side_going_first_as_often() -> None:
    assert order(1) == ["ref", "work"]
    assert order(3) == ["ref", "work", "work", "ref", "ref", "work"]
    assert order(4).count("ref") == order(4).count("work") == 4


def test_medians_and_ratios() -> None:
    samples = {
        "ref": {"replay_wall_us": [30.0, 10.0, 20.0], "ingest_cpu_us": [50.0, 40.0]},
        "work": {"replay_wall_us": [9.0, 15.0, 30.0], "ingest_cpu_us": [0.0, 0.0]},
    }
    assert rows(samples) == [
        Row("replay_wall_us", "replay: wall us per event", 20.0, 15.0, 0.75,
            (30.0, 10.0, 20.0), (9.0, 15.0, 30.0)),
        Row("ingest_cpu_us", "ingest: engine CPU us per event", 45.0, 0.0, 0.0,
            (50.0, 40.0), (0.0, 0.0)),
    ]  # fmt: skip
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None
    assert list(table(rows(samples), "ddd092d")) == [
        "| cost | ddd092d (median) | working tree (median) | new/old |",
        "|---|---:|---:|---:|",
        "| replay: wall us per event | 20.00 | 15.00 | 0.750 |",
        "| ingest: engine CPU us per event | 45.00 | 0.00 | 0.000 |",
    ]
    zero = Row("k", "label", 0.0, 1.0, None, (0.0,), (1.0,))
    assert list(table([zero], "main"))[-1] == "| label | 0.00 | 1.00 | - |"


def test_file_stem_is_safe_for_any_ref() -> None:
    assert file_stem("ddd092d") == "compare-ddd092d"
    assert file_stem("origin/main~2") == "compare-origin-main-2"
    assert file_stem("../..") == "compare-ref"


def test_input_is_the_working_trees_generator_cut_to_size() -> None:
    events = list(_compare_run.history(500, 14))
    assert len(events) == 500
    assert events == list(generate(17, _compare_run.DAYS, 14))[:500]
    start = DEFAULT_START + 7 * DAY
    messages = _compare_run.ingest_messages(300, 3, start)
    expected = list(_compare_run.history(300, 3, start=start))
    assert [json.loads(b) for _, b in messages] == [to_segment_spec(e) for e in expected]
    assert [s for s, _ in messages] == [f"shoal.events.{e.customer_id}" for e in expected]


def test_report_names_what_ran(tmp_path: Path) -> None:
    samples = {"ref": {"replay_cpu_us": [2.0, 4.0, 3.0]}, "work": {"replay_cpu_us": [3.0] * 3}}
    doc = {
        "ref": "main",
        "ref_commit": "0" * 40,
        "ref_pinned": "38 pins",
        "command": "python -m scripts.bench --compare main",
        "started_at": "2026-12-05 12:00 UTC",
        "duration_s": 100.0,
        "machine": {"cpu": "cpu", "cores": 2, "code": "abc1234"},
        "load_before": "1 1 1",
        "load_after": "2 2 2",
        "sizes": {"runs": 3, "replay_events": 10, "ingest_events": 5, "seed": 14},
        "order": order(3),
        "samples": samples,
        "rows": [vars(r) for r in rows(samples)],
        "checks": ["both replays wrote the same 7 transitions, byte for byte"],
    }
    stem = _compare_run.write(doc, tmp_path)
    assert stem == tmp_path / "compare-main"
    assert json.loads(Path(f"{stem}.json").read_text())["rows"][0]["ratio"] == 1.0
    md = Path(f"{stem}.md").read_text()
    assert "| replay: CPU us per event | 3.00 | 3.00 | 1.000 |" in md
    assert "- replay: CPU us per event: main 2.00, 4.00, 3.00; working tree 3.00" in md
    assert "ref work work ref ref work" in md and "byte for byte" in md


def test_a_quick_compare_runs_and_prints_ratios(tmp_path: Path) -> None:
    """The smoke test of ``--compare``: the working tree against its own last commit, on a
    few hundred events. It runs end to end and reports every figure with a ratio; the
    ratios themselves are not asserted (timings on a shared machine say nothing here)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.bench",
            "--compare",
            "HEAD",
            "--runs",
            "1",
            "--replay-events",
            "300",
            "--ingest-events",
            "200",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    doc = json.loads((tmp_path / "compare-HEAD.json").read_text())
    measured = {key for key, _ in _compare.METRICS if not key.startswith("deadlines")}
    assert {r["key"] for r in doc["rows"]} == measured
    assert all(r["ratio"] is not None for r in doc["rows"])
    md = (tmp_path / "compare-HEAD.md").read_text()
    assert "| replay, one process: CPU us per event |" in md
    assert "msgs/s** in this run" in md
    assert "both replays wrote the same" in md
