"""Rollups (issue 15): a read served from per-minute / per-hour rollups equals the same read
over the raw results, on SQLite and PostgreSQL; an upgraded v0.1 database gets its rollups.

The reference is the raw-row path of the same read (`rollups.ENABLED = False`: every segment
read from `results`), which was the read before rollups existed. Counts, minimums,
maximums, histograms, sets and times must be equal; sums and averages of confidences are
the same numbers added in another order, so they are compared to 1e-12 relative.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_payloads import report, result
from server_payloads import stats as payload_stats
from server_support import RunningBackend
from v01_schema import WORKSPACE, build_v01_database

from mmagg.server import Database, queries, rollups, tables, trends
from mmagg.server.bounds import Placement
from mmagg.server.queries import TimeRange
from mmagg.server.schemas import REPORT_ADAPTER
from mmagg.server.tables import reports, results

MODELS = ("yard/1", "dock/2")
CLASSES = ("car", "person", "truck")
DEVICES = (None, "edge-a", "edge-b")
SOURCES = (None, "cam-1", "cam-2")
HOURS = 4


def _anchor() -> float:
    """A whole hour a few hours back: ranges below fall on and off hour and minute edges."""
    return math.floor(time.time() / 3600) * 3600 - (HOURS + 1) * 3600


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('rollups') / 'r.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    database = Database(url)
    yield database
    database.close()


# A confidence: mostly random at millesimal resolution, sometimes on a bucket edge.
confidences = st.one_of(
    st.integers(0, 1000).map(lambda n: n / 1000), st.sampled_from([0.0, 0.1, 0.9, 0.95, 1.0])
)
items = st.tuples(
    st.sampled_from(MODELS),
    st.sampled_from(CLASSES),
    st.sampled_from(SOURCES),
    st.lists(confidences, min_size=1, max_size=4),
    st.booleans(),  # with the stats extension
)
reports_strategy = st.lists(
    st.tuples(
        # milliseconds after the anchor, with a bias to minute and hour edges
        st.one_of(
            st.integers(0, HOURS * 3600_000 - 1),
            st.integers(1, HOURS * 60).map(lambda m: m * 60_000 - 1),
            st.integers(0, HOURS).map(lambda h: h * 3600_000),
        ),
        st.sampled_from(DEVICES),
        st.lists(items, min_size=1, max_size=5),
    ),
    min_size=1,
    max_size=25,
)
offsets = st.one_of(
    st.integers(-120_000, HOURS * 3600_000 + 120_000),
    st.integers(0, HOURS * 60).map(lambda m: m * 60_000),
)
buckets = st.sampled_from([60, 120, 300, 900, 3600, 7200, 21600, 43200, 45, 90.5])


def _store(db: Database, workspace: str, anchor: float, drawn: list[Any]) -> None:
    principal = db.authenticate(db.create_key(workspace))
    assert principal is not None
    for millis, device, drawn_items in drawn:
        ts = anchor + millis / 1000
        body_items = []
        for model, class_name, source, values, with_stats in drawn_items:
            extra: dict[str, Any] = {}
            if source is not None:
                extra["source_id"] = source
            if with_stats:
                extra["stats"] = payload_stats(values)
            body_items.append(result(class_name, max(values), model, **extra))
        when = datetime.fromtimestamp(ts, timezone.utc)
        body = report(body_items, timestamp=when)
        if device is None:
            del body["device_id"]
        else:
            body["device_id"] = device
        placement = Placement(ts, time.time(), when.isoformat(), "client")
        db.store_report(principal, REPORT_ADAPTER.validate_python(body), None, placement)


def _devices_before_rollups(
    conn: sa.Connection, workspace_id: int, span: TimeRange, model_id: str | None
) -> dict[str, Any]:
    """The `devices` read as it was before rollups served it (its SQL, kept here as an
    independent reference): per (device, source) over `results`, report counts per device
    from `reports` (or distinct report ids for one model)."""
    where = [results.c.workspace_id == workspace_id, results.c.ts >= span.start]
    where.append(results.c.ts < span.end)
    if model_id is not None:
        where.append(results.c.model_id == model_id)
    rows = conn.execute(
        sa.select(
            results.c.device_id,
            results.c.source_id,
            sa.func.max(results.c.ts),
            sa.func.count(sa.distinct(results.c.report_id)),
            sa.func.count(),
        )
        .where(*where)
        .group_by(results.c.device_id, results.c.source_id)
    ).all()
    if model_id is None:
        per_device = sa.select(reports.c.device_id, sa.func.count()).where(
            reports.c.workspace_id == workspace_id,
            reports.c.ts >= span.start,
            reports.c.ts < span.end,
            reports.c.result_count > 0,
        )
    else:
        per_device = sa.select(
            results.c.device_id, sa.func.count(sa.distinct(results.c.report_id))
        ).where(*where)
    counts = dict(conn.execute(per_device.group_by(sa.column("device_id"))).all())
    found: dict[str | None, dict[str, Any]] = {}
    for device_id, source_id, last, report_count, result_count in rows:
        device = found.setdefault(
            device_id, {"device_id": device_id, "last": last, "result_count": 0, "sources": []}
        )
        device["last"] = max(device["last"], last)
        device["result_count"] += result_count
        device["sources"].append(
            {
                "source_id": source_id,
                "last_report_at": queries.iso(last),
                "report_count": report_count,
                "result_count": result_count,
            }
        )
    items = []
    for device_id in sorted(found, key=lambda d: (d is None, d or "")):
        device = found[device_id]
        items.append(
            {
                "device_id": device_id,
                "last_report_at": queries.iso(device.pop("last")),
                "result_count": device["result_count"],
                "sources": sorted(
                    device["sources"], key=lambda s: (s["source_id"] is None, s["source_id"] or "")
                ),
                "report_count": counts.get(device_id, 0),
            }
        )
    return {
        "start_time": queries.iso(span.start),
        "end_time": queries.iso(span.end),
        "devices": items,
    }


def _both(call: Any) -> tuple[Any, Any]:
    """(answer from rollups, answer from raw rows)."""
    rollups.ENABLED = True
    try:
        rolled = call()
        rollups.ENABLED = False
        raw = call()
    finally:
        rollups.ENABLED = True
    return rolled, raw


def assert_same(rolled: Any, raw: Any, where: str = "") -> None:
    """Equal, except floats (sums in another order) to 1e-12 relative."""
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw, rolled = dataclasses.asdict(raw), dataclasses.asdict(rolled)
    if isinstance(raw, float) and isinstance(rolled, float):
        assert math.isclose(rolled, raw, rel_tol=1e-12, abs_tol=1e-12), (where, rolled, raw)
    elif isinstance(raw, dict):
        assert isinstance(rolled, dict) and rolled.keys() == raw.keys(), (where, rolled, raw)
        for key in raw:
            assert_same(rolled[key], raw[key], f"{where}.{key}")
    elif isinstance(raw, list):
        assert isinstance(rolled, list) and len(rolled) == len(raw), (where, rolled, raw)
        for index, (a, b) in enumerate(zip(rolled, raw, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert rolled == raw, (where, rolled, raw)


def assert_every_read_equal(
    db: Database,
    workspace_id: int,
    span: TimeRange,
    wide: TimeRange,
    bucket: float,
    device: str | None,
    source: str | None,
    names: list[str],
) -> None:
    """Every read served from rollups (over `span`, and over `wide`, the whole stored range)
    equals the same read over raw rows; `devices` also equals its SQL from before rollups."""
    with db.read() as conn:
        for label, call in {
            "inference_stats": lambda: queries.inference_stats(conn, workspace_id, span),
            "inference_stats wide": lambda: queries.inference_stats(conn, workspace_id, wide),
            "models": lambda: queries.models(conn, workspace_id, span),
            "models device": lambda: queries.models(conn, workspace_id, span, device_id=device),
            "models source": lambda: queries.models(conn, workspace_id, span, source_id=source),
            "classes": lambda: queries.classes(conn, workspace_id, MODELS[0], span),
            "devices": lambda: queries.devices(conn, workspace_id, span),
            "devices wide": lambda: queries.devices(conn, workspace_id, wide),
            "devices model": lambda: queries.devices(conn, workspace_id, span, MODELS[1]),
            "timeseries": lambda: queries.timeseries(
                conn, workspace_id, MODELS[0], span, bucket, names, source, device
            ),
            "timeseries wide": lambda: queries.timeseries(
                conn, workspace_id, MODELS[1], wide, bucket
            ),
            "histogram": lambda: queries.histogram(
                conn, workspace_id, MODELS[1], span, names, source, device
            ),
            "histogram wide": lambda: queries.histogram(conn, workspace_id, MODELS[0], wide),
            "trends": lambda: trends.class_trends(
                conn,
                workspace_id,
                MODELS[0],
                span,
                bucket,
                trends.Filter(None, names[0] if names else None, device, source),
            ),
            "trends wide": lambda: trends.class_trends(conn, workspace_id, MODELS[1], wide, 3600),
            "drift": lambda: trends.drift_report(
                conn, workspace_id, span.end, 3600, 2 * 3600, trends.Filter(), min_count=1
            ),
            "period stats": lambda: trends.period_stats(
                conn, workspace_id, span, trends.Filter(MODELS[0], None, device, source)
            ),
        }.items():
            rolled, raw = _both(call)
            assert_same(rolled, raw, label)
        for model in (None, MODELS[0]):
            assert_same(
                queries.devices(conn, workspace_id, span, model),
                _devices_before_rollups(conn, workspace_id, span, model),
                f"devices {model} before rollups",
            )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=reports_strategy,
    start=offsets,
    end=offsets,
    bucket=buckets,
    device=st.sampled_from(DEVICES),
    source=st.sampled_from(SOURCES),
    names=st.lists(st.sampled_from(CLASSES), max_size=2, unique=True),
)
def test_every_read_from_rollups_equals_the_read_over_raw_rows(
    db: Database,
    drawn: list[Any],
    start: int,
    end: int,
    bucket: float,
    device: str | None,
    source: str | None,
    names: list[str],
) -> None:
    anchor = _anchor()
    workspace = f"w{uuid.uuid4().hex[:12]}"
    _store(db, workspace, anchor, drawn)
    workspace_id = db.ensure_workspace(workspace)
    low, high = sorted((start, end))
    span = TimeRange(anchor + low / 1000, anchor + high / 1000 + 0.001)
    wide = TimeRange(anchor - 60, anchor + HOURS * 3600 + 60)
    assert_every_read_equal(db, workspace_id, span, wide, bucket, device, source, names)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    minutes=st.lists(st.integers(0, 3 * 1440 - 1), min_size=1, max_size=40),
    start=st.integers(0, 2 * 86400),
    length=st.integers(86400, 3 * 86400),
    bucket=st.sampled_from([3600, 21600, 43200, 86400, 300]),
)
def test_reads_over_days_use_day_rows_and_stay_equal(
    db: Database, minutes: list[int], start: int, length: int, bucket: int
) -> None:
    """Ranges over whole UTC days read the day level; still equal to the raw read."""
    day = math.floor(time.time() / 86400) * 86400 - 4 * 86400
    workspace = f"w{uuid.uuid4().hex[:12]}"
    drawn = [
        (
            m * 60_000 + 250,
            DEVICES[m % 3],
            [(MODELS[m % 2], CLASSES[m % 3], None, [m % 7 / 7], m % 2 == 0)],
        )
        for m in minutes
    ]
    _store(db, workspace, day, drawn)
    workspace_id = db.ensure_workspace(workspace)
    span = TimeRange(day + start + 0.25, day + start + length)
    with db.read() as conn:
        for call in (
            lambda: queries.inference_stats(conn, workspace_id, span),
            lambda: queries.models(conn, workspace_id, span),
            lambda: queries.classes(conn, workspace_id, MODELS[0], span),
            lambda: queries.devices(conn, workspace_id, span),
            lambda: queries.devices(conn, workspace_id, span, MODELS[1]),
            lambda: queries.timeseries(conn, workspace_id, MODELS[1], span, bucket),
            lambda: queries.histogram(conn, workspace_id, MODELS[0], span),
            lambda: trends.class_trends(conn, workspace_id, MODELS[0], span, bucket),
        ):
            rolled, raw = _both(call)
            assert_same(rolled, raw)


def test_wide_reads_really_use_rollups(db: Database) -> None:
    """The plan for a whole-hours range reads hour rows: emptying `results` behind the
    rollups' back leaves the hourly answer, and the raw answer becomes empty."""
    anchor = _anchor()
    workspace = f"w{uuid.uuid4().hex[:12]}"
    _store(db, workspace, anchor, [(1000, "edge-a", [("yard/1", "car", None, [0.5], False)])])
    workspace_id = db.ensure_workspace(workspace)
    span = TimeRange(anchor, anchor + 3600)
    with db.write() as conn:
        conn.exec_driver_sql(f"DELETE FROM results WHERE workspace_id = {workspace_id}")
    with db.read() as conn:
        rolled, raw = _both(lambda: queries.classes(conn, workspace_id, "yard/1", span))
        devices, no_devices = _both(lambda: queries.devices(conn, workspace_id, span))
    assert [c["result_count"] for c in rolled["classes"]] == [1]
    assert raw["classes"] == []
    assert [(d["device_id"], d["report_count"]) for d in devices["devices"]] == [("edge-a", 1)]
    assert no_devices["devices"] == []


