"""`mmagg replay`: the shipped sample through the aggregator to the real backend, every report
checked against windows computed here, independently of mmagg."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import typer
from integrations_support import NO_RETRY, QUICK_RETRY, SAMPLE, Backend
from tests.conftest import Reply
from typer.testing import CliRunner

from mmagg.replay import BadLine, replay, replay_command

FREQUENCY = 5
Window = dict[tuple[str, str, str], tuple[float, str, int]]  # key -> (best, inference id, count)


def _epoch(value: Any) -> float:
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return float(value)


def _predictions(line: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(class, confidence, inference id) of one line, read the way the format says."""
    if "detections" in line:
        cols = line["detections"]
        ids = cols.get("inference_id", "")
        return [
            (name, conf, ids if isinstance(ids, str) else ids[i])
            for i, (name, conf) in enumerate(
                zip(cols["class_name"], cols["confidence"], strict=True)
            )
        ]
    value = line["predictions"]
    if isinstance(value, list):
        return [(p["class"], p["confidence"], line.get("inference_id", "")) for p in value]
    return [(name, d["confidence"], line.get("inference_id", "")) for name, d in value.items()]


def expected_windows(path: Path, frequency: int, model_id: str) -> tuple[list[Window], int]:
    """The windows a faithful replay reports, and how many reports (empty ones included)."""
    windows: list[Window] = []
    reports = 0
    window: Window = {}
    last = clock = None
    for text in path.read_text().splitlines():
        line = json.loads(text)
        when = _epoch(line["timestamp"])
        clock = when if clock is None else max(clock, when)
        last = clock if last is None else last
        for name, conf, inference_id in _predictions(line):
            key = (line.get("model_id", model_id), name, line.get("source_id", ""))
            best = window.get(key)
            if best is None:
                window[key] = (conf, inference_id, 1)
            elif conf > best[0]:  # the first seen wins ties
                window[key] = (conf, inference_id, best[2] + 1)
            else:
                window[key] = (best[0], best[1], best[2] + 1)
        if int(clock - last) >= frequency:
            reports += 1
            if window:
                windows.append(window)
            window, last = {}, clock
    if window:
        windows.append(window)
        reports += 1
    return windows, reports


# The sample is a recording with its own dates: read it back over its own span (plus a day each
# side), never over the server's default "last 24 hours", so the test holds on any date.
_SPAN = [_epoch(json.loads(text)["timestamp"]) for text in SAMPLE.read_text().splitlines()]
SAMPLE_RANGE = {"startTime": str(min(_SPAN) - 86400), "endTime": str(max(_SPAN) + 86400)}


def stored_windows(backend: Backend, workspace: str, key: str) -> list[Window]:
    """What the backend stored, one window per report, in the order reports arrived."""
    samples = backend.get(workspace, key, "samples", limit=1000, **SAMPLE_RANGE)["samples"]
    by_report: dict[int, Window] = defaultdict(dict)
    for s in samples:
        by_report[s["report_id"]][(s["model_id"], s["class_name"], s["source_id"] or "")] = (
            s["confidence"],
            s["inference_id"],
            s["prediction_count"],
        )
    return [by_report[report_id] for report_id in sorted(by_report)]


@pytest.fixture(scope="module")
def expected() -> tuple[list[Window], int]:
    return expected_windows(SAMPLE, FREQUENCY, "yard-detector/3")


def test_sample_is_what_the_docs_promise() -> None:
    lines = [json.loads(text) for text in SAMPLE.read_text().splitlines()]
    assert 200 <= len(lines) <= 1000
    assert {line["source_id"] for line in lines} == {"cam-entrance", "cam-yard"}
    assert {"predictions", "detections"} <= {k for line in lines for k in line}
    assert len({name for line in lines for name, _, _ in _predictions(line)}) >= 5


def test_replay_of_the_sample_reports_every_window(
    backend: Backend, expected: tuple[list[Window], int]
) -> None:
    windows, reports = expected
    assert len(windows) >= 5  # the sample spans several intervals
    workspace, key = backend.new_workspace()
    result = replay(
        SAMPLE,
        model_id="yard-detector/3",
        api_key=key,
        api_base_url=backend.base_url,
        frequency=FREQUENCY,
        fast=True,
        per_source=True,
        extensions=True,
        retry=QUICK_RETRY,
    )
    assert result.exit_code == 0 and result.ok
    assert result.bad_lines == [] and result.report_errors == []
    assert result.frames == 300
    assert result.counters.sent == reports
    assert result.counters.collected == sum(c for w in windows for _, _, c in w.values())
    assert stored_windows(backend, workspace, key) == windows
    assert result.recorded_seconds == pytest.approx(29.81)


MALFORMED = [
    (5, "not json", "not JSON"),
    (
        50,
        '{"predictions": [{"class": "car", "confidence": "high"}], "timestamp": 1}',
        "confidence: expected a number",
    ),
    (100, "[1, 2]", "expected a JSON object"),
    (150, '{"detections": {"class_name": ["car"], "confidence": [0.1, 0.2]}}', "expected 1 values"),
    (200, '{"predictions": [], "timestamp": "yesterday"}', "timestamp: not an ISO-8601"),
    (250, '{"timestamp": 1795680000}', "exactly one of 'predictions' or 'detections'"),
    (260, '{"predictions": [], "source_id": {"cam": 1}}', "source_id: expected"),
]


