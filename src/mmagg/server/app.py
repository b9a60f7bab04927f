"""The FastAPI app: Roboflow-compatible ingest and read endpoints, the dashboard API, ops.

Routes (docs/server.md has the shapes):

- `GET /` workspace lookup; `POST /{workspace}/inference-stats` ingest;
  `GET /{workspace}/inference-stats` Roboflow's read endpoint.
- `/{workspace}/api/...` JSON reads by API key; `/dashboard/api/...` the same by session.
- `GET /healthz`, `GET /metrics`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
import pydantic
from fastapi import APIRouter, Cookie, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse

from mmagg._version import __version__
from mmagg.server.api import (
    EndTime,
    ModelNames,
    StartTime,
    build_api_router,
    inference_stats_response,
)
from mmagg.server.db import SESSION_TTL_SECONDS, Database, Principal
from mmagg.server.errors import ApiError, BodyTooLargeError
from mmagg.server.metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from mmagg.server.ratelimit import FailureLimiter
from mmagg.server.responses import (
    ErrorResponse,
    HealthResponse,
    InferenceStatsResponse,
    IngestResponse,
    LogoutResponse,
    WorkspaceResponse,
    documented,
)
from mmagg.server.schemas import REPORT_ADAPTER, LoginRequest, error_details
from mmagg.wire import MAX_BODY_BYTES

logger = logging.getLogger("mmagg.server")

DEFAULT_DATABASE_URL = "sqlite:///mmagg.db"
DEFAULT_BODY_LIMIT = MAX_BODY_BYTES
SESSION_COOKIE = "mmagg_session"
MAX_IDEMPOTENCY_KEY = 255
DEFAULT_LOGIN_FAILURES_PER_MINUTE = 10


class BodyLimitMiddleware:
    """Reject bodies over `limit` bytes: by Content-Length up front, else while streaming.

    Checking the declared length alone would let a chunked upload through, so the wrapped
    `receive` counts the bytes actually read and raises `BodyTooLargeError` past the limit.
    """

    def __init__(self, app: Any, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit or declared < 0:
                    self.metrics.reject("too_large" if declared > self.limit else "invalid")
                    status = 413 if declared > self.limit else 400
                    detail = (
                        f"request body: expected at most {self.limit} bytes, "
                        f"Content-Length says {declared}"
                        if status == 413
                        else "Content-Length: expected a non-negative integer"
                    )
                    response = JSONResponse(
                        {"detail": detail}, status_code=status, headers={"Connection": "close"}
                    )
                    await response(scope, receive, send)
                    return
        received = 0

        async def counting_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, counting_receive, send)


_KEY_IN_QUERY = re.compile(r"(api_key=)[^&\s\"]+", re.IGNORECASE)


class RedactApiKeys(logging.Filter):
    """Log filter replacing `api_key=...` in messages and their arguments with `***`.

    uvicorn's access log prints the full path, query string included, and the Roboflow
    dialect carries the key there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _KEY_IN_QUERY.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _KEY_IN_QUERY.sub(r"\1***", record.msg)
        return True


def install_log_redaction() -> None:
    """Attach `RedactApiKeys` to uvicorn's loggers once."""
    for name in ("uvicorn.access", "uvicorn.error"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeys) for f in target.filters):
            target.addFilter(RedactApiKeys())


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
_BAD_KEY = "unknown or revoked API key"
_OTHER_WORKSPACE = "this API key does not belong to workspace in the URL"


def _principal_for_key(db: Database, key: str | None, workspace: str | None) -> Principal:
    if key is None:
        raise ApiError(401, _MISSING_KEY, reason="unauthorized")
    principal = db.authenticate(key)
    if principal is None:
        raise ApiError(401, _BAD_KEY, reason="unauthorized")
    if workspace is not None and principal.workspace != workspace:
        raise ApiError(403, _OTHER_WORKSPACE, reason="forbidden")
    return principal


