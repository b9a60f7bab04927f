"""The backend under hostile input: schemathesis against its OpenAPI, the dashboard API's
auth matrix, injection strings stored verbatim and served inert, body and field limits."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import strategies as st
from reliability_support import SECRET_KEY, ServedApp, add_known_key, serve_app

OTHER_KEY = "mmk_SECRET_CANARY_other_111111111111"
INJECTIONS = [
    "'; DROP TABLE reports; --",
    '" OR 1=1 --',
    "car'); DELETE FROM api_keys; --",
    "<script>alert('x')</script>",
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(2)</script>",
    "{{7*7}} ${7*7} %s %n",
    "ünïcödé 汽车 🚗 \u202e",
]
ENDPOINTS = [
    "/inference-stats",
    "/models",
    "/classes",
    "/devices",
    "/timeseries",
    "/histogram",
    "/samples",
]


def report(results: list[dict[str, Any]], device_id: str = "cam-1") -> dict[str, Any]:
    return {
        "timestamp": "2026-11-27T04:00:00+00:00",
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": device_id,
        "inference_server_version": "0.1.0",
        "inference_results": results,
    }


def result(class_name: str, model_id: str = "yard/3", **extra: Any) -> dict[str, Any]:
    return {
        "class_name": class_name,
        "confidence": 0.75,
        "inference_id": "inf-1",
        "model_type": "object-detection",
        "model_id": model_id,
        **extra,
    }


RANGE = {
    "startTime": "2026-11-26T00:00:00Z",
    "endTime": "2026-11-28T00:00:00Z",
    "model": "yard/3",  # required by some endpoints, a filter or ignored by the others
}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedApp, Path]]:
    from mmagg.server import Database, create_app

    path = tmp_path_factory.mktemp("hardening") / "mmagg.db"
    db = Database(f"sqlite:///{path}")
    add_known_key(db, "acme", SECRET_KEY)
    add_known_key(db, "other", OTHER_KEY)
    served = serve_app(create_app(db=db))
    with httpx.Client(base_url=served.url, timeout=10) as http:
        seeded = http.post(
            "/other/inference-stats",
            params={"api_key": OTHER_KEY},
            json=report([result("other-only")], device_id="other-cam"),
        )
        assert seeded.status_code == 200
    try:
        yield served, path
    finally:
        served.stop()
        db.close()


def login(http: httpx.Client, key: str = SECRET_KEY) -> None:
    response = http.post("/dashboard/api/login", json={"api_key": key})
    assert response.status_code == 200, response.text


# -- auth matrix of the dashboard's JSON API ------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS + ["/../api/me"])
def test_dashboard_api_auth_matrix(backend: tuple[ServedApp, Path], endpoint: str) -> None:
    served, _ = backend
    route = "/dashboard/api" + endpoint.replace("/../api", "")
    params = RANGE
    with httpx.Client(base_url=served.url, timeout=10) as anonymous:
        assert anonymous.get(route, params=params).status_code == 401
        # A key is not a session: neither in the query nor as a bearer token.
        assert anonymous.get(route, params={**params, "api_key": SECRET_KEY}).status_code == 401
        bearer = {"Authorization": f"Bearer {SECRET_KEY}"}
        assert anonymous.get(route, params=params, headers=bearer).status_code == 401
        anonymous.cookies.set("mmagg_session", "forged-" + "x" * 40)
        assert anonymous.get(route, params=params).status_code == 401
    with httpx.Client(base_url=served.url, timeout=10) as http:
        login(http)
        ok = http.get(route, params=params)
        assert ok.status_code == 200, ok.text
        assert ok.json().get("workspace") == "acme"
        assert "other-only" not in ok.text and "other-cam" not in ok.text
        token = http.cookies.get("mmagg_session")
        assert http.post("/dashboard/api/logout").status_code == 200
    with httpx.Client(base_url=served.url, timeout=10) as replay:
        replay.cookies.set("mmagg_session", token or "")
        assert replay.get(route, params=params).status_code == 401, "logged-out session"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_keyed_api_auth_matrix(backend: tuple[ServedApp, Path], endpoint: str) -> None:
    served, _ = backend
    with httpx.Client(base_url=served.url, timeout=10) as http:
        route = "/acme/api" + endpoint
        assert http.get(route, params=RANGE).status_code == 401
        assert http.get(route, params={**RANGE, "api_key": "mmk_nope"}).status_code == 401
        assert http.get(route, params={**RANGE, "api_key": OTHER_KEY}).status_code == 403
        login(http)  # a session cookie does not open the keyed routes
        assert http.get(route, params=RANGE).status_code == 401
        assert http.get(route, params={**RANGE, "api_key": SECRET_KEY}).status_code == 200


# -- injection strings: stored verbatim, served inert ----------------------------------------


def test_injection_strings_are_stored_verbatim_and_served_inert(
    backend: tuple[ServedApp, Path],
) -> None:
    served, path = backend
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for text in INJECTIONS:
            body = report([result(text, source_id=text)], device_id=text)
            response = http.post("/acme/inference-stats", params={"api_key": SECRET_KEY}, json=body)
            assert response.status_code == 200, response.text
        key = {"api_key": SECRET_KEY, **RANGE}
        samples = http.get("/acme/api/samples", params={**key, "limit": 1000})
        assert samples.status_code == 200
        assert samples.headers["content-type"].startswith("application/json")
        got = {(s["class_name"], s["device_id"], s["source_id"]) for s in samples.json()["samples"]}
        assert {(t, t, t) for t in INJECTIONS} <= got
        classes = http.get("/acme/api/classes", params={**key, "model": "yard/3"}).json()
        assert set(INJECTIONS) <= {c["class_name"] for c in classes["classes"]}
        devices = http.get("/acme/api/devices", params=key).json()
        assert set(INJECTIONS) <= {d["device_id"] for d in devices["devices"]}
        # Rendered inert: the page is static, scripts only from its own origin, no inline
        # script, no sniffing of JSON as HTML.
        page = http.get("/dashboard")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        script_src = [
            d for d in csp.split(";") if d.strip().startswith(("script-src", "default-src"))
        ]
        assert script_src and all("unsafe-inline" not in d for d in script_src), csp
        assert page.headers.get("x-content-type-options") == "nosniff"
        assert all(t not in page.text for t in INJECTIONS[3:6])
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"reports", "api_keys"} <= tables, tables
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 2
    finally:
        conn.close()


# -- size limits ------------------------------------------------------------------------------


def _post(http: httpx.Client, content: bytes | Iterator[bytes], **kw: Any) -> httpx.Response:
    return http.post(
        "/acme/inference-stats",
        params={"api_key": SECRET_KEY},
        content=content,
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
        **kw,
    )


def test_body_and_field_limits(backend: tuple[ServedApp, Path]) -> None:
    served, _ = backend
    with httpx.Client(base_url=served.url, timeout=30) as http:
        big = json.dumps(report([result("x" * 1000) for _ in range(1100)])).encode()
        assert len(big) > 1 << 20
        assert _post(http, big).status_code == 413

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        assert _post(http, chunks()).status_code == 413
        too_many = report([result("c", confidence=0.1) for _ in range(10_001)])
        too_many_body = json.dumps(too_many, separators=(",", ":")).encode()
        if len(too_many_body) <= 1 << 20:
            assert _post(http, too_many_body).status_code == 422
        for field in ("class_name", "model_id", "inference_id", "model_type"):
            long_value = report([{**result("c"), field: "y" * 1025}])
            assert _post(http, json.dumps(long_value).encode()).status_code == 422, field
        assert (
            _post(
                http,
                json.dumps(
                    report([]),
                ).encode(),
                headers={"Idempotency-Key": "k" * 256},
            ).status_code
            == 422
        )
        nested = b"[" * 100_000 + b"]" * 100_000
        assert _post(http, nested).status_code == 422
        deep_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
        assert _post(http, deep_object).status_code == 422
        for number in (b"1e999", b"NaN", b"-Infinity", b"1" * 5000):
            body = json.dumps(report([result("n")])).replace("0.75", number.decode()).encode()
            response = _post(http, body)
            assert response.status_code == 422, (number[:20], response.text[:200])
        assert _post(http, b"\xff\xfe not json").status_code == 422
        assert _post(http, b"").status_code == 422
        assert http.get("/healthz").status_code == 200


# -- schemathesis -------------------------------------------------------------------------------


def test_schemathesis_no_server_errors_and_schema_conformance(tmp_path: Path) -> None:
    """Every operation of the served OpenAPI, a few generated cases each: no 5xx, and the
    responses match the documented schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    from mmagg.server import Database, create_app

    db = Database(f"sqlite:///{tmp_path / 'st.db'}")
    add_known_key(db, "acme", SECRET_KEY)
    app = create_app(db=db)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        strategy = operation.as_strategy()

        @settings(
            max_examples=12,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            if case.path_parameters and "workspace" in case.path_parameters:
                case.path_parameters["workspace"] = "acme"
            headers = {"Authorization": f"Bearer {SECRET_KEY}"}
            response = case.call(headers=headers)
            try:
                case.validate_response(
                    response, checks=[not_a_server_error, response_schema_conformance]
                )
            except Exception as error:  # collect all, report together
                failures.append(f"{case.method} {case.formatted_path}: {str(error)[:400]}")

        run()
    db.close()
    assert not failures, "\n".join(failures[:10])


def test_openapi_documents_ingest_and_response_schemas() -> None:
    """Without these schemathesis could neither reach ingest nor check response shapes (it
    was an xfail until the server declared its response models)."""
    from mmagg.server import create_app

    spec = create_app("sqlite://").openapi()
    assert "post" in spec["paths"]["/{workspace}/inference-stats"]
    models = spec["paths"]["/{workspace}/api/models"]["get"]["responses"]
    assert models["200"]["content"]["application/json"]["schema"] not in ({}, None)
    assert {"401", "403"} <= set(models)


SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(INJECTIONS),
)
VALUE = st.recursive(
    SCALAR,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "class_name",
    "confidence",
    "inference_id",
    "model_type",
    "model_id",
    "source_id",
    "stats",
]
TOP = ["timestamp", "device_id", "inference_results", "mmagg", "source", "platform"]


