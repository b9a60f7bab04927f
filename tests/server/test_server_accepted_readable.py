"""Accepted => readable (issue 12): any report the ingest answers 2xx leaves every read
endpoint, keyed and dashboard, answering 2xx with the right numbers; anything else is a 422
naming the field. Hypothesis generates reports at and past every bound (numbers, strings of
every character class, timestamps at the edges of datetime) against SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_support import RunningBackend

from mmagg.server import tables

HIST = 10
BIG = 2**31  # past a 32-bit column
HUGE = 2**63  # past a 64-bit SUM

# Every character class: ASCII controls, Latin-1, bidi, BOM, CJK, astral (4-byte UTF-8);
# NUL in `_with_nul` (lone surrogates cannot be sent: JSON with one is invalid, see below).
_text = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=1, max_codepoint=0x7F),
        st.sampled_from(["\x7f", "\u202e", "\ufeff", "\u00e9", "\u6c7d", "🚗", "\U0010ffff"]),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    ),
    max_size=12,
)
_with_nul = _text.map(lambda text: text[:3] + "\x00" + text[3:])
_long_text = st.sampled_from(["x" * 1024, "x" * 1025, "🚗" * 512, "🚗" * 513, "é" * 1024])
_plain = st.sampled_from(["car", "person", "", " ", "yard/3", "ünï 汽车"])
# Mostly storable names, so that most reports are accepted and read back.
# Lone surrogates: Python's json writes them as \udXXX escapes, which is not valid JSON text.
_surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff"])
_names = st.sampled_from(range(40)).flatmap(
    lambda i: (
        _plain
        if i < 27
        else _text
        if i < 34
        else _long_text
        if i < 37
        else _with_nul
        if i < 39
        else _surrogates
    )
)

_edges = st.sampled_from([0.0, -0.0, 1.0, 0.1, 0.9999999, math.nextafter(1.0, 2), -1e-300])
_confidence = st.sampled_from(range(20)).flatmap(
    lambda i: (
        st.floats(0, 1)
        if i < 15
        else _edges
        if i < 18
        else st.floats(allow_nan=False, allow_infinity=False)
    )
)


_count = st.one_of(
    st.integers(min_value=1, max_value=50),
    st.sampled_from([0, -1, 10**9, 10**9 + 1, BIG - 1, BIG, HUGE, 2**64]),
)


def _bucket(c: float) -> int:
    return min(max(int(c * HIST), 0), HIST - 1)


_valid_names = st.one_of(
    _plain, _text, st.sampled_from(["x" * 1024, "🚗" * 512, "é" * 1024, "\u202e\ufeff"])
)


@st.composite
def _stats(draw: st.DrawFn, confidence: float, valid: bool = False) -> dict[str, Any]:
    """Stats consistent with `confidence` as their max, then perhaps broken on purpose."""
    others = draw(st.lists(st.floats(min_value=0.0, max_value=abs(confidence)), max_size=4))
    values = [confidence, *others]
    histogram = [0] * HIST
    for value in values:
        histogram[_bucket(value)] += 1
    stats: dict[str, Any] = {
        "count": len(values),
        "sum": math.fsum(values),
        "min": min(values),
        "max": max(values),
        "histogram": histogram,
    }
    if valid:
        # At the per-report bound: 10**8 per result, up to 4 results.
        factor = draw(st.sampled_from([1, 1, 1000, 10**8 // len(values)]))
        stats["histogram"] = [n * factor for n in histogram]
        stats["count"] = len(values) * factor
        stats["sum"] = stats["sum"] * factor
        return stats
    breakage = draw(
        st.sampled_from(["none"] * 24 + ["count", "sum", "min", "max", "hist", "scale"])
    )
    if breakage == "count":
        stats["count"] = draw(_count)
    elif breakage == "sum":
        stats["sum"] = draw(st.sampled_from([-1.0, 0.0, 1e308, stats["sum"] * 3 + 1]))
    elif breakage == "min":
        stats["min"] = draw(_confidence)
    elif breakage == "max":
        stats["max"] = draw(_confidence)
    elif breakage == "hist":
        index = draw(st.integers(0, HIST - 1))
        histogram[index] = draw(_count)
    elif breakage == "scale":
        # Huge but consistent: every bucket count scaled (sum of counts past 32/64 bits).
        factor = draw(st.sampled_from([10**8, 10**9, BIG, HUGE]))
        stats["histogram"] = [n * factor for n in histogram]
        stats["count"] = len(values) * factor
        stats["sum"] = stats["sum"] * factor
    return stats


@st.composite
def _result(draw: st.DrawFn, valid: bool = False) -> dict[str, Any]:
    names = _valid_names if valid else _names
    confidence = draw(st.floats(0, 1) if valid else _confidence)
    item: dict[str, Any] = {
        "class_name": draw(names),
        "confidence": confidence,
        "model_id": draw(st.one_of(st.sampled_from(["yard/3", "m/1"]), names)),
    }
    if valid and not item["model_id"]:
        item["model_id"] = "m/2"
    if draw(st.booleans()):
        item["source_id"] = draw(st.one_of(st.sampled_from(["cam-1"]), names))
    if draw(st.booleans()) and 0 <= confidence <= 1:
        item["stats"] = draw(_stats(confidence, valid))
    return item


_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@st.composite
def _timestamp(draw: st.DrawFn, valid: bool = False) -> Any:
    now = datetime.now(timezone.utc)
    kinds = ["recent"] * 4 + ["naive"] * 2 + ["future", "past"]
    if not valid:
        kinds += ["edge", "epoch", "any", "junk"]
    kind = draw(st.sampled_from(kinds))
    if kind == "recent":
        return (now - timedelta(seconds=draw(st.integers(0, 86400)))).isoformat()
    if kind == "naive":
        # What Roboflow's block sends: local wall-clock time of some zone, no offset.
        shift = timedelta(hours=draw(st.integers(-12, 14)))
        return (now + shift).replace(tzinfo=None).isoformat()
    if kind == "future":
        return (now + timedelta(seconds=draw(st.integers(61, 10**9)))).isoformat()
    if kind == "past":
        days = draw(st.integers(1, 19_000 if valid else 20_000))  # 19,000 days: after 1970
        return (now - timedelta(days=days)).isoformat()
    if kind == "edge":
        edge = draw(st.sampled_from([datetime.min, datetime.max]))
        return edge.replace(tzinfo=draw(_offsets)).isoformat()
    if kind == "epoch":
        return draw(st.sampled_from([0, -1, -(10**10), 10**10, 253402300800, 2**53, -2.5]))
    if kind == "any":
        moment = draw(st.datetimes(timezones=st.one_of(st.none(), _offsets)))
        return moment.isoformat()
    return draw(st.sampled_from(["", "yesterday", "2026-13-01T00:00:00", "NaN", "1e999"]))


@st.composite
def _report(draw: st.DrawFn, valid: bool = False) -> dict[str, Any]:
    names = _valid_names if valid else _names
    body: dict[str, Any] = {
        "timestamp": draw(_timestamp(valid)),
        "device_id": draw(st.one_of(st.just("edge-01"), names)),
        "inference_results": draw(st.lists(_result(valid), max_size=4)),
    }
    if draw(st.booleans()):
        body["hostname"] = draw(names)
    if draw(st.integers(0, 3)) == 0:
        frequencies = [5.0, 1e-300, 366 * 86400.0] + ([] if valid else [0.0, -1.0, 1e308, 4e7])
        frequency = draw(st.sampled_from(frequencies))
        body["mmagg"] = {"frequency": frequency, "aggregator_key": draw(names)}
    return body


def _dumps(body: dict[str, Any]) -> bytes:
    # Python's json writes NaN/Infinity literals; ints of any size stay exact.
    return json.dumps(body, allow_nan=True).encode()


def _expected_ts(body: dict[str, Any], sent: float, answered: float) -> tuple[float, float]:
    """The interval the report's filed time must lie in, by the documented clock rule."""
    value = body["timestamp"]
    if isinstance(value, int | float):
        # pydantic reads numbers past 2e10 as epoch milliseconds.
        client = float(value) / (1000 if abs(value) > 2e10 else 1)
    else:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return sent, answered
        client = parsed.timestamp()
    if client > sent + 60:
        return sent, answered
    return client, client


