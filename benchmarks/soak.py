"""Soak (by hand, not CI): 8 streams at 30 fps against a local `mmagg serve`, with a fault
injected every minute; resident memory and thread count over time, printed and plotted.

    python benchmarks/soak.py                       # 10 minutes, soak.png
    python benchmarks/soak.py --minutes 2 --png /tmp/soak.png

Topology: this process (8 `mmagg.Aggregator`s, one camera thread each) -> a fault proxy
(a subprocess) -> `mmagg serve` on SQLite (a subprocess). Every minute, for `--fault-seconds`,
the proxy answers 503, 429 with Retry-After, resets connections, or hangs; or the server is
stopped (SIGSTOP: accepts, never answers) or killed and restarted (connection refused).
At the end every collected prediction must be delivered or counted as dropped, by reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np

FAULTS = ["http_503", "server_stopped", "http_429", "reset", "server_killed", "hang"]
STREAMS = 8
FPS = 30


# -- the fault proxy (runs as a subprocess) ------------------------------------------------


def proxy_main(port: int, upstream: str, control: Path) -> None:
    """Forward to ``upstream`` unless ``control`` names a fault."""
    http = httpx.Client(base_url=upstream, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            mode = control.read_text().strip() if control.exists() else "pass"
            if mode == "hang":
                time.sleep(3600)
                return
            if mode == "reset":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if mode in ("http_503", "http_429"):
                status = int(mode[-3:])
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "2")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            try:
                answer = http.request(self.command, self.path, content=body, headers=headers)
            except httpx.HTTPError:
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = _handle

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    # A client that timed out closes its end: the late answer's broken pipe is expected.
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]
    server.serve_forever()


# -- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


@dataclass
class Backend:
    db_url: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from mmagg.cli import main; main()",
                    "serve",
                    "--port",
                    str(self.port),
                    "--database-url",
                    self.db_url,
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(f"http://127.0.0.1:{self.port}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Delivered(httpx.BaseTransport):
    """Counts the predictions of every report the backend acknowledged."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    predictions: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self.inner.handle_request(request)
            response.read()
        except httpx.TransportError as error:
            with self.lock:
                self.statuses[type(error).__name__] += 1
            raise
        with self.lock:
            self.statuses[str(response.status_code)] += 1
            if request.method == "POST" and response.is_success:
                body = json.loads(request.content)
                self.predictions += sum(r["stats"]["count"] for r in body["inference_results"])
        return response

    def close(self) -> None:
        self.inner.close()


# -- the soak --------------------------------------------------------------------------------


