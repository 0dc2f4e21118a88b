"""The benchmark suite runs end to end at its smallest size and reports every measurement.

No timing thresholds: the machines are shared and noisy. The figures must only be sane.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench import _sql
from scripts.bench._suite import MEASUREMENTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_smoke_run_reports_every_measurement(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| measurement | figure |" in proc.stdout
    doc = json.loads((tmp_path / "bench-smoke.json").read_text())
    md = (tmp_path / "bench-smoke.md").read_text()
    assert "## Summary" in md and "## Machine and code" in md

    assert doc["mode"] == "smoke" and doc["not_run"] == []
    assert set(doc["results"]) == set(MEASUREMENTS)
    assert doc["machine"]["cores"] >= 1 and doc["nats_server"] != "?"
    res = doc["results"]
    sizes = doc["sizes"]

    ingest = res["ingest"]["sizes"]
    assert [r["customers"] for r in ingest] == sizes["ingest_customers"]
    for r in ingest:
        assert r["events"] == sizes["ingest_events"] and r["events_per_s"] > 0
        assert r["transitions"] > 0 and r["rss_warm_mib"] > 0
        assert r["engine_gc_s"] >= 0 and r["max_stall_s"] >= 0

    rates = res["latency"]["rates"]
    assert [r["offered_per_s"] for r in rates] == sizes["latency_rates"]
    for r in rates:
        p = r["latency_ms"]
        assert p["count"] > 0 and 0 < p["p50"] <= p["p99"] <= p["max"]
        # Core publishes, none lost by the broker.
        assert r["stored_total"] == r["published_total"]

    dl = res["deadlines"]
    n = sizes["deadline_customers"]
    assert dl["pending_at_warm"] == n
    burst = dl["lateness_ms"]["burst"]
    assert burst["count"] == dl["due_in_one_second"] == n // 10
    assert dl["lateness_ms"]["spread"]["count"] == n // 10
    assert 0 <= burst["p50"] <= burst["p99"] <= burst["max"]

    assert res["replay"]["events"] > 0 and res["replay"]["events_per_s"] > 0
    assert res["rebuild"]["starts"] and all(
        s["warm_s"] >= s["ready_s"] for s in res["rebuild"]["starts"]
    )
    populations = {r["population"] for r in res["memory"]["engines"]}
    assert populations == {"typical", "bare", "history"}
    assert all(r["bytes_per_customer"] > 0 for r in res["memory"]["engines"])

    sql = res["sql"]
    assert [s["customers"] for s in sql["scales"]] == [
        sizes["sql_base"] * k for k in sizes["sql_clones"]
    ]
    for s in sql["scales"]:
        assert (
            s["recompute_s"] > 0
            and s["rows"] == sql["base_events"] * s["customers"] // sizes["sql_base"]
        )
        for segment, a in s["agreement"].items():
            # Every rule SQL can state exactly gives shoal's members at the same instant.
            if segment not in _sql.APPROXIMATED:
                assert a["equal"], (segment, a)

    assert res["consumer"]["consume_per_s"] > 0 and res["consumer"]["status"] == "ok"
    assert {r["measurement"] for r in doc["summary"]} >= {"ingest", "latency", "replay"}
