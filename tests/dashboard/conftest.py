"""Fixtures for the dashboard browser tests: a real backend and a real headless Chromium.

The backend is `mmagg.server.create_app` on a SQLite file, served by uvicorn on a free port in
a thread, and seeded only through its public ingestion API (httpx POSTs of wire-format
reports). Chromium is Debian's `/usr/bin/chromium`, driven by Playwright's sync API; no browser
is ever downloaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from dashboard_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OTHER_WORKSPACE,
    WORKSPACE,
    Backend,
    DashboardPage,
    free_port,
    post_all,
    seed_reports,
)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """uvicorn serving `create_app` on a SQLite file, seeded through the ingest API.

    Module-scoped so that its thread is gone before the rest of the suite runs.
    """
    uvicorn = pytest.importorskip("uvicorn")
    from mmagg.server import create_app

    db_path = tmp_path_factory.mktemp("dashboard-db") / "mmagg.db"
    app = create_app(database_url=f"sqlite:///{db_path}")
    # Same call as `mmagg keys create --workspace W --scope ingest,read`: these keys seed
    # the reports and open the dashboard.
    key = app.state.db.create_key(WORKSPACE, {"ingest", "read"})
    other_key = app.state.db.create_key(OTHER_WORKSPACE, {"ingest", "read"})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", ws="none", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    ours, theirs = seed_reports(datetime.now(timezone.utc))
    post_all(base, WORKSPACE, key, ours)
    post_all(base, OTHER_WORKSPACE, other_key, theirs)
    try:
        yield Backend(url=base, key=key, other_key=other_key, reports=ours, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module, stopped before other modules run (each test
    gets its own context)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def dashboard(browser: Any, backend: Backend, tmp_path: Path) -> Iterator[DashboardPage]:
    """A fresh browser context (no cookies) at 1280×800."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield from _page(context, backend, tmp_path)


@pytest.fixture
def phone(browser: Any, backend: Backend, tmp_path: Path) -> Iterator[DashboardPage]:
    """A fresh browser context with a 390×844 phone viewport."""
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    yield from _page(context, backend, tmp_path)


def _page(context: Any, backend: Backend, tmp_path: Path) -> Iterator[DashboardPage]:
    requests: list[str] = []
    page = context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    responses: list[tuple[int, str]] = []
    page.on("response", lambda response: responses.append((response.status, response.url)))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # A Content-Security-Policy violation (inline style or script, a foreign host) is logged
    # to the console by Chromium: any of them fails the test.
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if "Content Security Policy" in message.text or "Refused to" in message.text
            else None
        ),
    )
    try:
        yield DashboardPage(
            page=page, backend=backend, requests=requests, shots=tmp_path, responses=responses
        )
    finally:
        context.close()
    assert not errors, f"JavaScript errors or CSP violations on the page: {errors}"