def _check_reads(
    http: httpx.Client, prefix: str, params: dict[str, str], body: dict[str, Any]
) -> None:
    """Every read endpoint answers 200, with numbers computed here from the report."""
    items = body["inference_results"]
    span = {"startTime": "0", "endTime": str(time.time() + 86400)}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[(item["model_id"], item["class_name"])].append(item)

    def get(path: str, **extra: Any) -> dict[str, Any]:
        answer = http.get(prefix + path, params={**params, **span, **extra})
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        payload: dict[str, Any] = answer.json()
        return payload

    def predictions(group: list[dict[str, Any]]) -> int:
        return sum(i["stats"]["count"] if "stats" in i else 1 for i in group)

    stats = get("/inference-stats")
    assert stats["num_inferences"] == len(items)
    for row in stats["inference_stats"]:
        group = groups[(row["model_name"], row["predicted_class"])]
        confidences = [i["confidence"] for i in group]
        assert row["num_inferences"] == len(group)
        assert row["avg_confidence"] == pytest.approx(statistics.fmean(confidences))
        assert row["median_confidence"] == pytest.approx(statistics.median(confidences))
        assert row["class_count"] == predictions(group)
        total = math.fsum(i["stats"]["sum"] if "stats" in i else i["confidence"] for i in group)
        assert row["predictions_avg_confidence"] == pytest.approx(total / predictions(group))
    models = {m["model_id"]: m for m in get("/models")["models"]}
    assert set(models) == {model for model, _ in groups}
    for model_id, model in models.items():
        mine = [g for (m, _), gs in groups.items() if m == model_id for g in gs]
        assert model["result_count"] == len(mine)
        assert model["prediction_count"] == predictions(mine)
        for path in ("/classes", "/timeseries", "/histogram"):
            extra = {"bucket_seconds": str(366 * 86400)} if path == "/timeseries" else {}
            answer = get(path, model=model_id, **extra)
            if path == "/histogram":
                for row in answer["classes"]:
                    assert row["total"] == predictions(groups[(model_id, row["class_name"])])
            if path == "/timeseries":
                for series in answer["series"]:
                    group = groups[(model_id, series["class_name"])]
                    assert sum(p["samples"] for p in series["points"]) == len(group)
            if path == "/classes":
                for row in answer["classes"]:
                    group = groups[(model_id, row["class_name"])]
                    assert row["prediction_count"] == predictions(group)
                    assert row["max_confidence"] == max(i["confidence"] for i in group)
    devices = get("/devices")["devices"]
    assert sum(d["result_count"] for d in devices) == len(items)
    assert len(get("/samples", limit="1000")["samples"]) == len(items)


