"""Time (issue 12, class 2), over HTTP on SQLite and PostgreSQL: where a report lands when the
client's clock lies, the retention and 1970 bounds, read ranges a user can type, buckets
before 1970, and the schema step that records the client's timestamp.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result
from server_support import RunningBackend, create_pg_database, drop_pg_database, start_server

from mmagg.server import Database, create_app, tables
from mmagg.server.rollups import rebuild_rollups


def _post(client: httpx.Client, workspace: str, key: str, body: Any) -> httpx.Response:
    return client.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)


def _stored(backend: RunningBackend, report_id: int) -> Any:
    with backend.db.read() as conn:
        return conn.execute(sa.select(tables.reports).where(tables.reports.c.id == report_id)).one()


def test_naive_local_time_is_filed_at_receive_time_and_shows_in_default_reads(
    backend: RunningBackend, client: httpx.Client
) -> None:
    """A device in Tokyo (UTC+9) sends datetime.now().isoformat(): naive, 9 h 'ahead'."""
    workspace, key = backend.new_workspace()
    tokyo = (datetime.now(timezone.utc) + timedelta(hours=9)).replace(tzinfo=None)
    body = report([result("car", 0.8)])
    body["timestamp"] = tokyo.isoformat()
    before = time.time()
    answer = _post(client, workspace, key, body)
    after = time.time()
    assert answer.status_code == 200
    stored = _stored(backend, answer.json()["report_id"])
    assert before <= stored.ts <= after
    assert stored.client_timestamp == tokyo.isoformat()
    assert stored.time_rule == "received_naive"
    # Roboflow's default read (the last 24 h, no parameters) sees it.
    stats = client.get(f"/{workspace}/inference-stats", params={"api_key": key}).json()
    assert stats["num_inferences"] == 1


def test_future_timestamp_is_clamped_so_a_silent_model_does_not_look_alive(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    future = datetime.now(timezone.utc) + timedelta(days=400)
    before = time.time()
    answer = _post(client, workspace, key, report([result("car", 0.8)], timestamp=future))
    after = time.time()
    stored = _stored(backend, answer.json()["report_id"])
    assert before <= stored.ts <= after
    assert stored.time_rule == "clamped_future"
    assert stored.client_timestamp == future.isoformat()
    (model,) = client.get(f"/{workspace}/api/models", params={"api_key": key}).json()["models"]
    last = datetime.fromisoformat(model["last_report_at_all_time"]).timestamp()
    assert before <= last <= after


def test_small_skew_ahead_is_kept(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    ahead = datetime.now(timezone.utc) + timedelta(seconds=20)
    answer = _post(client, workspace, key, report([result("car", 0.8)], timestamp=ahead))
    stored = _stored(backend, answer.json()["report_id"])
    assert stored.ts == pytest.approx(ahead.timestamp())
    assert stored.time_rule == "client"


def test_aware_past_is_kept_for_replays(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    offset = timezone(timedelta(hours=-7))
    past = datetime.now(offset) - timedelta(days=30)
    answer = _post(client, workspace, key, report([result("car", 0.8)], timestamp=past))
    stored = _stored(backend, answer.json()["report_id"])
    assert stored.ts == pytest.approx(past.timestamp())
    assert stored.time_rule == "client"


@pytest.mark.parametrize(
    "timestamp",
    [
        "1969-12-31T23:59:59+00:00",
        "0001-01-01T00:00:00+00:00",
        "0001-01-01T00:00:00+14:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-14:00",  # after year 9999 in UTC
    ],
)
def test_timestamps_outside_the_window_are_422(
    backend: RunningBackend, client: httpx.Client, timestamp: str
) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", 0.8)])
    body["timestamp"] = timestamp
    answer = _post(client, workspace, key, body)
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["detail"]
    assert error["field"] == "timestamp"
    assert backend.db.count_reports(workspace) == 0


def test_datetime_max_with_a_negative_offset_is_clamped_not_500(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", 0.8)])
    body["timestamp"] = "9999-12-31T00:00:00+14:00"
    answer = _post(client, workspace, key, body)
    assert answer.status_code == 200
    assert _stored(backend, answer.json()["report_id"]).time_rule == "clamped_future"


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A server keeping 7 days of reports."""
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('ret') / 'r.db'}")
    running = start_server(create_app(db=db, retention_days=7))
    try:
        yield running.base_url, "acme", db.create_key("acme", {"ingest", "read"})
    finally:
        running.stop()
        db.close()


