"""The auth matrix over real HTTP, on SQLite and PostgreSQL: every route of the app × every
scope × a valid, a revoked and an expired key (and no key at all).

The routes are enumerated from the app itself and each must be classified in `ROUTES` below
(the scope it needs, and how to call it so that an allowed call succeeds), so a new route
cannot escape the matrix unclassified. The expected answers are written here from the issue's
rules, not taken from the code under test:

- a valid key holding the route's scope: 2xx;
- a valid key without it: 403 whose message names the scope, with nothing but that message;
- a revoked or an expired key, whatever its scopes, or no key: 401.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from server_payloads import report, result
from server_support import ManualClock, start_server

from mmagg.server import Database, create_app

SCOPES = ("ingest", "read", "admin")
STATES = ("valid", "revoked", "expired")
PUBLIC = "public"  # no key needed
SESSION = "session"  # the dashboard session cookie (opened with a read key)
MODEL = "yard/3"
SECRET_CLASS = "forklift-7f3a"  # in the seeded data: must never appear in a refusal


@dataclass
class World:
    """One served app, its database, clock, workspace and a key per (scopes, state)."""

    app: FastAPI
    base_url: str
    db: Database
    clock: ManualClock
    workspace: str
    keys: dict[tuple[str, str], str]

    def fresh_key_id(self) -> int:
        """The id of a new key of the workspace, for a DELETE to revoke."""
        _key, info = self.db.create_key_record(self.workspace, {"ingest"})
        return info.id


# How to call each route so that, with the right credentials, it succeeds: a function of the
# world and the key (None: send none) giving httpx.request keyword arguments.
Call = Callable[[World, str | None], dict[str, Any]]


def _bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def keyed_get(endpoint: str, **params: Any) -> Call:
    def call(world: World, key: str | None) -> dict[str, Any]:
        return {
            "url": endpoint.format(workspace=world.workspace),
            "params": params,
            "headers": _bearer(key),
        }

    return call


def query_key_get(world: World, key: str | None) -> dict[str, Any]:
    # The Roboflow client's lookup: the key in the query string.
    return {"url": "/", "params": {} if key is None else {"api_key": key, "nocache": "true"}}


def ingest_post(world: World, key: str | None) -> dict[str, Any]:
    body = report([result("car", 0.8, model_id=MODEL)])
    return {
        "url": f"/{world.workspace}/inference-stats",
        "params": {} if key is None else {"api_key": key},
        "json": body,
    }


def create_key_post(world: World, key: str | None) -> dict[str, Any]:
    return {
        "url": f"/{world.workspace}/api/keys",
        "headers": _bearer(key),
        "json": {"scopes": ["read"], "expires_in": "1d"},
    }


def revoke_key_delete(world: World, key: str | None) -> dict[str, Any]:
    return {
        "url": f"/{world.workspace}/api/keys/{world.fresh_key_id()}",
        "headers": _bearer(key),
    }


def login_post(world: World, key: str | None) -> dict[str, Any]:
    return {"url": "/dashboard/api/login", "json": {"api_key": key or ""}}


def plain(url: str, **params: Any) -> Call:
    def call(world: World, key: str | None) -> dict[str, Any]:
        return {"url": url, "params": params}

    return call


READ_QUERIES: dict[str, dict[str, Any]] = {
    "inference-stats": {},
    "models": {},
    "classes": {"model": MODEL},
    "devices": {},
    "timeseries": {"model": MODEL},
    "histogram": {"model": MODEL},
    "samples": {},
    "trends": {"model": MODEL},
    "drift": {},
    "alerts": {},
    "notices": {},
}

ROUTES: dict[tuple[str, str], tuple[str, Call]] = {
    ("GET", "/"): ("ingest", query_key_get),
    ("POST", "/{workspace}/inference-stats"): ("ingest", ingest_post),
    ("GET", "/{workspace}/inference-stats"): ("read", keyed_get("/{workspace}/inference-stats")),
    **{
        ("GET", f"/{{workspace}}/api/{name}"): (
            "read",
            keyed_get(f"/{{workspace}}/api/{name}", **query),
        )
        for name, query in READ_QUERIES.items()
    },
    ("GET", "/{workspace}/api/keys"): ("admin", keyed_get("/{workspace}/api/keys")),
    ("POST", "/{workspace}/api/keys"): ("admin", create_key_post),
    ("DELETE", "/{workspace}/api/keys/{key_id}"): ("admin", revoke_key_delete),
    ("POST", "/dashboard/api/login"): ("read", login_post),
    ("POST", "/dashboard/api/logout"): (PUBLIC, plain("/dashboard/api/logout")),
    ("GET", "/dashboard/api/me"): (SESSION, plain("/dashboard/api/me")),
    **{
        ("GET", f"/dashboard/api/{name}"): (SESSION, plain(f"/dashboard/api/{name}", **query))
        for name, query in READ_QUERIES.items()
    },
    ("GET", "/healthz"): (PUBLIC, plain("/healthz")),
    ("GET", "/metrics"): (PUBLIC, plain("/metrics")),
    ("GET", "/dashboard"): (PUBLIC, plain("/dashboard")),
    ("GET", "/dashboard/"): (PUBLIC, plain("/dashboard/")),
    ("GET", "/dashboard/static/{asset_path:path}"): (
        PUBLIC,
        plain("/dashboard/static/dashboard.css"),
    ),
    ("GET", "/openapi.json"): (PUBLIC, plain("/openapi.json")),
    ("GET", "/docs"): (PUBLIC, plain("/docs")),
    ("GET", "/docs/oauth2-redirect"): (PUBLIC, plain("/docs/oauth2-redirect")),
    ("GET", "/redoc"): (PUBLIC, plain("/redoc")),
}

KEY_ROUTES = sorted(k for k, (scope, _) in ROUTES.items() if scope in SCOPES)
SESSION_ROUTES = sorted(k for k, (scope, _) in ROUTES.items() if scope == SESSION)
PUBLIC_ROUTES = sorted(k for k, (scope, _) in ROUTES.items() if scope == PUBLIC)


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app answers, HEAD aside (it mirrors GET).

    Included routers are walked into (FastAPI >= 0.16x keeps them as one entry of
    `app.routes` that expands into the effective routes).
    """
    found: set[tuple[str, str]] = set()

    def visit(route: Any) -> None:
        expand = getattr(route, "effective_route_contexts", None)
        if expand is not None:
            for child in expand():
                visit(child)
            return
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        assert path and methods, f"a route without path or methods: {route!r}; classify it"
        for method in methods:
            if method != "HEAD":
                found.add((method, path))

    for route in app.routes:
        visit(route)
    return found


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("matrix") / "mmagg.db"
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_database_url")
    clock = ManualClock()
    db = Database(url, clock=clock)
    # Revoked and expired keys are failed guesses; the matrix makes dozens of them.
    app = create_app(db=db, login_failures_per_minute=10_000)
    running = start_server(app)
    workspace = f"mx-{uuid.uuid4().hex[:10]}"
    keys: dict[tuple[str, str], str] = {}
    for scope in SCOPES:
        keys[(scope, "valid")] = db.create_key(workspace, {scope})
        revoked, info = db.create_key_record(workspace, {scope})
        assert db.revoke_key(info.id)
        keys[(scope, "revoked")] = revoked
        # Created two hours ago with a one-hour lifetime: expired an hour ago.
        clock.advance(-7200)
        keys[(scope, "expired")] = db.create_key(workspace, {scope}, expires_in=3600)
        clock.advance(7200)
    seeded = World(app, running.base_url, db, clock, workspace, keys)
    # Data the read routes would return, so that a refusal leaking it would show.
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        body = report([result(SECRET_CLASS, 0.9, model_id=MODEL)])
        answer = http.post(
            f"/{workspace}/inference-stats",
            params={"api_key": keys[("ingest", "valid")]},
            json=body,
        )
        assert answer.status_code == 200, answer.text
    try:
        yield seeded
    finally:
        running.stop()
        db.close()


