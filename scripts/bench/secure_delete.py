"""Benchmark what ``PRAGMA secure_delete=ON`` (issue 20: erased rows must leave the file's
bytes) costs the store's most frequent rewrite: snapshot rows replaced by ``INSERT OR
REPLACE`` in transactions of 5,000, as a snapshot round writes them.

For each body size, a fresh WAL-mode file gets ``--rows`` rows, then ``--rounds`` rounds of
replacements are timed, with ``secure_delete`` off and on alternately (``--repeats`` times
each, in one process), and the medians compared.

Usage::

    python -m scripts.bench.secure_delete            # 40,000 rows, 600 B and 3 KB bodies
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path


def _timed(path: Path, secure: bool, rows: int, size: int, rounds: int) -> float:
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        f.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA secure_delete={'ON' if secure else 'OFF'}")
        conn.execute("CREATE TABLE s (id TEXT PRIMARY KEY, body BLOB)")
        first = [(f"c{i}", os.urandom(size)) for i in range(rows)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO s VALUES (?, ?)", first)
        conn.execute("COMMIT")
        start = time.perf_counter()
        for _ in range(rounds):
            again = [(f"c{i}", os.urandom(size + random.randint(-50, 50))) for i in range(rows)]
            for k in range(0, rows, 5_000):
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO s VALUES (?, ?)", again[k : k + 5_000])
                conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


def main() -> None:
    """Run the comparison and print one line per body size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="600,3000", help="body sizes in bytes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        for size in (int(s) for s in args.sizes.split(",")):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for secure in (False, True):
                    times[secure].append(_timed(path, secure, args.rows, size, args.rounds))
            off, on = statistics.median(times[False]), statistics.median(times[True])
            print(
                f"{size} B bodies, {args.rows:,} rows x {args.rounds} rounds: "
                f"secure_delete OFF {off:.3f} s, ON {on:.3f} s (medians of {args.repeats}); "
                f"ON/OFF {on / off:.2f}"
            )


if __name__ == "__main__":
    main()
