"""A simulated two-camera loop reporting to `mmagg serve`, with Prometheus metrics.

    export MMAGG_KEY=mmk_...       # mmagg keys create --workspace demo
    python examples/loop_with_prometheus.py --seconds 30
    curl -s http://127.0.0.1:9108/metrics | grep mmagg_

No model and no camera needed: detections are drawn at random, 30 frames/s per camera.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import supervision as sv

import mmagg
from mmagg.metrics import AggregatorMetrics

CLASSES = np.array(["car", "person", "truck", "bicycle"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--url", default="http://127.0.0.1:9090")
    parser.add_argument("--metrics-port", type=int, default=9108)
    args = parser.parse_args()

    metrics = AggregatorMetrics(port=args.metrics_port)
    agg = mmagg.Aggregator(
        "yard/3",
        frequency=5,
        api_key=os.environ["MMAGG_KEY"],
        api_base_url=args.url,
        extensions=True,
        per_source=True,
        store=metrics.store(),
    )
    metrics.watch(agg)
    print(f"metrics on http://127.0.0.1:{metrics.port}/metrics")
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + args.seconds
    with agg:
        while time.monotonic() < deadline:
            for camera in ("cam-gate", "cam-yard"):
                n = int(rng.integers(0, 8))
                detections = sv.Detections(
                    xyxy=rng.random((n, 4)) * 640, confidence=rng.beta(5, 2, n)
                )
                detections.data["class_name"] = rng.choice(CLASSES, n)
                agg.collect(detections, source_id=camera)
            time.sleep(1 / 30)
    print(agg.counters)
    metrics.close()


if __name__ == "__main__":
    main()