def _client_address(request: Request) -> str:
    # uvicorn puts the X-Forwarded-For address here for proxies it trusts
    # (--forwarded-allow-ips, 127.0.0.1 by default).
    return request.client.host if request.client else "unknown"


def _guarded_principal(request: Request, key: str | None) -> Principal:
    """`_principal_for_key` behind the per-client limit on failed attempts (429)."""
    if key is None:
        # Nothing was guessed (a health check probing `GET /`, say): no token taken, so
        # such probes cannot lock out the logins of clients sharing their address.
        raise ApiError(401, _MISSING_KEY, reason="unauthorized")
    limiter: FailureLimiter = request.app.state.login_limiter
    client = _client_address(request)
    wait = limiter.retry_after(client)
    if wait:
        raise ApiError(
            429,
            f"too many failed API key attempts from this address: retry in {wait} s",
            reason="rate_limited",
            headers={"Retry-After": str(wait)},
        )
    try:
        return _principal_for_key(request.app.state.db, key, None)
    except ApiError:
        limiter.failed(client)
        raise


def key_principal(request: Request, workspace: str) -> Principal:
    """Dependency: the workspace's principal from an API key; 401/403 otherwise."""
    return _principal_for_key(request.app.state.db, request_api_key(request), workspace)


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
    return principal


def _ingest(
    db: Database,
    metrics: Metrics,
    key: str,
    workspace: str,
    body: bytes,
    idempotency_key: str | None,
) -> JSONResponse:
    principal = _principal_for_key(db, key, workspace)
    try:
        report = REPORT_ADAPTER.validate_json(body)
    except pydantic.ValidationError as error:
        metrics.reject("invalid")
        return JSONResponse(
            {"detail": error_details(error.errors(include_url=False), secret=key)},
            status_code=422,
        )
    stored = db.store_report(principal, report, idempotency_key)
    headers = {}
    if stored.duplicate:
        metrics.duplicates.inc()
        headers["Idempotent-Replayed"] = "true"
    else:
        metrics.reports_received.inc()
        metrics.results_stored.inc(stored.result_count)
    return JSONResponse(
        {"status": "ok", "report_id": stored.report_id, "results": stored.result_count},
        headers=headers,
    )


async def ingest(request: Request) -> JSONResponse:
    """`POST /{workspace}/inference-stats`: authenticate, validate and store one report."""
    workspace: str = request.path_params["workspace"]
    key = request_api_key(request)
    if key is None:
        raise ApiError(401, _MISSING_KEY, reason="unauthorized")
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            422,
            f"Idempotency-Key: expected 1-{MAX_IDEMPOTENCY_KEY} characters, "
            f"got {len(idempotency_key)}",
            reason="invalid",
            field="header.Idempotency-Key",
        )
    body = await request.body()
    db: Database = request.app.state.db
    metrics: Metrics = request.app.state.metrics
    if db.dialect == "sqlite":
        # SQLite writes are serialised and mostly Python-side CPU: running them on the
        # event loop avoids a thread hop and GIL hand-offs that cost more than the write.
        return _ingest(db, metrics, key, workspace, body, idempotency_key)
    # Auth, validation and the write share one worker-thread hop.
    return await anyio.to_thread.run_sync(
        _ingest, db, metrics, key, workspace, body, idempotency_key
    )


