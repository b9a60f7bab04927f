"""Time from a threshold crossing to the webhook, on a real server with the real clock.

A backend (SQLite file) runs an `AlertEngine` with one rule, `median_confidence below 0.6`
over a 30 s window with `for: 0`, and a loopback webhook receiver. Each trial reports a high
confidence for a fresh model, waits a random part of the interval, then stores reports whose
predictions pull the window's median below 0.6; the crossing is the moment that POST returns.
The latency is until the firing webhook for that model arrives. Expected: uniform over the
evaluation interval plus one evaluation and one POST.

    python benchmarks/alert_latency.py                   # interval 15 s (the default), 8 trials
    python benchmarks/alert_latency.py --interval 1 --trials 20
    python benchmarks/alert_latency.py --smoke
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from mmagg.server import create_app
from mmagg.server.alert_rules import parse_rules
from mmagg.server.alerts import AlertEngine
from mmagg.server.db import Database
from mmagg.server.runner import BackgroundServer

WORKSPACE = "bench"


def _report(model: str, confidence: float, count: int) -> dict[str, Any]:
    histogram = [0] * 10
    histogram[min(int(confidence * 10), 9)] = count
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "device_id": "bench-host",
        "inference_results": [
            {
                "class_name": "helmet",
                "confidence": confidence,
                "inference_id": uuid.uuid4().hex,
                "model_type": "object-detection",
                "model_id": model,
                "stats": {
                    "count": count,
                    "sum": confidence * count,
                    "min": confidence,
                    "max": confidence,
                    "histogram": histogram,
                },
            }
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=15.0, help="--alert-interval, seconds")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="3 trials at a 0.5 s interval")
    args = parser.parse_args()
    if args.smoke:
        args.interval, args.trials = 0.5, 3

    arrivals: dict[str, float] = {}
    ready = threading.Condition()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            at = time.perf_counter()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            with ready:
                for alert in body["alerts"]:
                    if alert["status"] == "firing":
                        arrivals.setdefault(alert["labels"]["model_id"], at)
                ready.notify_all()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    rules = parse_rules(
        {
            "receivers": [{"name": "bench", "webhook": f"http://127.0.0.1:{hook.server_port}/"}],
            "rules": [
                {
                    "name": "low",
                    "workspace": WORKSPACE,
                    "metric": "median_confidence",
                    "below": 0.6,
                    "window": "30s",
                    "receiver": "bench",
                }
            ],
        }
    )
    with tempfile.TemporaryDirectory() as directory:
        db = Database(f"sqlite:///{Path(directory) / 'bench.db'}")
        key = db.create_key(WORKSPACE)
        engine = AlertEngine(db, rules, interval=args.interval)
        server = BackgroundServer(create_app(db=db, alerts=engine)).start()
        latencies = []
        rng = random.Random(7)
        try:
            with httpx.Client(base_url=server.url, params={"api_key": key}, timeout=10) as client:
                for trial in range(args.trials):
                    model = f"model-{trial}"
                    client.post(f"/{WORKSPACE}/inference-stats", json=_report(model, 0.9, 10))
                    time.sleep(rng.uniform(0, args.interval))
                    client.post(f"/{WORKSPACE}/inference-stats", json=_report(model, 0.3, 100))
                    crossed = time.perf_counter()
                    with ready:
                        ok = ready.wait_for(lambda m=model: m in arrivals, 3 * args.interval + 10)
                    if not ok:
                        raise SystemExit(f"trial {trial}: no webhook for {model}")
                    latencies.append(arrivals[model] - crossed)
        finally:
            server.stop()
            db.close()
            hook.shutdown()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(
        f"alert interval {args.interval:g} s, {len(latencies)} trials: crossing -> webhook "
        f"median {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms (bound: for + interval = {args.interval * 1000:.0f} ms"
        " plus one evaluation)"
    )


if __name__ == "__main__":
    main()
