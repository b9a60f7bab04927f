"""Numbers and strings at ingest and in read filters (issue 12, classes 1 and 3), over HTTP on
SQLite and PostgreSQL: each bound refused with a 422 naming field, bound and value; values at
the bound accepted and read back right; a zero count left by an older release never divides.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_payloads import report, result
from server_support import RunningBackend

from mmagg.server import tables
from mmagg.server.rollups import rebuild_rollups

NOW_RANGE = {"startTime": "0"}


def _post(client: httpx.Client, workspace: str, key: str, body: Any) -> httpx.Response:
    return client.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)


def _errors(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {item["field"]: item["msg"] for item in response.json()["detail"]}


def _stats(n: int, low: float, high: float, **changes: Any) -> dict[str, Any]:
    """Consistent stats of `n` predictions (one at `low`, the rest at `high`), then `changes`."""
    histogram = [0] * 10
    histogram[min(int(low * 10), 9)] += 1
    histogram[min(int(high * 10), 9)] += n - 1
    count = n
    body = {
        "count": count,
        "sum": low + high * (count - 1),
        "min": low,
        "max": high,
        "histogram": histogram,
    }
    body.update(changes)
    return body


# (case, result item, field, words the message must hold: the bound and the value)
REFUSED: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("confidence above 1", result("car", 1.0000001), "confidence", ["1", "1.0000001"]),
    ("confidence below 0", result("car", -0.25), "confidence", ["0", "-0.25"]),
    (
        "stats count 0",
        result("car", 0.5, stats=_stats(1, 0.5, 0.5, count=0, histogram=[0] * 10)),
        "stats.count",
        ["1", "0"],
    ),
    (
        "stats count past 32 bits",
        result("car", 0.9, stats=_stats(2**31, 0.9, 0.9)),
        "stats.count",
        ["1000000000", str(2**31)],
    ),
    (
        "negative bucket",
        result("car", 0.9, stats=_stats(2, 0.9, 0.9, histogram=[-1, 0, 0, 0, 0, 0, 0, 0, 0, 3])),
        "stats.histogram.0",
        ["0", "-1"],
    ),
    (
        "histogram not summing to count",
        result("car", 0.9, stats=_stats(3, 0.9, 0.9, count=4)),
        "stats.histogram",
        ["count=4", "3"],
    ),
    (
        "min outside its bucket",
        result("car", 0.95, stats=_stats(3, 0.55, 0.95, min=0.1)),
        "stats.min",
        ["[0.5, 0.6)", "0.1"],
    ),
    (
        "max above the last bucket",
        result("car", 0.55, stats=_stats(3, 0.55, 0.65, max=0.95)),
        "stats.max",
        ["[0.6, 0.7)", "0.95"],
    ),
    (
        "sum past count * max",
        result("car", 0.9, stats=_stats(3, 0.9, 0.9, sum=5.0)),
        "stats.sum",
        ["2.7", "5.0"],
    ),
    (
        "sum below count * min",
        result("car", 0.9, stats=_stats(3, 0.9, 0.9, sum=0.1)),
        "stats.sum",
        ["2.7", "0.1"],
    ),
    (
        "sample outside its stats",
        result("car", 0.2, stats=_stats(3, 0.9, 0.95)),
        "confidence",
        ["0.9", "0.2"],
    ),
]


@pytest.mark.parametrize(
    ("item", "field", "words"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_numbers_past_a_bound_are_422_naming_field_bound_and_value(
    backend: RunningBackend,
    client: httpx.Client,
    item: dict[str, Any],
    field: str,
    words: list[str],
) -> None:
    workspace, key = backend.new_workspace()
    errors = _errors(_post(client, workspace, key, report([result("ok", 0.5), item])))
    message = errors[f"inference_results.1.{field}"]
    assert all(word in message for word in words), message
    assert backend.db.count_reports(workspace) == 0


@pytest.mark.parametrize(
    ("extension", "words"),
    [({"frequency": 0}, ["0"]), ({"frequency": 1e308}, ["31622400", "1e+308"])],
)
def test_frequency_bounds(
    backend: RunningBackend, client: httpx.Client, extension: dict[str, Any], words: list[str]
) -> None:
    workspace, key = backend.new_workspace()
    errors = _errors(_post(client, workspace, key, report([result("car", 0.5)], mmagg=extension)))
    assert all(word in errors["mmagg.frequency"] for word in words), errors


def test_a_report_standing_for_more_than_a_billion_predictions_is_refused(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    half = 600_000_000
    body = report([result(c, 0.9, stats=_stats(half, 0.9, 0.9)) for c in ("a", "b")])
    errors = _errors(_post(client, workspace, key, body))
    assert "1000000000" in errors["inference_results"]
    assert str(2 * half) in errors["inference_results"]


def test_counts_at_the_bound_sum_past_32_bits_and_read_back_exactly(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    count = 1_000_000_000
    reports = 5  # 5e9 predictions: past a 32-bit SUM, well inside a 64-bit one
    for _ in range(reports):
        body = report([result("car", 0.9, "big/1", stats=_stats(count, 0.9, 0.9))])
        assert _post(client, workspace, key, body).status_code == 200
    params = {"api_key": key, "model": "big/1", **NOW_RANGE}
    (row,) = client.get(f"/{workspace}/api/classes", params=params).json()["classes"]
    assert row["prediction_count"] == reports * count
    assert row["predictions_avg_confidence"] == pytest.approx(0.9)
    (hist,) = client.get(f"/{workspace}/api/histogram", params=params).json()["classes"]
    assert hist["counts"][9] == reports * count
    stats_read = client.get(f"/{workspace}/inference-stats", params={"api_key": key, **NOW_RANGE})
    assert stats_read.json()["inference_stats"][0]["class_count"] == reports * count


def _legacy_result(backend: RunningBackend, key: str, ts: float, **columns: Any) -> None:
    """A row as a v0.1 server could have stored it (before these bounds)."""
    principal = backend.db.authenticate(key)
    assert principal is not None
    if backend.db.partitions is not None:  # PostgreSQL: the day's partition, as the upgrade
        backend.db.partitions.ready(ts)  # (step 7) makes one for every day holding rows
    with backend.db.write() as conn:
        report_id = conn.execute(
            sa.insert(tables.reports).values(
                workspace_id=principal.workspace_id,
                received_at=ts,
                ts=ts,
                system_info="{}",
                result_count=1,
            )
        ).inserted_primary_key[0]
        conn.execute(
            sa.insert(tables.results).values(
                report_id=report_id,
                workspace_id=principal.workspace_id,
                ts=ts,
                device_id="edge-01",
                model_id="old/1",
                class_name="car",
                confidence=0.5,
                **columns,
            )
        )
        # A v0.1 database gets its rollups built from its results by the upgrade (step 5).
        rebuild_rollups(conn)


def test_a_zero_count_left_by_an_older_release_never_divides(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    now = datetime.now(timezone.utc).timestamp()
    zero = {"stats_count": 0, "stats_sum": 0.0, "stats_min": 0.5, "stats_max": 0.5}
    _legacy_result(backend, key, now - 60, **zero, **{f"hist_{i}": 0 for i in range(10)})
    params = {"api_key": key, "model": "old/1", "bucket_seconds": "31536000", **NOW_RANGE}
    for path in ("classes", "timeseries", "histogram", "models", "inference-stats", "samples"):
        answer = client.get(f"/{workspace}/api/{path}", params=params)
        assert answer.status_code == 200, (path, answer.text)
    (row,) = client.get(f"/{workspace}/api/classes", params=params).json()["classes"]
    assert row["prediction_count"] == 0
    assert row["predictions_avg_confidence"] is None


# Strings (class 3)


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("class_name", "inference_results.0.class_name"),
        ("model_id", "inference_results.0.model_id"),
        ("source_id", "inference_results.0.source_id"),
        ("device_id", "device_id"),
        ("hostname", "hostname"),
        ("aggregator_key", "mmagg.aggregator_key"),
    ],
)
def test_nul_is_refused_alike_on_both_databases(
    backend: RunningBackend, client: httpx.Client, where: str, field: str
) -> None:
    workspace, key = backend.new_workspace()
    item = result("car", 0.5)
    body = report([item])
    if where in item or where == "source_id":
        item[where] = "a\x00b"
    elif where == "aggregator_key":
        body["mmagg"] = {"aggregator_key": "a\x00b"}
    else:
        body[where] = "a\x00b"
    errors = _errors(_post(client, workspace, key, body))
    assert "NUL" in errors[field] and "position 1" in errors[field], errors
    assert backend.db.count_reports(workspace) == 0


def test_an_empty_model_id_is_refused_since_no_read_could_name_it(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    errors = _errors(_post(client, workspace, key, report([result("car", 0.5, "")])))
    assert "inference_results.0.model_id" in errors


def test_strings_are_bounded_in_utf8_bytes_for_postgresql_indexes(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    # 1,024 characters of 4 bytes: within the character limit, past PostgreSQL's index row.
    errors = _errors(_post(client, workspace, key, report([result("car", 0.5, "🚗" * 1024)])))
    assert "2048" in errors["inference_results.0.model_id"]
    assert "4096" in errors["inference_results.0.model_id"]
    at_bound = "🚗" * 512
    answer = _post(client, workspace, key, report([result("é" * 1024, 0.5, at_bound)]))
    assert answer.status_code == 200, answer.text
    models = client.get(f"/{workspace}/api/models", params={"api_key": key, **NOW_RANGE})
    assert [m["model_id"] for m in models.json()["models"]] == [at_bound]


def test_invalid_unicode_is_refused(backend: RunningBackend, client: httpx.Client) -> None:
    workspace, key = backend.new_workspace()
    body = report([result("PLACEHOLDER", 0.5)])
    import json

    raw = json.dumps(body).replace("PLACEHOLDER", "\\ud800").encode()
    answer = client.post(
        f"/{workspace}/inference-stats",
        params={"api_key": key},
        content=raw,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422
    assert backend.db.count_reports(workspace) == 0


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/samples", {"device_id": "a\x00b"}, "query.device_id"),
        ("/api/samples", {"source_id": "\x00"}, "query.source_id"),
        ("/api/models", {"device_id": "a\x00b"}, "query.device_id"),
        ("/api/classes", {"model": "m\x00"}, "query.model"),
        ("/api/timeseries", {"model": "m", "class_name": ["ok", "c\x00"]}, "query.class_name"),
        ("/api/histogram", {"model": "m", "device_id": "\x00"}, "query.device_id"),
        ("/api/devices", {"model": "\x00"}, "query.model"),
        ("/inference-stats", {"modelNames": "a,\x00"}, "query.modelNames"),
        ("/api/inference-stats", {"modelNames": "a\x00"}, "query.modelNames"),
    ],
)
def test_nul_in_read_filters_is_422_on_both_databases(
    backend: RunningBackend,
    client: httpx.Client,
    path: str,
    params: dict[str, Any],
    field: str,
) -> None:
    workspace, key = backend.new_workspace()
    assert _post(client, workspace, key, report([result("car", 0.5, "m")])).status_code == 200
    answer = client.get(f"/{workspace}{path}", params={"api_key": key, **params})
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["detail"]
    assert error["field"] == field and "NUL" in error["msg"]
    # The dashboard mount refuses the same filters.
    if path.startswith("/api/"):
        assert client.post("/dashboard/api/login", json={"api_key": key}).status_code == 200
        dashboard = client.get("/dashboard/api" + path[4:], params=params)
        assert dashboard.status_code == 422, dashboard.text
        client.post("/dashboard/api/logout")


def test_report_time_of_recent_data_unaffected(
    backend: RunningBackend, client: httpx.Client
) -> None:
    """An ordinary, timezone-aware recent report keeps its own timestamp exactly."""
    workspace, key = backend.new_workspace()
    when = datetime.now(timezone.utc) - timedelta(minutes=5)
    answer = _post(client, workspace, key, report([result("car", 0.5)], timestamp=when))
    with backend.db.read() as conn:
        stored = conn.execute(
            sa.select(tables.reports).where(tables.reports.c.id == answer.json()["report_id"])
        ).one()
    assert stored.ts == pytest.approx(when.timestamp())
    assert stored.time_rule == "client"
    assert stored.client_timestamp == when.isoformat()