def soak(minutes: float, fault_seconds: float, png: Path, frequency: int) -> int:
    import supervision as sv

    import mmagg
    from mmagg import MemoryCache, MemoryStore, RetryPolicy

    tmp = Path(tempfile.mkdtemp(prefix="mmagg-soak-"))
    db_url = f"sqlite:///{tmp / 'soak.db'}"
    cli = [sys.executable, "-c", "from mmagg.cli import main; main()"]
    created = subprocess.run(
        [*cli, "keys", "create", "--workspace", "soak", "--database-url", db_url],
        capture_output=True,
        text=True,
        check=True,
    )
    key = next(w for w in created.stdout.split() if w.startswith("mmk_"))
    backend = Backend(db_url, free_port(), tmp / "serve.log")
    backend.start()
    control = tmp / "fault"
    control.write_text("pass")
    proxy_port = free_port()
    proxy = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--proxy",
            str(proxy_port),
            f"http://127.0.0.1:{backend.port}",
            str(control),
        ]
    )
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    wait_healthy(proxy_url)

    transport = Delivered()
    aggregators = [
        mmagg.Aggregator(
            f"soak/{i % 2}",
            frequency=frequency,
            api_key=key,
            api_base_url=proxy_url,
            store=MemoryStore(),
            cache=MemoryCache(),
            device_id=f"cam-{i}",
            extensions=True,
            request_timeout=5,
            flush_timeout=10,
            retry=RetryPolicy(deadline=15),
            transport=transport,
        )
        for i in range(STREAMS)
    ]
    stop = threading.Event()
    worst = [0.0] * STREAMS

    def camera(index: int) -> None:
        rng = np.random.default_rng(index)
        names = np.array([f"class-{c}" for c in range(20)])
        next_at = time.perf_counter()
        while not stop.is_set():
            n = int(rng.integers(0, 12))
            ids = rng.integers(0, names.size, size=n)
            frame = sv.Detections(
                xyxy=rng.uniform(0, 600, size=(n, 4)).astype(np.float32),
                confidence=rng.random(n).astype(np.float32),
                class_id=ids,
                data={"class_name": names[ids]},
            )
            t0 = time.perf_counter()
            aggregators[index].collect(frame)
            worst[index] = max(worst[index], time.perf_counter() - t0)
            next_at += 1 / FPS
            time.sleep(max(0.0, next_at - time.perf_counter()))

    cameras = [threading.Thread(target=camera, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in cameras:
        t.start()

    samples: list[tuple[float, float, int, str]] = []
    faults: list[tuple[float, float, str]] = []
    started = time.monotonic()
    end = started + minutes * 60
    fault_index = 0
    print(f"{'t(s)':>6} {'RSS MB':>8} {'threads':>7}  fault")
    try:
        while time.monotonic() < end:
            elapsed = time.monotonic() - started
            minute_phase = elapsed % 60
            active = ""
            if 30 <= minute_phase < 30 + fault_seconds:
                if not faults or faults[-1][1] >= 0:
                    name = FAULTS[fault_index % len(FAULTS)]
                    fault_index += 1
                    faults.append((elapsed, -1.0, name))
                    if name == "server_stopped":
                        backend.signal(signal.SIGSTOP)
                    elif name == "server_killed":
                        backend.signal(signal.SIGKILL)
                    else:
                        control.write_text(name)
                active = faults[-1][2]
            elif faults and faults[-1][1] < 0:
                t0, _, name = faults[-1]
                faults[-1] = (t0, elapsed, name)
                control.write_text("pass")
                if name == "server_stopped":
                    backend.signal(signal.SIGCONT)
                elif name == "server_killed":
                    backend.start()
            samples.append((elapsed, rss_mb(), threading.active_count(), active))
            if len(samples) % 5 == 1:
                print(f"{elapsed:6.0f} {samples[-1][1]:8.1f} {samples[-1][2]:7d}  {active}")
            time.sleep(1.0)
    finally:
        stop.set()
        for t in cameras:
            t.join(timeout=5)
        control.write_text("pass")
        backend.signal(signal.SIGCONT)
        if backend.proc is not None and backend.proc.poll() is not None:
            backend.start()
        closed = [a.close(timeout=20) for a in aggregators]
        proxy.terminate()
        proxy.wait(timeout=10)
        backend.stop()
        transport.close()

    counters = [a.counters for a in aggregators]
    collected = sum(c.collected for c in counters)
    dropped: Counter[str] = Counter()
    for c in counters:
        dropped.update(c.dropped)
    balance = collected - transport.predictions - sum(dropped.values())
    rss = [s[1] for s in samples]
    threads = [s[2] for s in samples]
    settle = len(samples) // 6
    print(
        f"\n{STREAMS} streams x {FPS} fps x {minutes:g} min, report every {frequency} s; "
        f"faults: {[f[2] for f in faults]}\n"
        f"RSS MB: start {rss[0]:.1f}, after warm-up {rss[settle]:.1f}, max {max(rss):.1f}, "
        f"end {rss[-1]:.1f}\n"
        f"threads: min {min(threads)}, max {max(threads)}, end {threads[-1]}\n"
        f"worst collect(): {max(worst) * 1000:.2f} ms\n"
        f"collected {collected}, delivered {transport.predictions}, dropped {dict(dropped)}, "
        f"unaccounted {balance}; sent {sum(c.sent for c in counters)}, "
        f"failed {sum(c.failed for c in counters)}, retried {sum(c.retried for c in counters)}, "
        f"merged back {sum(c.merged_back for c in counters)}; closed cleanly {all(closed)}\n"
        f"answers seen: {dict(transport.statuses)}"
    )
    plot(samples, faults, png)
    print(f"plot: {png}")
    return 0 if balance == 0 else 1


def plot(samples: list[tuple[float, float, int, str]], faults: list[Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.plot(t, [s[1] for s in samples], color="tab:blue")
    top.set_ylabel("RSS (MB)")
    bottom.plot(t, [s[2] for s in samples], color="tab:orange")
    bottom.set_ylabel("threads")
    bottom.set_xlabel("seconds")
    for start, stop, name in faults:
        stop = stop if stop >= 0 else t[-1]
        for axis in (top, bottom):
            axis.axvspan(start, stop, color="tab:red", alpha=0.15)
        top.annotate(name, (start, top.get_ylim()[1]), fontsize=7, va="top")
    top.set_title("mmagg soak: 8 streams x 30 fps, faults shaded")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        proxy_main(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-seconds", type=float, default=20.0)
    parser.add_argument("--frequency", type=int, default=5, help="report interval, s")
    parser.add_argument("--png", type=Path, default=Path("soak.png"))
    args = parser.parse_args()
    os.environ.pop("MMAGG_REDIS_URL", None)
    # One warning per failed report would drown the table; the counters carry it all.
    logging.basicConfig(level=logging.ERROR)
    return soak(args.minutes, args.fault_seconds, args.png, args.frequency)


if __name__ == "__main__":
    sys.exit(main())