def _routes(session_ttl: float, secure_cookies: bool) -> tuple[APIRouter, APIRouter]:
    dashboard = APIRouter(prefix="/dashboard/api")

    @dashboard.post("/login", responses=documented(WorkspaceResponse, 401, 413, 422, 429))
    def login(request: Request, credentials: LoginRequest) -> JSONResponse:
        db: Database = request.app.state.db
        principal = _guarded_principal(request, credentials.api_key)
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

    public = APIRouter()

    @public.get("/healthz", responses=documented(HealthResponse))
    def healthz(request: Request) -> dict[str, str]:
        with request.app.state.db.read() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "version": __version__}

    @public.get("/metrics", response_class=PlainTextResponse)
    def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @public.get("/", responses=documented(WorkspaceResponse, 401, 429))
    def lookup(request: Request) -> dict[str, str]:
        principal = _guarded_principal(request, request_api_key(request))
        return {"workspace": principal.workspace}

    @public.get(
        "/{workspace}/inference-stats",
        responses=documented(InferenceStatsResponse, 401, 403, 422),
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
            "403": answer("A key of another workspace", "ErrorResponse"),
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


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        metrics.reject(error.reason)
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        secret = request_api_key(request)
        if secret and secret in error.detail:
            error.detail = error.detail.replace(secret, "***")
        return error.response(headers)

    async def too_large(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, BodyTooLargeError)
        metrics.reject("too_large")
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


async def _prune_forever(db: Database, retention_days: float) -> None:
    while True:
        cutoff = time.time() - retention_days * 86400
        try:
            removed = await anyio.to_thread.run_sync(db.prune, cutoff)
        except Exception:  # a failed prune must not take the server down; retried next hour
            logger.exception("mmagg: pruning reports older than %s days failed", retention_days)
        else:
            if removed:
                logger.info("mmagg: pruned %d reports older than %s days", removed, retention_days)
        await anyio.sleep(PRUNE_INTERVAL_SECONDS)


def create_app(
    database_url: str | None = None,
    *,
    db: Database | None = None,
    body_limit: int = DEFAULT_BODY_LIMIT,
    session_ttl: float = SESSION_TTL_SECONDS,
    secure_cookies: bool = False,
    retention_days: float | None = None,
    login_failures_per_minute: int = DEFAULT_LOGIN_FAILURES_PER_MINUTE,
) -> FastAPI:
    """Build the backend app on `database_url` (or an open `db`), migrating its schema.

    `database_url` defaults to `$MMAGG_DATABASE_URL`, else `sqlite:///mmagg.db`. Set
    `secure_cookies` when the dashboard is served over HTTPS. With `retention_days`, reports
    older than that are deleted at start-up and then every hour. A client (IP address) gets
    `login_failures_per_minute` failed attempts at `POST /dashboard/api/login` and
    `GET /?api_key=` per minute, in bursts of as many; past that, 429 with `Retry-After`.

    Example:
        >>> app = create_app("sqlite://")
        >>> key = app.state.db.create_key("acme")
        >>> # uvicorn.run(app, host="127.0.0.1", port=9090)
    """
    if db is None:
        url = database_url or os.environ.get("MMAGG_DATABASE_URL") or DEFAULT_DATABASE_URL
        db = Database(url)
    metrics = Metrics()
    owned_db = db
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            if retention_days is not None:
                tasks.start_soon(_prune_forever, owned_db, retention_days)
            yield
            tasks.cancel_scope.cancel()
        owned_db.close()

    app = FastAPI(
        title="mmagg backend",
        version=__version__,
        summary="Self-hosted Model Monitoring backend (Roboflow-compatible ingest).",
        lifespan=lifespan,
    )
    app.state.db = db
    app.state.metrics = metrics
    app.state.login_limiter = FailureLimiter(failures=login_failures_per_minute, period=60.0)
    _install_error_handlers(app, metrics)

    dashboard_api, public = _routes(session_ttl, secure_cookies)
    # Routes are tried in order. Ingest takes nearly all the traffic, so it comes first, as
    # a plain Starlette route: no dependency solving on the hottest path (the body is parsed
    # by the pydantic adapter in `_ingest`). Then the fixed /dashboard routes, which the
    # /{workspace}/... routes would otherwise capture.
    app.router.add_route("/{workspace}/inference-stats", ingest, methods=["POST"])
    app.include_router(dashboard_api)
    page = _dashboard_page_router()
    if page is not None:
        app.include_router(page)
    app.include_router(public)

    _install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
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
