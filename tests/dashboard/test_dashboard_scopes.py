"""The dashboard login with keys of each scope, in real headless Chromium (issue 16)."""

from __future__ import annotations

import pytest
from dashboard_support import WORKSPACE, DashboardPage

pytestmark = pytest.mark.browser


def _try_login(dashboard: DashboardPage, key: str) -> tuple[int, str]:
    page = dashboard.page
    page.fill("#api-key", key)
    with page.expect_response(lambda r: r.url.endswith("/dashboard/api/login")) as info:
        page.click("#login-submit")
    page.wait_for_function("() => !document.querySelector('#login-submit').disabled")
    return info.value.status, page.text_content("#login-error") or ""


def test_an_ingest_key_is_told_that_the_dashboard_needs_a_read_key(
    dashboard: DashboardPage,
) -> None:
    db = dashboard.backend.app.state.db
    device_key = db.create_key(WORKSPACE)  # the default: ingest only, as on a camera
    dashboard.goto()
    status, message = _try_login(dashboard, device_key)
    assert status == 403
    assert "read" in message and "dashboard" in message
    assert f"mmagg keys create --workspace {WORKSPACE} --scope read" in message
    assert device_key not in message
    assert dashboard.page.is_hidden("#app-view")
    assert dashboard.page.request.get(dashboard.backend.url + "/dashboard/api/me").status == 401
    dashboard.screenshot("ingest-key-refused")

    # A read key, made as the message says, opens it.
    status, _ = _try_login(dashboard, db.create_key(WORKSPACE, {"read"}))
    assert status == 200
    dashboard.page.wait_for_selector("#app-view:not([hidden])")
    assert dashboard.page.text_content("#workspace-name") == WORKSPACE
