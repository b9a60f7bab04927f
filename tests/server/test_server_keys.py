"""Key scopes, lifetimes and last-used times: the CLI, the database, the admin API, and the
clients (the Workflows block and `mmagg.Aggregator`) reporting with an ingest-only key."""

from __future__ import annotations

import re
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from server_support import ManualClock, RunningBackend
from typer.testing import CliRunner

import mmagg
from mmagg.cli import app
from mmagg.server import Database, tables
from mmagg.server.db import AmbiguousKeyError

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*OpenCV.*", category=UserWarning)
    import supervision as sv

KEY_RE = re.compile(r"^mmk_[A-Za-z0-9_-]{32}$")
DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    url: str = request.getfixturevalue("pg_database_url")
    return url


def _create(url: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["keys", "create", *args, "--database-url", url])


def _scopes_of(url: str, key: str) -> frozenset[str]:
    db = Database(url)
    try:
        principal = db.authenticate(key)
        assert principal is not None
        return principal.scopes
    finally:
        db.close()


# the CLI


def test_keys_create_defaults_to_ingest_only_and_says_how_to_read(database_url: str) -> None:
    workspace = f"cli-{uuid.uuid4().hex[:8]}"
    created = _create(database_url, "--workspace", workspace)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert KEY_RE.match(key)
    assert _scopes_of(database_url, key) == {"ingest"}
    assert f"mmagg keys create --workspace {workspace} --scope read" in created.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--scope", "read"], {"read"}),
        (["--scope", "ingest", "--scope", "read"], {"ingest", "read"}),
        (["--scope", "ingest,read,admin"], {"ingest", "read", "admin"}),
        (["--scope", "READ, admin"], {"read", "admin"}),
    ],
)
def test_keys_create_scopes_repeated_or_comma_separated(
    tmp_path: Path, args: list[str], expected: set[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    created = _create(url, "--workspace", "acme", *args)
    assert created.exit_code == 0, created.output
    assert _scopes_of(url, created.stdout.strip()) == expected


@pytest.mark.parametrize(
    ("args", "field", "came"),
    [
        (["--scope", "write"], "--scope", "'write'"),
        (["--scope", "read,"], None, None),  # a trailing comma is harmless
        (["--scope", ","], "--scope", "none"),
        (["--expires-in", "90"], "--expires-in", "'90'"),
        (["--expires-in", "0d"], "--expires-in", "'0d'"),
        (["--expires-in", "-1h"], "--expires-in", "'-1h'"),
        (["--expires-in", "soon"], "--expires-in", "'soon'"),
    ],
)
def test_keys_create_bad_scope_or_lifetime_is_named(
    tmp_path: Path, args: list[str], field: str | None, came: str | None
) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    created = _create(url, "--workspace", "acme", *args)
    if field is None:
        assert created.exit_code == 0, created.output
        return
    assert created.exit_code == 2, created.output
    assert field in created.output and came is not None and came in created.output
    assert "expected" in created.output
    assert "mmk_" not in created.stdout  # no key was made
    db = Database(url)
    try:
        assert db.list_keys() == []
    finally:
        db.close()


def test_keys_create_expires_in_and_list_shows_it(database_url: str) -> None:
    workspace = f"cli-{uuid.uuid4().hex[:8]}"
    before = time.time()
    created = _create(database_url, "--workspace", workspace, "--expires-in", "90d")
    after = time.time()
    assert created.exit_code == 0, created.output
    db = Database(database_url)
    try:
        (info,) = db.list_keys(workspace)
    finally:
        db.close()
    assert info.expires_at is not None
    assert before + 90 * DAY <= info.expires_at <= after + 90 * DAY
    listed = CliRunner().invoke(app, ["keys", "list", "--database-url", database_url])
    expiry = datetime.fromtimestamp(info.expires_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
    row = next(line for line in listed.stdout.splitlines() if workspace in line)
    assert expiry in row and "ingest" in row and "active" in row


def test_keys_list_shows_scopes_created_and_last_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    clock = ManualClock(frozen=1_900_000_000.0)  # 2030-03-17 17:46:40 UTC
    db = Database(url, clock=clock)
    try:
        used = db.create_key("acme", {"read", "ingest"})
        db.create_key("acme", {"admin"})
        clock.advance(3600)
        assert db.authenticate(used) is not None
    finally:
        db.close()
    listed = CliRunner().invoke(app, ["keys", "list", "--database-url", url])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.stdout.splitlines() if "acme" in line]
    assert len(lines) == 2
    assert "ingest,read" in lines[0] and "admin" in lines[1]
    assert lines[0].count("2030-03-17 17:46:40 UTC") == 1  # created
    assert "2030-03-17 18:46:40 UTC" in lines[0]  # last used, an hour later
    assert "18:46:40" not in lines[1]  # never used
    for header in ("Scopes", "Status", "Created", "Last used", "Expires"):
        assert header in listed.stdout


def test_keys_list_marks_expired_and_revoked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    db = Database(url, clock=ManualClock(frozen=time.time() - 2 * DAY))
    try:
        db.create_key("old", expires_in=DAY)
        _key, gone = db.create_key_record("gone")
        assert db.revoke_key(gone.id)
        db.create_key("live")
    finally:
        db.close()
    listed = CliRunner().invoke(app, ["keys", "list", "--database-url", url]).stdout
    status = {
        name: next(line for line in listed.splitlines() if f" {name} " in line)
        for name in ("old", "gone", "live")
    }
    assert "expired" in status["old"]
    assert "revoked" in status["gone"]
    assert "active" in status["live"]


# expiry and last-used, with an injected clock


def test_an_expired_key_is_refused_like_a_revoked_one(database_url: str) -> None:
    clock = ManualClock(frozen=2_000_000_000.0)
    db = Database(database_url, clock=clock)
    try:
        key = db.create_key(f"exp-{uuid.uuid4().hex[:8]}", {"ingest", "read"}, expires_in=3600)
        clock.advance(3599)
        assert db.authenticate(key) is not None
        clock.advance(1)
        assert db.authenticate(key) is None
        clock.advance(-10)  # the clock decides, nothing was written
        assert db.authenticate(key) is not None
    finally:
        db.close()


def _count_key_updates(db: Database) -> list[str]:
    seen: list[str] = []

    @sa.event.listens_for(db.engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            seen.append(statement)

    return seen


def _last_used(db: Database, key_id: int) -> float | None:
    (info,) = [k for k in db.list_keys() if k.id == key_id]
    return info.last_used_at


def test_last_used_is_written_at_most_once_a_minute_per_key(database_url: str) -> None:
    t0 = 2_100_000_000.0
    clock = ManualClock(frozen=t0)
    db = Database(database_url, clock=clock)
    try:
        workspace = f"lu-{uuid.uuid4().hex[:8]}"
        key, info = db.create_key_record(workspace, {"ingest"})
        other, other_info = db.create_key_record(workspace, {"ingest"})
        updates = _count_key_updates(db)
        assert _last_used(db, info.id) is None
        for _ in range(50):
            assert db.authenticate(key) is not None
        assert len(updates) == 1
        assert _last_used(db, info.id) == t0
        clock.advance(59)
        for _ in range(50):
            db.authenticate(key)
        assert len(updates) == 1 and _last_used(db, info.id) == t0
        db.authenticate(other)  # per key: the other key gets its own write
        assert len(updates) == 2 and _last_used(db, other_info.id) == t0 + 59
        clock.advance(1)
        db.authenticate(key)
        assert len(updates) == 3 and _last_used(db, info.id) == t0 + 60

        # A second backend process on the same database: its write is conditional on the
        # stored time being a minute old, so it does not move last_used_at either.
        second = Database(database_url, clock=ManualClock(frozen=t0 + 90))
        try:
            second.authenticate(key)
            assert _last_used(db, info.id) == t0 + 60
        finally:
            second.close()
    finally:
        db.close()


def test_last_used_over_http_is_not_a_write_per_request(backend: RunningBackend) -> None:
    workspace, key = backend.new_workspace(frozenset({"ingest"}))
    (info,) = backend.db.list_keys(workspace)
    updates = _count_key_updates(backend.db)
    with httpx.Client(base_url=backend.base_url, timeout=10) as http:
        for _ in range(20):
            body = {
                "timestamp": datetime.now(timezone.utc).isoformat(),
                "inference_results": [{"class_name": "car", "confidence": 0.5, "model_id": "m/1"}],
            }
            answer = http.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)
            assert answer.status_code == 200, answer.text
            assert http.get("/", params={"api_key": key}).status_code == 200
    mine = [s for s in updates if "last_used_at" in s]
    assert len(mine) <= 1  # 40 authenticated requests within a minute
    used = _last_used(backend.db, info.id)
    assert used is not None and abs(used - time.time()) < 60


# revoking by prefix never takes more than one key


def _set_prefix(db: Database, key_id: int, prefix: str) -> None:
    with db.write() as conn:
        conn.execute(
            sa.update(tables.api_keys).where(tables.api_keys.c.id == key_id).values(prefix=prefix)
        )


def test_revoke_refuses_an_ambiguous_prefix_and_lists_the_matches(database_url: str) -> None:
    db = Database(database_url)
    try:
        workspace = f"rv-{uuid.uuid4().hex[:8]}"
        first, a = db.create_key_record(workspace, {"ingest"})
        second, b = db.create_key_record(workspace, {"read"})
        # Two keys whose shown prefixes collide (4 random characters: it happens).
        prefix = f"mmk_{uuid.uuid4().hex[:4]}"
        _set_prefix(db, a.id, prefix)
        _set_prefix(db, b.id, prefix)
        with pytest.raises(AmbiguousKeyError) as raised:
            db.revoke_key(prefix)
        assert {m.id for m in raised.value.matches} == {a.id, b.id}
        assert db.authenticate(first) is not None and db.authenticate(second) is not None

        result = CliRunner().invoke(
            app, ["keys", "revoke", prefix + "…", "--database-url", database_url]
        )
        assert result.exit_code == 1
        assert "nothing was revoked" in " ".join(result.stderr.split())
        for info in (a, b):
            assert re.search(rf"\b{info.id}\b.*{prefix}", result.stderr), result.stderr
        assert db.authenticate(first) is not None and db.authenticate(second) is not None

        # The whole key, or the id, names exactly one.
        assert db.revoke_key(second)
        assert db.authenticate(second) is None and db.authenticate(first) is not None
        # Now the prefix matches one active key only: revoking by it is unambiguous.
        done = CliRunner().invoke(app, ["keys", "revoke", prefix, "--database-url", database_url])
        assert done.exit_code == 0, done.output
        assert db.authenticate(first) is None
    finally:
        db.close()


def test_revoke_prefix_wildcards_are_literal(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        underscore, a = db.create_key_record("acme")
        letter, b = db.create_key_record("acme")
        _set_prefix(db, a.id, "mmk_a_cd")
        _set_prefix(db, b.id, "mmk_abcd")
        assert db.revoke_key("mmk_a_")  # '_' is a character here, not LIKE's wildcard
        assert db.authenticate(underscore) is None and db.authenticate(letter) is not None
        assert not db.revoke_key("mmk_%")
        with pytest.raises(AmbiguousKeyError):
            db.create_key("acme")
            db.revoke_key("mmk_")  # every active key: refused, not a mass revocation
    finally:
        db.close()


# the admin API


def test_admin_key_manages_its_workspaces_keys_over_http(backend: RunningBackend) -> None:
    workspace, admin = backend.new_workspace(frozenset({"admin"}))
    other_workspace, _ = backend.new_workspace()
    (_, other_info) = backend.db.create_key_record(other_workspace)
    bearer = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=backend.base_url, timeout=10, headers=bearer) as http:
        made = http.post(
            f"/{workspace}/api/keys", json={"scopes": ["read", "ingest"], "expires_in": "12h"}
        )
        assert made.status_code == 201, made.text
        body = made.json()
        new_key = body["key"]
        assert KEY_RE.match(new_key)
        assert body["item"]["scopes"] == ["ingest", "read"]
        assert body["item"]["expires_at"] == pytest.approx(time.time() + 12 * 3600, abs=60)
        principal = backend.db.authenticate(new_key)
        assert principal is not None and principal.workspace == workspace

        default = http.post(f"/{workspace}/api/keys")
        assert default.status_code == 201 and default.json()["item"]["scopes"] == ["ingest"]

        listed = http.get(f"/{workspace}/api/keys").json()
        assert listed["workspace"] == workspace
        assert [k["scopes"] for k in listed["keys"]] == [["admin"], ["ingest", "read"], ["ingest"]]
        assert new_key not in str(listed) and admin not in str(listed)
        assert other_info.id not in {k["id"] for k in listed["keys"]}

        revoked = http.delete(f"/{workspace}/api/keys/{body['item']['id']}")
        assert revoked.status_code == 200, revoked.text
        assert backend.db.authenticate(new_key) is None
        again = http.delete(f"/{workspace}/api/keys/{body['item']['id']}")
        assert again.status_code == 404
        # Another workspace's key cannot be revoked through this workspace.
        foreign = http.delete(f"/{workspace}/api/keys/{other_info.id}")
        assert foreign.status_code == 404
        assert "revoked_at" in str(backend.db.list_keys(other_workspace)[0])
        assert backend.db.list_keys(other_workspace)[-1].revoked_at is None
        # An id past any integer column is a 422 naming the path parameter, never a 500.
        for huge in (2**31, 2**63, 7727335450891781144576):
            answer = http.delete(f"/{workspace}/api/keys/{huge}")
            assert answer.status_code == 422, (huge, answer.text)
            assert "key_id" in answer.text

        bad = http.post(f"/{workspace}/api/keys", json={"scopes": ["write"]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "body.scopes"
        assert "'write'" in bad.json()["detail"][0]["msg"]
        bad = http.post(f"/{workspace}/api/keys", json={"expires_in": "forever"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "body.expires_in"


# the clients, with the key a device gets


def _detections(names: list[str], confidences: list[float]) -> Any:
    n = len(names)
    return sv.Detections(
        xyxy=np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (n, 1)),
        confidence=np.array(confidences),
        class_id=np.zeros(n, dtype=int),
        data={"class_name": np.array(names)},
    )


@pytest.fixture
def device_key(backend: RunningBackend) -> Iterator[tuple[str, str, str]]:
    """(workspace, an ingest-only key as a device gets it, a read key to check with)."""
    workspace, key = backend.new_workspace(frozenset({"ingest"}))
    yield workspace, key, backend.db.create_key(workspace, {"read"})


def _read_classes(backend: RunningBackend, workspace: str, read_key: str) -> set[str]:
    now = datetime.now(timezone.utc)
    answer = httpx.get(
        f"{backend.base_url}/{workspace}/inference-stats",
        headers={"Authorization": f"Bearer {read_key}"},
        params={
            "startTime": (now - timedelta(minutes=5)).isoformat(),
            "endTime": (now + timedelta(minutes=5)).isoformat(),
        },
    )
    assert answer.status_code == 200, answer.text
    return {item["predicted_class"] for item in answer.json()["inference_stats"]}


def test_aggregator_reports_with_an_ingest_only_key(
    backend: RunningBackend, device_key: tuple[str, str, str]
) -> None:
    workspace, key, read_key = device_key
    # No workspace given: the aggregator looks it up with the key (GET /?api_key=).
    aggregator = mmagg.Aggregator(
        "site/3", frequency=60, api_key=key, api_base_url=backend.base_url
    )
    aggregator.collect(_detections(["car", "person"], [0.9, 0.4]))
    assert aggregator.close(timeout=10)
    counters = aggregator.counters
    assert counters.sent == 1 and counters.failed == 0, counters
    assert backend.db.count_reports(workspace) == 1
    assert _read_classes(backend, workspace, read_key) == {"car", "person"}
    # ...and that key cannot read what it sent.
    denied = httpx.get(f"{backend.base_url}/{workspace}/inference-stats", params={"api_key": key})
    assert denied.status_code == 403 and "'read' scope" in denied.json()["detail"]


def test_workflows_block_reports_with_an_ingest_only_key(
    backend: RunningBackend, device_key: tuple[str, str, str]
) -> None:
    from mmagg import MemoryCache
    from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

    workspace, key, read_key = device_key
    now = [float(int(time.time()))]  # whole seconds, as the interval check counts them
    block = ModelMonitoringInferenceAggregatorBlockV1(
        cache=MemoryCache(),
        api_key=key,
        background_tasks=None,
        thread_pool_executor=None,
        api_base_url=backend.base_url,
        clock=lambda: now[0],
    )
    aggregator_key = f"scopes-{uuid.uuid4().hex}"
    first = block.run(False, _detections(["helmet"], [0.8]), 5, aggregator_key, "yard/3")
    assert first == {
        "error_status": False,
        "message": "Not in reporting range, skipping report. (Ok)",
    }
    now[0] += 5
    try:
        second = block.run(
            False, _detections(["helmet", "vest"], [0.6, 0.7]), 5, aggregator_key, "yard/3"
        )
    finally:
        assert block.reporter(aggregator_key).close(timeout=10)
    assert second == {"error_status": False, "message": "Data sent successfully"}
    assert backend.db.count_reports(workspace) == 1
    assert _read_classes(backend, workspace, read_key) == {"helmet", "vest"}


def test_a_failing_last_used_write_does_not_fail_the_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(frozen=2_200_000_000.0)
    db = Database(f"sqlite:///{tmp_path / 'k.db'}", clock=clock)
    try:
        key, info = db.create_key_record("acme")
        with db.write() as conn:
            conn.exec_driver_sql(
                "CREATE TRIGGER no_touch BEFORE UPDATE OF last_used_at ON api_keys "
                "BEGIN SELECT RAISE(ABORT, 'last_used_at is read-only here'); END"
            )
        principal = db.authenticate(key)
        assert principal is not None and principal.key_id == info.id
        assert _last_used(db, info.id) is None
        assert "could not record the last use of key id" in caplog.text
        assert key not in caplog.text
        with db.write() as conn:
            conn.exec_driver_sql("DROP TRIGGER no_touch")
        # The failed write is not remembered as done: the next use records it.
        clock.advance(1)
        assert db.authenticate(key) is not None
        assert _last_used(db, info.id) == 2_200_000_001.0
    finally:
        db.close()


def test_out_of_scope_attempts_are_not_failed_guesses(tmp_path: Path) -> None:
    from server_support import start_server

    from mmagg.server import create_app

    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    running = start_server(create_app(db=db, login_failures_per_minute=2))
    try:
        device = db.create_key("acme")  # ingest only
        person = db.create_key("acme", {"read"})
        with httpx.Client(base_url=running.base_url, timeout=10) as http:
            for _ in range(5):
                assert (
                    http.post("/dashboard/api/login", json={"api_key": device}).status_code == 403
                )
                assert http.get("/", params={"api_key": person}).status_code == 403
            # The valid keys were never guesses: the address is not locked out.
            assert http.post("/dashboard/api/login", json={"api_key": person}).status_code == 200
            assert http.get("/", params={"api_key": device}).json() == {"workspace": "acme"}
    finally:
        running.stop()
        db.close()
