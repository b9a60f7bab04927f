"""The dashboard in real headless Chromium against the real backend (issue 5).

Every test saves a screenshot under its tmp_path. Set MMAGG_DASHBOARD_SCREENSHOT=docs/dashboard.png
to also copy the model view (last 15 minutes) there.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from dashboard_support import (
    BUSY_CLASSES,
    BUSY_MODEL,
    HTML_CLASS,
    MODEL,
    OLD_CLASS,
    OTHER_DEVICE,
    OTHER_MODEL,
    OTHER_WORKSPACE,
    OUR_MODELS,
    QUIET_MODEL,
    RECENT_CLASSES,
    DashboardPage,
)

pytestmark = pytest.mark.browser

# Okabe–Ito blue, the colour of the first class (dashboard.js PALETTE[0]).
FIRST_SERIES_RGB = (0x00, 0x72, 0xB2)

_CANVAS_PIXELS = """
([selector, rgb, tolerance]) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas) return null;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0, series = 0, digest = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] === 0) continue;
    painted++;
    digest = (digest * 31 + data[i] * 7 + data[i + 1] * 3 + data[i + 2] + i) % 1000000007;
    if (data[i + 3] > 200 && Math.abs(data[i] - rgb[0]) <= tolerance
        && Math.abs(data[i + 1] - rgb[1]) <= tolerance
        && Math.abs(data[i + 2] - rgb[2]) <= tolerance) series++;
  }
  return {painted, series, digest, width: canvas.width, height: canvas.height};
}
"""


def canvas_pixels(page: Any, selector: str, rgb: tuple[int, int, int] = FIRST_SERIES_RGB) -> Any:
    return page.evaluate(_CANVAS_PIXELS, [selector, list(rgb), 40])


def test_bad_key_is_refused_with_a_clear_message_then_good_key_logs_in(
    dashboard: DashboardPage,
) -> None:
    page = dashboard.page
    dashboard.goto()
    page.fill("#api-key", "mmk_not-a-real-key")
    page.click("#login-submit")
    error = page.locator("#login-error")
    error.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#login-error').textContent.length > 0")
    assert "not accepted" in error.text_content()
    assert page.is_hidden("#app-view")
    dashboard.screenshot("bad-key")

    dashboard.login()
    assert page.text_content("#workspace-name") == "acme"
    rows = page.eval_on_selector_all(
        "#models-body tr", "rows => rows.map(r => r.getAttribute('data-model-id'))"
    )
    assert set(rows) == OUR_MODELS and len(rows) == len(OUR_MODELS)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["mmagg_session"]["httpOnly"] is True
    assert cookies["mmagg_session"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    dashboard.screenshot("overview")

    page.click("#logout-button")
    page.wait_for_selector("#login-view:not([hidden])")
    assert page.request.get(dashboard.backend.url + "/dashboard/api/me").status == 401


def test_too_many_wrong_keys_are_refused_with_a_message(dashboard: DashboardPage) -> None:
    from mmagg.server.ratelimit import DatabaseFailureLimiter

    app = dashboard.backend.app
    shared = app.state.login_limiter
    # A limiter of its own (two failures a minute, buckets apart from the app's), so the other
    # tests' logins are unaffected.
    app.state.login_limiter = DatabaseFailureLimiter(
        app.state.db, failures=2, period=60.0, namespace="too-many"
    )
    try:
        dashboard.goto()
        page = dashboard.page
        messages = []
        for key in ("mmk_wrong-1", "mmk_wrong-2", "mmk_wrong-3", dashboard.backend.key):
            page.fill("#api-key", key)
            with page.expect_response(lambda r: r.url.endswith("/dashboard/api/login")) as info:
                page.click("#login-submit")
            page.wait_for_function("() => !document.querySelector('#login-submit').disabled")
            messages.append((info.value.status, page.text_content("#login-error")))
        assert [status for status, _ in messages] == [401, 401, 429, 429]
        assert all("not accepted" in text for _, text in messages[:2])
        # Even the right key is refused while the client waits: the page says why.
        assert all("Too many attempts" in text for _, text in messages[2:])
        assert page.is_hidden("#app-view")
        dashboard.screenshot("too-many-attempts")
    finally:
        app.state.login_limiter = shared
    dashboard.login()
    assert page.text_content("#workspace-name") == "acme"


def test_overview_marks_a_model_that_stopped_reporting(dashboard: DashboardPage) -> None:
    dashboard.login()
    page = dashboard.page
    quiet = page.locator(f'#models-body tr[data-model-id="{QUIET_MODEL}"] .health')
    live = page.locator(f'#models-body tr[data-model-id="{MODEL}"] .health')
    assert "stale" in quiet.get_attribute("class")
    assert "Stopped reporting" in quiet.text_content()
    assert "ok" in live.get_attribute("class")
    quiet_row = page.text_content(f'#models-body tr[data-model-id="{QUIET_MODEL}"]')
    assert re.search(r"\b2 h( \d+ min)? ago", quiet_row), quiet_row
    dashboard.screenshot("overview-health")

    # Silent in the range: the model view says so instead of drawing nothing.
    dashboard.open_model(QUIET_MODEL)
    assert dashboard.legend_classes() == []
    assert page.is_visible("#legend-empty")
    assert page.evaluate("() => document.activeElement.id") == "model-title"
    dashboard.screenshot("quiet-model")
    before = dashboard.renders()
    page.click("#back-button")
    dashboard.wait_render(before)
    assert page.evaluate("() => document.activeElement.textContent") == QUIET_MODEL


def _overview_rows(page: Any) -> dict[str, tuple[str, int]]:
    """Model id -> (health class, reports in range), as the overview table shows them."""
    rows = page.eval_on_selector_all(
        "#models-body tr",
        """rows => rows.map(r => [r.getAttribute('data-model-id'),
                                 r.querySelector('.health').className,
                                 r.children[3].textContent])""",
    )
    return {model: (health.split()[-1], int(count)) for model, health, count in rows}


def _expected_overview(
    reports: list[dict[str, Any]], seconds: float, device: str | None, source: str | None
) -> dict[str, int]:
    """Per model seen on `device` / `source` ever: its reports among the last `seconds`."""
    now = datetime.now(timezone.utc)
    counts: dict[str, int] = {}
    for body in reports:
        if device is not None and body["device_id"] != device:
            continue
        recent = datetime.fromisoformat(body["timestamp"]) >= now - timedelta(seconds=seconds)
        models = {
            r["model_id"]
            for r in body["inference_results"]
            if source is None or r.get("source_id") == source
        }
        for model in models:
            counts[model] = counts.get(model, 0) + int(recent)
    return counts


def test_overview_is_one_request_and_follows_the_device_or_source_filter(
    dashboard: DashboardPage,
) -> None:
    dashboard.login()
    page = dashboard.page
    seeded = dashboard.backend.reports

    def models_requests() -> list[str]:
        return [u for u in dashboard.requests if urlsplit(u).path == "/dashboard/api/models"]

    dashboard.select_range("86400")
    rows = _overview_rows(page)
    assert {m: n for m, (_h, n) in rows.items()} == _expected_overview(seeded, 86400, None, None)
    assert rows[QUIET_MODEL][0] == "stale" and rows[MODEL][0] == "ok"

    for choice, device, source in [
        ("device:edge-02", "edge-02", None),
        ("source:cam-2", None, "cam-2"),
        ("device:edge-01", "edge-01", None),
    ]:
        before = dashboard.renders()
        page.select_option("#filter-select", choice)
        dashboard.wait_render(before)
        rows = _overview_rows(page)
        expected = _expected_overview(seeded, 86400, device, source)
        assert {m: n for m, (_h, n) in rows.items()} == expected, choice
        dashboard.screenshot("overview-" + choice.replace(":", "-"))
    # On edge-02 only the model that went silent two hours ago, still marked as such.
    before = dashboard.renders()
    page.select_option("#filter-select", "device:edge-02")
    dashboard.wait_render(before)

    # One /models call per refresh, for the chosen range: no all-time second call.
    calls_before = len(models_requests())
    before = dashboard.renders()
    page.click("#refresh-now")
    dashboard.wait_render(before)
    calls = models_requests()
    assert len(calls) == calls_before + 1
    query = parse_qs(urlsplit(calls[-1]).query)
    assert query["device_id"] == ["edge-02"]
    start = datetime.fromisoformat(query["startTime"][0].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - start).total_seconds() - 86400) < 120
    assert all(parse_qs(urlsplit(u).query).get("startTime") != ["0"] for u in calls)
    rows = _overview_rows(page)
    assert list(rows) == [QUIET_MODEL] and rows[QUIET_MODEL][0] == "stale"


def test_legend_lists_exactly_the_ingested_classes_and_charts_are_drawn(
    dashboard: DashboardPage,
) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page
    assert set(dashboard.legend_classes()) == RECENT_CLASSES  # default range: last hour
    confidence = canvas_pixels(page, "#confidence-chart")
    assert confidence["painted"] > 0
    assert confidence["series"] > 50, confidence  # the first class's line and markers
    counts = canvas_pixels(page, "#counts-chart")
    assert counts["series"] > 50, counts  # these reports carry stats
    histograms = page.eval_on_selector_all(
        "#histograms figure", "figs => figs.map(f => f.getAttribute('data-class'))"
    )
    assert set(histograms) == RECENT_CLASSES
    sample_classes = set(
        page.eval_on_selector_all(
            "#samples-body td.class-name", "tds => tds.map(td => td.textContent)"
        )
    )
    assert sample_classes <= RECENT_CLASSES and sample_classes

    over = page.locator("#confidence-chart .u-over")
    box = over.bounding_box()
    assert box is not None
    over.hover(position={"x": box["width"] * 0.95, "y": box["height"] / 2})
    readout = page.locator("#confidence-figure .readout")
    page.wait_for_function(
        "() => /\\d\\d:\\d\\d:\\d\\d · /.test("
        "document.querySelector('#confidence-figure .readout').textContent)"
    )
    assert "car 0." in readout.text_content()
    dashboard.screenshot("model-view")


def test_legend_entries_hide_and_show_their_class(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page
    first = sorted(RECENT_CLASSES)[0]  # the first class gets the first colour
    toggle = page.locator("#legend li").first.locator("button")
    assert page.get_attribute("#legend li >> nth=0", "data-class") == first
    assert canvas_pixels(page, "#confidence-chart")["series"] > 0

    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "false"
    assert canvas_pixels(page, "#confidence-chart")["series"] == 0
    assert page.locator("#histograms figure").first.is_hidden()
    dashboard.screenshot("class-hidden")

    toggle.press("Enter")  # a real button: the keyboard works too
    assert toggle.get_attribute("aria-pressed") == "true"
    assert canvas_pixels(page, "#confidence-chart")["series"] > 0
    assert page.locator("#histograms figure").first.is_visible()


def test_a_model_with_many_classes_draws_its_busiest_and_lists_all(
    dashboard: DashboardPage,
) -> None:
    dashboard.login()
    dashboard.open_model(BUSY_MODEL)
    page = dashboard.page
    assert dashboard.legend_classes() == BUSY_CLASSES  # every class stays listed
    drawn = page.eval_on_selector_all(
        "#legend li button[aria-pressed='true'] .class-name", "els => els.map(e => e.textContent)"
    )
    assert drawn == BUSY_CLASSES[4:]
    assert page.text_content("#legend-count") == "Drawing 8 of 12 classes."
    assert len(page.locator("#histograms figure:visible").all()) == 8
    dashboard.screenshot("many-classes")

    page.click("#show-all")
    assert page.text_content("#legend-count") == "Drawing 12 of 12 classes."
    assert len(page.locator("#histograms figure:visible").all()) == 12
    page.click("#show-top")
    assert page.text_content("#legend-count") == "Drawing 8 of 12 classes."


def test_switching_the_range_changes_what_is_plotted(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page

    dashboard.select_range("900")
    assert set(dashboard.legend_classes()) == RECENT_CLASSES
    narrow_series = int(page.get_attribute("#confidence-chart", "data-series"))
    narrow_start = int(page.get_attribute("#confidence-chart", "data-range-start"))
    narrow = canvas_pixels(page, "#confidence-chart")
    dashboard.screenshot("range-15min")

    dashboard.select_range("86400")
    assert set(dashboard.legend_classes()) == RECENT_CLASSES | {OLD_CLASS}
    wide_series = int(page.get_attribute("#confidence-chart", "data-series"))
    wide_start = int(page.get_attribute("#confidence-chart", "data-range-start"))
    wide = canvas_pixels(page, "#confidence-chart")
    dashboard.screenshot("range-24h")

    assert (narrow_series, wide_series) == (len(RECENT_CLASSES), len(RECENT_CLASSES) + 1)
    assert narrow_start - wide_start >= 86400 - 900 - 60  # the x axis spans the new range
    assert wide["digest"] != narrow["digest"]


def test_custom_range_and_source_filter(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page

    page.select_option("#range-select", "custom")
    page.wait_for_selector("#custom-range:not([hidden])")
    start, end = page.evaluate(
        """() => {
          const pad = n => String(n).padStart(2, "0");
          const local = d => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`
            + `T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
          const now = Date.now();
          return [local(new Date(now - 200 * 60000)), local(new Date(now - 170 * 60000))];
        }"""
    )
    page.fill("#custom-start", start)
    page.fill("#custom-end", end)
    before = dashboard.renders()
    page.click("#custom-apply")
    dashboard.wait_render(before)
    assert set(dashboard.legend_classes()) == {OLD_CLASS, "car"}
    dashboard.screenshot("custom-range")

    dashboard.select_range("3600")
    before = dashboard.renders()
    page.select_option("#filter-select", "source:cam-2")
    dashboard.wait_render(before)
    assert dashboard.legend_classes() == ["person"]
    dashboard.screenshot("filter-source")


def test_auto_refresh_runs_and_pauses(dashboard: DashboardPage) -> None:
    dashboard.login()
    page = dashboard.page
    page.goto(dashboard.backend.url + "/dashboard?refresh=2")  # the session cookie stays
    page.wait_for_selector("#app-view:not([hidden])")
    dashboard.wait_render(0)
    assert "every 2 s" in page.text_content("#refresh-status")
    dashboard.wait_render(dashboard.renders())  # a refresh nobody asked for

    page.click("#refresh-toggle")
    assert page.get_attribute("#refresh-toggle", "aria-pressed") == "true"
    assert "paused" in page.text_content("#refresh-status")
    # A refresh already under way may still land; none may start after it.
    page.wait_for_function("() => document.body.dataset.busy === 'false'")
    paused_at = dashboard.renders()
    page.wait_for_timeout(3_000)
    assert dashboard.renders() == paused_at
    dashboard.screenshot("refresh-paused")

    page.click("#refresh-toggle")
    assert page.get_attribute("#refresh-toggle", "aria-pressed") == "false"
    dashboard.wait_render(paused_at)


def test_other_workspace_is_absent_from_page_and_api(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.select_range("604800")
    page = dashboard.page
    forbidden = [OTHER_MODEL, "zebra_secret", OTHER_DEVICE, "globex-cam", OTHER_WORKSPACE]
    for view in ("overview", "model"):
        if view == "model":
            dashboard.open_model(MODEL)
        html = page.content()
        options = page.eval_on_selector_all("#filter-select option", "os => os.map(o => o.value)")
        for word in forbidden:
            assert word not in html
            assert all(word not in option for option in options)
    dashboard.screenshot("workspace-scoped")

    base = dashboard.backend.url + "/dashboard/api/"
    # A month back: everything seeded, and few enough daily buckets for the timeseries.
    everything = {"startTime": str(int(time.time()) - 30 * 86400)}
    listed = page.request.get(base + "models", params=everything).json()
    assert {m["model_id"] for m in listed["models"]} == OUR_MODELS
    # Asking by name for the other workspace's model finds nothing (the name is only echoed).
    for path, key, params in [
        ("timeseries", "series", {"bucket_seconds": "86400"}),
        ("histogram", "classes", {}),
        ("classes", "classes", {}),
        ("samples", "samples", {"limit": "1000"}),
    ]:
        response = page.request.get(
            base + path, params={"model": OTHER_MODEL, **params, **everything}
        )
        assert response.ok, (path, response.status)
        assert response.json()[key] == [], path
    for path, params in [("samples", {"limit": "1000"}), ("devices", {})]:
        response = page.request.get(base + path, params={**params, **everything})
        assert response.ok, (path, response.status)
        for word in forbidden:
            assert word not in response.text(), (path, word)
    # The cookie is no key: the other workspace's key-authorised API stays shut.
    response = page.request.get(f"{dashboard.backend.url}/{OTHER_WORKSPACE}/api/models")
    assert response.status == 401


def test_html_in_a_class_name_renders_as_inert_text(dashboard: DashboardPage) -> None:
    dashboard.login()
    dashboard.open_model(MODEL)
    page = dashboard.page
    assert HTML_CLASS in page.eval_on_selector_all(
        "#legend .class-name", "els => els.map(e => e.textContent)"
    )
    assert HTML_CLASS in page.eval_on_selector_all(
        "#samples-body td.class-name", "els => els.map(e => e.textContent)"
    )
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.querySelectorAll('body script').length") == 0
    assert page.evaluate("window.__pwned") is None
    dashboard.screenshot("html-class-inert")


def test_page_requests_only_its_own_backend(dashboard: DashboardPage) -> None:
    response = dashboard.page.goto(dashboard.backend.url + "/dashboard")
    assert response is not None
    headers = response.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    dashboard.login()
    dashboard.open_model(MODEL)
    dashboard.select_range("604800")
    dashboard.page.click("#refresh-now")
    dashboard.page.wait_for_function("() => document.body.dataset.busy === 'false'")
    dashboard.screenshot("own-backend-only")

    own = urlsplit(dashboard.backend.url)
    assert dashboard.requests
    for url in dashboard.requests:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (own.scheme, own.netloc), url
    failed = [(status, url) for status, url in dashboard.responses if status >= 400]
    # Only the "am I logged in?" probe of a page load before the login may fail (401).
    assert failed and {(status, urlsplit(url).path) for status, url in failed} == {
        (401, "/dashboard/api/me")
    }, failed
    scripts = [u for u in dashboard.requests if u.endswith(".js")]
    assert any(u.endswith("/dashboard/static/vendor/uplot/uPlot.iife.min.js") for u in scripts)


def test_phone_viewport_has_no_horizontal_overflow(phone: DashboardPage) -> None:
    phone.login()
    page = phone.page
    for view in ("overview", "model"):
        if view == "model":
            phone.open_model(MODEL)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{view}: {overflow}px of horizontal overflow"
        phone.screenshot(f"phone-{view}")
    assert canvas_pixels(page, "#confidence-chart")["series"] > 20


def test_login_form_and_range_selector_are_reachable_with_tab(dashboard: DashboardPage) -> None:
    dashboard.goto()
    page = dashboard.page

    def tab_to(element_id: str, limit: int = 20) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
                return
        raise AssertionError(f"#{element_id} not reached with {limit} Tab presses")

    tab_to("api-key")
    page.keyboard.type(dashboard.backend.key)
    tab_to("login-submit", limit=2)
    before = dashboard.renders()
    page.keyboard.press("Enter")
    page.wait_for_selector("#app-view:not([hidden])")
    dashboard.wait_render(before)

    tab_to("range-select")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # a visible focus ring
    before = dashboard.renders()
    page.keyboard.press("ArrowDown")
    dashboard.wait_render(before)
    assert page.input_value("#range-select") == "86400"
    dashboard.screenshot("keyboard")
