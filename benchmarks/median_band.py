"""What an exact median from one confidence band would cost (docs/scale.md, "The exact median").

The exact `median_confidence` of `inference-stats` reads every sampled confidence of the
range. The alternative studied: locate the band of the middle rank from per-band counts, then
read only that band's rows through an index on (workspace_id, model_id, class_name,
confidence, ts). This script measures, on a SQLite file holding one (model, class) of the
fleet benchmark over 30 days (`--rows`, default 1,080,000: one result a minute from each of
25 devices), the insert time with and without that index, the full read the median does now,
and the band reads for bands of 1/10, 1/100 and 1/1000 of [0, 1]. Median of 3 reads each.

    python benchmarks/median_band.py
    python benchmarks/median_band.py --smoke

No target: it measures a design that was not built.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

DAYS = 30
MODEL, CLASS = "site-a/1", "person"


def _load(path: Path, rows: list[tuple[float, float]], band_index: bool) -> float:
    """Seconds to insert `rows` (ts, confidence) into a fresh table with its indexes."""
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(
            "CREATE TABLE results (id INTEGER PRIMARY KEY, workspace_id INT, ts REAL, "
            "model_id TEXT, class_name TEXT, confidence REAL)"
        )
        con.execute("CREATE INDEX ix_ws_model_ts ON results (workspace_id, model_id, ts)")
        con.execute("CREATE INDEX ix_ws_ts ON results (workspace_id, ts)")
        if band_index:
            con.execute(
                "CREATE INDEX ix_band ON results "
                "(workspace_id, model_id, class_name, confidence, ts)"
            )
        started = time.perf_counter()
        for at in range(0, len(rows), 10_000):
            con.executemany(
                "INSERT INTO results (workspace_id, ts, model_id, class_name, confidence) "
                "VALUES (1, ?, ?, ?, ?)",
                [(ts, MODEL, CLASS, conf) for ts, conf in rows[at : at + 10_000]],
            )
            con.commit()
        seconds = time.perf_counter() - started
        con.execute("ANALYZE")
        con.commit()
        return seconds
    finally:
        con.close()


def _read_ms(con: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> tuple[float, int]:
    """Median ms of 3 runs of fetching `sql` and sorting the values, and the row count."""
    times = []
    count = 0
    for _ in range(3):
        started = time.perf_counter()
        values = sorted(row[0] for row in con.execute(sql, args))
        times.append(time.perf_counter() - started)
        count = len(values)
    return statistics.median(times) * 1000, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_080_000)
    parser.add_argument("--smoke", action="store_true", help="50,000 rows")
    args = parser.parse_args()
    if args.smoke:
        args.rows = 50_000
    rng = random.Random(1)
    end = time.time()
    start = end - DAYS * 86400
    step = DAYS * 86400 / args.rows
    # The fleet benchmark's best confidences: uniform on [0.3, 1.0], 4 decimals.
    rows = [(start + i * step, round(rng.uniform(0.3, 1.0), 4)) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as directory:
        plain = _load(Path(directory) / "plain.db", rows, band_index=False)
        indexed = _load(Path(directory) / "band.db", rows, band_index=True)
        print(
            f"insert {args.rows:,} results: {plain:.1f} s with today's indexes, {indexed:.1f} s "
            f"with the band index ({(indexed - plain) / args.rows * 1e6:+.1f} us per result)"
        )
        con = sqlite3.connect(Path(directory) / "band.db")
        try:
            full = (
                "SELECT confidence FROM results INDEXED BY ix_ws_model_ts WHERE workspace_id = 1 "
                "AND model_id = ? AND ts >= ? AND ts < ? AND class_name = ?"
            )
            ms, count = _read_ms(con, full, (MODEL, start, end, CLASS))
            print(f"every confidence of the range (today): {ms:8.1f} ms, {count:,} rows")
            band = (
                "SELECT confidence FROM results INDEXED BY ix_band WHERE workspace_id = 1 "
                "AND model_id = ? AND class_name = ? AND confidence >= ? AND confidence < ? "
                "AND ts >= ? AND ts < ?"
            )
            for width in (0.1, 0.01, 0.001):
                low = round(0.65 // width * width, 6)
                ms, count = _read_ms(
                    con,
                    band,
                    (MODEL, CLASS, low, low + width, start, end),
                )
                print(f"one band of width {width:g}: {ms:8.1f} ms, {count:,} rows")
        finally:
            con.close()
    if args.smoke:
        print("smoke: targets not judged (no target: a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
