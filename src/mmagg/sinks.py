"""``MonitoringSink``: every frame of an ``InferencePipeline`` (or any loop) into an Aggregator.

The sink is what ``on_prediction=`` expects from Roboflow's ``InferencePipeline.init(...)``
and ``init_with_workflow(...)``: called with ``(predictions, video_frame)`` in single-source
mode and with two lists (``None`` where a source had no frame) in batch mode. It reads the
video frame duck-typed (``source_id``, ``frame_id``, ``frame_timestamp``), so mmagg does not
depend on ``inference``, and it never raises into the pipeline: a frame it cannot use is
counted by kind and logged once per kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mmagg._secrets import get_logger, redact
from mmagg.aggregator import Aggregator
from mmagg.cache import Cache
from mmagg.client import RetryPolicy
from mmagg.stores.base import Store

if TYPE_CHECKING:
    import httpx
    from prometheus_client import CollectorRegistry

    from mmagg.metrics import AggregatorMetrics

__all__ = ["MonitoringSink", "SourceState"]

logger = get_logger("mmagg.sinks")

#: Error kinds the sink counts (``MonitoringSink.errors``).
INVALID_PREDICTIONS = "invalid_predictions"
UNSUPPORTED_OUTPUT = "unsupported_output"
BATCH_MISMATCH = "batch_length_mismatch"
INTERNAL_ERROR = "internal_error"

_MISSING = object()


@dataclass(slots=True)
class SourceState:
    """What the sink saw of one video source.

    Attributes:
        frames: frames handed to the sink (with or without predictions).
        skipped: frames the pipeline never delivered, from gaps in ``frame_id``.
        last_frame_id: the latest ``frame_id`` (``None`` if frames carry none).
        last_timestamp: the latest ``frame_timestamp`` as epoch seconds, or ``None``.
    """

    frames: int = 0
    skipped: int = 0
    last_frame_id: int | None = None
    last_timestamp: float | None = None


class _SinkError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class MonitoringSink:
    """An ``on_prediction`` callable that feeds an :class:`~mmagg.Aggregator`.

    Args:
        aggregator: where predictions go. Build it with ``per_source=True`` to keep one
            window per video source (see :meth:`for_model`).
        output_name: for workflow results (a dict of outputs), the output holding the
            predictions (``sv.Detections`` or a Roboflow JSON dict). Plain Roboflow JSON
            (``{"predictions": [{"class", "confidence", ...}]}``) is recognised as is.
        source_names: names for ``video_frame.source_id`` (``0, 1, ...`` in the order of the
            pipeline's ``video_reference`` list): a sequence or a mapping; sources without a
            name are called ``str(source_id)``.

    Calling the sink never raises: unusable frames are counted in :attr:`errors` by kind
    (``invalid_predictions``, ``unsupported_output``, ``batch_length_mismatch``,
    ``internal_error``) and each kind is logged once.

    Example:
        >>> from types import SimpleNamespace
        >>> sink = MonitoringSink.for_model("yard/3", per_source=True, api_key="k",
        ...                                 api_base_url="http://127.0.0.1:9")
        >>> frame = SimpleNamespace(source_id=0, frame_id=1, frame_timestamp=None)
        >>> sink({"predictions": [{"class": "car", "confidence": 0.9}]}, frame)
        >>> sink([None, {"predictions": "oops"}], [None, frame])  # batch mode, a hole
        >>> dict(sink.errors), sink.aggregator.counters.collected
        ({'invalid_predictions': 1}, 1)
        >>> sink.close(timeout=0)
        False
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        output_name: str = "predictions",
        source_names: Sequence[str] | Mapping[Any, str] | None = None,
    ) -> None:
        if not isinstance(output_name, str) or not output_name:
            raise ValueError(f"output_name: expected a non-empty string, got {output_name!r}")
        self.aggregator = aggregator
        self.output_name = output_name
        self._names: dict[Any, str] = {}
        if isinstance(source_names, Mapping):
            self._names.update({k: str(v) for k, v in source_names.items()})
        elif source_names is not None:
            if isinstance(source_names, (str, bytes)):
                raise TypeError("source_names: expected a sequence of names, got a string")
            self._names.update(enumerate(str(name) for name in source_names))
        self._sources: dict[str, SourceState] = {}
        self._errors: dict[str, int] = {}
        self._logged: set[str] = set()
        self._error_lock = threading.Lock()

    @classmethod
    def for_model(
        cls,
        model_id: str,
        *,
        per_source: bool = False,
        output_name: str = "predictions",
        source_names: Sequence[str] | Mapping[Any, str] | None = None,
        metrics: AggregatorMetrics | None = None,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        metrics_registry: CollectorRegistry | None = None,
        frequency: float = 5,
        api_key: str | None = None,
        api_base_url: str | None = None,
        fire_and_forget: bool = True,
        unique_aggregator_key: str | None = None,
        store: Store | str | None = None,
        cache: Cache | None = None,
        device_id: str | None = None,
        extensions: bool = False,
        request_timeout: float | None = None,
        flush_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> MonitoringSink:
        """A sink with its own :class:`~mmagg.Aggregator` (and Prometheus metrics on request).

        ``frequency`` ... ``transport`` go to ``Aggregator`` (see there). With metrics, the
        store (given, ``MMAGG_REDIS_URL`` or process memory) is wrapped in a
        :class:`~mmagg.stores.metered.MeteredStore`. ``metrics_port`` serves Prometheus metrics on
        that port of ``metrics_addr`` (``"0.0.0.0"`` for a remote Prometheus);
        ``metrics_registry`` registers them into a ``CollectorRegistry``; or pass an
        :class:`~mmagg.metrics.AggregatorMetrics` shared by several sinks.

        Example:
            >>> sink = MonitoringSink.for_model("yard/3", api_key="k", frequency=10,
            ...                                 api_base_url="http://127.0.0.1:9")
            >>> sink.aggregator.frequency
            10
            >>> sink.close(timeout=0)
            True
        """
        if metrics is None and (metrics_port is not None or metrics_registry is not None):
            from mmagg.metrics import AggregatorMetrics

            metrics = AggregatorMetrics(
                registry=metrics_registry, port=metrics_port, addr=metrics_addr
            )
        if metrics is not None:
            store = metrics.store(store)
        aggregator = Aggregator(
            model_id,
            frequency,
            api_key,
            api_base_url,
            fire_and_forget,
            unique_aggregator_key=unique_aggregator_key,
            store=store,
            cache=cache,
            device_id=device_id,
            per_source=per_source,
            extensions=extensions,
            request_timeout=request_timeout,
            flush_timeout=flush_timeout,
            retry=retry,
            clock=clock,
            transport=transport,
        )
        sink = cls(aggregator, output_name=output_name, source_names=source_names)
        if metrics is not None:
            metrics.watch(sink)
        return sink

    def __repr__(self) -> str:
        return f"MonitoringSink({self.aggregator!r}, output_name={self.output_name!r})"

    # -- the on_prediction callable -----------------------------------------------------------

    def __call__(self, predictions: Any, video_frame: Any = None) -> None:
        """Collect one frame (single mode) or one frame per source (batch mode)."""
        try:
            if isinstance(predictions, list):
                frames = video_frame if isinstance(video_frame, list) else None
                if frames is None or len(frames) != len(predictions):
                    got = "no list" if frames is None else f"{len(frames)} frames"
                    self._count(
                        BATCH_MISMATCH,
                        f"batch mode: {len(predictions)} predictions but {got}; "
                        "frames without a matching video frame are collected without source",
                    )
                    frames = (frames or [])[: len(predictions)]
                    frames = frames + [None] * (len(predictions) - len(frames))
                for prediction, frame in zip(predictions, frames, strict=True):
                    self._one(prediction, frame)
            else:
                self._one(predictions, video_frame)
        except Exception as exc:  # the pipeline must never see an exception from monitoring
            self._count(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    def _one(self, prediction: Any, frame: Any) -> None:
        source = self._observe_frame(frame) if frame is not None else None
        if prediction is None:  # a hole in batch mode: the source had no frame
            return
        try:
            payload = self._extract(prediction)
            if payload is None:
                return
            self.aggregator.collect(payload, source_id=source)
        except _SinkError as error:
            self._count(error.kind, str(error))
        except (TypeError, ValueError) as error:  # counted as rejected by the aggregator too
            self._count(INVALID_PREDICTIONS, str(error))

    def _extract(self, prediction: Any) -> Any:
        if _is_detections(prediction):
            return prediction
        if not isinstance(prediction, Mapping) and hasattr(prediction, "model_dump"):
            return prediction  # an inference response object: to_batch reads its model_dump()
        if isinstance(prediction, Mapping):
            value = prediction.get(self.output_name, _MISSING)
            if _is_detections(value) or (isinstance(value, Mapping) and "predictions" in value):
                return value  # a workflow output
            if "predictions" in prediction:  # Roboflow JSON from InferencePipeline.init
                return prediction
            if value is None:  # the workflow produced nothing for this frame
                return None
            outputs = sorted(map(str, prediction))[:8]
            raise _SinkError(
                UNSUPPORTED_OUTPUT,
                f"no predictions under output {self.output_name!r} (outputs: {outputs}); "
                "pass output_name= naming the workflow output that holds them",
            )
        raise _SinkError(
            UNSUPPORTED_OUTPUT,
            f"expected a dict or sv.Detections per frame, got {type(prediction).__name__}",
        )

    def _observe_frame(self, frame: Any) -> str | None:
        raw = getattr(frame, "source_id", None)
        name = self._names.get(raw) if raw is not None else ""
        if name is None:
            name = self._names[raw] = str(raw)
        state = self._sources.get(name)
        if state is None:
            state = self._sources[name] = SourceState()
        state.frames += 1
        frame_id = getattr(frame, "frame_id", None)
        if isinstance(frame_id, int):
            last = state.last_frame_id
            if last is not None and frame_id > last + 1:
                state.skipped += frame_id - last - 1
            state.last_frame_id = frame_id
        stamp = getattr(frame, "frame_timestamp", None)
        if stamp is not None:
            state.last_timestamp = _epoch(stamp)
        return name or None

    def _count(self, kind: str, message: str) -> None:
        with self._error_lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            logger.warning(
                "mmagg sink: %s (further %r errors are counted in sink.errors, not logged)",
                redact(message),
                kind,
            )

    # -- reading and shutting down ------------------------------------------------------------

    @property
    def errors(self) -> Mapping[str, int]:
        """Frames the sink could not collect, by kind (a read-only snapshot)."""
        with self._error_lock:
            return MappingProxyType(dict(self._errors))

    def sources(self) -> dict[str, SourceState]:
        """What was seen per source name (``""`` for frames without a ``source_id``)."""
        return {
            name: SourceState(s.frames, s.skipped, s.last_frame_id, s.last_timestamp)
            for name, s in list(self._sources.items())
        }

    def flush(self, timeout: float | None = None) -> bool:
        """Report everything collected so far; ``True`` when done within ``timeout``."""
        return self.aggregator.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Send the last partial window and stop (see :meth:`mmagg.Aggregator.close`)."""
        return self.aggregator.close(timeout)

    def __enter__(self) -> MonitoringSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_detections(value: object) -> bool:
    return hasattr(value, "xyxy") and hasattr(value, "confidence") and hasattr(value, "data")


def _epoch(stamp: Any) -> float | None:
    if isinstance(stamp, datetime):
        return stamp.timestamp()  # a naive datetime is local time, as inference makes it
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        return float(stamp)
    return None
