"""Drift and trend numbers: the measures, the read endpoints, the property on stationary data,
and the schema upgrade that adds the alert tables."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from alert_support import body, hist_median, histogram, post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import RunningBackend
from v01_schema import build_v01_database

from mmagg.server import Database
from mmagg.server.alert_rules import parse_rules
from mmagg.server.alerts import AlertEngine
from mmagg.server.drift import js_distance, psi
from mmagg.server.schemas import REPORT_ADAPTER
from mmagg.server.tables import SCHEMA_VERSION

MODEL = "yard/3"


def _psi_by_hand(a: list[int], b: list[int]) -> float:
    ta, tb = sum(a) + 0.5 * len(a), sum(b) + 0.5 * len(b)
    return sum(
        ((x + 0.5) / ta - (y + 0.5) / tb) * math.log(((x + 0.5) / ta) / ((y + 0.5) / tb))
        for x, y in zip(a, b, strict=True)
    )


@given(
    st.lists(st.integers(0, 500), min_size=10, max_size=10),
    st.lists(st.integers(0, 500), min_size=10, max_size=10),
)
def test_psi_is_symmetric_non_negative_and_zero_on_equal_shares(a: list[int], b: list[int]) -> None:
    assert psi(a, b) == pytest.approx(psi(b, a), abs=1e-12)
    assert psi(a, b) >= 0
    assert psi(a, b) == pytest.approx(_psi_by_hand(a, b), abs=1e-9)
    doubled = [2 * x for x in a]
    assert psi(a, a) == 0
    assert 0 <= js_distance(a, b) <= 1
    assert psi(doubled, a) < 0.05 or sum(a) < 20  # only the smoothing differs


def test_trends_and_drift_endpoints_match_numbers_computed_here(backend: RunningBackend) -> None:
    workspace, key = backend.new_workspace()
    now = time.time()
    early = [0.81, 0.85, 0.9, 0.92, 0.88, 0.95]
    late = [0.31, 0.42, 0.45, 0.38, 0.5, 0.55]
    bodies = []
    for i in range(40):  # baseline: 20 min ago to 10 min ago, every 15 s
        bodies.append(body(now - 1195 + 15 * i, MODEL, {"helmet": early, "car": [0.7]}))
    for i in range(20):  # recent 5 minutes
        bodies.append(body(now - 295 + 15 * i, MODEL, {"helmet": late, "car": [0.7, 0.72]}))
    post(backend.base_url, workspace, key, bodies)
    auth = {"api_key": key}
    answer = httpx.get(
        f"{backend.base_url}/{workspace}/api/drift",
        params={**auth, "window": 300, "baseline": 900, "endTime": str(now), "min_count": 50},
    )
    assert answer.status_code == 200, answer.text
    model = answer.json()["models"][0]
    helmet = next(c for c in model["classes"] if c["class_name"] == "helmet")
    expected = _psi_by_hand([20 * x for x in histogram(late)], [40 * x for x in histogram(early)])
    assert helmet["psi"] == pytest.approx(expected, rel=1e-9)
    assert helmet["level"] == "significant"
    assert helmet["recent_count"] == 120 and helmet["baseline_count"] == 240
    assert helmet["recent_median"] == pytest.approx(hist_median(histogram(late)))
    car = next(c for c in model["classes"] if c["class_name"] == "car")
    assert car["psi"] is None and car["level"] == "unknown"  # 40 < min_count on the recent side
    mix = _psi_by_hand([40, 120], [40, 240])
    assert model["class_mix"]["psi"] == pytest.approx(mix, rel=1e-9)

    trend = httpx.get(
        f"{backend.base_url}/{workspace}/api/trends",
        params={
            **auth,
            "model": MODEL,
            "bucket_seconds": 60,
            "startTime": str(now - 1260),
            "endTime": str(now + 1),
        },
    ).json()
    points = next(s for s in trend["series"] if s["class_name"] == "helmet")["points"]
    last = points[-1]
    in_bucket = [b for b in bodies if math.floor(_ts(b) / 60) * 60 == last["t"]]
    assert in_bucket, "the last bucket holds reports"
    assert last["prediction_count"] == 6 * len(in_bucket)
    assert last["predictions_per_minute"] == pytest.approx(6 * len(in_bucket))
    assert last["mean_confidence"] == pytest.approx(sum(late) / len(late))
    assert last["median_confidence"] == pytest.approx(hist_median(histogram(late)))
    assert last["best_confidence"] == pytest.approx(max(late))
    # p10 of the late values' histogram, by hand: 10 % of 6 per report = 0.6 of a count, all
    # in bucket 3 (0.31, 0.38 and more reports the same), linear in the bucket.
    per_report = histogram(late)
    reports = len(in_bucket)
    target = 0.1 * 6 * reports
    assert last["p10_confidence"] == pytest.approx((3 + target / (per_report[3] * reports)) / 10)


def _ts(item: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(item["timestamp"]).timestamp()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1))
def test_drift_rule_stays_quiet_on_stationary_data(tmp_path_factory: Any, seed: int) -> None:
    """Same distribution before and after: the drift rule (PSI above 0.25) never fires."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(2, 12), rng.uniform(1, 5)
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('drift') / 'd.db'}")
    try:
        key = db.create_key("ws", {"ingest", "read"})
        principal = db.authenticate(key)
        assert principal is not None
        end = float(int(time.time()) - 3600)
        for i in range(120):  # 10 minutes, a report every 5 s, 20 predictions each
            values = [float(v) for v in rng.beta(a, b, size=20)]
            report = REPORT_ADAPTER.validate_python(
                body(end - 600 + 5 * i, MODEL, {"helmet": values})
            )
            db.store_report(principal, report, None)
        rules = parse_rules(
            {
                "rules": [
                    {
                        "name": "drift",
                        "workspace": "ws",
                        "metric": "drift",
                        "above": 0.25,
                        "window": "60s",
                        "baseline": "5m",
                    }
                ]
            }
        )
        clock = [end - 240.0]
        engine = AlertEngine(db, rules, clock=lambda: clock[0])
        try:
            while clock[0] <= end:
                assert engine.tick() == []
                clock[0] += 15
        finally:
            engine.close()
    finally:
        db.close()


def test_v1_database_upgrades_to_alert_tables(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    build_v01_database(f"sqlite:///{path}", "sqlite", "mmk_" + "x" * 32, "session-token")
    db = Database(f"sqlite:///{path}")
    try:
        inspector = sa.inspect(db.engine)
        assert {"alert_state", "alert_events", "alert_lease"} <= set(inspector.get_table_names())
        with db.read() as conn:
            assert (
                conn.exec_driver_sql("SELECT version FROM schema_version").scalar()
                == SCHEMA_VERSION
            )
    finally:
        db.close()
    again = Database(f"sqlite:///{path}")  # idempotent: a second start changes nothing
    again.close()


def test_alert_endpoints_need_a_key_of_the_workspace(backend: RunningBackend) -> None:
    workspace, key = backend.new_workspace()
    other, other_key = backend.new_workspace()
    for path in ("alerts", "drift", f"trends?model={uuid.uuid4().hex}"):
        url = f"{backend.base_url}/{workspace}/api/{path}"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {other_key}"}).status_code == 403
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