@pytest.fixture
def http(world: World) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=world.base_url, timeout=10, follow_redirects=False) as client:
        yield client


def _send(http: httpx.Client, world: World, route: tuple[str, str], key: str | None) -> Any:
    method, _path = route
    return http.request(method, **ROUTES[route][1](world, key))


def test_every_route_of_the_app_is_classified(world: World) -> None:
    served = app_routes(world.app)
    unclassified = served - set(ROUTES)
    assert not unclassified, f"routes missing from the auth matrix: {sorted(unclassified)}"
    gone = set(ROUTES) - served
    assert not gone, f"the matrix lists routes the app no longer has: {sorted(gone)}"


@pytest.mark.parametrize("route", KEY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_key_routes_by_scope_and_key_state(
    world: World, http: httpx.Client, route: tuple[str, str]
) -> None:
    needed = ROUTES[route][0]
    for scope in SCOPES:
        for state in STATES:
            key = world.keys[(scope, state)]
            response = _send(http, world, route, key)
            where = f"{route} with a {state} {scope} key"
            assert key not in response.text, where
            if state != "valid":
                assert response.status_code == 401, (where, response.text)
                assert "unknown or revoked API key" in response.json()["detail"], where
            elif scope == needed:
                assert 200 <= response.status_code < 300, (where, response.text)
            else:
                assert response.status_code == 403, (where, response.text)
                body = response.json()
                assert set(body) == {"detail"}, where
                assert f"'{needed}' scope" in body["detail"], (where, body)
                assert f"--scope {needed}" in body["detail"], (where, body)
                assert SECRET_CLASS not in response.text and MODEL not in response.text, where
                assert "set-cookie" not in response.headers, where
    nobody = _send(http, world, route, None)
    assert nobody.status_code in (401, 422), (route, nobody.text)
    if route != ("POST", "/dashboard/api/login"):
        assert nobody.status_code == 401, (route, nobody.text)


def test_allowed_reads_return_the_data(world: World, http: httpx.Client) -> None:
    # Guards the matrix itself: the 2xx above were real answers, with the seeded class.
    response = _send(
        http, world, ("GET", "/{workspace}/inference-stats"), world.keys[("read", "valid")]
    )
    assert SECRET_CLASS in response.text


def test_dashboard_login_with_an_ingest_key_explains_what_is_needed(
    world: World, http: httpx.Client
) -> None:
    response = http.post("/dashboard/api/login", json={"api_key": world.keys[("ingest", "valid")]})
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert "dashboard" in detail and "'read' scope" in detail
    assert f"mmagg keys create --workspace {world.workspace} --scope read" in detail
    assert "set-cookie" not in response.headers


def _login(http: httpx.Client, key: str) -> httpx.Cookies:
    response = http.post("/dashboard/api/login", json={"api_key": key})
    assert response.status_code == 200, response.text
    return response.cookies


@pytest.mark.parametrize("route", SESSION_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_session_routes_live_and_die_with_their_read_key(
    world: World, route: tuple[str, str]
) -> None:
    method = route[0]
    kwargs = ROUTES[route][1](world, None)
    with httpx.Client(base_url=world.base_url, timeout=10) as anonymous:
        assert anonymous.request(method, **kwargs).status_code == 401

    # Only a valid read key opens a session: the others are refused at the login.
    for scope in SCOPES:
        for state in STATES:
            with httpx.Client(base_url=world.base_url, timeout=10) as browser:
                key = world.keys[(scope, state)]
                login = browser.post("/dashboard/api/login", json={"api_key": key})
                expected = (
                    200
                    if (scope, state) == ("read", "valid")
                    else (401 if state != "valid" else 403)
                )
                assert login.status_code == expected, (scope, state, login.text)
                answer = browser.request(method, **kwargs)
                assert answer.status_code == (200 if expected == 200 else 401), (scope, state)

    # A session ends when its key is revoked...
    key, info = world.db.create_key_record(world.workspace, {"read"})
    with httpx.Client(base_url=world.base_url, timeout=10) as browser:
        _login(browser, key)
        assert browser.request(method, **kwargs).status_code == 200
        assert world.db.revoke_key(info.id)
        gone = browser.request(method, **kwargs)
        assert gone.status_code == 401 and SECRET_CLASS not in gone.text

    # ...and when its key expires, though the session itself has hours left.
    key = world.db.create_key(world.workspace, {"read"}, expires_in=600)
    with httpx.Client(base_url=world.base_url, timeout=10) as browser:
        _login(browser, key)
        assert browser.request(method, **kwargs).status_code == 200
        world.clock.advance(601)
        try:
            assert browser.request(method, **kwargs).status_code == 401
        finally:
            world.clock.advance(-601)


@pytest.mark.parametrize("route", PUBLIC_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_public_routes_need_no_key(
    world: World, http: httpx.Client, route: tuple[str, str]
) -> None:
    for key in [None, *world.keys.values()]:
        response = _send(http, world, route, key)
        assert 200 <= response.status_code < 400, (route, response.status_code)


def test_another_workspaces_key_is_refused_whatever_its_scopes(
    world: World, http: httpx.Client
) -> None:
    other = world.db.create_key(f"other-{uuid.uuid4().hex[:8]}", {"ingest", "read", "admin"})
    for route in KEY_ROUTES:
        if route in {("GET", "/"), ("POST", "/dashboard/api/login")}:
            continue  # no workspace in the URL: the key selects its own
        response = _send(http, world, route, other)
        assert response.status_code == 403, (route, response.text)
        assert SECRET_CLASS not in response.text
