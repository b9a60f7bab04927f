"""Pieces the benchmark scripts share: a loopback capture server and realistic results."""

from __future__ import annotations

import json
import math
import random
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORKSPACE = "bench"


def start_capture(
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[ThreadingHTTPServer, str]:
    """A threaded loopback server speaking the Model Monitoring dialect.

    The workspace lookup answers ``{"workspace": "bench"}``; every POST answers 200 and,
    with ``on_report``, hands over the parsed report body.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._reply(json.dumps({"workspace": WORKSPACE}).encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if on_report is not None:
                on_report(json.loads(body))
            self._reply(b"{}")

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def random_result(
    rng: random.Random, class_name: str, model_id: str, source_id: str, best_low: float
) -> dict[str, Any]:
    """One ``inference_results`` item with the ``stats`` extension, as an aggregator with
    extensions sends it: a best confidence in ``[best_low, 0.99]`` and 1-400 predictions."""
    n = rng.randint(1, 400)
    best = rng.uniform(best_low, 0.99)
    # Consistent stats, as the aggregator computes them (the backend checks: issue 12): the
    # best confidence is the max, the others below it, the histogram made of the same values.
    values = [best] + [min(best, rng.betavariate(8, 2)) for _ in range(n - 1)]
    histogram = [0] * 10
    for value in values:
        histogram[min(int(value * 10), 9)] += 1
    return {
        "class_name": class_name,
        "confidence": best,
        "inference_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "model_type": "object-detection",
        "model_id": model_id,
        "source_id": source_id,
        "stats": {
            "count": n,
            "sum": math.fsum(values),
            "min": min(values),
            "max": best,
            "histogram": histogram,
        },
    }


def verdict(targets: list[tuple[str, bool]], *, smoke: bool) -> bool:
    """Print one line per target and the overall verdict; True when the run may exit 0.

    A smoke run is too short and too noisy to judge speed, so it says so instead of "met"
    or "MISSED" and never fails on a target; a full run prints MISSED beside every missed
    target and returns False, so the script exits non-zero.

    >>> verdict([("p99 <= 1 ms", True), ("cpu <= 20 us", False)], smoke=False)
      target p99 <= 1 ms: met
      target cpu <= 20 us: MISSED
    targets MISSED: 1 of 2
    False
    >>> verdict([("cpu <= 20 us", False)], smoke=True)
    smoke: targets not judged (cpu <= 20 us)
    True
    """
    if smoke:
        print(f"smoke: targets not judged ({'; '.join(name for name, _ in targets)})")
        return True
    for name, met in targets:
        print(f"  target {name}: {'met' if met else 'MISSED'}")
    missed = sum(1 for _, met in targets if not met)
    print(f"targets MISSED: {missed} of {len(targets)}" if missed else "targets met")
    return missed == 0
