"""Prometheus: scraped over HTTP, parsed with prometheus_client.parser, equal to what was
collected."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import defaultdict
from typing import Any

import httpx
import pytest
from integrations_support import NO_RETRY, VideoFrame
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import Reply

from mmagg import Aggregator
from mmagg.metrics import AggregatorMetrics
from mmagg.sinks import MonitoringSink

Labels = tuple[str, str, str]


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape over HTTP."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return parse(response.text)


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


class Expected:
    """Per-(model, class, source) count, sum and half-open 10-bucket histogram, kept here."""

    def __init__(self) -> None:
        self.count: dict[Labels, int] = defaultdict(int)
        self.total: dict[Labels, float] = defaultdict(float)
        self.buckets: dict[Labels, list[int]] = defaultdict(lambda: [0] * 10)

    def add(self, model: str, name: str, source: str, confidence: float) -> None:
        key = (model, name, source)
        self.count[key] += 1
        self.total[key] += confidence
        self.buckets[key][min(9, max(0, math.floor(confidence * 10)))] += 1

    def check(self, samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> None:
        counts = samples["mmagg_prediction_confidence_count"]
        assert len(counts) == len(self.count)
        for (model, name, source), count in self.count.items():
            labels = {"model_id": model, "class_name": name, "source_id": source}
            key = tuple(sorted(labels.items()))
            assert counts[key] == count
            assert samples["mmagg_prediction_confidence_sum"][key] == pytest.approx(
                self.total[(model, name, source)]
            )
            cumulative = 0
            for i, n in enumerate(self.buckets[(model, name, source)]):
                cumulative += n
                le = tuple(sorted({**labels, "le": f"{(i + 1) / 10:.1f}"}.items()))
                assert samples["mmagg_prediction_confidence_bucket"][le] == cumulative
            inf = tuple(sorted({**labels, "le": "+Inf"}.items()))
            assert samples["mmagg_prediction_confidence_bucket"][inf] == count


def _frame(rng: random.Random, expected: Expected, source: int, names: list[str]) -> Any:
    items = []
    for _ in range(rng.randint(0, 4)):
        name, conf = rng.choice(["car", "person", "truck"]), round(rng.random(), 3)
        items.append({"class": name, "confidence": conf})
        expected.add("yard/3", name, names[source], conf)
    return {"predictions": items, "inference_id": "i", "prediction_type": "object-detection"}


def _counter(samples: Any, name: str, aggregator: Aggregator, **labels: str) -> float:
    key = tuple(
        sorted({"aggregator": aggregator.key, "model_id": aggregator.model_id, **labels}.items())
    )
    return float(samples[name].get(key, 0.0))


def test_scraped_over_http_equals_what_was_collected(capture_server: Any, clock: Any) -> None:
    rng = random.Random(11)
    names = ["gate", "yard"]
    metrics = AggregatorMetrics(port=0)
    try:
        assert metrics.port
        sink = MonitoringSink.for_model(
            "yard/3",
            per_source=True,
            source_names=names,
            metrics=metrics,
            frequency=5,
            fire_and_forget=False,
            clock=clock,
            api_key="k",
            api_base_url=capture_server.url,
            retry=NO_RETRY,
        )
        agg = sink.aggregator
        expected = Expected()
        # Interval 1: reported; interval 2: its report fails (503) and is merged back;
        # interval 3: still in the window at scrape time.
        capture_server.replies = [Reply(status=200), Reply(status=503)]
        frame_ids = [0, 0]  # per source, as inference numbers them

        def next_frame(source: int) -> VideoFrame:
            frame_ids[source] += 1
            return VideoFrame(source, frame_ids[source])

        for interval in range(3):
            for i in range(29):
                source = i % 2
                sink(_frame(rng, expected, source, names), next_frame(source))
            if interval < 2:
                clock.advance(5)
                sink({"predictions": []}, next_frame(0))
            samples = scrape(metrics.port)
            expected.check(samples)
        counters = agg.counters
        assert (counters.sent, counters.failed, counters.merged_back) == (1, 1, 1)
        for field, name in [
            ("collected", "mmagg_predictions_collected_total"),
            ("rejected", "mmagg_predictions_rejected_total"),
            ("sent", "mmagg_reports_sent_total"),
            ("failed", "mmagg_reports_failed_total"),
            ("retried", "mmagg_report_retries_total"),
            ("merged_back", "mmagg_windows_merged_back_total"),
        ]:
            assert _counter(samples, name, agg) == getattr(counters, field), name
        frames = samples["mmagg_sink_frames_total"]
        assert frames[(("source_id", "gate"),)] + frames[(("source_id", "yard"),)] == 3 * 29 + 2
        assert samples["mmagg_sink_frames_skipped_total"][(("source_id", "yard"),)] == 0
        # After the final flush everything was reported once: the totals do not move.
        assert sink.close(timeout=5)
        after = scrape(metrics.port)
        expected.check(after)
        assert _counter(after, "mmagg_reports_sent_total", agg) == 2
    finally:
        metrics.close()


def test_refused_reports_count_as_dropped_by_reason(capture_server: Any) -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry=registry)
    capture_server.on_post = lambda req: Reply(status=422, body={"detail": "bad"})
    agg = Aggregator(
        "yard/3",
        api_key="k",
        api_base_url=capture_server.url,
        retry=NO_RETRY,
        store=metrics.store(),
    )
    metrics.watch(agg)
    agg.collect({"predictions": [{"class": "car", "confidence": 0.5}] * 3})
    with pytest.raises(TypeError):
        agg.collect({"predictions": [{"class": "car", "confidence": "x"}]})
    agg.flush(timeout=5)
    samples = parse(generate_latest(registry).decode())
    assert _counter(samples, "mmagg_predictions_dropped_total", agg, reason="http_422") == 3
    assert _counter(samples, "mmagg_predictions_rejected_total", agg) == 1
    key = (("class_name", "car"), ("model_id", "yard/3"), ("source_id", ""))
    assert samples["mmagg_prediction_confidence_count"][key] == 3  # collected, even if dropped
    assert metrics.render() == generate_latest(registry)
    agg.close(timeout=1)
    metrics.close()
    assert b"mmagg_" not in generate_latest(registry)


def test_sink_errors_and_frame_gaps(capture_server: Any) -> None:
    registry = CollectorRegistry()
    sink = MonitoringSink.for_model(
        "yard/3",
        metrics_registry=registry,
        api_key="k",
        api_base_url=capture_server.url,
    )
    sink({"predictions": [{"class": "car", "confidence": 0.5}]}, VideoFrame(0, 1, 100.0))
    sink({"predictions": "bad"}, VideoFrame(0, 7, 101.5))
    samples = parse(generate_latest(registry).decode())
    assert samples["mmagg_sink_frames_total"][(("source_id", "0"),)] == 2
    assert samples["mmagg_sink_frames_skipped_total"][(("source_id", "0"),)] == 5
    assert samples["mmagg_sink_last_frame_timestamp_seconds"][(("source_id", "0"),)] == 101.5
    assert samples["mmagg_sink_errors_total"][(("kind", "invalid_predictions"),)] == 1
    sink.close(timeout=5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_the_parents_totals(capture_server: Any) -> None:
    metrics = AggregatorMetrics(registry=CollectorRegistry())
    store = metrics.store()
    agg = Aggregator("yard/3", api_key="k", api_base_url=capture_server.url, store=store)
    agg.collect({"predictions": [{"class": "car", "confidence": 0.5}] * 4})
    agg.flush(timeout=5)
    assert store.totals()[("yard/3", "car", "")].count == 4
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
        pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without cleanup
        try:
            os.write(write, json.dumps(len(store.totals())).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_series = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child_series == 0
    assert store.totals()[("yard/3", "car", "")].count == 4  # the parent keeps its own
    agg.close(timeout=5)
