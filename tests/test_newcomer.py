"""What a newcomer runs before any code (issue 13): the README's setup block pasted into a
shell, and the test suite of a fresh clone with nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def setup_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("Start one first")
    return re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_setup_block_works_when_pasted(tmp_path: Path, readme_port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", 9090), timeout=0.2):
            pytest.skip("port 9090 is taken on this machine; the README uses it")
    except OSError:
        pass
    check = (
        "import os, time, httpx\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    try:\n"
        "        key = os.environ['MMAGG_KEY']\n"
        "        r = httpx.get('http://127.0.0.1:9090/', params={'api_key': key})\n"
        "        break\n"
        "    except httpx.TransportError:\n"
        "        assert time.monotonic() < deadline, 'mmagg serve did not come up'\n"
        "        time.sleep(0.1)\n"
        "print(r.status_code, r.json())\n"
    )
    # The block exactly as pasted, then what the reader does next, then `kill %1` as it says.
    script = f'set -e\n{setup_block()}\n{sys.executable} -c "{check}"\nkill %1\nwait || true\n'
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "200 {'workspace': 'demo'}"
    assert (tmp_path / "mmagg.db").exists()


def fresh_clone(target: Path) -> Path:
    """The repository's tracked files alone, in a folder with nothing beside it."""
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    clone = target / "mmagg"
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


def test_a_fresh_clone_runs_the_seed_example_tests_without_skips_or_stray_lines(
    tmp_path: Path,
) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = fresh_clone(tmp_path)
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
            "tests/core/test_block.py", "-k", "seed or manifest or selectors or hung or refused",
        ],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(clone / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.rstrip("\n").splitlines()
    summary = lines[-1]
    assert re.fullmatch(r"=* ?\d+ passed, \d+ deselected in [\d.]+s.*", summary), summary
    assert "skipped" not in done.stdout
    # Nothing after the summary: no aggregator reporting or logging at interpreter exit.
    assert done.stderr == "", done.stderr


def test_the_documented_opt_in_run_collects() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "inference", "--collect-only", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tests/integrations/test_workflows_plugin.py::" in done.stdout


def test_pytest_s_callspec2_deprecation_is_not_an_error_under_our_filters() -> None:
    """pytest >= 9.2 applies the ini `filterwarnings` while importing plugins, and anyio's
    plugin (<= 4.14) touches the renamed `_pytest.python.CallSpec2`: with `error` first and no
    exception, every run stops before collecting. Apply our filters the way pytest does and
    raise that warning."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from _pytest.warnings import apply_warning_filters  # type: ignore[attr-defined]

    ini = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    filters = ini["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert filters[0] == "error"
    with warnings.catch_warnings():
        apply_warning_filters(filters, [])
        warnings.warn(
            "_pytest.python.CallSpec2 has been renamed to CallSpec",
            pytest.PytestDeprecationWarning,
            stacklevel=1,
        )
        with pytest.raises(pytest.PytestDeprecationWarning):  # only that one is let through
            warnings.warn(
                "something else deprecated", pytest.PytestDeprecationWarning, stacklevel=1
            )
