"""The dashboard link `mmagg replay` prints opens the recording's own time range (issue 13):
the command in a subprocess, the link in headless Chromium, against a real backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_predictions.jsonl"
MODEL = "yard-detector/3"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    from mmagg.server import create_app
    from mmagg.server.runner import BackgroundServer

    app = create_app(database_url=f"sqlite:///{tmp_path / 'replay.db'}")
    key = app.state.db.create_key("replays", {"ingest", "read"})
    with BackgroundServer(app) as server:
        yield server.url, key
    app.state.db.close()


def test_the_printed_link_opens_the_recording_s_range(
    browser: Any, served: tuple[str, str]
) -> None:
    url, key = served
    done = subprocess.run(
        [sys.executable, "-m", "mmagg", "replay", str(SAMPLE), "--fast", "--no-progress",
         "--model-id", MODEL, "--extensions", "--api-key", key, "--api-base-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = re.search(r"^Dashboard for it: (\S+)$", done.stderr, re.M)
    assert found, done.stderr
    link = found.group(1)
    sent = int(re.search(r"reports: (\d+) sent", done.stderr).group(1))  # type: ignore[union-attr]
    assert link.startswith(f"{url}/dashboard?from=")

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(link)
        page.fill("#api-key", key)
        page.click("#login-submit")
        page.wait_for_selector("#app-view:not([hidden])")
        page.wait_for_function(
            "() => Number(document.body.dataset.renders) > 0"
            " && document.body.dataset.busy === 'false'"
        )
        assert page.input_value("#range-select") == "custom"
        assert page.is_visible("#custom-range")
        row = page.locator(f'#models-body tr[data-model-id="{MODEL}"]')
        cells = row.locator("td").all_text_contents()
        assert str(sent) in [cell.strip() for cell in cells], cells  # its reports, in range
        # The same page without the link: the default last hour holds none of them.
        page.goto(f"{url}/dashboard")
        page.wait_for_selector("#app-view:not([hidden])")
        page.wait_for_function(
            "() => Number(document.body.dataset.renders) > 0"
            " && document.body.dataset.busy === 'false'"
        )
        assert page.input_value("#range-select") != "custom"
        default_cells = [c.strip() for c in row.locator("td").all_text_contents()]
        assert "0" in default_cells and str(sent) not in default_cells, default_cells
        assert not errors, errors
    finally:
        context.close()