@st.composite
def mutated_reports(draw: st.DrawFn) -> Any:
    body: Any = report([result("car"), result("person", stats=None)])
    body["inference_results"][1].pop("stats")
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "result", "whole"]))
        if not isinstance(body, dict):
            break
        if where == "top":
            body[draw(st.sampled_from(TOP))] = draw(VALUE)
        elif where == "result" and isinstance(body.get("inference_results"), list):
            items = body["inference_results"]
            if items and isinstance(items[0], dict):
                items[0][draw(st.sampled_from(FIELDS))] = draw(VALUE)
        else:
            body = draw(VALUE)
    return body


def test_ingest_fuzz_never_answers_5xx(tmp_path: Path) -> None:
    """The ingest is missing from the OpenAPI, so schemathesis cannot reach it: hypothesis
    mutates valid reports instead. Any answer but a 5xx is fine; a 200 must be readable."""
    from hypothesis import HealthCheck, given, settings

    from mmagg.server import Database, create_app

    db = Database(f"sqlite:///{tmp_path / 'fuzz.db'}")
    add_known_key(db, "acme", SECRET_KEY)
    seen: dict[int, int] = {}
    served = serve_app(create_app(db=db))
    with httpx.Client(base_url=served.url, timeout=10) as http:

        @settings(
            max_examples=120,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=mutated_reports())
        def run(body: Any) -> None:
            try:
                content = json.dumps(body, allow_nan=True).encode()
            except (ValueError, OverflowError):
                return
            response = http.post(
                "/acme/inference-stats", params={"api_key": SECRET_KEY}, content=content
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (content[:300], response.text[:300])

        run()
        read = http.get("/acme/api/samples", params={"api_key": SECRET_KEY, "limit": 1000})
        assert read.status_code == 200
    served.stop()
    db.close()
    assert seen.get(200) and seen.get(422), seen
