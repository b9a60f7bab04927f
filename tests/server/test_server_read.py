"""Read endpoint and dashboard JSON API: numbers recomputed here from what was sent."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from server_payloads import report, result, stats
from server_support import RunningBackend

from mmagg.server import responses

BASE = datetime(2026, 11, 20, 10, 0, 0, tzinfo=timezone.utc)
RANGE = {"startTime": "2026-11-20 10:00:00", "endTime": "2026-11-20 11:00:00"}


def _post(client: httpx.Client, workspace: str, key: str, body: dict[str, Any]) -> None:
    response = client.post(f"/{workspace}/inference-stats", params={"api_key": key}, json=body)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def dataset(backend: RunningBackend) -> dict[str, Any]:
    """A workspace holding a known, varied set of reports, and what was sent."""
    rng = random.Random(7)
    workspace, key = backend.new_workspace()
    sent: list[dict[str, Any]] = []  # flat: one entry per result, with its report time
    bodies = []
    # In range: 40 reports, 2 devices, every 30 s; yard/3 with stats (per source), gate/1 without.
    for i in range(40):
        when = BASE + timedelta(seconds=30 * i + 1)
        device = "edge-01" if i % 2 == 0 else "edge-02"
        items = []
        for source in ("cam-1", "cam-2"):
            for class_name, mean in (("car", 0.8), ("helmet", 0.6 if i < 20 else 0.3)):
                confs = [
                    min(max(rng.gauss(mean, 0.1), 0.0), 1.0) for _ in range(rng.randint(1, 30))
                ]
                items.append(
                    result(class_name, max(confs), "yard/3", source_id=source, stats=stats(confs))
                )
        for class_name in ("person", "dog")[: 1 + i % 2]:
            items.append(result(class_name, round(rng.uniform(0.2, 0.99), 4), "gate/1"))
        bodies.append(
            report(items, timestamp=when, device_id=device, mmagg={"frequency": 30.0})
            if device == "edge-01"
            else report(items, timestamp=when, device_id=device)
        )
        sent.extend({**item, "ts": when.timestamp(), "device_id": device} for item in items)
    everything = list(sent)  # every result ever sent, with its report time and device
    # Previous hour: a few reports that only feed prev_*.
    prev: list[dict[str, Any]] = []
    for i in range(5):
        when = BASE - timedelta(minutes=10 * i + 1)
        items = [result("person", 0.5 + i / 20, "gate/1")]
        bodies.append(report(items, timestamp=when, device_id="edge-01"))
        prev.extend(items)
        everything.extend(
            {**item, "ts": when.timestamp(), "device_id": "edge-01"} for item in items
        )
    # An empty report (nothing detected) in the range: no results, so no activity anywhere.
    bodies.append(report([], timestamp=BASE + timedelta(minutes=5, seconds=7)))
    # After the range: must not count.
    late = BASE + timedelta(hours=2)
    items = [result("person", 0.01, "gate/1")]
    bodies.append(report(items, timestamp=late))
    everything.extend({**item, "ts": late.timestamp(), "device_id": "edge-01"} for item in items)
    with httpx.Client(base_url=backend.base_url, timeout=10) as client:
        for body in bodies:
            _post(client, workspace, key, body)
    return {
        "workspace": workspace,
        "key": key,
        "sent": sent,
        "prev": prev,
        "everything": everything,
    }


def _groups(items: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[(item["model_id"], item["class_name"])].append(item)
    return groups


def test_inference_stats_match_an_independent_computation(
    backend: RunningBackend, client: httpx.Client, dataset: dict[str, Any]
) -> None:
    response = client.get(
        f"/{dataset['workspace']}/inference-stats", params={"api_key": dataset["key"], **RANGE}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _groups(dataset["sent"])
    previous = _groups(dataset["prev"])
    assert [(s["model_name"], s["predicted_class"]) for s in body["inference_stats"]] == sorted(
        expected
    )
    for item in body["inference_stats"]:
        group = expected[(item["model_name"], item["predicted_class"])]
        confidences = [g["confidence"] for g in group]
        predictions = sum(g["stats"]["count"] if "stats" in g else 1 for g in group)
        total = sum(g["stats"]["sum"] if "stats" in g else g["confidence"] for g in group)
        assert item["num_inferences"] == len(group)
        assert item["avg_confidence"] == pytest.approx(statistics.fmean(confidences))
        assert item["median_confidence"] == pytest.approx(statistics.median(confidences))
        assert item["class_count"] == predictions
        assert item["predictions_avg_confidence"] == pytest.approx(total / predictions)
        prev = previous.get((item["model_name"], item["predicted_class"]), [])
        assert item["prev_num_inferences"] == len(prev)
        if prev:
            assert item["prev_avg_confidence"] == pytest.approx(
                statistics.fmean(p["confidence"] for p in prev)
            )
        assert item["num_errors"] is None and item["avg_response_time"] is None
    assert body["num_inferences"] == len(dataset["sent"])
    assert body["avg_confidence"] == pytest.approx(
        statistics.fmean(s["confidence"] for s in dataset["sent"])
    )
    assert body["prev_num_inferences"] == len(dataset["prev"])
    assert body["start_time"] == "2026-11-20T10:00:00+00:00"


def test_model_names_filter_and_time_formats(client: httpx.Client, dataset: dict[str, Any]) -> None:
    url = f"/{dataset['workspace']}/inference-stats"
    only_gate = client.get(url, params={"api_key": dataset["key"], "modelNames": "gate/1", **RANGE})
    assert {s["model_name"] for s in only_gate.json()["inference_stats"]} == {"gate/1"}
    both = client.get(
        url, params={"api_key": dataset["key"], "modelNames": "gate/1, yard/3", **RANGE}
    ).json()
    iso_range = {"startTime": "2026-11-20T10:00:00Z", "endTime": str(BASE.timestamp() + 3600)}
    same = client.get(url, params={"api_key": dataset["key"], **iso_range}).json()
    assert same["inference_stats"] == both["inference_stats"]
    bad = client.get(url, params={"api_key": dataset["key"], "startTime": "last tuesday"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["field"] == "query.startTime"
    reversed_range = client.get(
        url,
        params={
            "api_key": dataset["key"],
            "startTime": RANGE["endTime"],
            "endTime": RANGE["startTime"],
        },
    )
    assert reversed_range.status_code == 422


RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    "models": responses.ModelsResponse,
    "classes": responses.ClassesResponse,
    "devices": responses.DevicesResponse,
    "timeseries": responses.TimeseriesResponse,
    "histogram": responses.HistogramResponse,
    "samples": responses.SamplesResponse,
    "inference-stats": responses.InferenceStatsResponse,
}


def _api(client: httpx.Client, dataset: dict[str, Any], path: str, **params: Any) -> Any:
    response = client.get(
        f"/{dataset['workspace']}/api/{path}",
        params={"api_key": dataset["key"], **RANGE, **params},
    )
    assert response.status_code == 200, response.text
    assert response.json()["workspace"] == dataset["workspace"]
    # The documented model (extra="forbid") must describe the real answer exactly.
    RESPONSE_MODELS[path].model_validate(response.json())
    return response.json()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def _expected_models(dataset: dict[str, Any], **only: str) -> dict[str, dict[str, Any]]:
    """`/models` recomputed from what was sent; `only` keeps results whose fields match."""

    def keep(item: dict[str, Any]) -> bool:
        return all(item.get(name) == value for name, value in only.items())

    in_range = [s for s in dataset["sent"] if keep(s)]
    ever = [s for s in dataset["everything"] if keep(s)]
    expected = {}
    for model in sorted({s["model_id"] for s in ever}):
        mine = [s for s in in_range if s["model_id"] == model]
        expected[model] = {
            # A report's time identifies it here: every report of the dataset has its own.
            "report_count": len({s["ts"] for s in mine}),
            "result_count": len(mine),
            "prediction_count": sum(s["stats"]["count"] if "stats" in s else 1 for s in mine),
            "class_count": len({s["class_name"] for s in mine}),
            "devices": sorted({s["device_id"] for s in mine}),
            "sources": sorted({s["source_id"] for s in mine if "source_id" in s}),
            "last_report_at": _iso(max(s["ts"] for s in mine)) if mine else None,
            "last_report_at_all_time": _iso(max(s["ts"] for s in ever if s["model_id"] == model)),
        }
    return expected


def _observed(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fields = (
        "report_count",
        "result_count",
        "prediction_count",
        "class_count",
        "devices",
        "sources",
        "last_report_at",
        "last_report_at_all_time",
    )
    return {m["model_id"]: {f: m[f] for f in fields} for m in body["models"]}


def test_models_endpoint(client: httpx.Client, dataset: dict[str, Any]) -> None:
    body = _api(client, dataset, "models")
    assert [m["model_id"] for m in body["models"]] == ["gate/1", "yard/3"]
    assert _observed(body) == _expected_models(dataset)
    models = {m["model_id"]: m for m in body["models"]}
    # gate/1 reported after the range too: its last report over all time is that one.
    assert models["gate/1"]["last_report_at_all_time"] == _iso(
        (BASE + timedelta(hours=2)).timestamp()
    )
    assert models["gate/1"]["last_report_at"] != models["gate/1"]["last_report_at_all_time"]
    # edge-01 declares 30 s; the newest report of yard/3 (edge-02) declares nothing.
    assert models["yard/3"]["estimated_interval_seconds"] == 30.0
    assert models["yard/3"]["interval_source"] == "extension"


@pytest.mark.parametrize(
    "only",
    [
        {"device_id": "edge-01"},
        {"device_id": "edge-02"},
        {"source_id": "cam-1"},
        {"source_id": "cam-2"},
        {"device_id": "edge-02", "source_id": "cam-2"},
        {"device_id": "nowhere"},
    ],
)
def test_models_filtered_by_device_or_source(
    client: httpx.Client, dataset: dict[str, Any], only: dict[str, str]
) -> None:
    body = _api(client, dataset, "models", **only)
    assert _observed(body) == _expected_models(dataset, **only)
    via_session = client.post("/dashboard/api/login", json={"api_key": dataset["key"]})
    assert via_session.status_code == 200
    session_body = client.get("/dashboard/api/models", params={**RANGE, **only}).json()
    assert session_body == body


def test_models_interval_follows_the_filter(client: httpx.Client, dataset: dict[str, Any]) -> None:
    by_device = {
        device: {
            m["model_id"]: m for m in _api(client, dataset, "models", device_id=device)["models"]
        }
        for device in ("edge-01", "edge-02")
    }
    yard_01, yard_02 = by_device["edge-01"]["yard/3"], by_device["edge-02"]["yard/3"]
    assert (yard_01["estimated_interval_seconds"], yard_01["interval_source"]) == (
        30.0,
        "extension",
    )
    # edge-02 declares no frequency and reports every other 30 s slot.
    assert yard_02["interval_source"] == "median_gap"
    assert yard_02["estimated_interval_seconds"] == pytest.approx(60.0)


def test_models_lists_a_model_silent_before_the_range(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    old_times = [BASE - timedelta(days=2, seconds=10 * i) for i in range(4)]
    for when in old_times:
        _post(
            client,
            workspace,
            key,
            report([result("car", 0.5, "old/1")], timestamp=when, device_id="a"),
        )
    _post(
        client,
        workspace,
        key,
        report(
            [result("car", 0.9, "live/1")],
            timestamp=BASE + timedelta(minutes=5),
            device_id="b",
            mmagg={"frequency": 5.0},
        ),
    )
    params = {"api_key": key, **RANGE}
    body = client.get(f"/{workspace}/api/models", params=params).json()
    responses.ModelsResponse.model_validate(body)
    old = body["models"][1]
    assert [m["model_id"] for m in body["models"]] == ["live/1", "old/1"]
    assert old["report_count"] == old["result_count"] == 0
    assert old["last_report_at"] is None and old["devices"] == []
    assert old["last_report_at_all_time"] == _iso(max(old_times).timestamp())
    assert old["estimated_interval_seconds"] == pytest.approx(10.0)
    assert old["interval_source"] == "median_gap"
    live = body["models"][0]
    assert (live["report_count"], live["estimated_interval_seconds"]) == (1, 5.0)
    assert live["last_report_at"] == live["last_report_at_all_time"]
    on_b = client.get(f"/{workspace}/api/models", params={**params, "device_id": "b"}).json()
    assert [m["model_id"] for m in on_b["models"]] == ["live/1"]


def test_interval_from_median_gap_without_extension(
    backend: RunningBackend, client: httpx.Client
) -> None:
    workspace, key = backend.new_workspace()
    for i, gap in enumerate([0, 5, 10, 15, 20, 30]):
        for device in ("a", "b"):
            body = report(
                [result("car", 0.5, "m/1")],
                timestamp=BASE + timedelta(seconds=gap, milliseconds=i),
                device_id=device,
            )
            _post(client, workspace, key, body)
    models = client.get(f"/{workspace}/api/models", params={"api_key": key, **RANGE}).json()
    (model,) = models["models"]
    assert model["interval_source"] == "median_gap"
    assert model["estimated_interval_seconds"] == pytest.approx(5.001)


def test_classes_endpoint(client: httpx.Client, dataset: dict[str, Any]) -> None:
    body = _api(client, dataset, "classes", model="yard/3")
    expected = _groups(dataset["sent"])
    assert [c["class_name"] for c in body["classes"]] == ["car", "helmet"]
    for item in body["classes"]:
        group = expected[("yard/3", item["class_name"])]
        confidences = [g["confidence"] for g in group]
        assert item["result_count"] == len(group)
        assert item["max_confidence"] == pytest.approx(max(confidences))
        assert item["avg_confidence"] == pytest.approx(statistics.fmean(confidences))
        assert item["prediction_count"] == sum(g["stats"]["count"] for g in group)
        assert item["results_with_stats"] == len(group)


def test_devices_endpoint(client: httpx.Client, dataset: dict[str, Any]) -> None:
    body = _api(client, dataset, "devices")
    devices = {d["device_id"]: d for d in body["devices"]}
    assert set(devices) == {"edge-01", "edge-02"}
    assert devices["edge-01"]["report_count"] == 20
    for device_id, device in devices.items():
        mine = [s for s in dataset["sent"] if s["device_id"] == device_id]
        # A report's time identifies it here: every report of the dataset has its own.
        assert device["report_count"] == len({s["ts"] for s in mine})
        assert device["result_count"] == len(mine)
        assert device["last_report_at"] == _iso(max(s["ts"] for s in mine))
    sources = [s["source_id"] for s in devices["edge-01"]["sources"]]
    assert sources == ["cam-1", "cam-2", None]
    gate_only = _api(client, dataset, "devices", model="gate/1")
    assert all([s["source_id"] for s in d["sources"]] == [None] for d in gate_only["devices"])


def test_timeseries_buckets(client: httpx.Client, dataset: dict[str, Any]) -> None:
    bucket = 300
    body = _api(client, dataset, "timeseries", model="yard/3", bucket_seconds=bucket)
    expected: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for item in dataset["sent"]:
        if item["model_id"] == "yard/3":
            expected[(item["class_name"], (item["ts"] // bucket) * bucket)].append(item)
    points = {
        (series["class_name"], point["t"]): point
        for series in body["series"]
        for point in series["points"]
    }
    assert set(points) == set(expected)
    for where, point in points.items():
        group = expected[where]
        assert point["max_confidence"] == pytest.approx(max(g["confidence"] for g in group))
        assert point["avg_confidence"] == pytest.approx(
            statistics.fmean(g["confidence"] for g in group)
        )
        assert point["samples"] == len(group)
        assert point["prediction_count"] == sum(g["stats"]["count"] for g in group)
    # The drift written into the data is visible: helmet's best confidence drops.
    helmet = next(s for s in body["series"] if s["class_name"] == "helmet")["points"]
    assert helmet[0]["avg_confidence"] > helmet[-1]["avg_confidence"]
    filtered = _api(
        client,
        dataset,
        "timeseries",
        model="yard/3",
        bucket_seconds=bucket,
        class_name="car",
        source_id="cam-1",
    )
    assert [s["class_name"] for s in filtered["series"]] == ["car"]
    too_fine = client.get(
        f"/{dataset['workspace']}/api/timeseries",
        params={"api_key": dataset["key"], "model": "yard/3", "bucket_seconds": 0.01, **RANGE},
    )
    assert too_fine.status_code == 422
    assert too_fine.json()["detail"][0]["field"] == "query.bucket_seconds"


def test_histogram_sums_stats_or_counts_samples(
    client: httpx.Client, dataset: dict[str, Any]
) -> None:
    yard = _api(client, dataset, "histogram", model="yard/3", class_name="car")
    (car,) = yard["classes"]
    cars = [s for s in dataset["sent"] if (s["model_id"], s["class_name"]) == ("yard/3", "car")]
    assert car["counts"] == [sum(s["stats"]["histogram"][i] for s in cars) for i in range(10)]
    assert car["total"] == sum(s["stats"]["count"] for s in cars)
    gate = _api(client, dataset, "histogram", model="gate/1")
    persons = [s for s in dataset["sent"] if s["class_name"] == "person"]
    person = next(c for c in gate["classes"] if c["class_name"] == "person")
    assert person["results_with_stats"] == 0
    assert person["counts"] == [
        sum(1 for s in persons if min(int(s["confidence"] * 10), 9) == i) for i in range(10)
    ]
    assert len(gate["bin_edges"]) == 11


def test_samples_newest_first(client: httpx.Client, dataset: dict[str, Any]) -> None:
    body = _api(client, dataset, "samples", limit=5, model="gate/1")
    assert len(body["samples"]) == 5
    times = [s["t"] for s in body["samples"]]
    assert times == sorted(times, reverse=True)
    newest = max(s["ts"] for s in dataset["sent"] if s["model_id"] == "gate/1")
    assert times[0] == pytest.approx(newest)
    sent_ids = {s["inference_id"] for s in dataset["sent"]}
    assert all(s["inference_id"] in sent_ids for s in body["samples"])
    assert set(body["samples"][0]) >= {
        "class_name",
        "confidence",
        "inference_id",
        "model_type",
        "device_id",
        "source_id",
        "time",
    }


def test_dashboard_session_round_trip(
    backend: RunningBackend, client: httpx.Client, dataset: dict[str, Any]
) -> None:
    assert client.get("/dashboard/api/me").status_code == 401
    bad = client.post("/dashboard/api/login", json={"api_key": "mmk_nope"})
    assert bad.status_code == 401
    assert "unknown or revoked" in bad.json()["detail"]
    assert client.post("/dashboard/api/login", json={}).status_code == 422

    login = client.post("/dashboard/api/login", json={"api_key": dataset["key"]})
    assert login.status_code == 200
    assert login.json() == {"workspace": dataset["workspace"]}
    cookie = login.headers["set-cookie"]
    assert cookie.startswith("mmagg_session=")
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    token = client.cookies["mmagg_session"]
    assert dataset["key"] not in cookie and len(token) >= 40

    assert client.get("/dashboard/api/me").json() == {"workspace": dataset["workspace"]}
    via_session = client.get("/dashboard/api/models", params=RANGE).json()
    via_key = _api(client, dataset, "models")
    assert via_session == via_key
    stats_body = client.get("/dashboard/api/inference-stats", params=RANGE).json()
    assert stats_body["num_inferences"] == len(dataset["sent"])

    # The session never reaches another workspace: not via the URL, not via the keyed mount.
    other, _other_key = backend.new_workspace()
    assert client.get(f"/{other}/api/models").status_code == 401
    scoped = client.get("/dashboard/api/models", params={"workspace": other, **RANGE})
    assert scoped.json()["workspace"] == dataset["workspace"]

    assert client.post("/dashboard/api/logout").status_code == 200
    client.cookies.set("mmagg_session", token)  # a stolen copy must be dead too
    assert client.get("/dashboard/api/me").status_code == 401
    assert client.get("/dashboard/api/models").status_code == 401


def test_dashboard_endpoints_need_a_session(client: httpx.Client) -> None:
    for path in ("models", "devices", "samples", "inference-stats"):
        response = client.get(f"/dashboard/api/{path}")
        assert response.status_code == 401, path
    client.cookies.set("mmagg_session", "forged")
    assert client.get("/dashboard/api/models").status_code == 401


def test_revoking_the_key_ends_its_dashboard_sessions(
    backend: RunningBackend, client: httpx.Client
) -> None:
    _workspace, key = backend.new_workspace()
    assert client.post("/dashboard/api/login", json={"api_key": key}).status_code == 200
    assert client.get("/dashboard/api/me").status_code == 200
    assert backend.db.revoke_key(key[:8])
    assert client.get("/dashboard/api/me").status_code == 401
    assert client.post("/dashboard/api/login", json={"api_key": key}).status_code == 401


def test_sql_buckets_agree_with_the_wire_format_at_the_edges(
    backend: RunningBackend, client: httpx.Client
) -> None:
    from mmagg.server.queries import confidence_bucket

    workspace, key = backend.new_workspace()
    # Confidences outside [0, 1] are refused at ingest (test_server_bounds.py).
    edges = [-0.0, 0.0, 0.1, 0.19999999999999998, 0.3, 0.7, 0.9, 0.9999999, 1.0]
    edges += [i / 10 for i in range(11)] + [0.29999999999999993, 0.6000000000000001]
    body = report([result(f"c{i}", c, "edge/1") for i, c in enumerate(edges)], timestamp=BASE)
    _post(client, workspace, key, body)
    answer = client.get(
        f"/{workspace}/api/histogram", params={"api_key": key, "model": "edge/1", **RANGE}
    ).json()
    got = {c["class_name"]: c["counts"].index(1) for c in answer["classes"]}
    assert got == {f"c{i}": confidence_bucket(c) for i, c in enumerate(edges)}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 11])
def test_median_for_odd_and_even_counts(
    backend: RunningBackend, client: httpx.Client, count: int
) -> None:
    rng = random.Random(count)
    workspace, key = backend.new_workspace()
    values = [round(rng.random(), 6) for _ in range(count)]
    for i, value in enumerate(values):
        body = report([result("x", value, "med/1")], timestamp=BASE + timedelta(seconds=i))
        _post(client, workspace, key, body)
    answer = client.get(f"/{workspace}/inference-stats", params={"api_key": key, **RANGE}).json()
    (item,) = answer["inference_stats"]
    assert item["median_confidence"] == pytest.approx(statistics.median(values))
    assert item["num_inferences"] == count


def test_inference_stats_answer_matches_its_documented_model(
    client: httpx.Client, dataset: dict[str, Any]
) -> None:
    _api(client, dataset, "inference-stats")
    answer = client.get(
        f"/{dataset['workspace']}/inference-stats", params={"api_key": dataset["key"], **RANGE}
    )
    responses.InferenceStatsResponse.model_validate(answer.json())


def test_openapi_documents_ingest_and_every_json_answer(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    ingest = document["paths"]["/{workspace}/inference-stats"]["post"]
    assert set(ingest["responses"]) == {"200", "401", "403", "413", "422"}
    assert ingest["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Report"
    )
    for path in RESPONSE_MODELS:
        for mount in ("/{workspace}/api/", "/dashboard/api/"):
            ok = document["paths"][mount + path]["get"]["responses"]["200"]
            schema = ok["content"]["application/json"]["schema"]["$ref"]
            assert schema.endswith("/" + RESPONSE_MODELS[path].__name__)
