"""`mmagg demo`: the backend in-process and a SIMULATED multi-camera stream reporting to it.

Nothing here touches a camera, a model or the internet. Each simulated source produces
30 frames per second of `sv.Detections` with random boxes; every class draws its
confidences from its own beta distribution, and half-way through one class ("helmet")
drifts down, the kind of change Model Monitoring exists to show.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

FPS = 30
MODEL_ID = "site-safety/3"
WORKSPACE = "demo"
DRIFTING_CLASS = "helmet"


@dataclass(frozen=True)
class SimulatedClass:
    """A class's detection rate and confidence distribution Beta(a, b), before/after drift."""

    name: str
    per_frame: float
    beta: tuple[float, float]
    drifted_beta: tuple[float, float] | None = None


@dataclass(frozen=True)
class SimulatedSource:
    """One simulated camera."""

    source_id: str
    classes: tuple[SimulatedClass, ...]


SOURCES = (
    SimulatedSource(
        "cam-1-gate",
        (
            SimulatedClass("person", 1.5, (9, 2)),
            SimulatedClass(DRIFTING_CLASS, 1.2, (10, 2), drifted_beta=(3, 4)),
            SimulatedClass("car", 0.4, (12, 2)),
        ),
    ),
    SimulatedSource(
        "cam-2-yard",
        (
            SimulatedClass("car", 2.0, (14, 2)),
            SimulatedClass("truck", 0.6, (6, 3)),
            SimulatedClass("person", 0.8, (7, 3)),
        ),
    ),
    SimulatedSource(
        "cam-3-dock",
        (
            SimulatedClass("forklift", 0.9, (8, 3)),
            SimulatedClass("person", 1.0, (8, 2)),
            SimulatedClass(DRIFTING_CLASS, 0.8, (9, 2), drifted_beta=(3, 4)),
        ),
    ),
)


# supervision's import-time notice that OpenCV is absent (it then uses NumPy); the demo only
# builds Detections, which need no OpenCV. Exactly that warning, from supervision only.
OPENCV_ABSENT_WARNING = r"OpenCV\b.*\bis not installed"


def _import_supervision() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=OPENCV_ABSENT_WARNING,
            category=UserWarning,
            module=r"supervision(\.|$)",
        )
        import supervision as sv
    return sv


class StreamSimulator:
    """Frames of `sv.Detections` for every source, with the drift after `drift_at` frames.

    Example:
        >>> simulator = StreamSimulator(seed=1, drift_at=10)
        >>> source_id, detections = next(simulator.frames())
        >>> source_id, set(detections.data["class_name"]) <= set(simulator.classes)
        ('cam-1-gate', True)
    """

    def __init__(
        self,
        sources: tuple[SimulatedSource, ...] = SOURCES,
        *,
        seed: int | None = None,
        drift_at: int = 0,
        width: int = 1280,
        height: int = 720,
    ) -> None:
        self.sources = sources
        self.drift_at = drift_at
        self.frame_index = 0
        self._rng = np.random.default_rng(seed)
        self._sv = _import_supervision()
        self._size = np.array([width, height, width, height], dtype=np.float32)
        names = sorted({c.name for s in sources for c in s.classes})
        self.classes = names
        self._class_ids = {name: i for i, name in enumerate(names)}

    @property
    def drifted(self) -> bool:
        """Whether the drifting classes use their drifted distribution now."""
        return self.frame_index >= self.drift_at

    def frame(self, source: SimulatedSource) -> Any:
        """One frame of detections for `source`."""
        rng = self._rng
        names: list[str] = []
        confidences: list[np.ndarray] = []
        for cls in source.classes:
            n = int(rng.poisson(cls.per_frame))
            if n == 0:
                continue
            a, b = cls.drifted_beta if (cls.drifted_beta and self.drifted) else cls.beta
            confidences.append(rng.beta(a, b, size=n))
            names.extend([cls.name] * n)
        n = len(names)
        corners = rng.uniform(0, 0.8, size=(n, 2))
        sizes = rng.uniform(0.05, 0.2, size=(n, 2))
        xyxy = np.hstack([corners, corners + sizes]).astype(np.float32) * self._size
        frame_id = uuid.uuid4().hex
        return self._sv.Detections(
            xyxy=xyxy.reshape(n, 4),
            confidence=np.concatenate(confidences) if confidences else np.empty(0),
            class_id=np.array([self._class_ids[c] for c in names], dtype=int),
            data={
                "class_name": np.array(names, dtype=np.str_),
                "inference_id": np.array([frame_id] * n, dtype=np.str_),
                "prediction_type": np.array(["object-detection"] * n, dtype=np.str_),
            },
        )

    def frames(self) -> Iterator[tuple[str, Any]]:
        """Endless (source_id, detections) pairs, one frame of every source per tick."""
        while True:
            for source in self.sources:
                yield source.source_id, self.frame(source)
            self.frame_index += 1


