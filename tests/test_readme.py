"""The README's code runs as written, against a real `mmagg serve` started by its CLI."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, readme_port_for_module: int
) -> Iterator[tuple[str, str, str]]:
    """``mmagg keys create`` (an ingest key, and a read key) then ``mmagg serve`` on port
    9090 (as the README says): (url, ingest key, read key)."""
    tmp = tmp_path_factory.mktemp("readme")
    db_url = f"sqlite:///{tmp / 'mmagg.db'}"
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmagg.cli",
            "keys",
            "create",
            "--workspace",
            "demo",
            "--database-url",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = created.stdout.strip().splitlines()[-1]
    # The README's second step: a read key for the person looking at the numbers.
    read_key = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmagg.cli",
            "keys",
            "create",
            "--workspace",
            "demo",
            "--scope",
            "read",
            "--database-url",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    try:
        with socket.create_connection(("127.0.0.1", 9090), timeout=0.2):
            pytest.skip("port 9090 is taken on this machine; the README uses it")
    except OSError:
        pass
    server = subprocess.Popen(
        [sys.executable, "-m", "mmagg.cli", "serve", "--port", "9090", "--database-url", db_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:9090/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("mmagg serve did not come up")
        yield "http://127.0.0.1:9090", key, read_key
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_readme_has_the_three_ways() -> None:
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "mmagg.Aggregator" in blocks[0]
    assert "MonitoringSink" in blocks[1]
    assert "ModelMonitoringInferenceAggregatorBlockV1" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_python_block_runs(served: tuple[str, str, str], index: int, tmp_path: Path) -> None:
    url, key, read_key = served
    script = tmp_path / f"block{index}.py"
    script.write_text(python_blocks()[index], encoding="utf-8")
    env = os.environ | {"MMAGG_KEY": key}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    if index == 0:
        # The loop's last window arrived at the backend through close().
        # The blocks ran with the default, ingest-only key; reading takes the read key.
        denied = httpx.get(f"{url}/demo/inference-stats", params={"api_key": key})
        assert denied.status_code == 403 and "'read' scope" in denied.json()["detail"]
        stats = httpx.get(f"{url}/demo/inference-stats", params={"api_key": read_key}).json()
        text = str(stats)
        assert "car" in text and "person" in text
    if index == 2:
        assert "Not in reporting range, skipping report. (Ok)" in done.stdout