def test_http_reads_over_hours_count_every_result(backend: RunningBackend) -> None:
    """Over real HTTP: reports sent across three hours read back with the counts sent."""
    workspace, key = backend.new_workspace()
    now = time.time()
    sent = 0
    with httpx.Client(base_url=backend.base_url, timeout=30) as client:
        for minutes_ago in range(5, 180, 7):
            when = datetime.fromtimestamp(now - minutes_ago * 60, timezone.utc)
            body = report([result("car", 0.25), result("person", 0.75)], timestamp=when)
            answer = client.post(
                f"/{workspace}/inference-stats", json=body, params={"api_key": key}
            )
            assert answer.status_code in (200, 201, 202), answer.text
            sent += 1
        start = datetime.fromtimestamp(now - 4 * 3600, timezone.utc).isoformat()
        end = datetime.fromtimestamp(now + 1, timezone.utc).isoformat()
        read = client.get(
            f"/{workspace}/inference-stats",
            params={"startTime": start, "endTime": end, "api_key": key},
        )
    assert read.status_code == 200, read.text
    stats = {item["predicted_class"]: item for item in read.json()["inference_stats"]}
    assert stats["car"]["num_inferences"] == sent
    assert stats["person"]["num_inferences"] == sent
    assert stats["car"]["avg_confidence"] == pytest.approx(0.25)
    assert read.json()["num_inferences"] == 2 * sent