def test_reports_older_than_retention_are_refused_naming_the_period(
    retained: tuple[str, str, str],
) -> None:
    base, workspace, key = retained
    now = datetime.now(timezone.utc)
    with httpx.Client(base_url=base) as http:
        old = _post(http, workspace, key, report([result("c", 0.5)], timestamp=now - timedelta(8)))
        assert old.status_code == 422
        (error,) = old.json()["detail"]
        assert error["field"] == "timestamp" and "retention" in error["msg"]
        assert "7 days" in error["msg"]
        kept = _post(http, workspace, key, report([result("c", 0.5)], timestamp=now - timedelta(6)))
        assert kept.status_code == 200


READ_TIMES = [
    "0001-01-01 00:00:00",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59.999999",
    "9999-12-31T23:59:59-14:00",
    "-62135596800",
    "-62135596801",
    "-1e12",
    "1e20",
    "253402300800",
    "nan",
    "inf",
    "-inf",
    "1969-12-31",
    "-86400",
    "0",
    "1000-01-01T00:00:00+00:00",
    "8999-12-31T00:00:00Z",
    "2026-02-30",
    "x" * 100,
]
READ_PATHS = [
    "/inference-stats",
    "/api/inference-stats",
    "/api/models",
    "/api/classes",
    "/api/devices",
    "/api/timeseries",
    "/api/histogram",
    "/api/samples",
]


@pytest.mark.parametrize("value", READ_TIMES)
def test_any_typed_read_time_answers_2xx_or_422(
    backend: RunningBackend, client: httpx.Client, value: str
) -> None:
    workspace, key = backend.new_workspace()
    assert _post(client, workspace, key, report([result("car", 0.5, "m")])).status_code == 200
    for name in ("startTime", "endTime"):
        for path in READ_PATHS:
            params = {"api_key": key, "model": "m", name: value, "bucket_seconds": "31622400"}
            answer = client.get(f"/{workspace}{path}", params=params)
            assert answer.status_code in (200, 422), (path, name, answer.status_code)
            if answer.status_code == 422:
                (error,) = answer.json()["detail"]
                # The field typed (or startTime, when it is not before endTime), with the
                # accepted window and the value in the message.
                assert error["field"] in (f"query.{name}", "query.startTime"), error
                if "before endTime" not in error["msg"]:
                    assert error["field"] == f"query.{name}", error
                    assert "1000-01-01" in error["msg"] and value[:20] in error["msg"], error


def test_read_ranges_before_1970_bucket_correctly(
    backend: RunningBackend, client: httpx.Client
) -> None:
    """A pre-1970 result (stored by a v0.1 server, which took any timestamp) lands in the
    bucket that floors its time, on both databases."""
    workspace, key = backend.new_workspace()
    principal = backend.db.authenticate(key)
    assert principal is not None
    day = 86400.0
    stamps = [-1.5 * day, -0.25 * day, -2 * day]  # 1969-12-30 12:00, 12-31 18:00, 12-30 00:00
    if backend.db.partitions is not None:  # PostgreSQL: the days' partitions, as the upgrade
        for ts in stamps:  # (step 7) makes one for every day holding rows
            backend.db.partitions.ready(ts)
    with backend.db.write() as conn:
        for ts in stamps:
            report_id = conn.execute(
                sa.insert(tables.reports).values(
                    workspace_id=principal.workspace_id,
                    received_at=ts,
                    ts=ts,
                    system_info="{}",
                    result_count=1,
                )
            ).inserted_primary_key[0]
            conn.execute(
                sa.insert(tables.results).values(
                    report_id=report_id,
                    workspace_id=principal.workspace_id,
                    ts=ts,
                    model_id="old/1",
                    class_name="car",
                    confidence=0.5,
                )
            )
        # Upgrading that database to rollups (schema step 5) builds them from its results.
        rebuild_rollups(conn)
    params = {
        "api_key": key,
        "model": "old/1",
        "bucket_seconds": str(day),
        "startTime": "1969-12-29T00:00:00Z",
        "endTime": "1970-01-02",
    }
    answer = client.get(f"/{workspace}/api/timeseries", params=params)
    assert answer.status_code == 200, answer.text
    (series,) = answer.json()["series"]
    points = {p["time"]: p["samples"] for p in series["points"]}
    assert points == {"1969-12-30T00:00:00+00:00": 2, "1969-12-31T00:00:00+00:00": 1}
    samples = client.get(f"/{workspace}/api/samples", params=params).json()["samples"]
    assert [s["time"] for s in samples] == [
        "1969-12-31T18:00:00+00:00",
        "1969-12-30T12:00:00+00:00",
        "1969-12-30T00:00:00+00:00",
    ]


# Schema step 3: a v0.1 database (schema version 1), built from DDL frozen here.

