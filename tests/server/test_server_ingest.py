"""Ingest and lookup over real HTTP: auth matrix, every 4xx, idempotency, secrets."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result, stats
from server_support import RunningBackend

from mmagg.server import tables
from mmagg.server.db import KEY_DISPLAY_CHARS
from mmagg.server.responses import ErrorResponse, IngestResponse


def _auth(how: str, key: str) -> dict[str, Any]:
    if how == "query":
        return {"params": {"api_key": key}}
    return {"headers": {"Authorization": f"Bearer {key}"}}


def _count_reports(backend: RunningBackend, workspace: str) -> int:
    return backend.db.count_reports(workspace)


@pytest.mark.parametrize("how", ["query", "bearer"])
def test_lookup_returns_the_workspace_of_the_key(
    backend: RunningBackend, client: httpx.Client, how: str
) -> None:
    workspace, key = backend.new_workspace()
    response = client.get("/", **_auth(how, key))
    assert response.status_code == 200
    assert response.json() == {"workspace": workspace}
    # The original client adds nocache=true; it must not matter.
    assert client.get("/", params={"api_key": key, "nocache": "true"}).json() == {
        "workspace": workspace
    }


@pytest.mark.parametrize("how", ["query", "bearer"])
def test_ingest_with_key_in_query_or_header_stores_the_report(
    backend: RunningBackend, client: httpx.Client, how: str
) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", 0.9), result("person", 0.4)])
    response = client.post(f"/{workspace}/inference-stats", json=body, **_auth(how, key))
    assert response.status_code == 200, response.text
    assert response.json()["results"] == 2
    assert _count_reports(backend, workspace) == 1


def _auth_cases(backend: RunningBackend) -> Iterator[tuple[str, dict[str, Any], int]]:
    workspace, key = backend.new_workspace()
    _other, other_key = backend.new_workspace()
    _revoked_ws, revoked_key = backend.new_workspace()
    assert backend.db.revoke_key(revoked_key[:KEY_DISPLAY_CHARS])
    yield workspace, {}, 401
    yield workspace, {"params": {"api_key": "mmk_" + "x" * 32}}, 401
    yield workspace, {"headers": {"Authorization": "Bearer mmk_wrong"}}, 401
    yield workspace, {"headers": {"Authorization": f"Basic {key}"}}, 401
    yield workspace, {"params": {"api_key": revoked_key}}, 401
    yield workspace, {"headers": {"Authorization": f"Bearer {revoked_key}"}}, 401
    yield workspace, {"params": {"api_key": other_key}}, 403
    yield workspace, {"headers": {"Authorization": f"Bearer {other_key}"}}, 403


def test_auth_matrix_for_ingest_read_and_json_endpoints(
    backend: RunningBackend, client: httpx.Client
) -> None:
    for workspace, auth, expected in _auth_cases(backend):
        keys = [str(v) for v in auth.get("params", {}).values()] + [
            str(v).split(" ", 1)[1] for v in auth.get("headers", {}).values()
        ]
        requests = [
            client.post(f"/{workspace}/inference-stats", json=report([result("a", 0.5)]), **auth),
            client.get(f"/{workspace}/inference-stats", **auth),
            client.get(f"/{workspace}/api/models", **auth),
            client.get(f"/{workspace}/api/samples", **auth),
            client.get(
                f"/{workspace}/api/classes",
                params={"model": "m", **auth.get("params", {})},
                headers=auth.get("headers"),
            ),
        ]
        for response in requests:
            assert response.status_code == expected, (auth, response.request.url, response.text)
            ErrorResponse.model_validate(response.json())
            for key in keys:
                assert key not in response.text
        assert _count_reports(backend, workspace) == 0
        if expected == 401:
            lookup = client.get("/", **auth)
            assert lookup.status_code == 401
            assert lookup.headers["www-authenticate"] == "Bearer"


def test_revoking_a_key_takes_effect_immediately(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    assert client.get("/", params={"api_key": key}).status_code == 200
    assert backend.db.revoke_key(key[:KEY_DISPLAY_CHARS])
    assert client.get("/", params={"api_key": key}).status_code == 401
    response = client.post(
        f"/{workspace}/inference-stats", params={"api_key": key}, json=report([])
    )
    assert response.status_code == 401


def test_body_over_limit_by_content_length_is_413(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    padding = "x" * (1 << 20)
    body = json.dumps(report([result("car", 0.5)], hostname=padding)).encode()
    response = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "1048576" in response.json()["detail"]
    assert _count_reports(backend, workspace) == 0


def test_body_over_limit_when_chunked_is_413(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    body = json.dumps(report([result("car", 0.5)] * 8_000)).encode()
    assert len(body) > 1 << 20

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    try:
        response = client.post(
            f"/{workspace}/inference-stats",
            params={"api_key": key},
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
    except httpx.TransportError:
        pytest.fail("the server should answer 413, not drop the connection")
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413
    assert _count_reports(backend, workspace) == 0


def test_body_under_limit_when_chunked_is_accepted(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    body = json.dumps(report([result("car", 0.5)])).encode()
    response = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        content=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text


BAD_BODIES: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("nan literal", b"", "inference_results.0.confidence"),
    ("infinite", b"", "inference_results.0.confidence"),
    ("confidence as text", report([result("car", "high")]), "inference_results.0.confidence"),  # type: ignore[arg-type]
    ("nan as text", report([result("car", "nan")]), "inference_results.0.confidence"),  # type: ignore[arg-type]
    ("results not a list", report([]) | {"inference_results": {"a": 1}}, "inference_results"),
    (
        "missing model_id",
        report([{"class_name": "car", "confidence": 0.5}]),
        "inference_results.0.model_id",
    ),
    ("class_name as number", report([result(7, 0.5)]), "inference_results.0.class_name"),  # type: ignore[arg-type]
    ("missing timestamp", {"inference_results": []}, "timestamp"),
    ("bad timestamp", report([]) | {"timestamp": "yesterday"}, "timestamp"),
    ("string too long", report([result("c" * 1025, 0.5)]), "inference_results.0.class_name"),
    (
        "too many results",
        report([{"model_id": "m", "confidence": 0.5}] * 10_001),
        "inference_results",
    ),
    (
        "histogram sum",
        report([result("car", 0.5, stats=stats([0.5]) | {"count": 2})]),
        "inference_results.0.stats.histogram",
    ),
    (
        "histogram length",
        report([result("car", 0.5, stats=stats([0.5]) | {"histogram": [1]})]),
        "inference_results.0.stats.histogram",
    ),
    ("frequency", report([]) | {"mmagg": {"frequency": -1}}, "mmagg.frequency"),
    ("not an object", b"[1, 2]", "body"),
    ("not json", b"{", "body"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_schema_is_422_naming_the_field_and_never_the_key(
    backend: RunningBackend,
    client: httpx.Client,
    case: str,
    body: bytes | dict[str, Any],
    field: str,
) -> None:
    workspace, key = backend.new_workspace()
    if case == "nan literal":
        body = json.dumps(report([result("car", float("nan"))])).encode()
    elif case == "infinite":
        body = json.dumps(report([result("car", 0.5)])).replace("0.5", "1e999").encode()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    ErrorResponse.model_validate(response.json())
    fields = [error["field"] for error in response.json()["detail"]]
    assert any(f == field or f.startswith(field) for f in fields), fields
    assert key not in response.text
    assert _count_reports(backend, workspace) == 0


def test_422_does_not_echo_a_key_placed_in_the_body(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", key)], timestamp=None) | {"timestamp": key}  # type: ignore[arg-type]
    response = client.post(
        f"/{workspace}/inference-stats", headers={"Authorization": f"Bearer {key}"}, json=body
    )
    assert response.status_code == 422
    assert key not in response.text


def test_query_validation_422_does_not_echo_the_key(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    response = client.get(f"/{workspace}/api/samples", params={"api_key": key, "limit": key})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "query.limit"
    assert key not in response.text
    for params in ({"startTime": key}, {"endTime": key}):
        echoed = client.get(f"/{workspace}/inference-stats", params={"api_key": key, **params})
        assert echoed.status_code == 422
        assert key not in echoed.text


def test_bad_idempotency_key_is_422(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    response = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        json=report([]),
        headers={"Idempotency-Key": "k" * 256},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "header.Idempotency-Key"


def test_idempotent_retry_is_stored_once_with_the_same_answer(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", 0.9)])
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post(
        f"/{workspace}/inference-stats", params={"api_key": key}, json=body, headers=headers
    )
    second = client.post(
        f"/{workspace}/inference-stats", params={"api_key": key}, json=body, headers=headers
    )
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    IngestResponse.model_validate(first.json())
    assert second.headers["idempotent-replayed"] == "true"
    assert _count_reports(backend, workspace) == 1
    other = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        json=body,
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert other.json()["report_id"] != first.json()["report_id"]
    assert _count_reports(backend, workspace) == 2


def test_concurrent_retries_store_once(backend: RunningBackend) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("car", 0.9), result("dog", 0.2)])
    idempotency_key = uuid.uuid4().hex
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=backend.base_url, timeout=10) as http:
            response = http.post(
                f"/{workspace}/inference-stats",
                params={"api_key": key},
                json=body,
                headers={"Idempotency-Key": idempotency_key},
            )
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1
    assert _count_reports(backend, workspace) == 1


def test_same_idempotency_key_in_two_workspaces_is_two_reports(
    backend: RunningBackend, client: httpx.Client
) -> None:
    idempotency_key = uuid.uuid4().hex
    for _ in range(2):
        workspace, key = backend.new_workspace()
        response = client.post(
            f"/{workspace}/inference-stats",
            params={"api_key": key},
            json=report([result("car", 0.9)]),
            headers={"Idempotency-Key": idempotency_key},
        )
        assert response.status_code == 200
        assert "idempotent-replayed" not in response.headers
        assert _count_reports(backend, workspace) == 1


def test_extensions_and_system_info_are_stored(backend: RunningBackend) -> None:
    workspace, key = backend.new_workspace()
    confidences = [0.31, 0.5, 0.97]
    body = report(
        [result("car", 0.97, source_id="cam-2", stats=stats(confidences))],
        device_id="edge-07",
        mmagg={"frequency": 5.0, "aggregator_key": "agg-1"},
        timestamp=None,
    )
    body["timestamp"] = "2026-11-27T04:45:00.123456"  # naive: local time of an unknown zone
    with httpx.Client(base_url=backend.base_url) as http:
        before = time.time()
        response = http.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)
        after = time.time()
    assert response.status_code == 200
    with backend.db.read() as conn:
        stored = conn.execute(
            sa.select(tables.reports).where(tables.reports.c.id == response.json()["report_id"])
        ).one()
        row = conn.execute(
            sa.select(tables.results).where(tables.results.c.report_id == stored.id)
        ).one()
    assert stored.device_id == "edge-07"
    # A naive timestamp is filed at the server's receive time; the client's value is kept.
    assert before <= stored.ts <= after
    assert stored.received_at == stored.ts
    assert stored.client_timestamp == "2026-11-27T04:45:00.123456"
    assert stored.time_rule == "received_naive"
    assert stored.frequency == 5.0
    assert json.loads(stored.extension)["aggregator_key"] == "agg-1"
    assert json.loads(stored.system_info)["hostname"] == "edge-01"
    assert (row.model_id, row.class_name, row.source_id) == ("yard/3", "car", "cam-2")
    assert (row.stats_count, row.stats_min, row.stats_max) == (3, 0.31, 0.97)
    assert row.stats_sum == pytest.approx(sum(confidences))
    assert [row._mapping[f"hist_{i}"] for i in range(10)] == stats(confidences)["histogram"]


def test_api_key_is_stored_only_as_its_hash(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    client.post(
        f"/{workspace}/inference-stats", params={"api_key": key}, json=report([result("a", 1.0)])
    )
    client.post("/dashboard/api/login", json={"api_key": key})
    digest = hashlib.sha256(key.encode()).hexdigest()
    found_hash = False
    with backend.db.read() as conn:
        for table in tables.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                text = repr(tuple(row))
                assert key not in text, table.name
                assert key[4:] not in text, table.name
                found_hash = found_hash or digest in text
    assert found_hash


def test_health_and_metrics(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    client.post(
        f"/{workspace}/inference-stats", params={"api_key": key}, json=report([result("a", 0.5)])
    )
    client.get("/", params={"api_key": "nope"})
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert "mmagg_reports_received_total" in text
    assert "mmagg_results_stored_total" in text
    assert 'mmagg_rejections_total{reason="unauthorized"}' in text
    assert 'route="/{workspace}/inference-stats"' in text
    assert "mmagg_request_duration_seconds_bucket" in text


def _metric(text: str, name: str) -> float:
    """The value of one sample line (`name` with its labels) of a Prometheus text page."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return 0.0