def test_a_v01_database_gets_rollups_that_read_back_equal(v01_url: tuple[str, str]) -> None:
    url, kind = v01_url
    build_v01_database(url, kind, "k" + secrets.token_hex(16), secrets.token_hex(16))
    anchor = _anchor()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    rows = 0
    try:
        with engine.begin() as conn:
            workspace_id = conn.execute(
                sa.text("SELECT id FROM workspaces WHERE name = :n"), {"n": WORKSPACE}
            ).scalar_one()
            for n in range(40):  # v0.1 rows: reports every 6 minutes, two classes each
                ts = anchor + n * 360 + 0.5
                report_id = conn.execute(
                    sa.text(
                        "INSERT INTO reports (workspace_id, received_at, ts, device_id, "
                        "system_info, result_count) VALUES (:w, :ts, :ts, 'edge-1', '{}', 2) "
                        "RETURNING id"
                    ),
                    {"w": workspace_id, "ts": ts},
                ).scalar_one()
                for class_name, confidence in (("car", (n % 10) / 10), ("dog", 0.95)):
                    conn.execute(
                        sa.text(
                            "INSERT INTO results (report_id, workspace_id, ts, device_id, "
                            "model_id, class_name, confidence) VALUES "
                            "(:r, :w, :ts, 'edge-1', 'old/1', :c, :conf)"
                        ),
                        {
                            "r": report_id,
                            "w": workspace_id,
                            "ts": ts,
                            "c": class_name,
                            "conf": confidence,
                        },
                    )
                    rows += 1
    finally:
        engine.dispose()
    db = Database(url)  # migrates to the current schema, step 5 building the rollups
    try:
        with db.read() as conn:
            count = conn.execute(sa.text("SELECT SUM(results) FROM rollups WHERE level = 3600"))
            assert count.scalar_one() == rows
            span = TimeRange(anchor, anchor + 5 * 3600)
            for call in (
                lambda: queries.classes(conn, workspace_id, "old/1", span),
                lambda: queries.models(conn, workspace_id, span),
                lambda: queries.histogram(conn, workspace_id, "old/1", span),
                lambda: queries.timeseries(conn, workspace_id, "old/1", span, 3600),
            ):
                rolled, raw = _both(call)
                assert_same(rolled, raw)
            answer = queries.classes(conn, workspace_id, "old/1", span)
        by_class = {c["class_name"]: c for c in answer["classes"]}
        assert by_class["car"]["result_count"] == 40
        assert by_class["dog"]["max_confidence"] == 0.95
        assert by_class["car"]["avg_confidence"] == pytest.approx(0.45)
        # Running step 5 again (idempotent) leaves the same rollups.
        with db.write() as conn:
            rollups.rebuild_rollups(conn)
        with db.read() as conn:
            again = conn.execute(sa.text("SELECT COUNT(*), SUM(results) FROM rollups")).one()
        assert again[1] == len(rollups.LEVELS) * rows  # one row per level and result
    finally:
        db.close()


