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
  maximum with one ``np.maximum.at`` (the least any aggregator must do),
* ``report``: the block at ``frequency=5`` on a simulated 30 fps clock, reporting in the
  background to a loopback backend (``_fault_server.py ok``, its own process, not profiled):
  every 150th call is a report call (claim the interval from the injected cache, take the
  window, hand it to the sender). After each report call a second marker opens an untimed
  part in which the benchmark waits for the sender to finish (``wait_idle``), so the sender's work
  is counted apart ("sender per report") and never inside a call, as in ``hot_path.py``.
  What the sender does on its own (e.g. a timed poll) while a call runs lands in that call.

    python benchmarks/window_instructions.py                 # 300 frames, 50 det, 20 classes
    python benchmarks/window_instructions.py --detections 500 --classes 1000
    python benchmarks/window_instructions.py --report-frames 0   # without the report series

The exact callgrind command is printed. Needs ``valgrind`` on PATH.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

SERIES = ("block", "window", "floor")
REPORT_FPS = 30
REPORT_FREQUENCY = 5


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


def inner(
    frames_n: int, per_frame: int, classes: int, report_frames: int, port: int, out: str
) -> None:
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
    if report_frames:
        report_series(frames, report_frames, port, out)


def report_series(frames: list[Frame], report_frames: int, port: int, out: str) -> None:
    """A marker before every call; after a report call a second marker, then the untimed
    wait for the sender (one part of its own)."""
    from mmagg import MemoryCache
    from mmagg.block import ModelMonitoringInferenceAggregatorBlockV1

    now = [1_800_000_000.0]
    block = ModelMonitoringInferenceAggregatorBlockV1(
        MemoryCache(),
        "bench-key",
        None,
        None,
        api_base_url=f"http://127.0.0.1:{port}",
        clock=lambda: now[0],
    )
    key = "instructions-report"
    reporter = block.reporter(key, REPORT_FREQUENCY)
    import mmagg.reporter as reporter_module

    # Under valgrind a call takes ~0.1 s of real time, so 5 s of simulated stream take tens
    # of seconds: the sender would stop polling (frequency + 2 s of real time after a
    # report) long before the next report call. Keep it polling, every second (each poll
    # lands in whichever part is open: a few thousand instructions every few calls). A
    # version without a polling sender ignores both.
    reporter_module._POLL_SLACK = 3600.0  # type: ignore[attr-defined]
    reporter_module._POLL_INTERVAL = 1.0  # type: ignore[attr-defined]
    reports: list[int] = []
    for i in range(3):  # warm-up: imports, the interval starts, the first layout
        now[0] += 1 / REPORT_FPS
        block.run(True, frames[i % len(frames)], REPORT_FREQUENCY, key, "bench/1")
    for i in range(report_frames):
        now[0] += 1 / REPORT_FPS
        frame = frames[i % len(frames)]
        os.getppid()
        result = block.run(True, frame, REPORT_FREQUENCY, key, "bench/1")
        if "background" in str(result["message"]):
            os.getppid()  # the wait for the sender gets a part of its own
            reports.append(i)
            reporter.wait_idle(60)
    os.getppid()
    sent = reporter.counters().sent
    reporter.close(10)
    with open(out, "w") as handle:
        handle.write(f"{sent}\n" + " ".join(map(str, reports)))


def percentile(ordered: list[int], q: float) -> int:
    return ordered[max(0, int(len(ordered) * q) - 1)]


class Report:
    """The report series: every call, the report calls' indices, the sender's parts."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gaps: list[int] = []
        self.reports: list[int] = []
        self.sent = 0


def outer(
    frames_n: int, per_frame: int, classes: int, report_frames: int
) -> tuple[dict[str, list[int]], Report]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind not found on PATH")
    backend: subprocess.Popen[str] | None = None
    port = 0
    if report_frames:
        port = _free_port()
        server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fault_server.py")
        backend = subprocess.Popen(
            [sys.executable, server, str(port), "ok"], stdout=subprocess.PIPE, text=True
        )
        assert backend.stdout is not None
        backend.stdout.readline()  # "ready"
    try:
        return _profile(valgrind, frames_n, per_frame, classes, report_frames, port)
    finally:
        if backend is not None:
            backend.terminate()
            backend.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _profile(
    valgrind: str, frames_n: int, per_frame: int, classes: int, report_frames: int, port: int
) -> tuple[dict[str, list[int]], Report]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        report_out = os.path.join(tmp, "reports.txt")
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
            f"--report-frames={report_frames}",
            f"--port={port}",
            f"--out={report_out}",
        ]
        print("$ " + " ".join(command[:4] + ["python"] + command[5:-2]))
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
        report = Report()
        if report_frames:
            with open(report_out) as handle:
                sent, indices = (handle.read().split("\n") + [""])[:2]
            report.sent = int(sent)
            report.reports = [int(i) for i in indices.split()]
    # Part 1 runs up to the first marker; then N calls, then one part with the next
    # series' warm-up, and so on.
    series: dict[str, list[int]] = {}
    first = 2
    for name in SERIES:
        series[name] = [totals[p] for p in range(first, first + frames_n)]
        first += frames_n + 1
    chosen = set(report.reports)
    for i in range(report_frames):
        report.calls.append(totals[first])
        first += 1
        if i in chosen:
            report.gaps.append(totals[first])
            first += 1
    return series, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--detections", type=int, default=50)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument(
        "--report-frames",
        type=int,
        default=600,
        help="calls of the report series (a report every 150; 0: leave it out)",
    )
    parser.add_argument("--series", action="store_true", help="also print every call's count")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.frames, args.detections, args.classes, args.report_frames, args.port, args.out)
        return 0
    series, report = outer(args.frames, args.detections, args.classes, args.report_frames)
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
    if report.calls:
        print_report(report, floor_mean)
    if args.series:
        for name in SERIES:
            print(f"{name}: " + " ".join(str(v) for v in series[name]))
        if report.calls:
            print("report: " + " ".join(str(v) for v in report.calls))
    return 0


def print_report(report: Report, floor_mean: float) -> None:
    values = sorted(report.calls)
    mean = statistics.fmean(values)
    p50 = statistics.median(values)
    p99 = percentile(values, 0.99)
    print(
        f"{'report':8}{mean:10.0f}{p50:10.0f}{p99:10.0f}{values[-1]:10.0f}"
        f"{p99 / p50:9.1f}{mean / floor_mean:7.1f}x"
    )
    chosen = set(report.reports)
    at_report = sorted(report.calls[i] for i in chosen)
    plain = sorted(v for i, v in enumerate(report.calls) if i not in chosen)
    sender = sorted(report.gaps)
    if not at_report:
        print("report series: no report call (MISSED: nothing was due)")
        return
    print(
        f"report series ({len(report.calls)} calls at {REPORT_FPS} fps, every "
        f"{REPORT_FREQUENCY} s; {len(at_report)} report calls, {report.sent} reports sent):"
    )
    print(
        f"  report call: median {statistics.median(at_report):.0f}, max {at_report[-1]:.0f} "
        f"instructions ({statistics.median(at_report) / statistics.median(plain):.1f}x the "
        f"plain call's median {statistics.median(plain):.0f})"
    )
    print(
        f"  sender per report (untimed part after the report call): median "
        f"{statistics.median(sender):.0f} instructions"
    )


if __name__ == "__main__":
    sys.exit(main())
