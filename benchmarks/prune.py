"""`mmagg prune` on PostgreSQL: deleting rows (plain `results`) vs dropping day partitions.

Seeds the fleet of `benchmarks/_fleet.py` (`--devices` devices x `--classes` classes, a
report every `--interval` s for `--days` days before now) once into a PostgreSQL database
whose `results` is the plain table (schema step 7 left out: the layout before partitioning,
with its foreign key to `reports`), then per repeat clones it twice (`CREATE DATABASE …
TEMPLATE`): one copy stays plain, the other is converted by schema steps 7 and 11
(`partitions.convert` and `convert_reports`, timed: the upgrade's cost). Both copies are
vacuumed and analysed, then `Database.prune` (what `mmagg prune --older-than KEEP` runs)
cuts everything older than `--keep` days, on the plain copy (row deletes) and on the
partitioned copy (whole days dropped, the boundary day row by row), back to back. Both
must remove the same reports and keep the same rows.

    python benchmarks/prune.py --days 7 --keep 2 --interval 600   # 50 devices, ~1 min
    python benchmarks/prune.py --smoke                            # seconds

Target (full mode): the partitioned prune at least 3x faster than the row deletes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import _fleet
from _support import verdict
from mmagg.server import Database, tables
from mmagg.server.partitions import PartitionSet, convert, convert_reports

TARGET_SPEEDUP = 3.0


def _admin(dsn: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _url(name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def _survivors(db: Database) -> tuple[int, int, float]:
    with db.read() as conn:
        row = conn.exec_driver_sql(
            "SELECT (SELECT COUNT(*) FROM reports), COUNT(*), COALESCE(SUM(confidence), 0) "
            "FROM results"
        ).one()
    return int(row[0]), int(row[1]), round(float(row[2]), 6)


def _time_drops(partition_set: PartitionSet, into: list[float]) -> None:
    """Record how long `drop_before` takes inside the prune."""
    drop = partition_set.drop_before

    def timed(before: float, rollups_before: float | None = None) -> tuple[list[str], int]:
        started = time.perf_counter()
        try:
            return drop(before, rollups_before)
        finally:
            into.append(round(time.perf_counter() - started, 3))

    partition_set.drop_before = timed  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _fleet.add_arguments(parser)
    parser.add_argument("--keep", type=float, default=2.0, help="days kept by the prune")
    parser.add_argument("--repeat", type=int, default=2, help="fresh copies pruned per mode")
    args = parser.parse_args()
    if args.smoke:
        args.days, args.keep, args.devices, args.repeat = 3.0, 1.0, 5, 1
        args.interval = max(args.interval, 600.0)
    if args.days is None:
        args.days = 7.0
    now = time.time()
    seed_name = f"mmagg_prune_{uuid.uuid4().hex[:8]}"
    copies: list[str] = []
    try:
        _admin(args.pg_dsn, f'CREATE DATABASE "{seed_name}"')
        saved = tables.MIGRATIONS[7]
        tables.MIGRATIONS[7] = lambda conn: None  # the plain layout, as before step 7
        try:
            db = Database(_url(seed_name))
        finally:
            tables.MIGRATIONS[7] = saved
        started = time.perf_counter()
        written = _fleet.bulk_seed(db, args, now)
        reports = db.count_reports()
        db.close()
        print(
            f"seeded {reports:,} reports, {written:,} results ({args.devices} devices x "
            f"{args.classes} classes every {args.interval:g} s for {args.days:g} d) in "
            f"{time.perf_counter() - started:.0f} s; prune keeps the last {args.keep:g} d"
        )
        before = now - args.keep * 86400
        times: dict[str, list[float]] = {"rows": [], "partitions": []}
        converts: list[float] = []
        drops: list[float] = []
        outcomes: dict[str, set[tuple[int, tuple[int, int, float]]]] = {
            "rows": set(),
            "partitions": set(),
        }
        for _ in range(args.repeat):
            plain_name = f"{seed_name}_r{len(copies)}"
            parted_name = f"{seed_name}_p{len(copies)}"
            for name in (plain_name, parted_name):
                _admin(args.pg_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{seed_name}"')
                copies.append(name)
            plain = Database(_url(plain_name))
            assert plain.partitions is None
            plain.close()
            started = time.perf_counter()
            engine = tables.create_db_engine(_url(parted_name))
            with engine.begin() as conn:
                assert convert(conn, now)
                assert convert_reports(conn, now)
            engine.dispose()
            converts.append(time.perf_counter() - started)
            for name in (plain_name, parted_name):
                _admin(args.pg_dsn.replace("dbname=test", f"dbname={name}"), "VACUUM ANALYZE")
            for mode, name in (("rows", plain_name), ("partitions", parted_name)):
                db = Database(_url(name))
                try:
                    assert (db.partitions is not None) == (mode == "partitions")
                    if db.partitions is not None:
                        _time_drops(db.partitions, drops)
                    started = time.perf_counter()
                    removed = db.prune(before=before)
                    times[mode].append(time.perf_counter() - started)
                    outcomes[mode].add((removed, _survivors(db)))
                finally:
                    db.close()
        rows, parts = statistics.median(times["rows"]), statistics.median(times["partitions"])
        conversion = statistics.median(converts)
        print(f"steps 7 and 11 conversion (INSERT … SELECT into partitions): {conversion:.2f} s")
        print(f"  of the partitioned prune, DETACH + DROP of whole days: {drops}")
        print(f"prune, rows deleted (plain results):   {rows:.2f} s  runs {times['rows']}")
        print(f"prune, partitions dropped:             {parts:.2f} s  runs {times['partitions']}")
        print(f"speed-up: {rows / parts:.1f}x")
        print(f"removed reports, kept (reports, results, sum of confidences): {outcomes}")
        same = outcomes["rows"] == outcomes["partitions"] and len(outcomes["rows"]) == 1
        if not same:
            print("MISMATCH: the two prunes did not keep the same data")
            return 1
        ok = verdict(
            [(f"partitioned prune >= {TARGET_SPEEDUP:g}x faster", rows / parts >= TARGET_SPEEDUP)],
            smoke=args.smoke,
        )
        return 0 if ok else 1
    finally:
        for name in [*copies, seed_name]:
            _admin(args.pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