def test_pruning_keeps_reads_after_the_bound_equal(db: Database) -> None:
    """Retention drops raw rows before the bound and rollup buckets that end by it; every
    read that starts at or after the bound still equals the raw read."""
    anchor = _anchor()
    workspace = f"w{uuid.uuid4().hex[:12]}"
    drawn = [
        (
            minute * 60_000 + 1_500,
            "edge-a",
            [("yard/1", "car", "cam-1", [0.1 * (minute % 10)], False)],
        )
        for minute in range(0, HOURS * 60, 7)
    ]
    _store(db, workspace, anchor, drawn)
    workspace_id = db.ensure_workspace(workspace)
    bound = anchor + 2 * 3600 + 90  # inside an hour and inside a minute
    db.prune(before=bound)
    with db.read() as conn:
        left = conn.execute(
            sa.text("SELECT MIN(bucket + level) FROM rollups WHERE workspace_id = :w"),
            {"w": workspace_id},
        ).scalar_one()
        assert left > bound  # every bucket ending by the bound is gone
        for start in (bound, anchor + 3 * 3600, bound + 0.5):
            span = TimeRange(start, anchor + HOURS * 3600)
            rolled, raw = _both(
                lambda span=span: queries.classes(conn, workspace_id, "yard/1", span)  # type: ignore[misc]
            )
            assert_same(rolled, raw)
            expected = sum(1 for m in range(0, HOURS * 60, 7) if anchor + m * 60 + 1.5 >= start)
            assert rolled["classes"][0]["result_count"] == expected


