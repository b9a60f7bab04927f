"""The backend, the wire format and the CLI load no client-side module they do not use."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIENT_SIDE = ("mmagg.aggregator", "mmagg.reporter", "mmagg.block", "mmagg.sinks")


@pytest.mark.parametrize(
    "module", ["mmagg", "mmagg.payload", "mmagg.wire", "mmagg.server.app", "mmagg.cli"]
)
def test_importing_loads_no_client_side_module(module: str) -> None:
    code = f"import {module}, sys; print(sorted(m for m in sys.modules if m in {CLIENT_SIDE!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_public_names_still_resolve() -> None:
    import mmagg

    for name in mmagg.__all__:
        assert getattr(mmagg, name) is not None, name
    assert mmagg.Aggregator.__module__ == "mmagg.aggregator"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mmagg.nope  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("module", "other"), [("mmagg.metrics", "mmagg.sinks"), ("mmagg.sinks", "mmagg.metrics")]
)
def test_metrics_and_sinks_do_not_import_each_other(module: str, other: str) -> None:
    code = f"import {module}, sys; print({other!r} in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
