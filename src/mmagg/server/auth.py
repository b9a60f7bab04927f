"""Key scopes: what a key may do, the check every route makes, and key lifetimes.

Three scopes (docs/server.md has the route table):

- `ingest`: the Roboflow-compatible workspace lookup `GET /?api_key=` and
  `POST /{workspace}/inference-stats`. What a device needs, and all it gets by default.
- `read`: every read endpoint and the dashboard login.
- `admin`: managing the workspace's keys through the API (`/{workspace}/api/keys`).

A request whose key is valid but lacks the scope gets 403 naming the scope it needs (never a
401, which would suggest the key is wrong, and never the data).

Example:
    >>> sorted(parse_scopes(["ingest,read"]))
    ['ingest', 'read']
    >>> parse_duration("90d")
    7776000.0
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mmagg.server.errors import ApiError

INGEST = "ingest"
READ = "read"
ADMIN = "admin"
ALL_SCOPES: frozenset[str] = frozenset({INGEST, READ, ADMIN})
# A key nobody asked anything special of can report and nothing more: the key baked into a
# hundred cameras must not open the workspace's history.
DEFAULT_SCOPES: frozenset[str] = frozenset({INGEST})

# `last_used_at` is written at most this often per key (not a write per request).
LAST_USED_RESOLUTION_SECONDS = 60.0

# Longer than this is "never": leave --expires-in out instead.
MAX_LIFETIME_SECONDS = 100 * 365 * 86400.0

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


class ScopeError(ValueError):
    """A scope list or a key lifetime that cannot be used; the message names the field."""


def parse_scopes(values: Iterable[str], field: str = "scope") -> frozenset[str]:
    """The set of scopes in `values`, each a scope or a comma-separated list of them.

    Raises `ScopeError` for an unknown scope or an empty list.

    Example:
        >>> sorted(parse_scopes(["read", "ingest, admin"]))
        ['admin', 'ingest', 'read']
        >>> try:
        ...     parse_scopes(["write"])
        ... except ScopeError as error:
        ...     print(str(error)[:50])
        scope: expected one or more of admin, ingest, read
    """
    found: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in ALL_SCOPES:
                raise ScopeError(
                    f"{field}: expected one or more of {', '.join(sorted(ALL_SCOPES))} "
                    f"(comma-separated or repeated), got {part.strip()!r}"
                )
            found.add(name)
    if not found:
        raise ScopeError(
            f"{field}: expected one or more of {', '.join(sorted(ALL_SCOPES))}, got none"
        )
    return frozenset(found)


def format_scopes(scopes: Iterable[str]) -> str:
    """The stored and displayed form: sorted, comma-separated (`'ingest,read'`)."""
    return ",".join(sorted(scopes))


def stored_scopes(text: str | None) -> frozenset[str]:
    """Scopes from the database column; NULL or unknown names grant nothing."""
    if not text:
        return frozenset()
    return frozenset(part for part in text.split(",") if part in ALL_SCOPES)


def parse_duration(text: str, field: str = "expires-in") -> float:
    """Seconds in a duration like `90d`, `12h`, `30m`, `45s` or `2w`; must be positive.

    Example:
        >>> parse_duration("12h")
        43200.0
        >>> try:
        ...     parse_duration("soon")
        ... except ScopeError as error:
        ...     print(error)
        expires-in: expected a duration like 90d, 12h, 30m, 45s or 2w, got 'soon'
    """
    match = _DURATION_RE.match(text)
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()] if match else 0.0
    if not match or seconds <= 0:
        raise ScopeError(
            f"{field}: expected a duration like 90d, 12h, 30m, 45s or 2w, got {text!r}"
        )
    if seconds > MAX_LIFETIME_SECONDS:
        raise ScopeError(
            f"{field}: expected at most {MAX_LIFETIME_SECONDS / 86400:.0f}d "
            f"(leave it out for a key that never expires), got {text!r}"
        )
    return seconds


def _create_hint(workspace: str, scope: str) -> str:
    return f"mmagg keys create --workspace {workspace} --scope {scope}"


def require_scope(scopes: frozenset[str], scope: str, workspace: str) -> None:
    """Raise a 403 `ApiError` naming `scope` unless `scopes` holds it.

    Example:
        >>> require_scope(frozenset({"read"}), "read", "acme")
        >>> try:
        ...     require_scope(frozenset({"ingest"}), "read", "acme")
        ... except ApiError as error:
        ...     print(error.status, error.detail[:53])
        403 this endpoint needs an API key with the 'read' scope;
    """
    if scope in scopes:
        return
    have = format_scopes(scopes).replace(",", ", ") or "no scopes"
    raise ApiError(
        403,
        f"this endpoint needs an API key with the '{scope}' scope; this key has: {have}. "
        f"Create one with: {_create_hint(workspace, scope)}",
        reason="forbidden",
    )


def require_dashboard_scope(scopes: frozenset[str], workspace: str) -> None:
    """The login's own 403: the dashboard reads, so it needs a `read` key.

    Example:
        >>> try:
        ...     require_dashboard_scope(frozenset({"ingest"}), "acme")
        ... except ApiError as error:
        ...     print(error.status, error.detail.split("; ")[-1])
        403 create one with: mmagg keys create --workspace acme --scope read
    """
    if READ in scopes:
        return
    have = format_scopes(scopes).replace(",", ", ") or "no scopes"
    purpose = " (it can send reports, not read them)" if INGEST in scopes else ""
    raise ApiError(
        403,
        f"this key cannot open the dashboard: it has scope {have}{purpose}. The dashboard "
        f"needs a key with the '{READ}' scope; create one with: {_create_hint(workspace, READ)}",
        reason="forbidden",
    )