def test_step_8_upgrades_version_7_rollups_for_devices(v01_url: tuple[str, str]) -> None:
    """A version-7 database (rollups without the device counters and the 6-hour level) gets
    them from step 8: `devices` and 6-hour buckets then read equal to the raw rows; running
    the step again changes nothing."""
    url, _kind = v01_url
    anchor = _anchor()
    db = Database(url)
    try:
        workspace = "w" + uuid.uuid4().hex[:12]
        drawn = [
            (
                minute * 60_000 + 700,
                DEVICES[minute % 3],
                [
                    (MODELS[minute % 2], CLASSES[minute % 3], SOURCES[minute % 3], [0.5], False),
                    (MODELS[0], CLASSES[0], SOURCES[(minute + 1) % 3], [0.25], True),
                ],
            )
            for minute in range(0, HOURS * 60, 11)
        ]
        _store(db, workspace, anchor, drawn)
        workspace_id = db.ensure_workspace(workspace)
        with db.write() as conn:  # back to what version 7 had
            conn.exec_driver_sql("DELETE FROM rollups WHERE level = 21600")
            conn.exec_driver_sql("ALTER TABLE rollups DROP COLUMN device_reports")
            conn.exec_driver_sql("ALTER TABLE rollups DROP COLUMN device_source_reports")
            conn.exec_driver_sql("UPDATE schema_version SET version = 7")
    finally:
        db.close()
    db = Database(url)  # runs step 8
    try:
        span = TimeRange(anchor - 7200, anchor + HOURS * 3600 + 7200)
        with db.read() as conn:
            assert tables.current_version(conn) == tables.SCHEMA_VERSION
            for call in (
                lambda: queries.devices(conn, workspace_id, span),
                lambda: queries.devices(conn, workspace_id, span, MODELS[0]),
                lambda: queries.timeseries(conn, workspace_id, MODELS[0], span, 21600),
            ):
                rolled, raw = _both(call)
                assert_same(rolled, raw)
            before = conn.exec_driver_sql(
                "SELECT level, SUM(results), SUM(device_reports), SUM(device_source_reports) "
                "FROM rollups GROUP BY level ORDER BY level"
            ).all()
        assert [row[0] for row in before] == sorted(rollups.LEVELS)
        assert all(row[2] == len(drawn) for row in before)  # every report once per level
        with db.write() as conn:
            tables.MIGRATIONS[8](conn)  # idempotent
        with db.read() as conn:
            after = conn.exec_driver_sql(
                "SELECT level, SUM(results), SUM(device_reports), SUM(device_source_reports) "
                "FROM rollups GROUP BY level ORDER BY level"
            ).all()
        assert after == before
    finally:
        db.close()
