"""Upgrading a v0.1 database (schema version 1) to key scopes (schema step 2), on SQLite and
PostgreSQL.

The v0.1 database is built from the DDL below, frozen as v0.1 shipped it (not from the
current metadata, which would already hold the new columns), with a workspace, a key and a
dashboard session written the way v0.1 wrote them. After the upgrade the old key must still
do everything it could: look up, ingest, read, open the dashboard, and (as every scope is
granted to old keys) manage keys.
"""

from __future__ import annotations

import secrets

import httpx
import sqlalchemy as sa
from server_payloads import report, result
from server_support import start_server
from typer.testing import CliRunner
from v01_schema import WORKSPACE, build_v01_database

from mmagg.cli import app as cli_app
from mmagg.server import Database, create_app, tables


def test_a_v01_key_keeps_every_power_after_the_upgrade(v01_url: tuple[str, str]) -> None:
    url, kind = v01_url
    key = "mmk_" + secrets.token_urlsafe(24)
    session_token = secrets.token_urlsafe(32)
    build_v01_database(url, kind, key, session_token)

    db = Database(url)  # migrates
    running = start_server(create_app(db=db))
    try:
        with db.engine.connect() as conn:
            assert tables.current_version(conn) == tables.SCHEMA_VERSION
            columns = {c["name"] for c in sa.inspect(conn).get_columns("api_keys")}
        assert {"scopes", "expires_at", "last_used_at"} <= columns
        (old,) = db.list_keys()
        assert old.scopes == {"ingest", "read", "admin"}
        assert old.expires_at is None and old.revoked_at is None

        bearer = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=running.base_url, timeout=10) as http:
            assert http.get("/", params={"api_key": key}).json() == {"workspace": WORKSPACE}
            stored = http.post(
                f"/{WORKSPACE}/inference-stats",
                params={"api_key": key},
                json=report([result("legacy-class", 0.75)]),
            )
            assert stored.status_code == 200, stored.text
            stats = http.get(f"/{WORKSPACE}/inference-stats", headers=bearer)
            assert stats.status_code == 200
            assert [i["predicted_class"] for i in stats.json()["inference_stats"]] == [
                "legacy-class"
            ]
            listed = http.get(f"/{WORKSPACE}/api/keys", headers=bearer)
            assert listed.status_code == 200
            assert listed.json()["keys"][0]["scopes"] == ["admin", "ingest", "read"]
            # The v0.1 session still works, and the key still opens new ones.
            http.cookies.set("mmagg_session", session_token)
            assert http.get("/dashboard/api/me").json() == {"workspace": WORKSPACE}
            http.cookies.clear()
            assert http.post("/dashboard/api/login", json={"api_key": key}).status_code == 200

        # A key made after the upgrade gets the safe default, ingest only.
        new_key = db.create_key(WORKSPACE)
        principal = db.authenticate(new_key)
        assert principal is not None and principal.scopes == {"ingest"}
    finally:
        running.stop()
        db.close()

    shown = CliRunner().invoke(cli_app, ["keys", "list", "--database-url", url])
    assert shown.exit_code == 0, shown.output
    assert "admin,ingest,read" in shown.stdout


def test_step_2_is_idempotent_on_an_upgraded_or_new_database(v01_url: tuple[str, str]) -> None:
    url, kind = v01_url
    build_v01_database(url, kind, "mmk_" + secrets.token_urlsafe(24), secrets.token_urlsafe(32))
    for _ in range(2):  # the upgraded database, then the same again (already at version 2)
        db = Database(url)
        try:
            with db.engine.begin() as conn:
                tables.MIGRATIONS[2](conn)  # a second run adds nothing and changes nothing
            assert [sorted(k.scopes) for k in db.list_keys()] == [["admin", "ingest", "read"]]
        finally:
            db.close()


def test_processes_starting_together_migrate_once(v01_url: tuple[str, str]) -> None:
    """Instances started at once on a new database (a deployment's replicas) all come up."""
    import threading

    url, _ = v01_url
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_database() -> None:
        start.wait()
        try:
            Database(url).close()
        except BaseException as error:  # collected: the assertion below names it
            errors.append(error)

    threads = [threading.Thread(target=open_database) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    db = Database(url)
    try:
        with db.read() as conn:
            assert tables.current_version(conn) == tables.SCHEMA_VERSION
            assert (
                conn.execute(sa.select(sa.func.count()).select_from(tables.schema_version)).scalar()
                == 1
            )
    finally:
        db.close()
