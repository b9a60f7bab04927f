"""Instructions per call of the hot path, counted by callgrind: repeatable on a busy machine.

Wall-clock timings swing by 2-10x when other processes share the cores; instruction counts
do not. This script runs itself under ``valgrind --tool=callgrind`` with
``--dump-before=os_getppid*``: the measured loop calls ``os.getppid()`` before every frame,
so callgrind writes one profile part per call, and the part totals are the instructions of
exactly one call (the interpreter's own work included). Three series, same frames:

* ``block``: ``ModelMonitoringInferenceAggregatorBlockV1.run`` (frequency 1 h: no report is
  due, nothing is sent; what the video loop pays between reports),
* ``window``: ``to_batch`` + ``Window.add`` only (the part issue 14 reworks),
* ``floor``: read the confidence and class-id columns and fold them into a per-class running
  maximum with one ``np.maximum.at`` (the least any aggregator must do).

    python benchmarks/window_instructions.py                 # 300 frames, 50 det, 20 classes
    python benchmarks/window_instructions.py --detections 500 --classes 1000

The exact callgrind command is printed. Needs ``valgrind`` on PATH.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

SERIES = ("block", "window", "floor")


class Frame:
    """Duck-typed ``sv.Detections`` (the columns ``to_batch`` reads), so that the profiled
    process does not import supervision and OpenCV."""

    def __init__(self, rng: np.random.Generator, index: int, per_frame: int, names: Any) -> None:
        self.class_id = rng.integers(0, len(names), per_frame)
        self.xyxy = rng.random((per_frame, 4)) * 640
        self.confidence = rng.beta(5, 2, per_frame).astype(np.float32)
        self.data = {
            "class_name": names[self.class_id],
            "inference_id": np.full(per_frame, f"frame-{index}"),
            "prediction_type": np.full(per_frame, "object-detection"),
        }


def inner(frames_n: int, per_frame: int, classes: int) -> None:
    """The profiled process: one ``os.getppid()`` marker before every measured call."""
    from mmagg import MemoryCache
    from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1
    from mmagg.predictions import to_batch
    from mmagg.window import Window

    names = np.array([f"class_{i:04d}" for i in range(classes)])
    rng = np.random.default_rng(0)
    frames = [Frame(rng, i, per_frame, names) for i in range(frames_n)]
    warm = [Frame(rng, -i, per_frame, names) for i in range(1, 4)]

    block = ModelMonitoringInferenceAggregatorBlockV1(
        MemoryCache(), "bench-key", None, None, api_base_url="http://127.0.0.1:9"
    )

    def block_run(frame: Frame) -> object:
        return block.run(True, frame, 3600, "instructions", "bench/1")

    window = Window()

    def window_run(frame: Frame) -> object:
        return window.add(to_batch(frame), model_id="bench/1", seen_at=1.0)

    running = np.full(classes, -np.inf)

    def floor_run(frame: Frame) -> object:
        confidence = np.asarray(frame.confidence)
        class_id = np.asarray(frame.class_id)
        np.maximum.at(running, class_id, confidence)
        return None

    runs: dict[str, Callable[[Frame], object]] = {
        "block": block_run,
        "window": window_run,
        "floor": floor_run,
    }
    for name in SERIES:
        run = runs[name]
        for frame in warm:
            run(frame)
        for frame in frames:
            os.getppid()
            run(frame)
        os.getppid()  # closes the last call; the next series' set-up gets its own part


def percentile(ordered: list[int], q: float) -> int:
    return ordered[max(0, int(len(ordered) * q) - 1)]


def outer(frames_n: int, per_frame: int, classes: int) -> dict[str, list[int]]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        command = [
            valgrind,
            "--tool=callgrind",
            "--dump-before=os_getppid*",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--inner",
            f"--frames={frames_n}",
            f"--detections={per_frame}",
            f"--classes={classes}",
        ]
        print("$ " + " ".join(command[:4] + ["python"] + command[5:]))
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
        totals: dict[int, int] = {}
        for path in glob.glob(out + ".*"):
            with open(path) as handle:
                text = handle.read()
            part = re.search(r"^part: (\d+)$", text, re.M)
            total = re.search(r"^totals: (\d+)$", text, re.M)
            if part and total:
                totals[int(part.group(1))] = int(total.group(1))
    # Part 1 runs up to the first marker; then N calls, then one part with the next
    # series' warm-up, and so on.
    series: dict[str, list[int]] = {}
    first = 2
    for name in SERIES:
        series[name] = [totals[p] for p in range(first, first + frames_n)]
        first += frames_n + 1
    return series


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--detections", type=int, default=50)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--series", action="store_true", help="also print every call's count")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.frames, args.detections, args.classes)
        return 0
    series = outer(args.frames, args.detections, args.classes)
    print(
        f"instructions per call: {args.frames} frames, {args.detections} detections/frame, "
        f"{args.classes} classes"
    )
    print(f"{'':8}{'mean':>10}{'p50':>10}{'p99':>10}{'max':>10}{'p99/p50':>9}{'/floor':>8}")
    floor_mean = statistics.fmean(series["floor"])
    for name in SERIES:
        values = sorted(series[name])
        mean = statistics.fmean(values)
        p50 = statistics.median(values)
        p99 = percentile(values, 0.99)
        print(
            f"{name:8}{mean:10.0f}{p50:10.0f}{p99:10.0f}{values[-1]:10.0f}"
            f"{p99 / p50:9.1f}{mean / floor_mean:7.1f}x"
        )
    if args.series:
        for name in SERIES:
            print(f"{name}: " + " ".join(str(v) for v in series[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
