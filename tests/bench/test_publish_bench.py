"""The publishing benchmark runs, on a real nats-server, and reports both ways of writing
messages (no figure is asserted: speed is for benchmarks)."""

from __future__ import annotations

from pathlib import Path

from scripts.bench import publish


def test_the_publishing_benchmark_reports_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "publish.md"
    assert (
        publish.main(["--transitions", "600", "--rounds", "2", "--piece", "300", "--out", str(out)])
        == 0
    )
    text = out.read_text()
    for row in (
        "| fenced | nats-py | 300 |",
        "| fenced | shoal | 2,000 |",
        "| unfenced | shoal | 300 |",
    ):
        assert row in text
    assert "This process's CPU, shoal's commands against nats-py's: unfenced " in text