@dataclass
class DemoResult:
    """What a demo run did and read back."""

    url: str
    workspace: str
    api_key: str
    database_url: str
    frames: int
    started_at: float
    drift_at: float
    ended_at: float
    counters: Any
    stats: dict[str, Any] = field(default_factory=dict)
    first_half: dict[str, Any] = field(default_factory=dict)
    second_half: dict[str, Any] = field(default_factory=dict)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def run_stream(
    base_url: str,
    api_key: str,
    *,
    seconds: float,
    frequency: int,
    seed: int | None = None,
    on_tick: Any = None,
) -> tuple[int, float, float, Any]:
    """Feed the simulated cameras in real time through `mmagg.Aggregator` over HTTP.

    Returns (frames per source, start time, drift time, final counters). `on_tick(elapsed,
    frames, counters)` is called a few times per second for progress display.
    """
    from mmagg import Aggregator

    total_ticks = max(int(seconds * FPS), 1)
    simulator = StreamSimulator(seed=seed, drift_at=total_ticks // 2)
    aggregator = Aggregator(
        model_id=MODEL_ID,
        frequency=frequency,
        api_key=api_key,
        api_base_url=base_url,
        fire_and_forget=True,
        per_source=True,
        extensions=True,
        device_id="demo-host",
    )
    started = time.time()
    drift_time = started + seconds / 2
    frames = simulator.frames()
    tick_start = time.perf_counter()
    try:
        for tick in range(total_ticks):
            for _ in simulator.sources:
                source_id, detections = next(frames)
                aggregator.collect(detections, source_id=source_id)
            if on_tick is not None and tick % 10 == 0:
                on_tick(tick / FPS, tick, aggregator.counters)
            # Pace to wall-clock 30 fps so reports land `frequency` seconds apart.
            delay = tick_start + (tick + 1) / FPS - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if on_tick is not None:
            on_tick(total_ticks / FPS, total_ticks, aggregator.counters)
    finally:
        aggregator.close(timeout=5.0)
    return total_ticks, started, drift_time, aggregator.counters


def read_back(
    base_url: str, workspace: str, api_key: str, start: float, middle: float, end: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The read endpoint's answer for the whole run and for each half."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"}
    url = f"{base_url}/{workspace}/inference-stats"
    answers = []
    with httpx.Client(timeout=10) as client:
        for lo, hi in ((start, end), (start, middle), (middle, end)):
            response = client.get(
                url, headers=headers, params={"startTime": _utc(lo), "endTime": _utc(hi)}
            )
            response.raise_for_status()
            answers.append(response.json())
    return answers[0], answers[1], answers[2]


def demo_rules(seconds: float, frequency: float, workspace: str = WORKSPACE) -> Any:
    """The alert rules `mmagg demo` ships: helmet's median confidence and its drift.

    Sized to the run: the window holds three reports, the baseline is the first half (before
    the drift), so the drift half-way fires during the run.

    Example:
        >>> [r.name for r in demo_rules(20, 2).rules]
        ['helmet-confidence-low', 'helmet-drift']
    """
    from mmagg.server.alert_rules import parse_rules

    window = max(3 * frequency, 4.0)
    return parse_rules(
        {
            "rules": [
                {
                    "name": "helmet-confidence-low",
                    "workspace": workspace,
                    "model": MODEL_ID,
                    "class": DRIFTING_CLASS,
                    "metric": "median_confidence",
                    "below": 0.6,
                    "window": f"{window:g}s",
                    "for": f"{frequency:g}s",
                },
                {
                    "name": "helmet-drift",
                    "workspace": workspace,
                    "model": MODEL_ID,
                    "class": DRIFTING_CLASS,
                    "metric": "drift",
                    "above": 0.25,
                    "window": f"{window:g}s",
                    "baseline": f"{max(seconds / 2, window):g}s",
                },
            ]
        },
        "demo rules",
    )


def describe_alert(note: Any) -> str:
    """One console line for an alert notification of the demo."""
    return f"ALERT {note.status.upper()}: {note.rule} — {note.annotations.get('summary', '')}"


DEMO_FINISHED = (
    "This was a demo: the SIMULATED stream of `mmagg demo` has finished, so its model no "
    "longer reports. Nothing is broken; the alerts and drift below are what it produced."
)
