"""Managing a workspace's keys over HTTP, with a key that has the `admin` scope.

- `GET /{workspace}/api/keys`: the workspace's keys (never a key, only its prefix).
- `POST /{workspace}/api/keys` `{"scopes": ["read"], "expires_in": "90d"}`: a new key, shown once.
- `DELETE /{workspace}/api/keys/{key_id}`: revoke one key of the workspace.

The same operations as `mmagg keys create|list|revoke`, for a workspace's own administrator who
has no shell on the backend host.

Example:
    >>> from fastapi import APIRouter
    >>> router = build_keys_router(lambda: None)  # app.py passes the admin-key dependency
    >>> sorted(route.path for route in router.routes)
    ['/keys', '/keys', '/keys/{key_id}']
"""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mmagg.server.auth import DEFAULT_SCOPES, ScopeError, parse_duration, parse_scopes
from mmagg.server.db import Database, KeyInfo, Principal
from mmagg.server.errors import ApiError
from mmagg.server.responses import documented


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateKeyRequest(_Model):
    """Body of `POST /{workspace}/api/keys`; both fields optional."""

    scopes: list[str] = Field(
        default_factory=lambda: sorted(DEFAULT_SCOPES),
        description="Any of ingest, read, admin. Default: ingest only.",
    )
    expires_in: str | None = Field(
        default=None, description="A lifetime like 90d, 12h, 30m; none: the key never expires."
    )


class KeyItem(_Model):
    """One key as listed: never the key itself."""

    id: int
    prefix: str
    scopes: list[str]
    status: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None


class KeysResponse(_Model):
    """`GET /{workspace}/api/keys`."""

    workspace: str
    keys: list[KeyItem]


class CreatedKeyResponse(_Model):
    """`POST /{workspace}/api/keys`: the key, shown only this once."""

    workspace: str
    key: str
    item: KeyItem


class RevokedKeyResponse(_Model):
    """`DELETE /{workspace}/api/keys/{key_id}`."""

    workspace: str
    revoked: int


def _item(info: KeyInfo, now: float) -> dict[str, Any]:
    return {
        "id": info.id,
        "prefix": info.prefix,
        "scopes": sorted(info.scopes),
        "status": info.status(now),
        "created_at": info.created_at,
        "expires_at": info.expires_at,
        "last_used_at": info.last_used_at,
        "revoked_at": info.revoked_at,
    }


def build_keys_router(admin_dependency: Callable[..., Any]) -> APIRouter:
    """The key-management routes (mounted under `/{workspace}/api`), behind `admin_dependency`."""
    router = APIRouter()
    Admin = Annotated[Principal, Depends(admin_dependency)]

    @router.get("/keys", responses=documented(KeysResponse, 401, 403))
    def list_workspace_keys(request: Request, principal: Admin) -> JSONResponse:
        db: Database = request.app.state.db
        now = db.clock()
        keys = [_item(info, now) for info in db.list_keys(principal.workspace)]
        return JSONResponse({"workspace": principal.workspace, "keys": keys})

    @router.post("/keys", responses=documented(CreatedKeyResponse, 401, 403, 422))
    def create_workspace_key(
        request: Request, principal: Admin, body: CreateKeyRequest | None = None
    ) -> JSONResponse:
        db: Database = request.app.state.db
        body = body or CreateKeyRequest()
        try:
            scopes = parse_scopes(body.scopes, field="body.scopes")
        except ScopeError as error:
            raise ApiError(422, str(error), reason="invalid", field="body.scopes") from None
        expires_in = None
        if body.expires_in is not None:
            try:
                expires_in = parse_duration(body.expires_in, field="body.expires_in")
            except ScopeError as error:
                raise ApiError(422, str(error), reason="invalid", field="body.expires_in") from None
        key, info = db.create_key_record(principal.workspace, scopes, expires_in=expires_in)
        return JSONResponse(
            {"workspace": principal.workspace, "key": key, "item": _item(info, db.clock())},
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )

    @router.delete("/keys/{key_id}", responses=documented(RevokedKeyResponse, 401, 403, 404))
    def revoke_workspace_key(
        request: Request, principal: Admin, key_id: Annotated[int, Path(ge=1, le=2**31 - 1)]
    ) -> JSONResponse:
        db: Database = request.app.state.db
        if not db.revoke_key(key_id, workspace=principal.workspace):
            raise ApiError(
                404,
                f"key_id: no active key {key_id} in workspace {principal.workspace}",
                reason="not_found",
            )
        return JSONResponse({"workspace": principal.workspace, "revoked": key_id})

    return router


__all__ = ["build_keys_router"]
