"""The benchmark's reading of py-spy's collapsed stacks, on hand-written input (no py-spy
needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.bench import _main
from scripts.bench._profiles import profile_lines, read_collapsed, shorten_line

# Root first; the main thread's stacks start in runpy, a thread's in Thread._bootstrap.
RUN = "_run_module_as_main (<frozen runpy>:173);<module> (scripts/_bench_engine.py:1)"
LOOP = f"{RUN};run (anyio/_core/_eventloop.py:38);BaseEventLoop._run_once (stdlib/asyncio/x.py:1)"
INGEST = f"{LOOP};Engine._ingest (actors/_engine.py:896)"
APPLY = "Customer.apply (actors/_customer.py:317)"
THREAD = "Thread._bootstrap (stdlib/threading.py:988);Thread.run (stdlib/threading.py:971)"
STACKS = [
    f"{INGEST};{APPLY};rule (<rule>:1) 6",
    f"{INGEST};{APPLY} 2",
    f"{INGEST};decode_event (protocol/_inbound.py:105) 3",
    # Recursion: counted once per sample in inclusive, self only at the leaf.
    f"{INGEST};{APPLY};{APPLY} 1",
    f"{LOOP};Client._read_loop (nats/aio/client.py:2078) 4",
    f"{LOOP};EpollSelector.select (stdlib/selectors.py:451) 2",
    f"{THREAD};_connection_worker_thread (aiosqlite/core.py:48) 2",
    "",
]


def test_self_and_inclusive_samples() -> None:
    p = read_collapsed(STACKS)
    assert (p.samples, p.all_samples, p.other_threads) == (20, 20, 2)
    assert p.self_samples.most_common(3) == [
        ("rule (<rule>:1)", 6),
        ("Client._read_loop (nats/aio/client.py:2078)", 4),
        ("Customer.apply (actors/_customer.py:317)", 3),
    ]
    assert p.inclusive["Engine._ingest (actors/_engine.py:896)"] == 12
    assert p.inclusive["Customer.apply (actors/_customer.py:317)"] == 9
    assert p.inclusive["_run_module_as_main (<frozen runpy>:173)"] == 18
    assert p.inclusive["Thread.run (stdlib/threading.py:971)"] == 2
    assert dict(p.areas) == {
        "other": 6,  # rule (<rule>)
        "actors": 3,
        "protocol": 3,
        "nats": 4,
        "waiting": 2,
        "sqlite": 2,
    }


def test_within_counts_from_the_first_matching_frame_down() -> None:
    p = read_collapsed(STACKS, within="Customer.apply (actors/")
    assert (p.samples, p.all_samples, p.other_threads) == (9, 20, 0)
    assert p.inclusive["Customer.apply (actors/_customer.py:317)"] == 9
    assert "Engine._ingest (actors/_engine.py:896)" not in p.inclusive
    assert p.self_samples == {
        "rule (<rule>:1)": 6,
        "Customer.apply (actors/_customer.py:317)": 3,
    }


def test_report_lines() -> None:
    lines = profile_lines(read_collapsed(STACKS), rate=250, top=3)
    assert lines == [
        "20 samples at 250 Hz (0.1 s on a CPU): main thread 90.0 %, other threads 10.0 %",
        "running in actors 15.0 %, store 0.0 %, protocol 15.0 %, scripts 0.0 %, nats 20.0 %, "
        "msgspec 0.0 %, sqlite 10.0 %, asyncio/anyio 0.0 %, waiting 10.0 %, other 30.0 %",
        "",
        "top 3 by self samples (the function running), % of samples",
        " self %  incl %  function",
        " 30.0    30.0   rule (<rule>:1)",
        " 20.0    20.0   Client._read_loop (nats/aio/client.py:2078)",
        " 15.0    45.0   Customer.apply (actors/_customer.py:317)",
        "",
        "top 3 by inclusive samples (the function on the stack; the standard library and the "
        "loop's runner left out), % of samples",
        " incl %  self %  function",
        # <module>, runpy, asyncio and anyio's run are on most stacks: left out.
        " 60.0     0.0   Engine._ingest (actors/_engine.py:896)",
        " 45.0    15.0   Customer.apply (actors/_customer.py:317)",
        " 30.0    30.0   rule (<rule>:1)",
    ]
    assert profile_lines(read_collapsed([]), rate=250) == ["no samples"]


def test_shorten_line() -> None:
    roots = (("/work/main/", ""), ("/usr/lib/python3.11/", "stdlib/"))
    line = (
        "_run_module_as_main (<frozen runpy>:173);"
        "BaseEventLoop._run_once (/usr/lib/python3.11/asyncio/base_events.py:1845);"
        "Client._read_loop (/venv/lib/python3.11/site-packages/nats/aio/client.py:2078);"
        "Engine._ingest (/work/main/actors/_engine.py:896) 17"
    )
    assert shorten_line(line, roots) == (
        "_run_module_as_main (<frozen runpy>:173);"
        "BaseEventLoop._run_once (stdlib/asyncio/base_events.py:1845);"
        "Client._read_loop (nats/aio/client.py:2078);"
        "Engine._ingest (actors/_engine.py:896) 17"
    )


def test_profile_without_py_spy_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(_main, "find_py_spy", lambda: None)
    assert _main.main(["--smoke", "--profile", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "python -m scripts.bench: --profile needs py-spy (a sampling profiler), which is not "
        "installed: pip install -e '.[bench]'\n"
    )
    assert list(tmp_path.iterdir()) == []
