"""The FastAPI app: Roboflow-compatible ingest and read endpoints, the dashboard API, ops.

Routes (docs/server.md has the shapes):

- `GET /` workspace lookup; `POST /{workspace}/inference-stats` ingest;
  `GET /{workspace}/inference-stats` Roboflow's read endpoint.
- `/{workspace}/api/...` JSON reads by API key; `/dashboard/api/...` the same by session.
- `GET /healthz`, `GET /metrics`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Cookie, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse

from mmagg._version import __version__
from mmagg.server.alerts import AlertEngine
from mmagg.server.api import (
    EndTime,
    ModelNames,
    StartTime,
    build_api_router,
    inference_stats_response,
    reject_unstorable_query,
)
from mmagg.server.auth import ADMIN, INGEST, READ, require_dashboard_scope, require_scope
from mmagg.server.bounds import TimestampError, place, unstorable_reason
from mmagg.server.clients import TrustedProxies
from mmagg.server.db import (
    FOLD_INTERVAL_SECONDS,
    SESSION_TTL_SECONDS,
    Database,
    KeyRevokedError,
    LimitCheck,
    PendingReport,
    Principal,
    RateLimitedError,
    StoredReport,
    hash_secret,
)
from mmagg.server.errors import ApiError, BodyTooLargeError
from mmagg.server.gcguard import collector_paused
from mmagg.server.groupcommit import GroupCommit
from mmagg.server.guards import BodyLimitMiddleware, install_log_redaction
from mmagg.server.guards import RedactApiKeys as RedactApiKeys  # re-exported
from mmagg.server.guards import redact_keys as redact_keys  # re-exported
from mmagg.server.keys_api import build_keys_router
from mmagg.server.lease import Lease
from mmagg.server.metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from mmagg.server.monitoring_api import build_monitoring_router
from mmagg.server.ratelimit import DatabaseFailureLimiter, FailureLimiter, RedisFailureLimiter
from mmagg.server.responses import (
    ErrorResponse,
    HealthResponse,
    InferenceStatsResponse,
    IngestResponse,
    LogoutResponse,
    WorkspaceResponse,
    documented,
)
from mmagg.server.retention import Retention, RetentionError
from mmagg.server.schemas import (
    REPORT_ADAPTER,
    LoginRequest,
    ReportInvalidError,
    error_details,
    parse_report,
)
from mmagg.wire import MAX_BODY_BYTES

logger = logging.getLogger("mmagg.server")

DEFAULT_DATABASE_URL = "sqlite:///mmagg.db"
DEFAULT_BODY_LIMIT = MAX_BODY_BYTES
SESSION_COOKIE = "mmagg_session"
MAX_IDEMPOTENCY_KEY = 255
# Reports up to this size are stored on the event loop on SQLite (~200 results): measured by
# benchmarks/healthz_under_ingest.py, larger ones go to a worker thread.
INLINE_INGEST_BYTES = 32 * 1024
DEFAULT_LOGIN_FAILURES_PER_MINUTE = 10


def request_api_key(request: Request) -> str | None:
    """The key from `?api_key=` or `Authorization: Bearer`, whichever is present."""
    key = request.query_params.get("api_key")
    if key:
        return key
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


_MISSING_KEY = "missing API key: pass ?api_key=KEY or the header 'Authorization: Bearer KEY'"
_BAD_KEY = "unknown or revoked API key (an expired key counts as revoked)"
_OTHER_WORKSPACE = "this API key does not belong to workspace in the URL"


def _checked_principal(
    db: Database,
    limiter: FailureLimiter,
    client: str,
    key: str | None,
    workspace: str | None,
    scope: str | None = None,
    *,
    cached: bool = False,
) -> Principal:
    """The principal of `key`, behind the per-client limit on failed key checks (429).

    Every keyed route goes through here (ingest, reads, lookup, login), so a guesser gets
    the same few attempts a minute wherever they try. A missing key takes no token (nothing
    was guessed: a health check probing `GET /`, say), nor does a valid key of another
    workspace (403) or a valid key without `scope` (403 naming the scope).
    With `cached`, a key checked lately is not looked up again (`Database.cached_principal`).
    """
    if key is None:
        raise ApiError(401, _MISSING_KEY, reason="unauthorized")
    with db.read() as conn:  # one checkout for the limit and the key
        wait = limiter.retry_after(client, conn)
        if wait:
            raise _rate_limited(wait)
        # `cached`: ingest's fast path, whose report is stored only if its key is still
        # active when the storing transaction checks it again (`PendingReport.key_digest`).
        principal = db.cached_principal(key) if cached else None
        if principal is None:
            principal = db.authenticate(key, conn)
    if principal is None:
        limiter.failed(client)
        raise ApiError(401, _BAD_KEY, reason="unauthorized")
    if workspace is not None and principal.workspace != workspace:
        raise ApiError(403, _OTHER_WORKSPACE, reason="forbidden")
    if scope is not None:
        require_scope(principal.scopes, scope, principal.workspace)
    return principal


def _rate_limited(wait: int) -> ApiError:
    """The 429 of a client whose failed-key-check bucket is empty."""
    return ApiError(
        429,
        f"too many failed API key attempts from this address: retry in {wait} s",
        reason="rate_limited",
        headers={"Retry-After": str(wait)},
    )


def _client_address(request: Request) -> str:
    """The address failed key checks are counted under (`mmagg.server.clients`)."""
    peer = request.client.host if request.client else "unknown"
    proxies: TrustedProxies = request.app.state.trusted_proxies
    return proxies.client(peer, request.headers.getlist("x-forwarded-for"))


def _guarded_principal(request: Request, key: str | None) -> Principal:
    """`_checked_principal` for routes without a workspace in the URL."""
    limiter: FailureLimiter = request.app.state.login_limiter
    return _checked_principal(request.app.state.db, limiter, _client_address(request), key, None)


def key_principal(request: Request, workspace: str) -> Principal:
    """Dependency: the workspace's principal from a `read` API key; 401/403/429 otherwise."""
    limiter: FailureLimiter = request.app.state.login_limiter
    return _checked_principal(
        request.app.state.db,
        limiter,
        _client_address(request),
        request_api_key(request),
        workspace,
        READ,
    )


