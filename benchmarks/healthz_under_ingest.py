"""`/healthz` latency while one client posts 10,000-result reports back to back.

Starts `mmagg serve` (SQLite file, or `--database-url postgresql://...`) as a subprocess,
then for `--duration` seconds one thread posts large reports (10,000 results each, about
0.6 MB) as fast as the server takes them while another probes `GET /healthz` every 20 ms.
Target (issue 12): /healthz p99 <= 50 ms; ingest on the event loop used to hold every other
request for the whole validation and write of a large report.

    python benchmarks/healthz_under_ingest.py            # 20 s, judged: exits 1 on a miss
    python benchmarks/healthz_under_ingest.py --smoke    # 3 s, targets not judged
    python benchmarks/healthz_under_ingest.py --old-src /tmp/old/src   # a before/after

With `--old-src DIR` (e.g. `git archive <commit> src | tar -x -C DIR`) that tree's server is
measured first, for comparison (never judged).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

P99_TARGET_MS = 50.0
RESULTS = 10_000
PROBE_INTERVAL = 0.02


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def large_body(results: int) -> bytes:
    """One report of `results` minimal results over 100 classes, 10 models."""
    items = [
        {"class_name": f"c{i % 100}", "confidence": (i % 997) / 997, "model_id": f"m/{i % 10}"}
        for i in range(results)
    ]
    body = {"timestamp": datetime.now(timezone.utc).isoformat(), "inference_results": items}
    return json.dumps(body).encode()


def serve(database_url: str, source: Path | None) -> tuple[subprocess.Popen[bytes], str, str]:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    cli = [sys.executable, "-c", "from mmagg.cli import main; main()"]
    made = subprocess.run(
        [*cli, "keys", "create", "--workspace", "bench", "--database-url", database_url],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = next(word for word in made.stdout.split() if word.startswith("mmk_"))
    port = free_port()
    command = [*cli, "serve", "--port", str(port), "--database-url", database_url]
    process = subprocess.Popen(
        [*command, "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return process, base, key
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("mmagg serve did not start")


def measure(base: str, key: str, duration: float) -> tuple[list[float], int, dict[str, int]]:
    """Probe latencies (s), large reports stored, and the ingest statuses."""
    body = large_body(RESULTS)
    stop = threading.Event()
    statuses: dict[str, int] = {}

    def post_forever() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                answer = http.post(
                    "/bench/inference-stats",
                    content=body,
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
                )
                statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1

    poster = threading.Thread(target=post_forever, name="large-reports")
    poster.start()
    time.sleep(0.5)  # the first large report is in flight
    latencies: list[float] = []
    with httpx.Client(base_url=base, timeout=30) as http:
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            http.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(PROBE_INTERVAL)
    stop.set()
    poster.join()
    return latencies, statuses.get("200", 0), statuses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(label: str, database_url: str, source: Path | None, duration: float) -> float:
    process, base, key = serve(database_url, source)
    try:
        latencies, stored, statuses = measure(base, key, duration)
    finally:
        process.terminate()
        process.wait(10)
    p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
    print(
        f"{label}: {len(latencies)} probes, /healthz ms p50={p50:.1f} p99={p99:.1f} "
        f"max={max(latencies) * 1e3:.1f} mean={statistics.fmean(latencies) * 1e3:.1f}; "
        f"{stored} reports of {RESULTS} results stored ({stored / duration:.2f}/s), "
        f"statuses {statuses}"
    )
    return p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 s; targets not judged")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--old-src", type=Path, help="measure this source tree first")
    args = parser.parse_args()
    duration = 3.0 if args.smoke else args.duration
    with tempfile.TemporaryDirectory() as scratch:
        for label, source in (("old", args.old_src), ("new", None)):
            if label == "old" and source is None:
                continue
            url = args.database_url or f"sqlite:///{Path(scratch) / f'{label}.db'}"
            p99 = run(label, url, source, duration)
    if args.smoke:
        print("smoke: targets not judged")
        return 0
    if p99 > P99_TARGET_MS:
        print(f"MISSED: /healthz p99 {p99:.1f} ms > {P99_TARGET_MS:.0f} ms")
        return 1
    print(f"met: /healthz p99 {p99:.1f} ms <= {P99_TARGET_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
