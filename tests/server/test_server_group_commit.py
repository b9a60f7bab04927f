"""Group commit: concurrent reports share a transaction, and each is still stored exactly once.

Real databases (a SQLite file, a PostgreSQL database of its own) and a real server over
loopback HTTP. A "poisoned" report is one the database itself refuses: a trigger raises for
`device_id = 'poison'`, so the failure happens inside the shared transaction, as an
unforeseen database error would.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from server_payloads import report, result, stats
from server_support import scratch_pg_database, start_server

from mmagg.server import Database, create_app
from mmagg.server.bounds import place
from mmagg.server.db import KeyRevokedError, PendingReport, StoredReport, hash_secret
from mmagg.server.groupcommit import GroupCommit
from mmagg.server.rollups import ROLLUP_COLUMNS, rebuild_rollups
from mmagg.server.schemas import (
    _PLAIN_ADAPTER,
    REPORT_ADAPTER,
    ReportInvalidError,
    _plain_text,
    _stats_hold,
    parse_report,
)
from mmagg.server.tables import reports, rollups

_SQLITE_POISON = (
    "CREATE TRIGGER poison_reports BEFORE INSERT ON reports WHEN NEW.device_id = 'poison' "
    "BEGIN SELECT RAISE(ABORT, 'poisoned report'); END"
)
_PG_POISON = (
    "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
    "IF NEW.device_id = 'poison' THEN RAISE EXCEPTION 'poisoned report'; END IF; "
    "RETURN NEW; END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER poison_reports BEFORE INSERT ON reports FOR EACH ROW EXECUTE FUNCTION poison()",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database of its own (the poison trigger must not reach other tests)."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'group.db'}")
        with database.write() as conn:
            conn.exec_driver_sql(_SQLITE_POISON)
        try:
            yield database
        finally:
            database.close()
        return
    request.getfixturevalue("pg_database_url")  # skips when PostgreSQL is not reachable
    with scratch_pg_database("mmagg_group_") as url:
        database = Database(url)
        try:
            with database.write() as conn:
                for statement in _PG_POISON:
                    conn.exec_driver_sql(statement)
            yield database
        finally:
            database.close()


def _body(device: str, n: int = 3) -> dict[str, Any]:
    confidences = [0.3 + 0.1 * i for i in range(n)]
    items = [
        result(
            f"class-{i}", confidences[i], source_id=f"cam-{i % 2}", stats=stats([confidences[i]])
        )
        for i in range(n)
    ]
    return report(items, device_id=device)


def _pending(db: Database, key: str, device: str, idempotency_key: str | None) -> PendingReport:
    principal = db.authenticate(key)
    assert principal is not None
    parsed = REPORT_ADAPTER.validate_python(_body(device))
    return PendingReport(
        principal, parsed, idempotency_key, place(parsed.timestamp, time.time()), hash_secret(key)
    )


def _stored_keys(db: Database) -> Counter[str]:
    with db.read() as conn:
        return Counter(conn.execute(sa.select(reports.c.idempotency_key)).scalars())


def _rollups_equal_rebuilt(db: Database) -> None:
    """The rollups written batch by batch equal those recomputed from the stored results."""
    order = [rollups.c[name] for name in ROLLUP_COLUMNS[:7]]
    columns = [rollups.c[name] for name in ROLLUP_COLUMNS]
    with db.read() as conn:
        written = [tuple(row) for row in conn.execute(sa.select(*columns).order_by(*order))]
    with db.engine.connect() as conn:
        transaction = conn.begin()
        rebuild_rollups(conn)
        rebuilt = [tuple(row) for row in conn.execute(sa.select(*columns).order_by(*order))]
        transaction.rollback()
    assert len(written) == len(rebuilt)
    for mine, theirs in zip(written, rebuilt, strict=True):
        assert mine[:7] == theirs[:7]
        assert mine[7:] == pytest.approx(theirs[7:], rel=1e-12)


async def _store_all(writer: GroupCommit, items: list[PendingReport]) -> list[Any]:
    # gather: every request hands its report over in the same event-loop turn.
    return await asyncio.gather(*(writer.store(item) for item in items), return_exceptions=True)


def test_concurrent_reports_share_one_transaction(db: Database) -> None:
    key = db.create_key("acme")
    items = [_pending(db, key, f"edge-{i % 3}", uuid.uuid4().hex) for i in range(20)]
    writer = GroupCommit(db)
    outcomes = asyncio.run(_store_all(writer, items))
    assert writer.batches == 1 and writer.reports == 20
    assert all(isinstance(o, StoredReport) and not o.duplicate for o in outcomes)
    assert len({o.report_id for o in outcomes}) == 20
    assert _stored_keys(db) == Counter(item.idempotency_key for item in items)
    _rollups_equal_rebuilt(db)


def test_a_poisoned_report_fails_alone(db: Database) -> None:
    key = db.create_key("acme")
    devices = ["edge-1", "poison", "edge-2", "edge-3", "poison", "edge-4"]
    items = [_pending(db, key, device, uuid.uuid4().hex) for device in devices]
    writer = GroupCommit(db)
    outcomes = asyncio.run(_store_all(writer, items))
    assert writer.batches == 1  # the shared transaction failed, then each went alone
    for device, outcome in zip(devices, outcomes, strict=True):
        if device == "poison":
            assert isinstance(outcome, Exception)
            assert "poisoned report" in str(outcome)
        else:
            assert isinstance(outcome, StoredReport) and not outcome.duplicate
    stored = _stored_keys(db)
    expected = [i.idempotency_key for d, i in zip(devices, items, strict=True) if d != "poison"]
    assert stored == Counter(expected)
    _rollups_equal_rebuilt(db)


def test_one_idempotency_key_twice_in_a_batch_is_stored_once(db: Database) -> None:
    key = db.create_key("acme")
    keys = [uuid.uuid4().hex for _ in range(3)]
    items = [_pending(db, key, "edge-1", k) for k in keys + keys]
    outcomes = asyncio.run(_store_all(GroupCommit(db), items))
    assert all(isinstance(o, StoredReport) for o in outcomes)
    for i in range(3):
        first, again = outcomes[i], outcomes[i + 3]
        assert first.report_id == again.report_id
        assert [first.duplicate, again.duplicate].count(True) == 1
    assert _stored_keys(db) == Counter(keys)
    _rollups_equal_rebuilt(db)


def test_a_key_revoked_elsewhere_stores_nothing(db: Database) -> None:
    key = db.create_key("acme")
    item = _pending(db, key, "edge-1", uuid.uuid4().hex)
    assert db.cached_principal(key) is not None
    # Another process (another Database on the same storage) revokes the key.
    other = Database(db.url, migrate_schema=False)
    try:
        assert other.revoke_key(key)
    finally:
        other.close()
    assert db.cached_principal(key) is not None  # this process has not heard of it yet
    outcomes = asyncio.run(_store_all(GroupCommit(db), [item]))
    assert isinstance(outcomes[0], KeyRevokedError)
    assert db.cached_principal(key) is None
    assert _stored_keys(db) == Counter()


def _post_many(base_url: str, workspace: str, key: str, plan: list[tuple[str, str]]) -> list:
    """POST every (device, idempotency key) of `plan` from 12 threads; (key, status, body)."""
    answers: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    work = list(plan)

    def client() -> None:
        http = httpx.Client(base_url=base_url, timeout=30)
        try:
            while True:
                with lock:
                    if not work:
                        return
                    device, idempotency_key = work.pop()
                for _attempt in range(5):
                    try:
                        response = http.post(
                            f"/{workspace}/inference-stats",
                            content=json.dumps(_body(device)),
                            headers={
                                "Authorization": f"Bearer {key}",
                                "Content-Type": "application/json",
                                "Idempotency-Key": idempotency_key,
                            },
                        )
                        break
                    except httpx.TransportError:
                        # uvicorn closes a connection after a 500; a client retries the
                        # same report (same Idempotency-Key) on a new one.
                        http.close()
                        http = httpx.Client(base_url=base_url, timeout=30)
                else:
                    raise AssertionError("no answer after 5 attempts")
                with lock:
                    answers.append((idempotency_key, response.status_code, response.text))
        finally:
            http.close()

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_many_clients_over_http_every_acknowledged_report_stored_once(db: Database) -> None:
    key = db.create_key("acme")
    plan = []
    for i in range(150):
        device = "poison" if i % 7 == 3 else f"edge-{i % 5}"
        idempotency_key = uuid.uuid4().hex
        plan.append((device, idempotency_key))
        if i % 10 == 0:  # a retry of the same report, racing the first attempt
            plan.append((device, idempotency_key))
    running = start_server(create_app(db=db))
    try:
        answers = _post_many(running.base_url, "acme", key, plan)
        metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
    finally:
        running.stop()
    assert len(answers) == len(plan)
    poisoned = {k for d, k in plan if d == "poison"}
    acknowledged = {k for k, status, _ in answers if status == 200}
    for idempotency_key, status, text in answers:
        assert status == (500 if idempotency_key in poisoned else 200), text
    assert acknowledged == {k for d, k in plan if d != "poison"}
    assert _stored_keys(db) == Counter(acknowledged)  # each exactly once, nothing else
    # Retries answered the same report id as the first attempt.
    ids: dict[str, set[int]] = {}
    for idempotency_key, status, text in answers:
        if status == 200:
            ids.setdefault(idempotency_key, set()).add(json.loads(text)["report_id"])
    assert all(len(found) == 1 for found in ids.values())
    assert "mmagg_ingest_batch_reports_count" in metrics
    _rollups_equal_rebuilt(db)


def test_a_revoked_key_gets_401_even_with_an_invalid_body(db: Database) -> None:
    key = db.create_key("acme")
    running = start_server(create_app(db=db))
    try:
        with httpx.Client(base_url=running.base_url, timeout=10) as http:
            url = "/acme/inference-stats"
            auth = {"Authorization": f"Bearer {key}"}
            assert http.post(url, json=_body("edge-1"), headers=auth).status_code == 200
            other = Database(db.url, migrate_schema=False)
            try:
                assert other.revoke_key(key)
            finally:
                other.close()
            bad = http.post(url, json={"timestamp": "x"}, headers=auth)
            good = http.post(url, json=_body("edge-1"), headers=auth)
    finally:
        running.stop()
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert good.status_code == 401
    assert sum(_stored_keys(db).values()) == 1


_ascii_text = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=12)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | _ascii_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_ascii_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _near_reports(draw: st.DrawFn) -> bytes:
    """Report bodies, valid and not, some with odd strings and types in known fields."""
    confidence = draw(st.floats(-0.5, 1.5) | st.just(0.5))
    item: dict[str, Any] = {
        "class_name": draw(_ascii_text | st.just("car")),
        "confidence": confidence,
        "model_id": draw(_ascii_text | st.just("yard/3")),
    }
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(0, 1), min_size=1, max_size=4))
        item["stats"] = stats([min(max(confidence, 0.0), 1.0), *values])
        if draw(st.booleans()):  # one field off: each check of the stats, in turn
            field = draw(st.sampled_from(["count", "sum", "min", "max", "histogram"]))
            if field == "histogram":
                histogram = list(item["stats"]["histogram"])
                histogram[draw(st.integers(0, 9))] += draw(st.integers(-1, 1))
                item["stats"]["histogram"] = histogram
            elif field == "count":
                item["stats"]["count"] += draw(st.integers(-1, 1))
            else:
                item["stats"][field] = draw(st.floats(-0.1, 1.1) | st.floats(0, 10))
    if draw(st.booleans()):
        item["source_id"] = draw(_json_value)
    body: dict[str, Any] = report([item], device_id=draw(_ascii_text))
    if draw(st.booleans()):
        body[draw(st.sampled_from(sorted(body)))] = draw(_json_value)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode()


def _comparable(errors: list[Any]) -> list[Any]:
    return [
        {**error, "ctx": {k: str(v) for k, v in error["ctx"].items()}} if "ctx" in error else error
        for error in errors
    ]


@settings(max_examples=300, deadline=None)
@given(_near_reports())
def test_plain_text_validation_is_the_full_validation(body: bytes) -> None:
    try:
        full: Any = REPORT_ADAPTER.validate_json(body)
    except Exception as error:
        full = error
    try:
        parsed: Any = parse_report(body)
    except ReportInvalidError as error:
        parsed = error
    if isinstance(full, Exception):
        assert isinstance(parsed, ReportInvalidError)
        # Exceptions in `ctx` compare by identity: compare their text.
        assert _comparable(parsed.errors) == _comparable(
            full.errors(include_url=False)  # type: ignore[attr-defined]
        )
    else:
        assert not isinstance(parsed, Exception)
        assert parsed.model_dump() == full.model_dump()
    if _plain_text(body):
        # The plain models leave the stats checks to `_stats_hold`: together they accept
        # exactly what the full models accept.
        try:
            plain = _PLAIN_ADAPTER.validate_json(body)
        except Exception:
            assert isinstance(full, Exception)
        else:
            assert _stats_hold(plain) == (not isinstance(full, Exception))
            if not isinstance(full, Exception):
                assert plain.model_dump() == full.model_dump()
