"""`mmagg replay` as a newcomer meets it (issue 13): the command in a subprocess against the real
backend; what it prints is checked against values computed here from the recording."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from integrations_support import SAMPLE, Backend

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"
ROBOFLOW_DOCS = "https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key"


def mmagg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmagg", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def epoch(value: Any) -> float:
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    return float(value)


def utc(when: float, pattern: str) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime(pattern)


SPAN = [epoch(json.loads(text)["timestamp"]) for text in SAMPLE.read_text().splitlines()]
CLASSES = {
    name
    for text in SAMPLE.read_text().splitlines()
    for line in [json.loads(text)]
    for name in (
        line["detections"]["class_name"]
        if "detections" in line
        else [p["class"] for p in line["predictions"]]
        if isinstance(line["predictions"], list)
        else list(line["predictions"])
    )
}


def stats_classes(backend: Backend, workspace: str, key: str, **params: str) -> set[str]:
    answer = httpx.get(
        f"{backend.base_url}/{workspace}/inference-stats",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    answer.raise_for_status()
    return {item["predicted_class"] for item in answer.json()["inference_stats"]}


def test_replay_prints_the_stored_range_and_a_link_that_shows_it(backend: Backend) -> None:
    workspace, key = backend.new_workspace()
    done = mmagg(
        "replay", str(SAMPLE), "--fast", "--no-progress", "--extensions",
        "--api-key", key, "--api-base-url", backend.base_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    first, last = min(SPAN), max(SPAN)
    shown = "%Y-%m-%d %H:%M:%S"
    assert f"Stored time range: {utc(first, shown)} to {utc(last, shown)} UTC" in lines
    iso = "%Y-%m-%dT%H:%M:%SZ"
    link = (
        f"Dashboard for it: {backend.base_url}/dashboard?from={utc(math.floor(first), iso)}"
        f"&to={utc(math.ceil(last) + 1, iso)}"
    )
    assert link in lines
    # The link's range is where the data is: the read endpoint over it finds every class ...
    start, end = re.search(r"\?from=(\S+)&to=(\S+)$", link).groups()  # type: ignore[union-attr]
    assert stats_classes(backend, workspace, key, startTime=start, endTime=end) == CLASSES
    # ... and the line after says why the default view would not, when the recording is old.
    if time.time() - last > 3600:
        assert lines[-1].startswith("The recording ends ")
        assert lines[-1].endswith(
            "ago, before the dashboard's default last hour: open the link above, or replay "
            "with --shift-to-now to make it end now."
        )


def test_shift_to_now_lands_the_sample_in_the_default_read(backend: Backend) -> None:
    workspace, key = backend.new_workspace()
    before = time.time()
    done = mmagg(
        "replay", str(SAMPLE), "--fast", "--no-progress", "--shift-to-now",
        "--api-key", key, "--api-base-url", backend.base_url,
    )  # fmt: skip
    after = time.time()
    assert done.returncode == 0, done.stderr
    match = re.search(r"^Stored time range: (.+) to (.+) UTC$", done.stderr, re.M)
    assert match, done.stderr
    start, end = (
        datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        for text in match.groups()
    )
    assert math.floor(before) - 1 <= end <= after
    assert abs((end - start) - (max(SPAN) - min(SPAN))) <= 1.0  # the spacing is kept
    assert "--shift-to-now to make it end now" not in done.stderr
    # No time range asked: the backend's default (the last 24 h) now holds the whole sample.
    assert stats_classes(backend, workspace, key) == CLASSES


def test_shift_to_now_moves_every_report_by_one_offset(capture_server: Any) -> None:
    from mmagg.replay import replay

    now = 1_900_000_000.0
    result = replay(
        SAMPLE, api_key="k", api_base_url=capture_server.url, fast=True, frequency=5,
        shift_to_now=True, wall_clock=lambda: now,
    )  # fmt: skip
    assert result.exit_code == 0
    offset = now - max(SPAN)
    assert result.first_time == min(SPAN) + offset and result.last_time == now
    stamps = [epoch(post.json()["timestamp"]) for post in capture_server.posts]
    assert stamps and all(min(SPAN) + offset - 1e-3 <= s <= now + 1e-3 for s in stamps)
    assert abs(max(stamps) - now) < 1e-3  # the last report is the recording's last frame


def test_impossible_confidences_and_missing_classes_are_bad_lines(
    capture_server: Any, tmp_path: Path
) -> None:
    path = tmp_path / "r.jsonl"
    lines = [
        {"timestamp": 100, "predictions": [{"class": "car", "confidence": 0.5}]},
        {"timestamp": 101, "predictions": [{"class": "car", "confidence": 1.7}]},
        {
            "timestamp": 102,
            "predictions": [{"class": "car", "confidence": 0.2}, {"confidence": 0.6}],
        },
        {"timestamp": 103, "detections": {"class_name": ["bus"], "confidence": [-0.1]}},
        {"timestamp": 104, "predictions": {"rain": {"confidence": 2}}},
        {"timestamp": 105, "detections": {"class_name": ["bus", ""], "confidence": [0.3, 0.3]}},
        {"timestamp": 106, "predictions": {"predictions": [{"class": "x", "confidence": 1.01}]}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    done = mmagg(
        "replay", str(path), "--fast", "--no-progress",
        "--api-key", "k", "--api-base-url", capture_server.url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped ")]
    assert skipped == [
        "skipped line 2: predictions[0].confidence: expected a number in [0, 1], got 1.7",
        "skipped line 3: predictions[1].class: expected a class name, got none",
        "skipped line 4: detections.confidence[0]: expected a number in [0, 1], got -0.1",
        "skipped line 5: predictions['rain'].confidence: expected a number in [0, 1], got 2",
        "skipped line 6: detections.class_name[1]: expected a class name, got none",
        "skipped line 7: predictions.predictions[0].confidence: expected a number in [0, 1], "
        "got 1.01",
    ]
    assert "1 frames over 0.0 s recorded, 6 bad lines skipped" in done.stderr
    results = [r for post in capture_server.posts for r in post.json()["inference_results"]]
    assert [(r["class_name"], r["confidence"]) for r in results] == [("car", 0.5)]


def test_without_a_key_it_says_how_to_get_one_for_the_backend_in_use(
    capture_server: Any,
) -> None:
    no_key = {"ROBOFLOW_API_KEY": "", "API_KEY": "", "API_BASE_URL": ""}
    own = mmagg(
        "replay", str(SAMPLE), "--fast", "--no-progress", "--api-base-url", capture_server.url,
        env=no_key,
    )  # fmt: skip
    assert own.returncode == 2
    assert own.stderr == (
        f"error: no API key for {capture_server.url}: create one with `mmagg keys create "
        "--workspace NAME` (with the --database-url of that mmagg serve), then pass it with "
        "--api-key or ROBOFLOW_API_KEY\n"
    )
    assert capture_server.requests == []
    roboflow = mmagg("replay", str(SAMPLE), "--fast", "--no-progress", env=no_key)
    assert roboflow.returncode == 2
    assert roboflow.stderr == (
        "error: no API key for https://api.roboflow.com: pass --api-key or set "
        "ROBOFLOW_API_KEY; a Roboflow key is in your workspace settings "
        f"({ROBOFLOW_DOCS})\n"
    )


def test_the_prometheus_snippet_shows_mmagg_s_own_series(backend: Backend) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (code,) = [block for block in blocks if "AggregatorMetrics(registry=REGISTRY)" in block]
    _, key = backend.new_workspace()
    done = subprocess.run(
        [sys.executable, "-c", code.replace("http://127.0.0.1:9090", backend.base_url)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"MMAGG_KEY": key},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("mmagg_") for line in lines)
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    collected = [v for k, v in series.items() if k.startswith("mmagg_predictions_collected_total")]
    sent = [v for k, v in series.items() if k.startswith("mmagg_reports_sent_total")]
    assert collected == [1.0] and sent == [1.0]
    car = '{class_name="car",model_id="yard/3",source_id=""}'
    assert series[f"mmagg_prediction_confidence_count{car}"] == 1.0
    assert series[f"mmagg_prediction_confidence_sum{car}"] == 0.9


@given(
    confidences=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=6
    ),
    shape=st.sampled_from(["list", "detections", "multi-label", "nested"]),
)
@settings(max_examples=300, deadline=None)
def test_a_line_is_good_exactly_when_every_confidence_is_in_0_1(
    confidences: list[float], shape: str
) -> None:
    from mmagg.replay import parse_line

    names = [f"c{i}" for i in range(len(confidences))]
    rows = [{"class": n, "confidence": c} for n, c in zip(names, confidences, strict=True)]
    line: dict[str, Any] = {
        "list": {"predictions": rows},
        "detections": {"detections": {"class_name": names, "confidence": confidences}},
        "multi-label": {"predictions": {r["class"]: {"confidence": r["confidence"]} for r in rows}},
        "nested": {"predictions": {"predictions": rows}},
    }[shape]
    text = json.dumps(line)  # NaN and Infinity as Python's json writes them
    outside = [i for i, c in enumerate(confidences) if not 0.0 <= c <= 1.0]
    if not outside:
        assert parse_line(text, 1) is not None
        return
    try:
        parse_line(text, 1)
    except ValueError as error:
        assert "expected a number in [0, 1]" in str(error)
        assert f"[{outside[0]}]" in str(error) or f"'c{outside[0]}'" in str(error)
    else:
        raise AssertionError(f"{text} was accepted")
