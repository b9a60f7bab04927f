"""PostgreSQL: `results` and `rollups` partitioned by day (schema step 7), `reports` too
(step 11), `mmagg.server.partitions`.

Real PostgreSQL (and a real SQLite file as the reference for retention). Every time is
relative to `time.time()`, so the tests hold on any date.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_payloads import report, result
from server_support import create_pg_database, drop_pg_database, scratch_pg_database, start_server
from v01_schema import WORKSPACE, build_v01_database

from mmagg.server import Database, create_app, tables
from mmagg.server.bounds import Placement
from mmagg.server.db import PendingReport, Principal
from mmagg.server.partitions import (
    KEY_MONTH_MARGIN_SECONDS,
    PARTITION_SECONDS,
    attached,
    attached_months,
    convert,
    day_of,
    is_partitioned,
    key_partition_name,
    month_bounds,
    month_of,
    partition_name,
)
from mmagg.server.schemas import REPORT_ADAPTER

DAY = float(PARTITION_SECONDS)


@pytest.fixture
def pg_url(pg_database_url: str) -> Iterator[str]:
    """A PostgreSQL database of this test's own (retention drops partitions database-wide)."""
    with scratch_pg_database("mmagg_part_") as url:
        yield url


def _day_start(days_ago: int) -> float:
    """Midnight UTC `days_ago` days before today."""
    return (day_of(time.time()) - days_ago) * DAY


def _store(
    db: Database, principal: Principal, ts: float, key: str | None = None, cls: str = "car"
) -> Any:
    when = datetime.fromtimestamp(ts, timezone.utc)
    body = REPORT_ADAPTER.validate_python(report([result(cls, 0.5)], timestamp=when))
    placement = Placement(ts, time.time(), when.isoformat(), "client")
    return db.store_report(principal, body, key, placement)


def _principal(db: Database, workspace: str = "acme") -> Principal:
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    return principal


def _rows_by_partition(db: Database) -> list[tuple[str, float]]:
    with db.read() as conn:
        rows = conn.exec_driver_sql("SELECT tableoid::regclass::text, ts FROM results").all()
    return [(str(name), float(ts)) for name, ts in rows]


def _reports_by_partition(db: Database) -> list[tuple[str, float]]:
    with db.read() as conn:
        rows = conn.exec_driver_sql("SELECT tableoid::regclass::text, ts FROM reports").all()
    return [(str(name), float(ts)) for name, ts in rows]


def _rollups_by_partition(db: Database) -> list[tuple[str, float]]:
    with db.read() as conn:
        rows = conn.exec_driver_sql("SELECT tableoid::regclass::text, bucket FROM rollups").all()
    return [(str(name), float(bucket)) for name, bucket in rows]


def _partitions(db: Database) -> set[str]:
    """Leaf partitions of `results`, from pg_partition_tree."""
    with db.read() as conn:
        rows = conn.exec_driver_sql(
            "SELECT relid::text FROM pg_partition_tree('results') WHERE isleaf"
        ).scalars()
        return {str(name) for name in rows}


