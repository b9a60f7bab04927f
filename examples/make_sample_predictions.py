"""Write examples/sample_predictions.jsonl: 30 s of two cameras, deterministic.

Two sources (``cam-entrance``, ``cam-yard``) at 5 frames/s each, interleaved; an object
detector ``yard-detector/3`` (car, person, truck, bicycle) written in two shapes (Roboflow
JSON and ``detections`` columns), and every 10th line a multi-label classifier
``weather-classifier/1``. Timestamps alternate between epoch seconds and ISO-8601.

    python examples/make_sample_predictions.py > examples/sample_predictions.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from datetime import datetime, timezone

START = 1_795_680_000.0  # 2026-11-26T08:00:00Z
SOURCES = ("cam-entrance", "cam-yard")
CLASSES = ("car", "person", "truck", "bicycle")
FRAMES_PER_SOURCE = 150
FRAME_INTERVAL = 0.2


def main() -> None:
    rng = random.Random(6)
    for index in range(FRAMES_PER_SOURCE * len(SOURCES)):
        source = SOURCES[index % len(SOURCES)]
        when = START + (index // len(SOURCES)) * FRAME_INTERVAL + (index % len(SOURCES)) * 0.01
        line: dict[str, object] = {"source_id": source}
        line["timestamp"] = (
            datetime.fromtimestamp(when, timezone.utc).isoformat() if index % 7 == 0 else when
        )
        if index % 10 == 9:
            line["model_id"] = "weather-classifier/1"
            line["predictions"] = {
                name: {"confidence": round(rng.random(), 3)} for name in ("rain", "fog", "snow")
            }
            line["predicted_classes"] = ["rain"]
            line["inference_id"] = f"inf-{index:04d}"
            line["prediction_type"] = "classification"
        else:
            count = rng.randint(0, 4)
            names = [rng.choice(CLASSES) for _ in range(count)]
            scores = [round(rng.uniform(0.2, 0.99), 3) for _ in range(count)]
            if index % 3 == 0:
                line["detections"] = {
                    "class_name": names,
                    "confidence": scores,
                    "inference_id": f"inf-{index:04d}",
                    "prediction_type": "object-detection",
                }
            else:
                line["predictions"] = [
                    {
                        "x": rng.randint(20, 620),
                        "y": rng.randint(20, 460),
                        "width": rng.randint(10, 200),
                        "height": rng.randint(10, 200),
                        "confidence": score,
                        "class": name,
                        "class_id": CLASSES.index(name),
                        "detection_id": f"det-{index:04d}-{k}",
                    }
                    for k, (name, score) in enumerate(zip(names, scores, strict=True))
                ]
                line["inference_id"] = f"inf-{index:04d}"
                line["prediction_type"] = "object-detection"
        sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