def admin_principal(request: Request, workspace: str) -> Principal:
    """Dependency: the workspace's principal from an `admin` API key; 401/403/429 otherwise."""
    limiter: FailureLimiter = request.app.state.login_limiter
    return _checked_principal(
        request.app.state.db,
        limiter,
        _client_address(request),
        request_api_key(request),
        workspace,
        ADMIN,
    )


def session_principal(
    request: Request, mmagg_session: Annotated[str | None, Cookie()] = None
) -> Principal:
    """Dependency: the principal of the dashboard session cookie; 401 otherwise."""
    if not mmagg_session:
        raise ApiError(401, "not logged in: POST /dashboard/api/login", reason="unauthorized")
    db: Database = request.app.state.db
    principal = db.session_principal(mmagg_session)
    if principal is None:
        raise ApiError(401, "session expired or logged out: log in again", reason="unauthorized")
    require_scope(principal.scopes, READ, principal.workspace)
    return principal


@dataclass(frozen=True)
class _IngestContext:
    db: Database
    metrics: Metrics
    limiter: FailureLimiter
    client: str
    retention_seconds: float | None


def _prepare(
    ctx: _IngestContext,
    key: str,
    workspace: str,
    body: bytes,
    idempotency_key: str | None,
) -> PendingReport | JSONResponse:
    """Authenticate and validate one report: the report to store, or the 422 to answer.

    The key check may come from memory (`cached`); before a 422 the key is looked up for
    real, so a revoked key still gets its 401 whatever the body.
    """
    principal, limit = _ingest_principal(ctx, key, workspace)
    received_at = time.time()
    try:
        report = parse_report(body, sliced_above=INLINE_INGEST_BYTES)
    except ReportInvalidError as error:
        _checked_principal(ctx.db, ctx.limiter, ctx.client, key, workspace, INGEST)
        ctx.metrics.reject("invalid")
        return JSONResponse({"detail": error_details(error.errors, secret=key)}, status_code=422)
    try:
        placement = place(report.timestamp, received_at, ctx.retention_seconds)
    except TimestampError as error:
        _checked_principal(ctx.db, ctx.limiter, ctx.client, key, workspace, INGEST)
        raise ApiError(422, f"timestamp: {error}", reason="invalid", field="timestamp") from None
    return PendingReport(principal, report, idempotency_key, placement, hash_secret(key), limit)


