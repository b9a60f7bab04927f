"""Benchmarks tell the truth about themselves: the shared verdict never says "met" beside a
miss, and a smoke run never claims a judgement it did not make."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _support() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_support", BENCHMARKS / "_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_verdict_doctests_hold() -> None:
    failed, attempted = doctest.testmod(_support())
    assert attempted >= 2 and failed == 0


@pytest.mark.parametrize("outcomes", [[True], [False], [True, False], [False, False, True]])
def test_full_run_fails_on_any_miss_and_names_it(
    outcomes: list[bool], capsys: pytest.CaptureFixture[str]
) -> None:
    targets = [(f"target-{i}", met) for i, met in enumerate(outcomes)]
    assert _support().verdict(targets, smoke=False) is all(outcomes)
    out = capsys.readouterr().out
    for name, met in targets:
        line = next(line for line in out.splitlines() if f"{name}:" in line)
        assert line.endswith("MISSED" if not met else "met")
    assert ("targets met" in out) is all(outcomes)


def test_smoke_run_judges_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert _support().verdict([("a", False), ("b", True)], smoke=True) is True
    out = capsys.readouterr().out
    assert "smoke: targets not judged" in out
    assert "met" not in out.replace("smoke: targets not judged", "")