V01_DDL = [
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE workspaces (id {pk}, name VARCHAR(64) NOT NULL UNIQUE, "
    "created_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE api_keys (id {pk}, workspace_id INTEGER NOT NULL REFERENCES workspaces (id), "
    "key_hash VARCHAR(64) NOT NULL UNIQUE, prefix VARCHAR(16) NOT NULL, "
    "created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)",
    "CREATE TABLE reports (id {pk}, workspace_id INTEGER NOT NULL REFERENCES workspaces (id), "
    "received_at DOUBLE PRECISION NOT NULL, ts DOUBLE PRECISION NOT NULL, "
    "device_id VARCHAR(1024), source VARCHAR(1024), source_info VARCHAR(1024), "
    "inference_server_version VARCHAR(1024), system_info TEXT NOT NULL, "
    "idempotency_key VARCHAR(255), frequency DOUBLE PRECISION, extension TEXT, "
    "result_count INTEGER NOT NULL, "
    "CONSTRAINT uq_reports_idempotency UNIQUE (workspace_id, idempotency_key))",
    "CREATE INDEX ix_reports_workspace_ts ON reports (workspace_id, ts)",
    "CREATE TABLE dashboard_sessions (token_hash VARCHAR(64) PRIMARY KEY, "
    "workspace_id INTEGER NOT NULL REFERENCES workspaces (id), "
    "api_key_id INTEGER NOT NULL REFERENCES api_keys (id), "
    "created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE results (id {pk}, "
    "report_id INTEGER NOT NULL REFERENCES reports (id) ON DELETE CASCADE, "
    "workspace_id INTEGER NOT NULL, ts DOUBLE PRECISION NOT NULL, device_id VARCHAR(1024), "
    "model_id VARCHAR(1024) NOT NULL, class_name VARCHAR(1024) NOT NULL, "
    "confidence DOUBLE PRECISION NOT NULL, inference_id VARCHAR(1024), "
    "model_type VARCHAR(1024), source_id VARCHAR(1024), stats_count INTEGER, "
    "stats_sum DOUBLE PRECISION, stats_min DOUBLE PRECISION, stats_max DOUBLE PRECISION, "
    + ", ".join(f"hist_{i} INTEGER" for i in range(10))
    + ")",
    "CREATE INDEX ix_results_ws_model_ts ON results (workspace_id, model_id, ts)",
    "CREATE INDEX ix_results_report_id ON results (report_id)",
    "CREATE INDEX ix_results_ws_ts ON results (workspace_id, ts)",
    "INSERT INTO schema_version (version) VALUES (1)",
    "INSERT INTO workspaces (name, created_at) VALUES ('acme', 0)",
    "INSERT INTO reports (workspace_id, received_at, ts, system_info, result_count) "
    "VALUES (1, {now}, {now}, '{{}}', 1)",
    "INSERT INTO results (report_id, workspace_id, ts, model_id, class_name, confidence) "
    "VALUES (1, 1, {now}, 'old/1', 'car', 0.5)",
]


@pytest.fixture(params=["sqlite", "postgresql"])
def v01_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database as mmagg v0.1 left it."""
    if request.param == "sqlite":
        url, pk, drop = f"sqlite:///{tmp_path / 'v01.db'}", "INTEGER PRIMARY KEY", None
    else:
        request.getfixturevalue("pg_database_url")  # skips without PostgreSQL
        name = f"mmagg_v01_{uuid.uuid4().hex[:10]}"
        url, pk, drop = create_pg_database(name), "SERIAL PRIMARY KEY", name
    engine = sa.create_engine(tables.normalize_url(url))
    with engine.begin() as conn:
        for statement in V01_DDL:
            conn.exec_driver_sql(statement.format(pk=pk, now=time.time() - 60))
    engine.dispose()
    try:
        yield url
    finally:
        if drop is not None:
            drop_pg_database(drop)


def test_step_3_upgrades_a_v01_database_and_is_idempotent(v01_url: str) -> None:
    db = Database(v01_url)
    try:
        with db.read() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("reports")}
            assert {"client_timestamp", "time_rule"} <= columns
            assert tables.current_version(conn) == tables.SCHEMA_VERSION >= 3
        with db.engine.begin() as conn:
            tables.MIGRATIONS[3](conn)  # a second run changes nothing and does not fail
        key = db.create_key("acme", {"ingest", "read"})
        running = start_server(create_app(db=db))
        try:
            with httpx.Client(base_url=running.base_url) as http:
                old = http.get("/acme/inference-stats", params={"api_key": key}).json()
                assert old["num_inferences"] == 1  # the v0.1 row reads back
                body = report([result("car", 0.5)])
                body["timestamp"] = datetime.now().isoformat()  # naive, as Roboflow's block
                answer = _post(http, "acme", key, body)
                assert answer.status_code == 200
        finally:
            running.stop()
        with db.read() as conn:
            rows = conn.execute(sa.select(tables.reports).order_by(tables.reports.c.id)).all()
        assert [r.time_rule for r in rows] == [None, "received_naive"]
    finally:
        db.close()
