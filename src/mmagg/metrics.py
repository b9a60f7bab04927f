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

import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mmagg.stores import Store, resolve_store
from mmagg.window import HISTOGRAM_BUCKETS, ClassStats, Key, Window

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

if TYPE_CHECKING:
    from mmagg.aggregator import Aggregator
    from mmagg.sinks import MonitoringSink

__all__ = ["AggregatorMetrics", "MeteredStore"]

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


class MeteredStore:
    """A :class:`~mmagg.stores.Store` that keeps running per-class totals for Prometheus.

    Every call is passed to ``inner``; ``take``/``claim`` add the taken window's statistics
    to the totals and ``give_back`` subtracts them again (the window is counted when it is
    taken the next time). The caller thread's ``window(key)`` stays a dictionary look-up.

    With a shared (Redis) store each process counts the windows it reports; summed over
    processes the totals are exact, but a window given back after a failed report may make
    a series dip until it is reported again.

    Example:
        >>> from mmagg.predictions import to_batch
        >>> store = MeteredStore()
        >>> _ = store.window("k").add(to_batch({"predictions": [{"class": "cat",
        ...     "confidence": 0.4}]}), model_id="m/1")
        >>> store.totals()[("m/1", "cat", "")].count
        1
    """

    def __init__(self, inner: Store | str | None = None) -> None:
        self.inner = resolve_store(inner)
        self.shared = self.inner.shared
        self._lock = threading.Lock()
        self._reported: dict[Key, ClassStats] = {}
        self._keys: dict[str, None] = {}
        _METERED.add(self)

    def __repr__(self) -> str:
        return f"MeteredStore({self.inner!r})"

    def _reset_after_fork(self) -> None:
        # A forked child starts with empty windows (the stores reset theirs): its totals
        # must not repeat what the parent collected.
        self._lock = threading.Lock()
        self._reported = {}
        self._keys = {}

    # -- the Store protocol -------------------------------------------------------------------

    def window(self, key: str) -> Window:
        if key not in self._keys:
            self._keys[key] = None
        return self.inner.window(key)

    def claim(self, key: str, frequency: float) -> Window | None:
        return self._counted(lambda: self.inner.claim(key, frequency))

    def take(self, key: str) -> Window:
        window = self._counted(lambda: self.inner.take(key))
        assert window is not None
        return window

    def give_back(self, key: str, window: Window) -> None:
        stats = window.stats()
        if self.shared:  # I/O: never under the lock a scrape waits on
            self.inner.give_back(key, window)
            with self._lock:
                self._add(stats, -1)
            return
        with self._lock:  # atomic for a scrape: the data moves from the totals to the window
            self.inner.give_back(key, window)
            self._add(stats, -1)

    def close(self) -> None:
        self.inner.close()

    # -- reading ------------------------------------------------------------------------------

    def totals(self) -> dict[Key, ClassStats]:
        """Statistics of every prediction collected so far (reported or still in a window)."""
        with self._lock:
            merged = {key: stats.copy() for key, stats in self._reported.items()}
            for key in list(self._keys):
                for entry, stats in self.inner.window(key).stats().items():
                    mine = merged.get(entry)
                    if mine is None:
                        merged[entry] = stats
                    else:
                        mine.merge_in(stats)
        return merged

    def _counted(self, take: Any) -> Window | None:
        if self.shared:
            window: Window | None = take()
            if window is not None:
                stats = window.stats()
                with self._lock:
                    self._add(stats, 1)
            return window
        with self._lock:  # atomic for a scrape: the data moves from the window to the totals
            window = take()
            if window is not None:
                self._add(window.stats(), 1)
        return window

    def _add(self, stats: dict[Key, ClassStats], sign: int) -> None:
        for key, item in stats.items():
            mine = self._reported.get(key)
            if mine is None:
                mine = self._reported[key] = ClassStats()
            mine.count += sign * item.count
            mine.total += sign * item.total
            mine.histogram = [
                a + sign * b for a, b in zip(mine.histogram, item.histogram, strict=True)
            ]


_METERED: weakref.WeakSet[MeteredStore] = weakref.WeakSet()


def _reset_metered_after_fork() -> None:
    for store in list(_METERED):
        store._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_metered_after_fork)


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
        self._aggregators: weakref.WeakSet[Aggregator] = weakref.WeakSet()
        self._sinks: weakref.WeakSet[MonitoringSink] = weakref.WeakSet()
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

    def watch(self, target: Aggregator | MonitoringSink) -> None:
        """Expose an aggregator's counters (and, for a sink, its frame and error counts)."""
        with self._lock:
            if hasattr(target, "aggregator"):
                self._sinks.add(target)  # type: ignore[arg-type]
                self._aggregators.add(target.aggregator)
            else:
                self._aggregators.add(target)  # type: ignore[arg-type]

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

    def _counter_families(self, aggregators: list[Aggregator]) -> Iterator[Metric]:
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

    def _sink_families(self, sinks: list[MonitoringSink]) -> Iterator[Metric]:
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
