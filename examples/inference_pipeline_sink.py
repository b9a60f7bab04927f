"""Monitor a Roboflow InferencePipeline with mmagg (needs `pip install inference`).

    export ROBOFLOW_API_KEY=...                       # the model's key
    export MMAGG_KEY=mmk_...                          # a key of your `mmagg serve`
    python examples/inference_pipeline_sink.py yard-detector/3 rtsp://gate/stream rtsp://yard/stream

Reports go to http://127.0.0.1:9090 (`mmagg serve`) with one window per camera; Prometheus
metrics are served on http://127.0.0.1:9108/metrics while the pipeline runs.
"""

from __future__ import annotations

import os
import sys

from inference import InferencePipeline

from mmagg.sinks import MonitoringSink


def main(model_id: str, videos: list[str]) -> None:
    sink = MonitoringSink.for_model(
        model_id,
        per_source=True,
        source_names=videos,
        frequency=5,
        api_key=os.environ["MMAGG_KEY"],
        api_base_url=os.environ.get("MMAGG_URL", "http://127.0.0.1:9090"),
        extensions=True,
        metrics_port=9108,
    )
    pipeline = InferencePipeline.init(
        model_id=model_id,
        video_reference=videos if len(videos) > 1 else videos[0],
        on_prediction=sink,
        api_key=os.environ["ROBOFLOW_API_KEY"],
    )
    pipeline.start()
    try:
        pipeline.join()
    finally:
        sink.close()
        print(sink.aggregator.counters, dict(sink.errors))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