def _post_and_read(backend: RunningBackend, body: dict[str, Any]) -> int:
    """Post `body` to a fresh workspace; if accepted, check every read; the ingest status."""
    workspace = f"ws-{uuid.uuid4().hex[:12]}"
    key = backend.db.create_key(workspace, {"ingest", "read"})
    with httpx.Client(base_url=backend.base_url, timeout=30) as http:
        sent = time.time()
        answer = http.post(
            f"/{workspace}/inference-stats",
            params={"api_key": key},
            content=_dumps(body),
            headers={"Content-Type": "application/json"},
        )
        answered = time.time()
        event(f"ingest {answer.status_code}")
        assert answer.status_code in (200, 422), (answer.status_code, answer.text[:300])
        if answer.status_code == 422:
            details = answer.json()["detail"]
            assert details and all(d["field"] and d["msg"] for d in details), details
            assert key not in answer.text
            return 422
        report_id = answer.json()["report_id"]
        with backend.db.read() as conn:
            stored = conn.execute(
                tables.reports.select().where(tables.reports.c.id == report_id)
            ).one()
        low, high = _expected_ts(body, sent, answered)
        assert low - 1e-3 <= stored.ts <= high + 1e-3, (body["timestamp"], stored.ts)
        _check_reads(http, f"/{workspace}/api", {"api_key": key}, body)
        # The Roboflow-dialect read, and the dashboard JSON of a session on this workspace.
        roboflow = http.get(
            f"/{workspace}/inference-stats",
            params={"api_key": key, "startTime": "0", "endTime": str(time.time() + 86400)},
        )
        assert roboflow.status_code == 200
        assert roboflow.json()["num_inferences"] == len(body["inference_results"])
        assert http.post("/dashboard/api/login", json={"api_key": key}).status_code == 200
        _check_reads(http, "/dashboard/api", {}, body)
        return 200


_PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_PROPERTY
@given(body=_report())
def test_whatever_ingest_accepts_every_read_endpoint_serves(
    backend: RunningBackend, body: dict[str, Any]
) -> None:
    """Reports at and past every bound: 2xx and readable, or 422 naming the field."""
    _post_and_read(backend, body)


@settings(_PROPERTY, max_examples=12)
@given(body=_report(valid=True))
def test_reports_within_every_bound_are_accepted_and_read_back(
    backend: RunningBackend, body: dict[str, Any]
) -> None:
    """Reports inside the bounds (edges included: 1,024 characters, 2,048 bytes, 10^8 per
    result, naive and future times) are all accepted, then read back right."""
    assert _post_and_read(backend, body) == 200


def test_dashboard_json_reads_an_accepted_edge_report(backend: RunningBackend) -> None:
    """The dashboard mount serves a report at the bounds (counts, strings, old and naive time)."""
    workspace, key = backend.new_workspace()
    count = 10**9
    histogram = [0] * HIST
    histogram[9] = count
    body = {
        "timestamp": (datetime.now(timezone.utc) - timedelta(days=3650)).isoformat(),
        "device_id": "🚗" * 512,
        "inference_results": [
            {
                "class_name": "é" * 1024,
                "confidence": 1.0,
                "model_id": "🚗" * 512,
                "stats": {
                    "count": count,
                    "sum": 0.95 * count,
                    "min": 0.9,
                    "max": 1.0,
                    "histogram": histogram,
                },
            }
        ],
    }
    with httpx.Client(base_url=backend.base_url, timeout=30) as http:
        posted = http.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)
        assert posted.status_code == 200, posted.text
        for _ in range(2):  # two reports at the per-report bound: sums past 32 bits
            body["timestamp"] = datetime.now(timezone.utc).isoformat()
            assert (
                http.post(
                    f"/{workspace}/inference-stats", params={"api_key": key}, json=body
                ).status_code
                == 200
            )
        assert http.post("/dashboard/api/login", json={"api_key": key}).status_code == 200
        _check_reads(
            http, "/dashboard/api", {}, {**body, "inference_results": body["inference_results"] * 3}
        )
