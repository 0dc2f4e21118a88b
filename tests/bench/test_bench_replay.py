"""The replay benchmark runs end to end on a tiny history (a smoke test, no timings checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench import replay as bench_replay


def test_tiny_history_reports_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "replay.jsonl"
    argv = ["--customers", "40", "--days", "30", "--digest", "--floor", "--profile"]
    assert bench_replay.main([*argv, "--json", str(figures), "--out", str(tmp_path / "r.md")]) == 0
    result = json.loads(figures.read_text("utf-8"))
    events = result["history"]["events"]
    assert events > 40
    best = result["best"]
    assert best["transitions"] > 0 and best["events_per_s"] > 0
    fl = result["floor"]
    # One evaluation per event, and each fired deadline another.
    assert fl["evaluations"] == events + fl["deadlines_fired"]
    assert 0 < fl["evaluations_changing"] <= fl["evaluations"]
    assert all(fl[k] > 0 for k in ("loop", "fold", "one_segment"))
    assert len(result["digest"]) == 64
    report = (tmp_path / "r.md").read_text("utf-8")
    assert "Below the rules" in report and "cProfile" in report
    assert report in capsys.readouterr().out