def test_a_new_postgresql_database_is_partitioned_with_days_ahead(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with db.read() as conn:
            assert is_partitioned(conn) and is_partitioned(conn, "rollups")
            assert is_partitioned(conn, "reports")
            days = set(attached(conn))
            assert set(attached(conn, "rollups")) == days == set(attached(conn, "reports"))
        today = day_of(time.time())
        assert {today, today + 1, today + 2} <= days
        assert {partition_name(d) for d in days} == _partitions(db)
    finally:
        db.close()


def test_reports_over_several_days_land_in_their_partitions(pg_url: str) -> None:
    """Days with a partition made ahead, days without one yet (a late report: made on
    arrival), and the exact midnight, which belongs to the day it starts."""
    db = Database(pg_url)
    try:
        principal = _principal(db)
        midnight = _day_start(0)
        stamps = [
            midnight + 3600.5,  # today, made ahead
            midnight - 0.001,  # yesterday's last millisecond: no partition until now
            midnight,  # the boundary itself: today
            _day_start(3) + 7,  # three days ago
            _day_start(40) + 43_200,  # a replay from 40 days ago
            time.time() + 30,  # the tolerated future
        ]
        before = _partitions(db)
        assert partition_name(day_of(midnight - 1)) not in before
        for ts in stamps:
            assert not _store(db, principal, ts).duplicate
        placed = _rows_by_partition(db)
        assert sorted(ts for _, ts in placed) == sorted(stamps)
        for name, ts in placed:
            assert name == partition_name(day_of(ts)), (name, ts)
        filed = _reports_by_partition(db)
        assert sorted(ts for _, ts in filed) == sorted(stamps)
        for name, ts in filed:
            assert name == partition_name(day_of(ts), "reports"), (name, ts)
        # The reports before the rollup watermark were rolled up as they were stored; the
        # one ahead of it (in the future) is folded by the job, into its day's partition too.
        assert db.fold_rollups(now=time.time() + 120) == 1
        rolled = _rollups_by_partition(db)
        with db.read() as conn:
            daily = conn.exec_driver_sql("SELECT SUM(results) FROM rollups WHERE level = 86400")
            assert daily.scalar() == len(stamps)
        for name, bucket in rolled:
            assert name == partition_name(day_of(bucket), "rollups"), (name, bucket)
        assert {partition_name(day_of(ts)) for ts in stamps} <= _partitions(db)
        # The parent holds no row of its own (there is no DEFAULT partition either).
        with db.read() as conn:
            own = conn.exec_driver_sql("SELECT COUNT(*) FROM ONLY results").scalar_one()
        assert own == 0
    finally:
        db.close()


def test_idempotency_dedups_across_partitions(pg_url: str) -> None:
    """A retry filed on another day (a naive timestamp is filed at the receive time) is
    still the same report: stored once."""
    db = Database(pg_url)
    try:
        principal = _principal(db)
        key = "retry-" + secrets.token_hex(8)
        first = _store(db, principal, _day_start(2) + 100, key)
        again = _store(db, principal, _day_start(0) + 100, key)
        assert not first.duplicate and again.duplicate
        assert again.report_id == first.report_id
        assert db.count_reports() == 1
        assert len(_rows_by_partition(db)) == 1
        assert [name for name, _ in _reports_by_partition(db)] == [
            partition_name(day_of(_day_start(2)), "reports")
        ]
        # The same key in another workspace is another report.
        other = _store(db, _principal(db, "beta"), _day_start(0) + 100, key)
        assert not other.duplicate and other.report_id != first.report_id
    finally:
        db.close()


def test_one_key_twice_in_a_batch_is_stored_once(pg_url: str) -> None:
    """A group-commit batch holding one key twice (two requests of one retry at once):
    the first is stored, the second answers as its replay; the others are stored."""
    db = Database(pg_url)
    try:
        principal = _principal(db)
        key = "twice-" + secrets.token_hex(8)
        items = []
        for n, (ts, idem) in enumerate(
            [(_day_start(1) + 5, key), (_day_start(0) + 5, key), (_day_start(0) + 9, None)]
        ):
            when = datetime.fromtimestamp(ts, timezone.utc)
            body = REPORT_ADAPTER.validate_python(report([result(f"c{n}", 0.5)], timestamp=when))
            items.append(
                PendingReport(principal, body, idem, Placement(ts, time.time(), "", "client"))
            )
        outcomes = db.store_reports(items)
        assert [getattr(o, "duplicate", o) for o in outcomes] == [False, True, False]
        assert outcomes[0].report_id == outcomes[1].report_id  # type: ignore[union-attr]
        assert db.count_reports() == 2
    finally:
        db.close()


def test_one_key_from_two_writers_on_two_days_is_stored_once(pg_url: str) -> None:
    """Two processes (two engines) store one Idempotency-Key at the same moment, filed on
    different days (the retry of a naive timestamp is filed at its own receive time): no
    unique constraint spans the partitions, the key lock does. 25 keys, one report each."""
    first, second = Database(pg_url), Database(pg_url)
    try:
        principals = (_principal(first), _principal(second))
        workspace = {p.workspace_id for p in principals}
        assert len(workspace) == 1  # one workspace, two keys of it
        outcomes: list[tuple[int, Any]] = []
        errors: list[BaseException] = []
        for n in range(25):
            barrier = threading.Barrier(2)
            key = f"race-{n}-" + secrets.token_hex(4)

            def write(
                db: Database,
                principal: Principal,
                ts: float,
                key: str = key,
                barrier: threading.Barrier = barrier,
                n: int = n,
            ) -> None:
                try:
                    barrier.wait(timeout=10)
                    outcomes.append((n, _store(db, principal, ts, key)))
                except BaseException as error:  # reported below, in the test's thread
                    errors.append(error)

            threads = [
                threading.Thread(target=write, args=(first, principals[0], _day_start(3) + n)),
                threading.Thread(target=write, args=(second, principals[1], _day_start(0) + n)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
        assert errors == []
        for n in range(25):
            pair = [stored for m, stored in outcomes if m == n]
            assert sorted(stored.duplicate for stored in pair) == [False, True]
            assert pair[0].report_id == pair[1].report_id
        assert first.count_reports() == 25
        with first.read() as conn:
            keys = conn.exec_driver_sql(
                "SELECT idempotency_key, COUNT(*) FROM reports GROUP BY idempotency_key"
            ).all()
        assert len(keys) == 25 and all(count == 1 for _, count in keys)
    finally:
        first.close()
        second.close()


def test_idempotency_over_http_stores_once(pg_url: str) -> None:
    db = Database(pg_url)
    running = start_server(create_app(db=db))
    try:
        workspace, key = "acme", db.create_key("acme", "ingest,read")
        body = report([result("car", 0.7)])
        headers = {"Idempotency-Key": "k-" + secrets.token_hex(8)}
        with httpx.Client(base_url=running.base_url, timeout=10) as http:
            answers = [
                http.post(
                    f"/{workspace}/inference-stats",
                    params={"api_key": key},
                    json=body,
                    headers=headers,
                )
                for _ in range(2)
            ]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["report_id"] == answers[1].json()["report_id"]
        assert db.count_reports(workspace) == 1
    finally:
        running.stop()


def test_two_writers_for_a_new_day_both_succeed(pg_url: str) -> None:
    """Two processes (two engines, separate sessions) store the first reports of a day
    that has no partition at the same moment: both are stored, the partition made once."""
    first, second = Database(pg_url), Database(pg_url)
    try:
        principals = (_principal(first), _principal(second, "beta"))
        days = [_day_start(10 + n) + 1000 + n for n in range(6)]
        errors: list[BaseException] = []
        for ts in days:
            barrier = threading.Barrier(2)

            def write(
                db: Database,
                principal: Principal,
                ts: float = ts,
                barrier: threading.Barrier = barrier,
            ) -> None:
                try:
                    barrier.wait(timeout=10)
                    _store(db, principal, ts)
                except BaseException as error:  # reported below, in the test's thread
                    errors.append(error)

            threads = [
                threading.Thread(target=write, args=(db, p))
                for db, p in zip((first, second), principals, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
        assert errors == []
        placed = _rows_by_partition(first)
        assert sorted(ts for _, ts in placed) == sorted(days + days)
        assert all(name == partition_name(day_of(ts)) for name, ts in placed)
    finally:
        first.close()
        second.close()


def test_a_day_dropped_by_another_process_is_made_again(pg_url: str) -> None:
    """Process A knows day D has a partition; process B's prune drops it; A's next report
    for D finds it missing, makes it again and is stored."""
    writer, pruner = Database(pg_url), Database(pg_url)
    try:
        principal = _principal(writer)
        old = _day_start(20) + 500
        _store(writer, principal, old)
        assert pruner.prune(before=_day_start(19)) == 1
        assert partition_name(day_of(old)) not in _partitions(writer)
        assert not _store(writer, principal, old + 1).duplicate
        assert [ts for _, ts in _rows_by_partition(writer)] == [old + 1]
        assert [ts for _, ts in _reports_by_partition(writer)] == [old + 1]
    finally:
        writer.close()
        pruner.close()


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    """(SQLite file, PostgreSQL): the same reports go to both."""
    lite, pg = Database(f"sqlite:///{tmp_path / 'ref.db'}"), Database(pg_url)
    try:
        yield lite, pg
    finally:
        lite.close()
        pg.close()


def _remaining(db: Database) -> list[tuple[Any, ...]]:
    """Every kept result (with its report) and every kept rollup row."""
    with db.read() as conn:
        rows = conn.exec_driver_sql(
            "SELECT r.ts, s.class_name FROM reports r JOIN results s ON s.report_id = r.id"
        ).all()
        rolled = conn.exec_driver_sql(
            "SELECT level, bucket, class_name, results FROM rollups"
        ).all()
    return sorted((float(ts), str(name)) for ts, name in rows) + sorted(
        (int(level), float(bucket), str(name), int(count)) for level, bucket, name, count in rolled
    )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    offsets=st.lists(st.integers(0, 5 * PARTITION_SECONDS * 1000), min_size=1, max_size=25),
    bound=st.integers(0, 6 * PARTITION_SECONDS * 1000),
)
def test_retention_drops_partitions_and_keeps_what_sqlite_keeps(
    pair: tuple[Database, Database], offsets: list[int], bound: int
) -> None:
    """Random reports over five days and a random bound (whole days included): PostgreSQL
    drops every partition that ends by the bound and keeps exactly the rows SQLite's
    row-by-row delete keeps."""
    lite, pg = pair
    for db in pair:
        db.prune(before=time.time() + 10 * DAY)  # empty both: every partition goes too
    base = _day_start(8)
    if bound % 3 == 0:
        bound -= bound % (PARTITION_SECONDS * 1000)  # a bound at midnight, exactly
    cut = base + bound / 1000
    principals = (_principal(lite), _principal(pg))
    for n, offset in enumerate(offsets):
        for db, principal in zip(pair, principals, strict=True):
            _store(db, principal, base + offset / 1000, cls=f"c{n}")
    assert _remaining(lite) == _remaining(pg)
    removed = [db.prune(before=cut) for db in pair]
    assert removed[0] == removed[1] == sum(1 for o in offsets if base + o / 1000 < cut)
    assert _remaining(lite) == _remaining(pg)
    assert all(row[0] >= cut for row in _remaining(pg) if len(row) == 2)
    with pg.read() as conn:
        for table in ("results", "rollups", "reports"):
            assert all(high > cut for _, _, high, _ in attached(conn, table).values())
    # The day holding the bound stays (pruned row by row) if it held rows or was made.
    for name, ts in _rows_by_partition(pg):
        assert name == partition_name(day_of(ts))
    for name, ts in _reports_by_partition(pg):
        assert name == partition_name(day_of(ts), "reports")


def _insert_v01_rows(url: str, anchor: float) -> int:
    """Reports over four days as v0.1 stored them; returns the number of results."""
    engine = sa.create_engine(tables.normalize_url(url))
    rows = 0
    try:
        with engine.begin() as conn:
            workspace_id = conn.execute(
                sa.text("SELECT id FROM workspaces WHERE name = :n"), {"n": WORKSPACE}
            ).scalar_one()
            for n in range(0, 4 * 24 * 60, 37):  # every 37 minutes for four days
                ts = anchor + n * 60 + 0.25
                device = f"edge-{n % 3}"
                report_id = conn.execute(
                    sa.text(
                        "INSERT INTO reports (workspace_id, received_at, ts, device_id, "
                        "system_info, result_count, idempotency_key) "
                        "VALUES (:w, :ts, :ts, :d, '{}', 2, :k) RETURNING id"
                    ),
                    {"w": workspace_id, "ts": ts, "d": device, "k": f"v01-{n}"},
                ).scalar_one()
                for class_name, confidence in (("car", (n % 10) / 10), ("dog", 0.95)):
                    conn.execute(
                        sa.text(
                            "INSERT INTO results (report_id, workspace_id, ts, device_id, "
                            "model_id, class_name, confidence, source_id, stats_count, "
                            "stats_sum) VALUES (:r, :w, :ts, :d, 'old/1', :c, :conf, 'cam', "
                            ":count, :total)"
                        ),
                        {
                            "r": report_id,
                            "w": workspace_id,
                            "ts": ts,
                            "d": device,
                            "c": class_name,
                            "conf": confidence,
                            "count": None if n % 2 else 3,
                            "total": None if n % 2 else confidence * 2,
                        },
                    )
                    rows += 1
    finally:
        engine.dispose()
    return rows


READS = {
    "inference-stats": {},
    "models": {},
    "classes": {"model": "old/1"},
    "devices": {},
    "timeseries": {"model": "old/1", "bucket_seconds": "3600"},
    "histogram": {"model": "old/1"},
    "samples": {"limit": "500"},
    "trends": {"model": "old/1"},
    "drift": {},
}


def _read_everything(db: Database, key: str, start: float, end: float) -> dict[str, Any]:
    running = start_server(create_app(db=db))
    span = {
        "startTime": datetime.fromtimestamp(start, timezone.utc).isoformat(),
        "endTime": datetime.fromtimestamp(end, timezone.utc).isoformat(),
        "api_key": key,
    }
    answers: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=running.base_url, timeout=30) as http:
            stats = http.get(f"/{WORKSPACE}/inference-stats", params=span)
            assert stats.status_code == 200, stats.text
            answers["GET inference-stats"] = stats.json()
            for name, query in READS.items():
                got = http.get(f"/{WORKSPACE}/api/{name}", params={**span, **query})
                assert got.status_code == 200, (name, got.text)
                answers[name] = got.json()
    finally:
        running.stop()
    return answers


def test_a_v01_database_is_partitioned_and_reads_back_equal(
    pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v0.1 database with four days of rows, upgraded twice from one copy: once to the
    current schema (partitioned) and once with step 7 left out (the plain table). Every
    read endpoint answers the same on both; every row sits in its day's partition; ids and
    the id sequence carry on; running step 7 again changes nothing."""
    names = [f"mmagg_v01p_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        url = create_pg_database(names[0])
        key = "mmk_" + secrets.token_urlsafe(24)
        build_v01_database(url, "postgresql", key, secrets.token_urlsafe(32))
        anchor = _day_start(5) + 1234.0
        rows = _insert_v01_rows(url, anchor)
        plain_url = create_pg_database(names[1], template=names[0])

        with monkeypatch.context() as patch:
            patch.setitem(tables.MIGRATIONS, 7, lambda conn: None)
            plain = Database(plain_url)
        upgraded = Database(url)
        try:
            with plain.read() as conn:
                assert not is_partitioned(conn)
            with upgraded.read() as conn:
                assert is_partitioned(conn) and is_partitioned(conn, "rollups")
                assert tables.current_version(conn) == tables.SCHEMA_VERSION
                ids = conn.exec_driver_sql("SELECT id, report_id FROM results ORDER BY id")
                upgraded_ids = ids.all()
            with plain.read() as conn:
                plain_ids = conn.exec_driver_sql("SELECT id, report_id FROM results ORDER BY id")
                assert upgraded_ids == plain_ids.all()
            assert len(upgraded_ids) == rows
            placed = _rows_by_partition(upgraded)
            assert len({name for name, _ in placed}) >= 4
            assert all(name == partition_name(day_of(ts)) for name, ts in placed)
            rolled = _rollups_by_partition(upgraded)
            assert all(name == partition_name(day_of(b), "rollups") for name, b in rolled)
            with plain.read() as conn:
                assert conn.exec_driver_sql("SELECT COUNT(*) FROM rollups").scalar() == len(rolled)

            span = (anchor - 3600, time.time() + 60)
            assert _read_everything(upgraded, key, *span) == _read_everything(plain, key, *span)

            # New rows continue the id sequence, which is now the partitioned table's.
            stored = _store(upgraded, _principal(upgraded, WORKSPACE), time.time() - 5)
            with upgraded.read() as conn:
                newest = conn.exec_driver_sql(
                    "SELECT id FROM results WHERE report_id = %(r)s", {"r": stored.report_id}
                ).scalar_one()
                owner = conn.exec_driver_sql(
                    "SELECT pg_get_serial_sequence('results', 'id')"
                ).scalar_one()
            assert newest > max(i for i, _ in upgraded_ids) and owner is not None
            with upgraded.read() as conn:
                kinds = conn.exec_driver_sql(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE (table_name, column_name) IN "
                    "(('results', 'id'), ('results', 'report_id'), ('reports', 'id'))"
                ).all()
            assert sorted(kinds) == [
                ("reports", "id", "bigint"),
                ("results", "id", "bigint"),
                ("results", "report_id", "bigint"),
            ]

            # Step 7 again (an already partitioned database) is left alone.
            with upgraded.write() as conn:
                before = [sorted(attached(conn, t).items()) for t in ("results", "rollups")]
                assert convert(conn) == []
                tables.MIGRATIONS[7](conn)
                after = [sorted(attached(conn, t).items()) for t in ("results", "rollups")]
                assert after == before
        finally:
            plain.close()
            upgraded.close()
    finally:
        for name in names:
            drop_pg_database(name)


def test_step_7_does_nothing_on_sqlite(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'lite.db'}")
    try:
        assert db.partitions is None
        with db.write() as conn:
            assert convert(conn) == []
            assert not is_partitioned(conn)
    finally:
        db.close()


def test_a_prune_that_stopped_between_detach_and_drop_is_finished(pg_url: str) -> None:
    """A day detached but not dropped (a prune that died in between) goes with the next
    prune; it is never attached again with its old rows."""
    db = Database(pg_url)
    try:
        principal = _principal(db)
        old = _day_start(30) + 60
        _store(db, principal, old)
        name = partition_name(day_of(old))
        with db.engine.connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto.exec_driver_sql(f"ALTER TABLE results DETACH PARTITION {name}")
        assert name not in _partitions(db)
        with db.read() as conn:
            assert conn.exec_driver_sql(f"SELECT COUNT(*) FROM {name}").scalar() == 1
        db.prune(before=_day_start(29))
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT to_regclass(%(n)s)", {"n": name}).scalar() is None
        assert db.count_reports() == 0
    finally:
        db.close()


def test_two_processes_upgrading_at_once_both_start(pg_database_url: str) -> None:
    """Two servers started together on a v0.1 database with rows: one converts, the other
    waits for it and finds nothing left to do; no row is lost."""
    name = f"mmagg_v01c_{uuid.uuid4().hex[:10]}"
    try:
        url = create_pg_database(name)
        build_v01_database(url, "postgresql", "mmk_" + secrets.token_urlsafe(24), "t")
        rows = _insert_v01_rows(url, _day_start(3) + 77.0)
        opened: list[Database] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def start() -> None:
            try:
                barrier.wait(timeout=10)
                opened.append(Database(url))
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        try:
            assert errors == [] and len(opened) == 2
            assert all(db.partitions is not None for db in opened)
            with opened[0].read() as conn:
                count = conn.exec_driver_sql("SELECT COUNT(*) FROM results").scalar()
            assert count == rows
        finally:
            for db in opened:
                db.close()
    finally:
        drop_pg_database(name)


def _all_reports(db: Database) -> list[tuple[Any, ...]]:
    with db.read() as conn:
        return [tuple(row) for row in conn.execute(sa.select(tables.reports).order_by("id"))]


def test_a_version_10_database_gets_partitioned_reports_and_reads_back_equal(
    pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema step 11: a database at version 10 (`results` and `rollups` partitioned,
    `reports` one table with its unique key) holding keyed reports over four days, copied;
    the original upgraded, the copy left at version 10. Every `reports` row (every column)
    and every read endpoint over HTTP are equal on both; every report sits in its day's
    partition; a key stored before the upgrade is still a replay after it; ids carry on;
    step 11 again changes nothing."""
    names = [f"mmagg_v10_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    anchor = _day_start(4) + 321.0
    try:
        url = create_pg_database(names[0])
        with monkeypatch.context() as patch:
            patch.setattr(tables, "SCHEMA_VERSION", 10)
            old = Database(url)
            try:
                with old.read() as conn:
                    assert tables.current_version(conn) == 10
                    assert is_partitioned(conn) and not is_partitioned(conn, "reports")
                key = old.create_key(WORKSPACE, "ingest,read")
                principal = old.authenticate(key)
                assert principal is not None
                stamps = [anchor + n * 1877.25 for n in range(4 * 86_400 // 1877)]
                for n, ts in enumerate(stamps):
                    _store(old, principal, ts, f"v10-{n}", cls=("car", "dog", "bus")[n % 3])
                old.fold_rollups(now=time.time())
            finally:
                old.close()
            plain = Database(create_pg_database(names[1], template=names[0]))
        upgraded = Database(url)
        try:
            with plain.read() as conn:
                assert tables.current_version(conn) == 10
                assert not is_partitioned(conn, "reports")
            with upgraded.read() as conn:
                assert tables.current_version(conn) == tables.SCHEMA_VERSION
                assert is_partitioned(conn, "reports")
            assert len(_all_reports(upgraded)) == len(stamps)
            assert _all_reports(upgraded) == _all_reports(plain)
            with upgraded.read() as conn:
                keys = conn.exec_driver_sql(
                    "SELECT report_id, workspace_id, idempotency_key, received_at, result_count "
                    "FROM report_keys ORDER BY report_id"
                ).all()
            assert [tuple(k) for k in keys] == [
                (row[0], row[1], row[9], row[2], row[12]) for row in _all_reports(plain)
            ]
            filed = _reports_by_partition(upgraded)
            assert len({name for name, _ in filed}) >= 4
            assert all(name == partition_name(day_of(ts), "reports") for name, ts in filed)

            span = (anchor - 3600, time.time() + 60)
            assert _read_everything(upgraded, key, *span) == _read_everything(plain, key, *span)

            writer = upgraded.authenticate(key)
            assert writer is not None
            replay = _store(upgraded, writer, time.time() - 5, "v10-7")
            assert replay.duplicate
            assert replay.report_id == _all_reports(plain)[7][0]
            fresh = _store(upgraded, writer, time.time() - 5, "v11-new")
            assert not fresh.duplicate
            assert fresh.report_id > max(row[0] for row in _all_reports(plain))
            assert upgraded.count_reports() == len(stamps) + 1

            with upgraded.write() as conn:
                before = sorted(attached(conn, "reports").items())
                tables.MIGRATIONS[11](conn)
                assert sorted(attached(conn, "reports").items()) == before
        finally:
            plain.close()
            upgraded.close()
    finally:
        for name in names:
            drop_pg_database(name)


def test_keys_go_by_month_once_every_report_they_name_is_gone(pg_url: str) -> None:
    """A keyed report received (and filed at its receive time) three months ago: a prune
    past its day drops its report, but its key's month is kept until the bound passes the
    month's end by the filing margin, so a retry until then is still its replay; after
    that the month goes as a partition and the key is new again."""
    db = Database(pg_url)
    try:
        principal = _principal(db)
        month = month_of(time.time()) - 3
        start, end = month_bounds(month)
        received = start + 7_200.5
        when = datetime.fromtimestamp(received, timezone.utc)
        body = REPORT_ADAPTER.validate_python(report([result("car", 0.5)], timestamp=when))
        placement = Placement(received, received, when.replace(tzinfo=None).isoformat(), "naive")
        first = db.store_report(principal, body, "old-key", placement)
        with db.read() as conn:
            assert month in attached_months(conn)  # made on demand for a past month
            assert (
                key_partition_name(month)
                == conn.exec_driver_sql(
                    "SELECT tableoid::regclass::text FROM report_keys"
                ).scalar_one()
            )

        assert db.prune(before=end + KEY_MONTH_MARGIN_SECONDS - 1) == 1
        assert db.count_reports() == 0
        replay = _store(db, principal, time.time() - 5, "old-key")
        assert replay.duplicate and replay.report_id == first.report_id
        with db.read() as conn:
            assert month in attached_months(conn)

        assert db.prune(before=end + KEY_MONTH_MARGIN_SECONDS) == 0
        with db.read() as conn:
            assert month not in attached_months(conn)
            assert month_of(time.time()) in attached_months(conn)
        again = _store(db, principal, time.time() - 5, "old-key")
        assert not again.duplicate and again.report_id != first.report_id
        assert db.count_reports() == 1
    finally:
        db.close()
