"""Prometheus metrics of mmagg itself: the aggregators' counters and per-class statistics.

Nothing here runs on the video loop. A custom collector reads the state when Prometheus
scrapes: the counters of every watched aggregator (a snapshot) and, per
``(model_id, class_name, source_id)``, the count and confidence histogram of every
prediction collected so far. Those come from a :class:`MeteredStore`, a thin
:class:`~mmagg.stores.Store` wrapper that adds a window's statistics to running totals when
the reporter takes it (once per report, O(classes)) and reads the window still being
filled at scrape time.

``prometheus-client`` is optional: ``pip install "mmagg[prometheus]"``.

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from mmagg import Aggregator
    >>> from mmagg.metrics import AggregatorMetrics
    >>> metrics = AggregatorMetrics(registry=CollectorRegistry())
    >>> agg = Aggregator("yard/3", api_key="k", api_base_url="http://127.0.0.1:9",
    ...                  store=metrics.store())
    >>> metrics.watch(agg)
    >>> _ = agg.collect({"predictions": [{"class": "car", "confidence": 0.9}]})
    >>> b'mmagg_predictions_collected_total' in generate_latest(metrics.registry)
    True
    >>> agg.close(timeout=0)
    False
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mmagg.stores.metered import MeteredStore
from mmagg.window import ClassStats, Key
from mmagg.wire import HISTOGRAM_BUCKETS

if TYPE_CHECKING:
    from mmagg.reporter import Counters
    from mmagg.stores.base import Store

try:
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mmagg.metrics needs prometheus-client: pip install 'mmagg[prometheus]'"
    ) from error

__all__ = [
    "AggregatorMetrics",
    "MeteredStore",
    "WatchedAggregator",
    "WatchedSink",
    "WatchedSource",
]


class WatchedAggregator(Protocol):
    """What the collector reads from an aggregator (``mmagg.Aggregator`` fits)."""

    @property
    def key(self) -> str: ...

    @property
    def model_id(self) -> str: ...

    @property
    def counters(self) -> Counters: ...


class WatchedSource(Protocol):
    """What the collector reads per video source (``mmagg.sinks.SourceState`` fits)."""

    @property
    def frames(self) -> int: ...

    @property
    def skipped(self) -> int: ...

    @property
    def last_timestamp(self) -> float | None: ...


@runtime_checkable
class WatchedSink(Protocol):
    """What the collector reads from a sink (``mmagg.sinks.MonitoringSink`` fits)."""

    @property
    def aggregator(self) -> WatchedAggregator: ...

    @property
    def errors(self) -> Mapping[str, int]: ...

    def sources(self) -> Mapping[str, WatchedSource]: ...


#: Upper bounds of the confidence histogram, as Prometheus ``le`` labels. The window's
#: buckets are half-open, ``[i/10, (i+1)/10)``: ``le="0.5"`` counts confidences *below* 0.5.
BUCKET_BOUNDS = tuple(f"{(i + 1) / HISTOGRAM_BUCKETS:.1f}" for i in range(HISTOGRAM_BUCKETS))

_COUNTER_HELP = {
    "collected": ("mmagg_predictions_collected", "Predictions taken into a window."),
    "rejected": (
        "mmagg_predictions_rejected",
        "Predictions or inputs refused (NaN/inf confidence, unsupported shape).",
    ),
    "sent": ("mmagg_reports_sent", "Reports the backend accepted."),
    "failed": ("mmagg_reports_failed", "Reports that did not go through (each failure once)."),
    "retried": ("mmagg_report_retries", "HTTP retries inside reports."),
    "merged_back": (
        "mmagg_windows_merged_back",
        "Failed windows merged back so that the next report carries them.",
    ),
}


class AggregatorMetrics:
    """Prometheus collector for mmagg aggregators and sinks, read at scrape time.

    Args:
        registry: register into this ``CollectorRegistry`` (e.g. ``prometheus_client.REGISTRY``
            to join an existing exporter); default: a registry of its own.
        port: also serve ``registry`` over HTTP on this port (``start_http_server``).
        addr: the address to serve on; ``"0.0.0.0"`` lets a remote Prometheus scrape.

    Use one instance per process: :meth:`watch` every aggregator (or sink) with it and give
    each aggregator ``store=metrics.store()`` for the per-class series.

    Metrics (counters end in ``_total``):

    - ``mmagg_predictions_collected_total``, ``mmagg_predictions_rejected_total``,
      ``mmagg_reports_sent_total``, ``mmagg_reports_failed_total``,
      ``mmagg_report_retries_total``, ``mmagg_windows_merged_back_total`` and
      ``mmagg_predictions_dropped_total{reason}``, labelled ``aggregator`` (the aggregator
      key) and ``model_id``;
    - ``mmagg_prediction_confidence`` (histogram: ``_bucket{le}``, ``_count``, ``_sum``)
      labelled ``model_id``, ``class_name``, ``source_id`` (``""`` without per-source);
    - from a :class:`~mmagg.sinks.MonitoringSink`: ``mmagg_sink_frames_total``,
      ``mmagg_sink_frames_skipped_total`` (gaps in the pipeline's frame ids),
      ``mmagg_sink_last_frame_timestamp_seconds`` per ``source_id``, and
      ``mmagg_sink_errors_total{kind}``.

    Example:
        >>> from prometheus_client import CollectorRegistry
        >>> metrics = AggregatorMetrics(registry=CollectorRegistry())
        >>> [m.name for m in metrics.collect()]
        []
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
        addr: str = "127.0.0.1",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._aggregators: weakref.WeakSet[WatchedAggregator] = weakref.WeakSet()
        self._sinks: weakref.WeakSet[WatchedSink] = weakref.WeakSet()
        self._stores: list[MeteredStore] = []
        self._server: Any = None
        self.registry.register(self)
        if port is not None:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The port metrics are served on (useful with ``port=0``), or ``None``."""
        return None if self._server is None else int(self._server.server_port)

    def store(self, inner: Store | str | None = None) -> MeteredStore:
        """A store for ``Aggregator(store=...)`` whose per-class totals this collector exposes.

        ``inner``: the store to wrap (default: ``MMAGG_REDIS_URL``, else process memory).
        """
        metered = MeteredStore(inner)
        with self._lock:
            self._stores.append(metered)
        return metered

    def watch(self, target: WatchedAggregator | WatchedSink) -> None:
        """Expose an aggregator's counters (and, for a sink, its frame and error counts)."""
        with self._lock:
            if isinstance(target, WatchedSink):
                self._sinks.add(target)
                self._aggregators.add(target.aggregator)
            else:
                self._aggregators.add(target)

    def render(self) -> bytes:
        """The registry in Prometheus text format (for a web framework's ``/metrics``)."""
        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        """Stop serving (if a port was given) and leave the registry."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.registry.unregister(self)

    # -- the prometheus_client Collector interface --------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: series appear as aggregators are watched.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            aggregators = list(self._aggregators)
            sinks = list(self._sinks)
            stores = list(self._stores)
        if aggregators:
            yield from self._counter_families(aggregators)
        if stores:
            yield self._confidence_family(stores)
        if sinks:
            yield from self._sink_families(sinks)

    def _counter_families(self, aggregators: list[WatchedAggregator]) -> Iterator[Metric]:
        labels = ["aggregator", "model_id"]
        families = {
            field: CounterMetricFamily(name, text, labels=labels)
            for field, (name, text) in _COUNTER_HELP.items()
        }
        dropped = CounterMetricFamily(
            "mmagg_predictions_dropped",
            "Predictions given up, by reason (http_<status>, shutdown, max_classes, ...).",
            labels=[*labels, "reason"],
        )
        seen: set[str] = set()
        for agg in sorted(aggregators, key=lambda a: a.key):
            if agg.key in seen:  # aggregators sharing a key share one reporter
                continue
            seen.add(agg.key)
            counters = agg.counters
            values = [agg.key, agg.model_id]
            for field, family in families.items():
                family.add_metric(values, getattr(counters, field))
            for reason, count in sorted(counters.dropped.items()):
                dropped.add_metric([*values, reason], count)
        yield from families.values()
        yield dropped

    def _confidence_family(self, stores: list[MeteredStore]) -> Metric:
        totals: dict[Key, ClassStats] = {}
        for store in stores:
            for key, stats in store.totals().items():
                mine = totals.get(key)
                if mine is None:
                    totals[key] = stats
                else:
                    mine.merge_in(stats)
        family = HistogramMetricFamily(
            "mmagg_prediction_confidence",
            "Confidence of every prediction collected, per model, class and source "
            '(buckets are half-open: le="0.5" counts confidences below 0.5).',
            labels=["model_id", "class_name", "source_id"],
        )
        for (model_id, class_name, source_id), stats in sorted(totals.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(BUCKET_BOUNDS, stats.histogram, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            buckets.append(("+Inf", stats.count))
            family.add_metric([model_id, class_name, source_id], buckets, stats.total)
        return family

    def _sink_families(self, sinks: list[WatchedSink]) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "mmagg_sink_frames", "Frames handed to the sink, per source.", labels=["source_id"]
        )
        skipped = CounterMetricFamily(
            "mmagg_sink_frames_skipped",
            "Frames the pipeline never delivered (gaps in frame ids), per source.",
            labels=["source_id"],
        )
        last = GaugeMetricFamily(
            "mmagg_sink_last_frame_timestamp_seconds",
            "Timestamp of the latest frame seen, per source (a stalled camera stops it).",
            labels=["source_id"],
        )
        errors = CounterMetricFamily(
            "mmagg_sink_errors", "Frames the sink could not collect, by kind.", labels=["kind"]
        )
        frame_counts: dict[str, int] = {}
        skipped_counts: dict[str, int] = {}
        last_seen: dict[str, float] = {}
        error_counts: dict[str, int] = {}
        for sink in sinks:
            for source, state in sink.sources().items():
                frame_counts[source] = frame_counts.get(source, 0) + state.frames
                skipped_counts[source] = skipped_counts.get(source, 0) + state.skipped
                if state.last_timestamp is not None:
                    last_seen[source] = max(last_seen.get(source, 0.0), state.last_timestamp)
            for kind, count in sink.errors.items():
                error_counts[kind] = error_counts.get(kind, 0) + count
        for source in sorted(frame_counts):
            frames.add_metric([source], frame_counts[source])
            skipped.add_metric([source], skipped_counts[source])
            if source in last_seen:
                last.add_metric([source], last_seen[source])
        for kind in sorted(error_counts):
            errors.add_metric([kind], error_counts[kind])
        yield from (frames, skipped, last, errors)
