"""Load: N concurrent mmagg reporters against `mmagg serve` on SQLite, exactly-once checked.

Each reporter is a real `mmagg.Aggregator` (its own background sender, the real HTTP client
with retries and an Idempotency-Key per report) fed by its own "camera" thread; the server
is `mmagg serve` in a subprocess on a fresh SQLite file. A recording transport notes every
request the clients make; at the end the database is read back:

- no 5xx answer was ever seen;
- every report answered 2xx is stored exactly once (by its Idempotency-Key), and nothing
  else is stored;
- p50/p99/max latency of the POSTs, and of `collect()` on the camera threads.

    python benchmarks/load.py                  # 50 reporters, 60 s
    python benchmarks/load.py --smoke          # 50 reporters, 10 s
    python benchmarks/load.py --fps 30 --reporters 100   # heavier

Exit status 1 if a check fails. (`benchmarks/ingest.py` measures the server alone with raw
HTTP; this one the whole client stack against it.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

import mmagg
from mmagg import MemoryCache, MemoryStore, RetryPolicy

WORKSPACE = "load"
CLASSES = [f"class-{i}" for i in range(12)]


@dataclass
class Recorder(httpx.BaseTransport):
    """Notes every POST: its Idempotency-Key, status (or error) and latency."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    posts: list[tuple[str, int | None, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        status: int | None = None
        try:
            response = self.inner.handle_request(request)
            response.read()
            status = response.status_code
            return response
        finally:
            if request.method == "POST":
                with self.lock:
                    self.posts.append(
                        (
                            request.headers.get("idempotency-key", ""),
                            status,
                            time.perf_counter() - started,
                        )
                    )

    def close(self) -> None:
        self.inner.close()


@dataclass
class Result:
    reporters: int
    seconds: float
    posts: int
    statuses: dict[str, int]
    acked: int
    stored: int
    duplicates: int
    missing: int
    unexpected: int
    post_ms: dict[str, float]
    collect_ms: dict[str, float]
    sent: int
    failed: int
    dropped: int

    @property
    def ok(self) -> bool:
        five_xx = sum(n for s, n in self.statuses.items() if s.startswith("5"))
        return five_xx == 0 and self.duplicates == 0 and self.missing == 0 and self.unexpected == 0

    def summary(self) -> str:
        return (
            f"{self.reporters} reporters x {self.seconds:.0f} s: {self.posts} POSTs "
            f"({self.posts / self.seconds:.1f}/s), statuses {self.statuses}\n"
            f"  stored exactly once: acked={self.acked} stored={self.stored} "
            f"duplicates={self.duplicates} missing={self.missing} unexpected={self.unexpected}\n"
            f"  POST latency ms: {_fmt(self.post_ms)}\n"
            f"  collect() ms:    {_fmt(self.collect_ms)}\n"
            f"  counters: sent={self.sent} failed={self.failed} dropped={self.dropped}\n"
            f"  {'OK' if self.ok else 'FAILED'}"
        )


def _fmt(q: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in q.items())


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1000
    return {
        "p50": float(np.quantile(a, 0.5)),
        "p99": float(np.quantile(a, 0.99)),
        "max": float(a.max()),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(db_path: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`mmagg keys create` then `mmagg serve` on a fresh SQLite file: (process, url, key)."""
    url_db = f"sqlite:///{db_path}"
    cli = [sys.executable, "-c", "from mmagg.cli import main; main()"]
    created = subprocess.run(
        [*cli, "keys", "create", "--workspace", WORKSPACE, "--database-url", url_db],
        capture_output=True,
        text=True,
        check=True,
    )
    key = next(w for w in created.stdout.split() if w.startswith("mmk_"))
    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *cli,
                "serve",
                "--port",
                str(port),
                "--database-url",
                url_db,
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text())
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mmagg serve did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(
    url: str,
    key: str,
    db_path: Path,
    *,
    reporters: int = 50,
    seconds: float = 60.0,
    frequency: float = 1.0,
    fps: float = 10.0,
    detections: int = 6,
) -> Result:
    """Drive ``reporters`` aggregators for ``seconds`` against ``url``; check the database."""
    recorder = Recorder()
    stop = threading.Event()
    collect_times: list[float] = []
    lock = threading.Lock()
    aggregators = [
        mmagg.Aggregator(
            f"load/{i % 5}",
            frequency=max(1, round(frequency)),
            api_key=key,
            api_base_url=url,
            store=MemoryStore(),
            cache=MemoryCache(),
            device_id=f"cam-{i:03d}",
            extensions=True,
            request_timeout=10,
            retry=RetryPolicy(deadline=20),
            transport=recorder,
        )
        for i in range(reporters)
    ]

    def camera(index: int, agg: mmagg.Aggregator) -> None:
        rng = np.random.default_rng(index)
        period = 1.0 / fps
        mine: list[float] = []
        next_at = time.perf_counter()
        while not stop.is_set():
            names = rng.choice(CLASSES, size=detections)
            frame = {
                "predictions": [
                    {"class": str(n), "confidence": float(c)}
                    for n, c in zip(names, rng.random(detections), strict=True)
                ]
            }
            t0 = time.perf_counter()
            agg.collect(frame)
            mine.append(time.perf_counter() - t0)
            next_at += period
            time.sleep(max(0.0, next_at - time.perf_counter()))
        with lock:
            collect_times.extend(mine)

    threads = [
        threading.Thread(target=camera, args=(i, a), name=f"camera-{i}", daemon=True)
        for i, a in enumerate(aggregators)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    for agg in aggregators:
        agg.close(timeout=15)
    elapsed = time.monotonic() - started
    recorder.close()

    statuses = Counter(str(s) if s is not None else "error" for _, s, _ in recorder.posts)
    acked = Counter(k for k, s, _ in recorder.posts if s is not None and 200 <= s < 300)
    conn = sqlite3.connect(db_path)
    try:
        stored = Counter(row[0] for row in conn.execute("SELECT idempotency_key FROM reports"))
    finally:
        conn.close()
    counters = [a.counters for a in aggregators]
    return Result(
        reporters=reporters,
        seconds=elapsed,
        posts=len(recorder.posts),
        statuses=dict(sorted(statuses.items())),
        acked=len(acked),
        stored=sum(stored.values()),
        duplicates=sum(n - 1 for n in stored.values() if n > 1),
        missing=len(set(acked) - set(stored)),
        unexpected=len(set(stored) - set(acked)),
        post_ms=_quantiles([lat for _, _, lat in recorder.posts]),
        collect_ms=_quantiles(collect_times),
        sent=sum(c.sent for c in counters),
        failed=sum(c.failed for c in counters),
        dropped=sum(c.dropped_total for c in counters),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reporters", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--smoke", action="store_true", help="10 s")
    parser.add_argument("--frequency", type=int, default=1, help="report interval, whole s")
    parser.add_argument("--fps", type=float, default=10.0, help="frames/s per reporter")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.smoke else args.seconds
    with tempfile.TemporaryDirectory(prefix="mmagg-load-") as tmp:
        db_path = Path(tmp) / "load.db"
        proc, url, key = start_server(db_path, Path(tmp) / "serve.log")
        try:
            result = run(
                url,
                key,
                db_path,
                reporters=args.reporters,
                seconds=seconds,
                frequency=args.frequency,
                fps=args.fps,
            )
        finally:
            stop_server(proc)
    print(json.dumps(result.__dict__) if args.json else result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    os.environ.pop("MMAGG_REDIS_URL", None)
    sys.exit(main())
