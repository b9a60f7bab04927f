"""The dashboard router without a browser: headers, assets, allow-list, vendored library.

Requests go over HTTP to the same uvicorn backend the browser tests use (`backend` fixture).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from dashboard_support import Backend

from mmagg.server.dashboard import STATIC_DIR


@pytest.fixture
def client(backend: Backend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=backend.url, timeout=10) as http:
        yield http


def _assert_hardened(headers: object) -> None:
    csp = headers["content-security-policy"]  # type: ignore[index]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe" not in csp
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]


def test_page_is_served_with_a_strict_policy(client: httpx.Client) -> None:
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    _assert_hardened(response.headers)
    assert "no-store" in response.headers["cache-control"]


def test_page_has_no_inline_script_or_style_and_names_no_host() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert " style=" not in html and "<style" not in html
    assert re.findall(r"(?:src|href)=\"(?:https?:)?//", html) == []


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("vendor/uplot/uPlot.min.css", "text/css"),
        ("vendor/uplot/LICENSE", "text/plain"),
    ],
)
def test_assets_are_served_with_their_type(
    client: httpx.Client, path: str, content_type: str
) -> None:
    response = client.get(f"/dashboard/static/{path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    _assert_hardened(response.headers)


@pytest.mark.parametrize(
    "path",
    ["nope.js", "../dashboard.py", "..%2Fdashboard.py", "%2e%2e/db.py", "/etc/passwd", ""],
)
def test_only_shipped_assets_are_served(client: httpx.Client, path: str) -> None:
    assert client.get(f"/dashboard/static/{path}").status_code == 404


def test_trailing_slash_redirects_to_the_page(client: httpx.Client) -> None:
    response = client.get("/dashboard/", follow_redirects=False)
    assert response.status_code == 308
    assert response.headers["location"] == "/dashboard"


def test_vendored_library_carries_its_licence_and_pinned_version() -> None:
    vendor = STATIC_DIR / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    readme = (vendor / "README.md").read_text()
    assert "uplot@1.6.32" in readme
    assert "uPlot.iife.min.js" in readme


def test_create_app_serves_the_page_next_to_its_api(client: httpx.Client) -> None:
    assert client.get("/dashboard/api/me").status_code == 401
    assert client.get("/healthz").status_code == 200
