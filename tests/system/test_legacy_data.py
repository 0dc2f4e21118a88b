"""A data directory written by an older shoal starts from its snapshots, with no rebuild.

``data/legacy-ddd092d/shoal.db`` was written by ``shoal serve`` at commit ddd092d (before
the engine was assembled from parts): 40 customers, 195 events through the default segments,
published transitions, and complete rounds of snapshots. Starting on it must load every
customer from its snapshot, read nothing from the log, and give each customer the
memberships and version its published transitions (the outbox) say it has.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import msgspec

from actors import EngineConfig, VirtualClock, load_segments
from protocol import Transition
from tests.helpers import NatsServer, eventually, running_engine

LEGACY = Path(__file__).parent / "data" / "legacy-ddd092d" / "shoal.db"
CUSTOMERS, EVENTS = 40, 195
# The latest instant the old engine evaluated a customer at; no deadline falls before
# 2026-12-06, so starting here fires nothing.
WRITTEN = 1_796_479_568_852_878


def published(db: Path) -> dict[str, tuple[set[str], int]]:
    """Each customer's memberships and version as its transitions in the outbox tell."""
    out: dict[str, tuple[set[str], int]] = {}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT body FROM transitions ORDER BY customer_id, version")
        for (body,) in rows:
            t = msgspec.json.decode(body, type=Transition)
            members, _ = out.get(t.customer_id, (set(), 0))
            if t.change == "entered":
                members.add(t.segment)
            else:
                members.discard(t.segment)
            out[t.customer_id] = (members, t.version)
    return out


async def test_old_data_dir_starts_from_its_snapshots(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "shoal.db"
    shutil.copy(LEGACY, db)
    expected = published(db)
    assert len(expected) == CUSTOMERS

    clock = VirtualClock(WRITTEN)
    async with running_engine(
        nats_server.url, db, load_segments(), clock=clock, config=EngineConfig()
    ) as engine:
        await eventually(lambda: engine.warm and engine.customer_count == CUSTOMERS)
        stats = engine.stats
        assert (stats.snapshots_loaded, stats.snapshots_ignored) == (CUSTOMERS, 0)
        assert stats.rebuilt_events == 0  # not one event read from the log
        found = {}
        for customer_id in expected:
            c = engine.customer(customer_id)
            assert c is not None
            found[customer_id] = (set(c.members), c.version)
        assert found == expected
        assert stats.transitions == 0  # nothing changed by starting

    # The same store rebuilt from the log alone holds the same customers.
    log_db = tmp_path / "log" / "shoal.db"
    log_db.parent.mkdir()
    shutil.copy(LEGACY, log_db)
    async with running_engine(
        nats_server.url,
        log_db,
        load_segments(),
        clock=VirtualClock(WRITTEN),
        config=EngineConfig(use_snapshots=False),
        consumer="rebuild",
    ) as engine:
        assert engine.stats.rebuilt_events == EVENTS
        assert engine.customer_count == CUSTOMERS