def _ingest_principal(
    ctx: _IngestContext, key: str, workspace: str
) -> tuple[Principal, LimitCheck | None]:
    """Ingest's key check: `_checked_principal` with `cached`, or without any query.

    With the limiter's buckets in the database and the key checked lately, neither the
    bucket nor the key is read here: both are checked by the transaction storing the report
    (`PendingReport.key_digest` and `.limit`), which answers 401 or 429 as this check would
    have. Anything but a plain success (another workspace, a missing scope) goes through
    the full check, so that an empty bucket still answers 429 first.
    """
    if isinstance(ctx.limiter, DatabaseFailureLimiter):
        principal = ctx.db.cached_principal(key)
        if (
            principal is not None
            and principal.workspace == workspace
            and INGEST in principal.scopes
        ):
            return principal, ctx.limiter.deferred(ctx.client)
    principal = _checked_principal(
        ctx.db, ctx.limiter, ctx.client, key, workspace, INGEST, cached=True
    )
    return principal, None


def _answer(ctx: _IngestContext, outcome: StoredReport | Exception) -> JSONResponse:
    """The response to a stored report (or the error storing it raised)."""
    if isinstance(outcome, KeyRevokedError):
        # Revoked (or expired) after the request was let in: nothing was stored.
        ctx.limiter.failed(ctx.client)
        raise ApiError(401, _BAD_KEY, reason="unauthorized")
    if isinstance(outcome, RateLimitedError):
        raise _rate_limited(outcome.retry_after)
    if isinstance(outcome, Exception):
        raise outcome
    metrics = ctx.metrics
    headers = {}
    if outcome.duplicate:
        metrics.duplicates.inc()
        headers["Idempotent-Replayed"] = "true"
    else:
        metrics.reports_received.inc()
        metrics.results_stored.inc(outcome.result_count)
    return JSONResponse(
        {"status": "ok", "report_id": outcome.report_id, "results": outcome.result_count},
        headers=headers,
    )


async def ingest(request: Request) -> JSONResponse:
    """`POST /{workspace}/inference-stats`: authenticate, validate and store one report."""
    workspace: str = request.path_params["workspace"]
    key = request_api_key(request)
    if key is None:
        raise ApiError(401, _MISSING_KEY, reason="unauthorized")
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and (reason := unstorable_reason(idempotency_key)):
        raise ApiError(
            422, f"Idempotency-Key: {reason}", reason="invalid", field="header.Idempotency-Key"
        )
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            422,
            f"Idempotency-Key: expected 1-{MAX_IDEMPOTENCY_KEY} characters, "
            f"got {len(idempotency_key)}",
            reason="invalid",
            field="header.Idempotency-Key",
        )
    body = await request.body()
    state = request.app.state
    ctx = _IngestContext(
        state.db,
        state.metrics,
        state.login_limiter,
        _client_address(request),
        state.retention_seconds,
    )
    if len(body) > INLINE_INGEST_BYTES:
        # A large report would hold the event loop (and every other request) for as long
        # as it takes to validate and write: auth, validation and the write share one
        # worker-thread hop instead, outside the group commit.
        return await anyio.to_thread.run_sync(
            _ingest_large, ctx, key, workspace, body, idempotency_key
        )
    if ctx.db.dialect != "sqlite" and ctx.db.cached_principal(key) is None:
        # A key not checked lately costs a database round trip: off the event loop.
        prepared = await anyio.to_thread.run_sync(
            _prepare, ctx, key, workspace, body, idempotency_key
        )
    else:
        # Small reports are validated on the event loop (cheaper than a thread hop) and
        # stored by the group commit with the reports of concurrent requests.
        prepared = _prepare(ctx, key, workspace, body, idempotency_key)
    if isinstance(prepared, JSONResponse):
        return prepared
    writer: GroupCommit = state.group_commit
    try:
        outcome: StoredReport | Exception = await writer.store(prepared)
    except (KeyRevokedError, RateLimitedError) as error:
        outcome = error
    return _answer(ctx, outcome)


