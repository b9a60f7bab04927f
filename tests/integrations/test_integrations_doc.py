"""docs/integrations.md: every runnable Python snippet runs as written against the backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from integrations_support import Backend

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"
DOC_BACKEND = "http://127.0.0.1:9090"


def snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return [block for block in blocks if not block.startswith("# requires:")]


def test_the_doc_has_runnable_snippets_for_each_integration() -> None:
    text = "\n".join(snippets())
    for name in ("mmagg.Aggregator", "MonitoringSink", "replay(", "AggregatorMetrics"):
        assert name in text


@pytest.mark.parametrize("index", range(len(snippets())))
def test_snippet_runs(backend: Backend, index: int) -> None:
    _, key = backend.new_workspace()
    code = snippets()[index].replace(DOC_BACKEND, backend.base_url)
    code = code.replace("metrics_port=9108", "metrics_port=0")  # any free port here
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"MMAGG_KEY": key},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
