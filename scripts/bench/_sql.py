"""The baseline of the suite (``python -m scripts.bench``): shoal's default segments as
scheduled SQL.

What a team without shoal would run: an ``events`` table in SQLite (one row per Segment Spec
event: ``customer_id``, ``type``, ``event``, ``ts`` in microseconds, ``properties`` and
``traits`` as JSON text), two ordinary indexes, and one straightforward ``SELECT`` per
segment, re-run from scratch every N minutes. Each query gives the members at instant
``:t``. The table holds a generated history cloned to size, copy after copy, each copy in
receive order: a customer's rows are spread over the table as in a live one. (Interleaving
the copies event by event would put the copies of one customer side by side in the table
and in the index, and makes the queries about 3 times faster, which flatters SQL.)

Two rules cannot be written as one stateless query, and the SQL versions approximate them:

- ``at_risk`` and ``loyal`` have an ``exit`` rule (hysteresis) and ``at_risk`` a
  ``min_dwell``: membership depends on the customer's own past membership. The SQL gives
  the entry rule alone, so it misses members who entered earlier and have not yet met the
  exit rule.
- ``weekend_only`` reads weekdays in the customer's ``timezone`` trait; SQLite has no time
  zones, so the SQL reads them in UTC (as a team on SQLite would), which misplaces visits
  near midnight for customers far from UTC.

The other nine agree exactly with shoal's memberships at the same instant, which the
benchmark checks per segment.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from actors import Replay, SegmentSet
from actors.population import write_history
from protocol import DAY, Event, parse_timestamp

D = DAY
H = 14 * DAY  # the default segments' half-life

_WEIGHT = (
    "CASE event WHEN 'Visit' THEN 1.0 WHEN 'Order Completed' THEN 2.0 "
    "WHEN 'Email Link Clicked' THEN 0.5 WHEN 'Email Opened' THEN 0.1 ELSE 0.0 END"
)

QUERIES: dict[str, str] = {
    "new_customer": f"""
        SELECT customer_id FROM events WHERE ts <= :t
        GROUP BY customer_id HAVING :t - MIN(ts) < {30 * D}""",
    "inactive_14d": f"""
        SELECT customer_id FROM events WHERE type = 'track' AND ts <= :t
        GROUP BY customer_id HAVING :t - MAX(ts) >= {14 * D}""",
    "inactive_30d": f"""
        SELECT customer_id FROM events WHERE type = 'track' AND ts <= :t
        GROUP BY customer_id HAVING :t - MAX(ts) >= {30 * D}""",
    "inactive_60d": f"""
        SELECT customer_id FROM events WHERE type = 'track' AND ts <= :t
        GROUP BY customer_id HAVING :t - MAX(ts) >= {60 * D}""",
    "engagement_dropped": f"""
        SELECT customer_id FROM (
            SELECT customer_id,
                SUM({_WEIGHT} * pow(2.0, (ts - :t) * 1.0 / {H})) AS now_score,
                SUM(CASE WHEN ts <= :t - {7 * D}
                    THEN {_WEIGHT} * pow(2.0, (ts - (:t - {7 * D})) * 1.0 / {H})
                    ELSE 0.0 END) AS week_ago
            FROM events WHERE type = 'track' AND ts <= :t GROUP BY customer_id)
        WHERE week_ago >= 3 AND now_score < 0.75 * week_ago""",
    "renewal_due": f"""
        SELECT customer_id FROM (
            SELECT customer_id, json_extract(traits, '$.renewal_date') AS d,
                ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY ts DESC, rowid DESC) AS rn
            FROM events
            WHERE type = 'identify' AND ts <= :t
              AND json_extract(traits, '$.renewal_date') IS NOT NULL)
        WHERE rn = 1
          AND CAST(strftime('%s', d) AS INTEGER) * 1000000 - :t BETWEEN 0 AND {14 * D}""",
    "opens_no_clicks": f"""
        SELECT customer_id FROM events
        WHERE type = 'track' AND ts > :t - {90 * D} AND ts <= :t
        GROUP BY customer_id
        HAVING SUM(event = 'Email Opened') > 0 AND SUM(event = 'Email Link Clicked') = 0""",
    "at_risk": f"""
        SELECT customer_id FROM events WHERE ts <= :t
        GROUP BY customer_id
        HAVING :t - MIN(ts) >= {90 * D}
           AND SUM(type = 'track' AND event = 'Visit' AND ts > :t - {30 * D}) < 2""",
    "weekend_only": f"""
        SELECT customer_id FROM events
        WHERE type = 'track' AND event = 'Visit' AND ts > :t - {60 * D} AND ts <= :t
        GROUP BY customer_id
        HAVING COUNT(*) >= 3
           AND SUM(strftime('%w', ts / 1000000, 'unixepoch') IN ('0', '6')) = COUNT(*)""",
    "one_time_buyer": f"""
        SELECT customer_id FROM events
        WHERE type = 'track' AND event = 'Order Completed' AND ts <= :t
        GROUP BY customer_id HAVING COUNT(*) = 1 AND :t - MAX(ts) >= {30 * D}""",
    "loyal": f"""
        SELECT customer_id FROM events
        WHERE type = 'track' AND event = 'Visit' AND ts > :t - {30 * D} AND ts <= :t
        GROUP BY customer_id HAVING COUNT(*) >= 8""",
    "churned": f"""
        SELECT customer_id FROM events WHERE type = 'track' AND ts <= :t
        GROUP BY customer_id HAVING :t - MAX(ts) >= {90 * D}""",
}

APPROXIMATED = {
    "at_risk": "entry rule only: the exit rule (3 visits in 14 days) and min_dwell 7d need "
    "the customer's past membership, which one stateless query does not have",
    "loyal": "entry rule only: members stay until fewer than 4 visits in 30 days (exit rule), "
    "which one stateless query does not see",
    "weekend_only": "weekdays in UTC: SQLite has no time zones (shoal reads them in the "
    "customer's timezone trait)",
}

_encode = msgspec.json.Encoder().encode


def write_jsonl(events: Iterable[Event], path: Path) -> int:
    """The events as Segment Spec JSON lines (``shoal generate``'s format)."""
    with open(path, "wb") as f:
        return write_history(events, f)


def load(db: Path, jsonl: Path, clones: int) -> dict[str, Any]:
    """An ``events`` table holding the JSON lines ``clones`` times over (customer ``x``
    of copy k is ``x.k``), then two indexes and ``ANALYZE``; returns rows and seconds."""
    decode = msgspec.json.Decoder().decode
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute(
            "CREATE TABLE base (customer_id TEXT, type TEXT, event TEXT, ts INTEGER, "
            "properties TEXT, traits TEXT)"
        )
        t0 = time.perf_counter()
        rows = []
        with open(jsonl, "rb") as f:
            for line in f:
                m = decode(line)
                rows.append(
                    (
                        m["userId"],
                        m["type"],
                        m.get("event"),
                        parse_timestamp(m["timestamp"]),
                        _encode(m.get("properties") or {}).decode(),
                        _encode(m.get("traits") or {}).decode(),
                    )
                )
        con.executemany("INSERT INTO base VALUES (?, ?, ?, ?, ?, ?)", rows)
        con.execute(
            "CREATE TABLE events (customer_id TEXT, type TEXT, event TEXT, ts INTEGER, "
            "properties TEXT, traits TEXT)"
        )
        # Copy after copy, each in receive order (the order of the lines).
        for k in range(clones):
            con.execute(
                "INSERT INTO events SELECT customer_id || '.' || ?, type, event, ts, "
                "properties, traits FROM base ORDER BY rowid",
                (k,),
            )
        con.execute("DROP TABLE base")
        con.commit()
        t1 = time.perf_counter()
        con.execute("CREATE INDEX events_by_customer ON events (customer_id, ts)")
        con.execute("CREATE INDEX events_by_name ON events (event, ts)")
        con.execute("ANALYZE")
        con.commit()
        t2 = time.perf_counter()
        (n,) = con.execute("SELECT count(*) FROM events").fetchone()
    finally:
        con.close()
    return {"rows": n, "load_s": t1 - t0, "index_s": t2 - t1}


def recompute(db: Path, at: int) -> tuple[dict[str, float], dict[str, int]]:
    """Run every segment's query at instant ``at``: seconds and members per segment."""
    con = sqlite3.connect(db)
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for name, sql in QUERIES.items():
            t0 = time.perf_counter()
            members = con.execute(sql, {"t": at}).fetchall()
            seconds[name] = time.perf_counter() - t0
            counts[name] = len(members)
    finally:
        con.close()
    return seconds, counts


def shoal_members(events: list[Event], segments: SegmentSet, at: int) -> dict[str, int]:
    """Members per segment at instant ``at``, from a replay of ``events``."""
    r = Replay(segments)
    for e in events:
        r.apply(e)
    r.advance(at)
    counts: Counter[str] = Counter()
    ids = {e.customer_id for e in events}
    for cid in ids:
        c = r.customer(cid)
        if c is not None:
            counts.update(c.members.keys())
    return {name: counts.get(name, 0) for name in segments.names}