def _ingest_large(
    ctx: _IngestContext, key: str, workspace: str, body: bytes, idempotency_key: str | None
) -> JSONResponse:
    with collector_paused():
        prepared = _prepare(ctx, key, workspace, body, idempotency_key)
        if isinstance(prepared, JSONResponse):
            return prepared
        return _answer(ctx, ctx.db.store_reports([prepared])[0])


def _routes(session_ttl: float, secure_cookies: bool) -> tuple[APIRouter, APIRouter]:
    dashboard = APIRouter(prefix="/dashboard/api")

    @dashboard.post("/login", responses=documented(WorkspaceResponse, 401, 403, 413, 422, 429))
    def login(request: Request, credentials: LoginRequest) -> JSONResponse:
        db: Database = request.app.state.db
        principal = _guarded_principal(request, credentials.api_key)
        require_dashboard_scope(principal.scopes, principal.workspace)
        token = db.create_session(principal, ttl=session_ttl)
        response = JSONResponse({"workspace": principal.workspace})
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(session_ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
        )
        return response

    @dashboard.post("/logout", responses=documented(LogoutResponse, 422))
    def logout(
        request: Request, mmagg_session: Annotated[str | None, Cookie()] = None
    ) -> JSONResponse:
        if mmagg_session:
            request.app.state.db.delete_session(mmagg_session)
        response = JSONResponse({"status": "logged out"})
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookies
        )
        return response

    @dashboard.get("/me", responses=documented(WorkspaceResponse, 401))
    def me(principal: Annotated[Principal, Depends(session_principal)]) -> dict[str, str]:
        return {"workspace": principal.workspace}

    dashboard.include_router(build_api_router(session_principal))
    dashboard.include_router(build_monitoring_router(session_principal))

    public = APIRouter()

    @public.get("/healthz", responses=documented(HealthResponse))
    def healthz(request: Request) -> dict[str, str]:
        with request.app.state.db.read() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "version": __version__}

    @public.get("/metrics", response_class=PlainTextResponse)
    def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @public.get("/", responses=documented(WorkspaceResponse, 401, 403, 429))
    def lookup(request: Request) -> dict[str, str]:
        principal = _guarded_principal(request, request_api_key(request))
        require_scope(principal.scopes, INGEST, principal.workspace)
        return {"workspace": principal.workspace}

    @public.get(
        "/{workspace}/inference-stats",
        responses=documented(InferenceStatsResponse, 401, 403, 422),
        dependencies=[Depends(reject_unstorable_query)],
    )
    def read_stats(
        request: Request,
        principal: Annotated[Principal, Depends(key_principal)],
        start_time: StartTime = None,
        end_time: EndTime = None,
        model_names: ModelNames = None,
    ) -> JSONResponse:
        return inference_stats_response(request, principal, start_time, end_time, model_names)

    keyed = APIRouter(prefix="/{workspace}/api")
    keyed.include_router(build_api_router(key_principal))
    keyed.include_router(build_keys_router(admin_principal))
    keyed.include_router(build_monitoring_router(key_principal))
    public.include_router(keyed)
    return dashboard, public


_SCHEMA_REF = "#/components/schemas/{model}"


