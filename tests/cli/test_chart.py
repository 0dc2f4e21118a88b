"""``shoal replay --chart``: a colour of its own for each segment however many there are,
small multiples past a handful, and ``--only`` to choose the segments drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import DAY, to_instant
from scripts import cli
from scripts._replay_cmd import size_chart
from tests.helpers import run

pytest.importorskip("matplotlib")

T0 = to_instant(__import__("datetime").datetime(2026, 1, 1, tzinfo=__import__("datetime").UTC))


def colours_drawn(names: list[str]) -> list[str]:
    """The colour of each segment's line on the chart of ``names`` (in the order drawn)."""
    from matplotlib.colors import to_hex

    instants = [T0 + d * DAY for d in range(5)]
    rows = [[i + d for i in range(len(names))] for d in range(5)]
    fig = size_chart(names, instants, rows)
    return [to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()]


def test_no_two_segments_share_a_colour() -> None:
    # One chart up to six, small multiples beyond; past ten, matplotlib's own cycle repeats.
    for n in (1, 3, 6, 7, 10, 11, 12, 15, 20, 40):
        names = [f"segment_{i}" for i in range(n)]
        colours = colours_drawn(names)
        assert len(colours) == n
        assert len(set(colours)) == n, (n, colours)


def test_many_segments_get_a_panel_each_titled_with_the_name() -> None:
    names = [f"segment_{i}" for i in range(15)]
    fig = size_chart(names, [T0, T0 + DAY], [list(range(15)), list(range(1, 16))])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in shown] == names
    assert [ax.get_title(loc="right") for ax in shown] == [f"{i + 1} at the end" for i in range(15)]
    # The last row is short: the panel above each empty cell shows the dates.
    assert len(fig.axes) == 16 and not fig.axes[15].get_visible()
    assert fig.axes[11].xaxis.get_tick_params()["labelbottom"]


HISTORY = "\n".join(
    json.dumps(
        {"type": "track", "userId": f"c{i}", "event": "Visit",
         "timestamp": f"2026-01-{i + 1:02d}T10:00:00Z", "messageId": f"m{i}"}
    )
    for i in range(5)
)  # fmt: skip
TWELVE = "".join(f"[segments.s{i:02d}]\nrule = \"count('Visit') >= {i}\"\n\n" for i in range(12))


def test_only_draws_the_segments_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, seg, png = tmp_path / "h.jsonl", tmp_path / "s.toml", tmp_path / "c.png"
    source.write_text(HISTORY)
    seg.write_text(TWELVE)
    drawn: list[list[str]] = []

    def spy(path: Path, names: list[str], instants: object, rows: object) -> None:
        drawn.append(list(names))
        real(path, names, instants, rows)  # type: ignore[arg-type]

    from scripts import _replay_cmd

    real = _replay_cmd.write_chart
    monkeypatch.setattr(_replay_cmd, "write_chart", spy)
    monkeypatch.setattr(cli, "configure_logging", lambda level, **_: None)
    args = ["replay", str(source), "--segments", str(seg), "--chart", str(png)]
    assert cli.main([*args, "--only", "s03,s01"]) == 0
    assert drawn == [["s03", "s01"]]
    assert png.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()


@pytest.mark.parametrize(
    ("only", "message"),
    [
        ("s01,vip", "--only: unknown segment 'vip'; the segments defined are: "
         + ", ".join(f"s{i:02d}" for i in range(12))),
        ("vip,gold", "--only: unknown segments 'vip', 'gold'; the segments defined are: "
         + ", ".join(f"s{i:02d}" for i in range(12))),
        (",", "--only needs at least one segment name"),
    ],
)  # fmt: skip
def test_only_names_known_segments(tmp_path: Path, only: str, message: str) -> None:
    source, seg, png = tmp_path / "h.jsonl", tmp_path / "s.toml", tmp_path / "c.png"
    source.write_text(HISTORY)
    seg.write_text(TWELVE)
    done = run("replay", str(source), "--segments", str(seg), "--chart", str(png), "--only", only)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"shoal: error: {message}\n")
    assert not png.exists()


def test_only_goes_with_a_chart(tmp_path: Path) -> None:
    source = tmp_path / "h.jsonl"
    source.write_text(HISTORY)
    done = run("replay", str(source), "--only", "active")
    assert (done.returncode, done.stderr) == (
        2,
        "shoal: error: --only chooses the segments --chart draws: give --chart FILE.png\n",
    )
