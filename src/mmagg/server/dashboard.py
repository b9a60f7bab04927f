"""The dashboard page: ``GET /dashboard`` and its static assets.

The page is plain HTML, CSS and JavaScript shipped inside the package (``static/``), with the
charting library vendored under ``static/vendor/`` so nothing is fetched at run time and there is
no build step. The page talks only to the JSON API under ``/dashboard/api/`` served by the backend
(``mmagg.server.app``), which owns the session cookie and the workspace scoping.

Every response of this router carries a strict Content-Security-Policy (same origin only, no
inline script or style), ``X-Content-Type-Options: nosniff`` and no-referrer, so a class name
that looks like ``<script>`` can never run even if a future change inserted it as HTML.

Example:
    >>> from fastapi import FastAPI
    >>> from mmagg.server.dashboard import router
    >>> app = FastAPI()
    >>> app.include_router(router)
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

__all__ = ["CONTENT_SECURITY_POLICY", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# Explicit types: the platform's mimetypes table may lack some or guess differently.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",
}


def _scan_static(root: Path) -> dict[str, Path]:
    """Map every shipped asset's URL path (``app.js``, ``vendor/uplot/LICENSE``) to its file.

    Serving only from this allow-list built once at import makes path traversal impossible
    instead of merely checked.
    """
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


_ASSETS = _scan_static(STATIC_DIR)

router = APIRouter(include_in_schema=False)


def _content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def _file_response(path: Path, cache_control: str) -> Response:
    headers = dict(_SECURITY_HEADERS)
    headers["Cache-Control"] = cache_control
    return Response(path.read_bytes(), media_type=_content_type(path), headers=headers)


@router.get("/dashboard")
def dashboard_page() -> Response:
    """The single page; it asks for an API key, then holds a session cookie."""
    # no-store: the page is tiny and must change together with its scripts after an upgrade.
    return _file_response(STATIC_DIR / "index.html", "no-store")


@router.get("/dashboard/")
def dashboard_slash() -> RedirectResponse:
    """``/dashboard/`` would break the page's relative asset URLs: send it to ``/dashboard``."""
    return RedirectResponse("/dashboard", status_code=308)


@router.get("/dashboard/static/{asset_path:path}")
def dashboard_asset(asset_path: str) -> Response:
    """A shipped asset (script, style sheet, vendored library or its licence)."""
    path = _ASSETS.get(asset_path)
    if path is None:
        raise HTTPException(status_code=404, detail="no such asset")
    return _file_response(path, "no-cache")
