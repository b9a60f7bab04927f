"""Load, the short version of ``benchmarks/load.py``: 50 real reporters against ``mmagg
serve`` on SQLite for a few seconds; no 5xx, every acknowledged report stored exactly once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

LOAD_SECONDS = 8.0


def _load_benchmark() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("mmagg_benchmark_load", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fifty_reporters_against_mmagg_serve(tmp_path: Path, capsys: Any) -> None:
    load = _load_benchmark()
    db_path = tmp_path / "load.db"
    proc, url, key = load.start_server(db_path, tmp_path / "serve.log")
    try:
        result = load.run(url, key, db_path, reporters=50, seconds=LOAD_SECONDS)
    finally:
        load.stop_server(proc)
    with capsys.disabled():
        print("\n" + result.summary())
    assert not [s for s in result.statuses if s.startswith("5")], result.statuses
    assert result.duplicates == 0 and result.missing == 0 and result.unexpected == 0
    assert result.acked >= 50 * (LOAD_SECONDS - 2), "each reporter reports about once a second"
    assert result.sent == result.acked
    assert result.dropped == 0
    assert result.ok
