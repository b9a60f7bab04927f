"""The rollup fold job's cost: `Database.fold_rollups` over a seeded fleet, per result and
per transaction (how long the watermark lock is held), on SQLite and PostgreSQL.

Seeds `--devices` devices (one video source each) reporting `--classes` classes every
`--interval` seconds for `--minutes` minutes (the `benchmarks/read.py` bulk loader, with the
rollup watermark set before the data, so that nothing is rolled up yet), then folds it all
with each `--chunks` transaction size (seconds of results per transaction), emptying the
rollups and resetting the watermark before each, and times every transaction. The baseline
measured in the same run is the Python aggregation of the same range (`rebuild_rollups`:
each report's rows computed in Python as ingest computes them, then upserted; the fold did
much the same before it ran in SQL); both give the same rows (checked). CPU is this
process's plus, on PostgreSQL, the database's backends' (Linux /proc: run it on the
database's machine).

    python benchmarks/fold.py                                   # 500 devices x 5 classes, 5 min
    python benchmarks/fold.py --devices 2000 --interval 5 --minutes 2 --chunks 60,10,5
    python benchmarks/fold.py --engines postgresql
    python benchmarks/fold.py --smoke

The fold aggregates in SQL on PostgreSQL and in Python on SQLite (`rollups.fold_range`).
No target: the numbers size the job for a fleet (docs/scale.md, "The fold in SQL").
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from typing import Any

import sqlalchemy as sa

import _fleet
from mmagg.server import Database, rollups
from mmagg.server.tables import rollups as rollup_table


def _rows(db: Database) -> list[tuple[Any, ...]]:
    columns = [rollup_table.c[name] for name in rollups.ROLLUP_COLUMNS]
    with db.read() as conn:
        return [tuple(row) for row in conn.execute(sa.select(*columns).order_by(*columns[:7]))]


def _reset(db: Database, watermark: float) -> None:
    with db.write() as conn:
        conn.execute(sa.delete(rollup_table))
        rollups.set_watermark(conn, watermark)


def _backend_cpu(db: Database) -> float:
    """CPU seconds of this database's PostgreSQL backends so far (Linux /proc; 0 on SQLite,
    whose work is this process's)."""
    if db.dialect != "postgresql":
        return 0.0
    import os
    from pathlib import Path

    with db.read() as conn:
        pids = (
            conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            )
            .scalars()
            .all()
        )
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rounded(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with the float sums rounded (added in another order, equal to ~1e-15)."""
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in rows]


def run_engine(db: Database, args: argparse.Namespace) -> None:
    now = math.floor(time.time() / 60) * 60.0
    start = now - args.minutes * 60
    _reset(db, start)
    seed = argparse.Namespace(
        days=args.minutes / 1440,
        devices=args.devices,
        classes=args.classes,
        interval=args.interval,
    )
    seeded = time.perf_counter()
    results = _fleet.bulk_seed(db, seed, now)
    print(
        f"{db.dialect}: {results:,} results ({args.devices} devices x {args.classes} classes, "
        f"every {args.interval:g} s, {args.minutes} min), seeded in "
        f"{time.perf_counter() - seeded:.1f} s"
    )
    # The baseline: the same range aggregated in Python, report by report (rebuild_rollups).
    _reset(db, now)
    began, cpu, backend = time.perf_counter(), time.process_time(), _backend_cpu(db)
    with db.write() as conn:
        rollups.rebuild_rollups(conn)
    python_wall = time.perf_counter() - began
    python_cpu = time.process_time() - cpu + _backend_cpu(db) - backend
    reference = _rounded(_rows(db))
    print(
        f"  Python aggregation (rebuild_rollups): {python_wall:.2f} s wall, "
        f"{python_cpu / results * 1e6:.1f} us CPU per result (this process + PostgreSQL)"
    )
    for chunk in args.chunks:
        _reset(db, start)
        took: list[float] = []
        cpu, backend = time.process_time(), _backend_cpu(db)
        for until in _steps(start, now, chunk):
            began = time.perf_counter()
            db.fold_rollups(until=until, chunk=chunk)
            took.append(time.perf_counter() - began)
        wall = sum(took)
        used = time.process_time() - cpu + _backend_cpu(db) - backend
        same = _rounded(_rows(db)) == reference
        print(
            f"  fold in {chunk:g} s transactions: {wall:.2f} s wall, "
            f"{used / results * 1e6:.1f} us CPU per result (Python aggregation / this: "
            f"{python_cpu / used:.2f}), longest transaction {max(took) * 1000:.0f} ms; "
            f"rows equal the Python aggregation: {'yes' if same else 'NO'}"
        )
        if not same:
            raise SystemExit("the fold's rows differ from the Python aggregation")


def _steps(start: float, end: float, chunk: float) -> list[float]:
    """The `until` of each fold call: one transaction of `chunk` seconds each, as the job
    running every `chunk` seconds would fold."""
    marks = []
    at = start
    while at < end:
        at = min(at + chunk, end)
        marks.append(at)
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--minutes", type=int, default=5)
    parser.add_argument("--chunks", default="60,10", help="seconds per fold transaction")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--pg-dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--smoke", action="store_true", help="a few seconds")
    args = parser.parse_args()
    args.chunks = [float(c) for c in args.chunks.split(",")]
    if args.smoke:
        args.devices, args.minutes = 20, 2
    with tempfile.TemporaryDirectory() as directory:
        for engine in args.engines.split(","):
            with _fleet._database(engine, directory, args.pg_dsn) as db:
                run_engine(db, args)
    if args.smoke:
        print("smoke: targets not judged (none set: the numbers size the fold job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