def test_malformed_lines_are_reported_skipped_and_counted(
    backend: Backend, expected: tuple[list[Window], int], tmp_path: Path
) -> None:
    lines = SAMPLE.read_text().splitlines()
    bad_at = {}
    for after, text, _ in reversed(MALFORMED):
        lines.insert(after, text)
    lines.insert(20, "")  # a blank line is not a frame, and not an error either
    for lineno, text in enumerate(lines, start=1):
        for _, bad, reason in MALFORMED:
            if text == bad:
                bad_at[lineno] = reason
    path = tmp_path / "recording.jsonl"
    path.write_text("\n".join(lines) + "\n")
    workspace, key = backend.new_workspace()
    result = replay(
        path,
        model_id="yard-detector/3",
        api_key=key,
        api_base_url=backend.base_url,
        frequency=FREQUENCY,
        fast=True,
        extensions=True,
        retry=QUICK_RETRY,
    )
    assert [bad.lineno for bad in result.bad_lines] == sorted(bad_at)
    for bad in result.bad_lines:
        assert bad_at[bad.lineno] in bad.reason
    assert result.frames == 300 and result.exit_code == 0
    assert result.counters.rejected == 0  # refused at parsing, never handed to the aggregator
    assert stored_windows(backend, workspace, key) == expected[0]


def test_speed_paces_frames_on_recorded_time(capture_server: Any) -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    lines = SAMPLE.read_text().splitlines()[:60]
    result = replay(
        lines,
        api_key="k",
        api_base_url=capture_server.url,
        speed=4,
        frequency=FREQUENCY,
        sleep=sleep,
        monotonic=lambda: now[0],
        retry=QUICK_RETRY,
    )
    assert result.ok
    assert now[0] == pytest.approx(result.recorded_seconds / 4)
    assert len(sleeps) >= 50
    # The same recording gives the same reports whatever the pace.
    fast = replay(
        lines,
        api_key="k",
        api_base_url=capture_server.url,
        fast=True,
        frequency=FREQUENCY,
        retry=QUICK_RETRY,
    )
    assert fast.counters == result.counters


def test_frames_without_timestamps_are_spaced_by_fps(capture_server: Any) -> None:
    lines = [
        json.dumps({"predictions": [{"class": "car", "confidence": i / 100}]}) for i in range(100)
    ]
    result = replay(
        lines,
        api_key="k",
        api_base_url=capture_server.url,
        fast=True,
        fps=10,
        frequency=FREQUENCY,
        retry=QUICK_RETRY,
    )
    assert result.recorded_seconds == pytest.approx(9.9)
    assert result.counters.sent == 2  # one interval (at 5 s) and the final partial window
    confidences = [
        max(r["confidence"] for r in post.json()["inference_results"])
        for post in capture_server.posts
    ]
    assert confidences[-1] == 0.99


def test_refused_reports_fail_the_replay(capture_server: Any) -> None:
    capture_server.on_post = lambda req: Reply(status=400, body={"detail": "no"})
    result = replay(
        SAMPLE.read_text().splitlines()[:80],
        api_key="k",
        api_base_url=capture_server.url,
        fast=True,
        frequency=FREQUENCY,
        retry=NO_RETRY,
    )
    assert result.exit_code == 1
    assert result.counters.dropped.get("http_400", 0) > 0
    assert result.report_errors and all("Error while uploading" in m for m in result.report_errors)


def test_an_unreachable_backend_at_the_end_fails_the_replay(capture_server: Any) -> None:
    capture_server.on_post = lambda req: Reply(status=503)
    result = replay(
        SAMPLE.read_text().splitlines()[:10],
        api_key="k",
        api_base_url=capture_server.url,
        fast=True,
        frequency=FREQUENCY,
        retry=NO_RETRY,
        flush_timeout=5,
    )
    assert result.counters.failed >= 1
    assert result.exit_code == 1


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("replay")(replay_command)

    @app.callback()
    def main() -> None:
        """mmagg (test harness: the replay command as cli.py registers it)."""

    return app


def test_cli_replays_the_sample(backend: Backend, cli: typer.Typer) -> None:
    workspace, key = backend.new_workspace()
    result = CliRunner().invoke(
        cli,
        [
            "replay",
            str(SAMPLE),
            "--fast",
            "--api-key",
            key,
            "--api-base-url",
            backend.base_url,
            "--model-id",
            "yard-detector/3",
            "--extensions",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "300 frames" in result.output and "0 bad lines" in result.output
    assert len(stored_windows(backend, workspace, key)) >= 5


def test_cli_reports_bad_lines_and_exit_codes(
    capture_server: Any, cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"predictions": [{"class": "car", "confidence": 0.5}], "timestamp": 0}\n'
        '{"predictions": [{"class": "car", "confidence": [1]}]}\n'
    )
    runner = CliRunner()
    ok = runner.invoke(
        cli, ["replay", str(path), "--fast", "--api-key", "k", "--api-base-url", capture_server.url]
    )
    assert ok.exit_code == 0, ok.output
    assert "line 2: predictions[0].confidence" in ok.output
    assert "1 bad lines skipped" in ok.output
    capture_server.on_post = lambda req: Reply(status=403, body={"detail": "forbidden"})
    refused = runner.invoke(
        cli, ["replay", str(path), "--fast", "--api-key", "k", "--api-base-url", capture_server.url]
    )
    assert refused.exit_code == 1
    missing = runner.invoke(cli, ["replay", str(tmp_path / "nope.jsonl"), "--api-key", "k"])
    assert missing.exit_code == 2
    for name in ("ROBOFLOW_API_KEY", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    no_key = runner.invoke(cli, ["replay", str(path), "--fast"])
    assert no_key.exit_code == 2 and "API key" in no_key.output


def test_bad_line_str() -> None:
    assert str(BadLine(3, "not JSON")) == "line 3: not JSON"
