"""Helpers for the alert tests: a loopback webhook receiver, a steppable clock, report bodies."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


class FakeClock:
    """A clock the test moves by hand; the engine reads it instead of `time.time`."""

    def __init__(self, start: float) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self.now += seconds
            return self.now


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed


@dataclass
class WebhookReceiver:
    """A real HTTP server on loopback recording every POST; `fail_next` answers 500 first."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    received: list[Received] = field(default_factory=list)
    fail_next: int = 0
    attempts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received]

    def statuses(self) -> list[str]:
        return [r.body["status"] for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_receiver() -> WebhookReceiver:
    holder: dict[str, WebhookReceiver] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            receiver = holder["r"]
            with lock:
                receiver.attempts += 1
                failing = receiver.fail_next > 0
                if failing:
                    receiver.fail_next -= 1
                else:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
                    )
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    receiver = WebhookReceiver(server, thread)
    holder["r"] = receiver
    thread.start()
    return receiver


def histogram(confidences: list[float]) -> list[int]:
    buckets = [0] * 10
    for c in confidences:
        buckets[min(max(int(c * 10), 0), 9)] += 1
    return buckets


def body(
    ts: float,
    model: str,
    per_class: dict[str, list[float]],
    device: str = "edge-01",
) -> dict[str, Any]:
    """A report at `ts` whose results carry stats for the given prediction confidences."""
    results = []
    for name, values in per_class.items():
        if not values:
            continue
        results.append(
            {
                "class_name": name,
                "confidence": max(values),
                "inference_id": uuid.uuid4().hex,
                "model_type": "object-detection",
                "model_id": model,
                "stats": {
                    "count": len(values),
                    "sum": sum(values),
                    "min": min(values),
                    "max": max(values),
                    "histogram": histogram(values),
                },
            }
        )
    return {
        "timestamp": datetime.fromtimestamp(ts, timezone.utc).isoformat(),
        "source": "workflow",
        "source_info": "ModelMonitoringInferenceAggregatorBlockV1",
        "device_id": device,
        "inference_server_version": "0.1.0",
        "platform": "Linux",
        "inference_results": results,
    }


def post(base_url: str, workspace: str, key: str, bodies: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for item in bodies:
            answer = client.post(
                f"/{workspace}/inference-stats", params={"api_key": key}, json=item
            )
            assert answer.status_code == 200, answer.text


def hist_median(counts: list[int]) -> float | None:
    """Independent median estimate from 10 buckets (linear within the bucket)."""
    total = sum(counts)
    if not total:
        return None
    cumulative = 0.0
    for i, c in enumerate(counts):
        if c and cumulative + c >= total / 2:
            return (i + (total / 2 - cumulative) / c) / 10
        cumulative += c
    return 1.0