def test_metrics_count_what_happened(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    names = (
        "mmagg_reports_received_total",
        "mmagg_results_stored_total",
        "mmagg_reports_duplicate_total",
        'mmagg_rejections_total{reason="invalid"}',
        'mmagg_rejections_total{reason="forbidden"}',
        'mmagg_rejections_total{reason="too_large"}',
    )
    before = {n: _metric(client.get("/metrics").text, n) for n in names}
    url = f"/{workspace}/inference-stats"
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    body = report([result("a", 0.5), result("b", 0.6), result("c", 0.7)])
    for _ in range(2):  # the second is a replay
        client.post(url, params={"api_key": key}, json=body, headers=headers)
    client.post(url, params={"api_key": key}, json=report([result("a", 0.5)]))
    client.post(url, params={"api_key": key}, json={"timestamp": "never"})
    _other, other_key = backend.new_workspace()
    client.post(url, params={"api_key": other_key}, json=body)
    client.post(url, params={"api_key": key}, content=b"x" * (2 << 20))
    after = {n: _metric(client.get("/metrics").text, n) for n in names}
    delta = {n: after[n] - before[n] for n in names}
    assert delta == {
        "mmagg_reports_received_total": 2,
        "mmagg_results_stored_total": 4,
        "mmagg_reports_duplicate_total": 1,
        'mmagg_rejections_total{reason="invalid"}': 1,
        'mmagg_rejections_total{reason="forbidden"}': 1,
        'mmagg_rejections_total{reason="too_large"}': 1,
    }