def _ingest_operation(components: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for the ingest route, which is a plain route FastAPI does not describe."""
    for model in (IngestResponse, ErrorResponse):
        model_schema = model.model_json_schema(ref_template=_SCHEMA_REF)
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    report_schema = REPORT_ADAPTER.json_schema(ref_template=_SCHEMA_REF)
    components.update(report_schema.pop("$defs", {}))
    components["Report"] = report_schema

    def answer(description: str, model: str) -> dict[str, Any]:
        content = {"application/json": {"schema": {"$ref": _SCHEMA_REF.format(model=model)}}}
        return {"description": description, "content": content}

    return {
        "summary": "Store one report (docs/wire-format.md)",
        "operationId": "ingest_report",
        "parameters": [
            {"name": "workspace", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "api_key", "in": "query", "required": False, "schema": {"type": "string"}},
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Report"}}},
        },
        "responses": {
            "200": answer("Stored, or a replay of an earlier Idempotency-Key", "IngestResponse"),
            "401": answer("No key, or an unknown or revoked key", "ErrorResponse"),
            "403": answer(
                "A key of another workspace, or one without the 'ingest' scope", "ErrorResponse"
            ),
            "413": answer("Body over the limit", "ErrorResponse"),
            "422": answer("Schema error, naming the field", "ErrorResponse"),
        },
    }


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            path = schema["paths"].setdefault("/{workspace}/inference-stats", {})
            path["post"] = _ingest_operation(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _api_error_response(metrics: Metrics, request: Request, error: ApiError) -> JSONResponse:
    """The response to an `ApiError`, counted, the request's key blanked out of it."""
    metrics.reject(error.reason)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    secret = request_api_key(request)
    if secret and secret in error.detail:
        error.detail = error.detail.replace(secret, "***")
    return error.response(headers)


def _route_path(scope: Any) -> str:
    """The path the router matches: `path` without the `root_path` mount prefix."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class IngestFastPath:
    """The app's outermost layer: `POST /{workspace}/inference-stats` straight to `ingest`.

    Ingest takes nearly all the traffic, and the middleware stack (FastAPI's server-error,
    telemetry, body-limit, exception and exit-stack layers, ours for metrics and the body
    limit) with the router and the request wrapper cost it about as much CPU as validating
    its report. So a report with a declared `Content-Length` within the limit is served
    here, doing what those layers do for it: routing's fields (`endpoint`, `route`,
    `path_params`) set as the router sets them, the latency observed under the route
    template, an `ApiError` answered as the app's exception handler answers it, any other
    error answered 500 and re-raised to the server's log, as Starlette's server-error
    middleware does. Everything else (other routes, a chunked or oversized body) goes
    through the full stack untouched, which answers the 413s.
    """

    def __init__(self, app: Any, fastapi_app: FastAPI, route: Any, metrics: Metrics, limit: int):
        self.app = app
        self.fastapi_app = fastapi_app
        self.route = route
        self.metrics = metrics
        self.limit = limit
        self._latency: dict[int, Any] = {}

    def _declared_within_limit(self, scope: Any) -> bool:
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if declared is not None or not value.isdigit():
                    return False
                declared = int(value)
            elif name == b"transfer-encoding":
                return False
        return declared is not None and declared <= self.limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = self.route.path_regex.match(_route_path(scope))
            if match is not None and self._declared_within_limit(scope):
                await self._ingest(scope, receive, send, match.groupdict())
                return
        await self.app(scope, receive, send)

    async def _ingest(self, scope: Any, receive: Any, send: Any, params: dict[str, str]) -> None:
        started = time.perf_counter()
        scope["app"] = self.fastapi_app
        scope["endpoint"] = ingest
        scope["route"] = self.route
        scope["path_params"] = {**scope.get("path_params", {}), **params}
        request = Request(scope, receive, send)
        try:
            try:
                response = await ingest(request)
            except ApiError as error:
                response = _api_error_response(self.metrics, request, error)
        except Exception:
            self._observe(500, started)
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        await response(scope, receive, send)
        self._observe(response.status_code, started)

    def _observe(self, status: int, started: float) -> None:
        """What `MetricsMiddleware` records for a request (children made on first use)."""
        child = self._latency.get(status // 100)
        if child is None:
            child = self.metrics.latency.labels(
                method="POST", route=self.route.path, status=f"{status // 100}xx"
            )
            self._latency[status // 100] = child
        child.observe(time.perf_counter() - started)


def _wrap_stack(app: FastAPI, wrapper: Any) -> None:
    """Put `wrapper(stack)` outside the middleware stack Starlette builds on first call."""
    build = app.build_middleware_stack

    def build_wrapped() -> Any:
        return wrapper(build())

    app.build_middleware_stack = build_wrapped  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return _api_error_response(metrics, request, error)

    async def too_large(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, BodyTooLargeError)
        # BodyLimitMiddleware answers (and counts) it; this is for an app served without it.
        return JSONResponse(
            {"detail": f"request body: expected at most {error.limit} bytes, got more"},
            status_code=413,
            headers={"Connection": "close"},
        )

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        metrics.reject("invalid")
        secret = request_api_key(request)
        return JSONResponse(
            {"detail": error_details(list(error.errors()), secret=secret)}, status_code=422
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BodyTooLargeError, too_large)
    app.add_exception_handler(RequestValidationError, invalid_request)


PRUNE_INTERVAL_SECONDS = 3600.0
RETENTION_LEASE = "retention"


def retention_settings(
    retention_days: float | None,
    keep_minute_rollups: float | None = None,
    keep_hour_rollups: float | None = None,
    keep_day_rollups: float | None = None,
) -> Retention | None:
    """The `Retention` of these options (None: keep everything); `RetentionError` naming the
    option for a rollup kept shorter than a finer kind, or kept without `--retention-days`.

    Example:
        >>> retention_settings(7, keep_hour_rollups=400).days_of(3600)
        400.0
    """
    if retention_days is None:
        for option, days in (
            ("--keep-minute-rollups", keep_minute_rollups),
            ("--keep-hour-rollups", keep_hour_rollups),
            ("--keep-day-rollups", keep_day_rollups),
        ):
            if days is not None:
                raise RetentionError(
                    f"{option}: expected together with --retention-days (without it nothing "
                    f"is deleted), got {option} {days:g} alone"
                )
        return None
    return Retention(retention_days, keep_minute_rollups, keep_hour_rollups, keep_day_rollups)


async def _prune_forever(
    db: Database, retention: Retention, lease: Lease, metrics: Metrics
) -> None:
    """Every hour, delete what is past retention, in whichever process holds the lease.

    The lease outlives two intervals, so the holder keeps it from one pass to the next and
    the other processes (workers, instances on the same database) skip theirs; when the
    holder stops, another one takes over at its next pass after the lease expired.
    """
    while True:
        try:
            if await anyio.to_thread.run_sync(lease.acquire, time.time()):
                bounds = retention.bounds(time.time())
                removed = await anyio.to_thread.run_sync(
                    functools.partial(db.prune, bounds.raw, rollups_before=bounds.levels)
                )
                metrics.retention_runs.inc()
                if removed:
                    logger.info(
                        "mmagg: pruned %d reports older than %s days", removed, retention.raw_days
                    )
        except Exception:  # a failed prune must not take the server down; retried next hour
            logger.exception("mmagg: pruning reports older than %s days failed", retention.raw_days)
        await anyio.sleep(PRUNE_INTERVAL_SECONDS)


MEDIAN_DIGEST_INTERVAL_SECONDS = 60.0
MEDIAN_DIGEST_LEASE = "median-digests"
# Between two passes of a catch-up (a pass's budget ran out): room for ingest and reads.
_CATCH_UP_PAUSE_SECONDS = 1.0


async def _median_digests_forever(
    db: Database,
    lease: Lease,
    metrics: Metrics,
    interval: float,
    retention_days: float | None,
) -> None:
    """Every `interval` seconds, build the missing or stale median digests
    (`Database.build_median_digests`) in whichever process holds the lease; a pass that
    left work (a catch-up over history) is followed by the next after a short pause."""
    while True:
        pause = interval
        try:
            now = db.clock()
            if await anyio.to_thread.run_sync(lease.acquire, now):
                keep_after = None if retention_days is None else now - retention_days * 86400
                built = await anyio.to_thread.run_sync(db.build_median_digests, now, keep_after)
                metrics.median_digests_built.labels(level="hour").inc(built.hours)
                metrics.median_digests_built.labels(level="day").inc(built.days)
                if built.more:
                    pause = min(interval, _CATCH_UP_PAUSE_SECONDS)
        except Exception:  # a failed pass must not take the server down; retried next time
            logger.exception("mmagg: building median digests failed")
        await anyio.sleep(pause)


ROLLUP_LEASE = "rollups"


async def _fold_forever(db: Database, lease: Lease, metrics: Metrics, interval: float) -> None:
    """Every `interval` seconds, fold the new results into the rollups (`fold_rollups`), in
    whichever process holds the rollup lease; every process keeps its lag gauge current.

    The lease outlives several intervals, so the holder keeps it; when it stops, another
    process takes over once the lease expired.
    """
    while True:
        try:
            if await anyio.to_thread.run_sync(lease.acquire, time.time()):
                folded = await anyio.to_thread.run_sync(db.fold_rollups)
                metrics.rollup_folded.inc(folded)
            metrics.rollup_lag.set(await anyio.to_thread.run_sync(db.rollup_lag))
        except Exception:  # reads stay exact while the job lags; retried next interval
            logger.exception("mmagg: folding results into the rollups failed")
        await anyio.sleep(interval)


async def _partitions_forever(db: Database) -> None:
    """PostgreSQL: keep the partitions of today and the next days made ahead (hourly)."""
    partition_set = db.partitions
    while partition_set is not None:
        await anyio.sleep(PRUNE_INTERVAL_SECONDS)
        try:
            await anyio.to_thread.run_sync(partition_set.prepare)
        except Exception:  # retried next hour; a report's own day is made on arrival anyway
            logger.exception("mmagg: creating the next days' partitions failed")


def create_app(
    database_url: str | None = None,
    *,
    db: Database | None = None,
    body_limit: int = DEFAULT_BODY_LIMIT,
    session_ttl: float = SESSION_TTL_SECONDS,
    secure_cookies: bool = False,
    retention_days: float | None = None,
    keep_minute_rollups: float | None = None,
    keep_hour_rollups: float | None = None,
    keep_day_rollups: float | None = None,
    login_failures_per_minute: int = DEFAULT_LOGIN_FAILURES_PER_MINUTE,
    alerts: AlertEngine | None = None,
    trusted_proxies: Sequence[str] | str | None = None,
    redis_url: str | None = None,
    median_digest_interval: float | None = MEDIAN_DIGEST_INTERVAL_SECONDS,
    rollup_interval: float | None = FOLD_INTERVAL_SECONDS,
) -> FastAPI:
    """Build the backend app on `database_url` (or an open `db`), migrating its schema.

    `database_url` defaults to `$MMAGG_DATABASE_URL`, else `sqlite:///mmagg.db`. Set
    `secure_cookies` when the dashboard is served over HTTPS. With `retention_days`, reports
    older than that are deleted at start-up and then every hour; `keep_minute_rollups`,
    `keep_hour_rollups` and `keep_day_rollups` keep those rollups (and the hour and day
    median digests) longer, in days (`mmagg.server.retention`; `RetentionError` when they
    are shorter than a finer kind, or given without `retention_days`). A client (IP address) gets
    `login_failures_per_minute` failed attempts at `POST /dashboard/api/login` and
    `GET /?api_key=` per minute, in bursts of as many; past that, 429 with `Retry-After`.
    `alerts` (an `AlertEngine` on the same database) is evaluated every `alerts.interval`
    seconds while the app runs (docs/alerts.md).
    Failed key checks on every other keyed route (ingest, reads) count the same. The
    buckets are in the database, or in Redis at `redis_url` (`mmagg.server.ratelimit`), so
    that every process serving the database shares them. Retention runs in one of those
    processes at a time (a database lease, `mmagg.server.lease`), and so does the rollup
    job, every `rollup_interval` seconds (None: never; `Database.fold_rollups`).
    `X-Forwarded-For` names the client only on requests from `trusted_proxies` (addresses
    or networks, a list or a comma-separated string; `mmagg.server.clients`).
    Every `median_digest_interval` seconds (None: never) one process builds the median
    digests that serve `inference-stats`' exact median (`mmagg.server.medians`).

    Example:
        >>> app = create_app("sqlite://")
        >>> key = app.state.db.create_key("acme")
        >>> # uvicorn.run(app, host="127.0.0.1", port=9090)
    """
    retention = retention_settings(
        retention_days, keep_minute_rollups, keep_hour_rollups, keep_day_rollups
    )
    if db is None:
        url = database_url or os.environ.get("MMAGG_DATABASE_URL") or DEFAULT_DATABASE_URL
        db = Database(url)
    metrics = Metrics()
    owned_db = db
    install_log_redaction()
    limiter: FailureLimiter
    if redis_url is not None:
        limiter = RedisFailureLimiter(redis_url, failures=login_failures_per_minute, period=60.0)
    else:
        limiter = DatabaseFailureLimiter(db, failures=login_failures_per_minute, period=60.0)
    retention_lease = Lease(db, RETENTION_LEASE, ttl=2 * PRUNE_INTERVAL_SECONDS)
    digest_lease = (
        None
        if median_digest_interval is None
        else Lease(db, MEDIAN_DIGEST_LEASE, ttl=max(2 * median_digest_interval, 120.0))
    )
    rollup_lease = (
        None
        if rollup_interval is None
        else Lease(db, ROLLUP_LEASE, ttl=max(30.0, 6 * rollup_interval))
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            if retention is not None:
                tasks.start_soon(_prune_forever, owned_db, retention, retention_lease, metrics)
            if owned_db.partitions is not None:
                tasks.start_soon(_partitions_forever, owned_db)
            if digest_lease is not None and median_digest_interval is not None:
                tasks.start_soon(
                    _median_digests_forever,
                    owned_db,
                    digest_lease,
                    metrics,
                    median_digest_interval,
                    retention_days,
                )
            if alerts is not None:
                tasks.start_soon(alerts.run)
            if rollup_lease is not None and rollup_interval is not None:
                tasks.start_soon(_fold_forever, owned_db, rollup_lease, metrics, rollup_interval)
            yield
            tasks.cancel_scope.cancel()
        if alerts is not None:
            alerts.close()
        if retention_days is not None:
            retention_lease.release()
        if digest_lease is not None:
            digest_lease.release()
        if rollup_lease is not None:
            rollup_lease.release()
        limiter.close()
        owned_db.close()

    app = FastAPI(
        title="mmagg backend",
        version=__version__,
        summary="Self-hosted Model Monitoring backend (Roboflow-compatible ingest).",
        lifespan=lifespan,
    )
    app.state.db = db
    app.state.group_commit = GroupCommit(db, on_batch=metrics.batch_reports.observe)
    app.state.metrics = metrics
    app.state.alerts = alerts
    if alerts is not None:
        alerts.attach_metrics(metrics.registry)
    app.state.login_limiter = limiter
    app.state.trusted_proxies = (
        TrustedProxies.parse(trusted_proxies)
        if isinstance(trusted_proxies, str) or trusted_proxies is None
        else TrustedProxies(trusted_proxies)
    )
    app.state.retention_seconds = None if retention_days is None else retention_days * 86400.0
    _install_error_handlers(app, metrics)

    dashboard_api, public = _routes(session_ttl, secure_cookies)
    # Routes are tried in order. Ingest takes nearly all the traffic, so it comes first, as
    # a plain Starlette route (served by `IngestFastPath`, which matches its template before
    # the router): no dependency solving on the hottest path. Then the fixed /dashboard
    # routes, which the /{workspace}/... routes would otherwise capture.
    app.router.add_route("/{workspace}/inference-stats", ingest, methods=["POST"])
    ingest_route = app.router.routes[-1]
    app.include_router(dashboard_api)
    page = _dashboard_page_router()
    if page is not None:
        app.include_router(page)
    app.include_router(public)

    _install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _wrap_stack(
        app,
        lambda stack: IngestFastPath(stack, app, ingest_route, metrics, body_limit),
    )
    return app


def _dashboard_page_router() -> APIRouter | None:
    try:
        module = importlib.import_module("mmagg.server.dashboard")
    except ModuleNotFoundError as error:
        # Only a missing dashboard module is expected; a bug inside it must surface.
        if error.name != "mmagg.server.dashboard":
            raise
        return None
    router: APIRouter = module.router
    return router
