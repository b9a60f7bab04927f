"""Alert rules evaluated by a real server, notifying a real loopback webhook receiver.

The engine reads an injected clock that the tests step in `interval`-sized moves; after each
move they wait for two evaluation rounds of the server's own loop, so no test sleeps through a
`for:` duration. Report timestamps are relative to the real current time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alert_support import (
    FakeClock,
    WebhookReceiver,
    body,
    hist_median,
    histogram,
    post,
    start_receiver,
)
from server_support import ServerThread, start_server

from mmagg.server import Database, create_app
from mmagg.server.alert_rules import RulesError, parse_rules
from mmagg.server.alerts import AlertEngine

INTERVAL = 15.0  # the logical evaluation interval the clock is stepped by
MODEL = "site-safety/3"
HIGH = [0.81, 0.83, 0.85, 0.86, 0.88, 0.9, 0.92, 0.84, 0.87, 0.89]
LOW = [0.31, 0.35, 0.38, 0.4, 0.42, 0.45, 0.47, 0.5, 0.36, 0.44]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = start_receiver()
    yield r
    r.close()


class Served:
    """A backend with an alert engine on `db_url`, stepping a fake clock."""

    def __init__(self, db_url: str, rules: dict[str, Any], clock: FakeClock, **kw: Any) -> None:
        self.db = Database(db_url)
        self.clock = clock
        self.engine = AlertEngine(
            self.db,
            parse_rules(rules),
            interval=0.02,
            clock=clock,
            lease_ttl=kw.pop("lease_ttl", 10**7),
            retry_backoff=0.01,
            **kw,
        )
        self.server: ServerThread = start_server(create_app(db=self.db, alerts=self.engine))
        self.url = self.server.base_url

    def step(self, seconds: float = INTERVAL) -> float:
        now = self.clock.advance(seconds)
        assert self.engine.wait_ticks(2), "the server's evaluation loop stopped"
        return now

    def settle(self) -> None:
        assert self.engine.wait_ticks(2)

    def begin(self, at: float) -> None:
        """Move the clock from its parking place (a day early) to `at`, after seeding."""
        self.clock.now = at
        self.settle()

    def stop(self) -> None:
        self.server.stop()
        self.db.close()


def _rules(receiver: WebhookReceiver, workspace: str, **rule: Any) -> dict[str, Any]:
    base = {"name": "helmet-low", "workspace": workspace, "receiver": "ops"}
    base.update(rule)
    return {
        "receivers": [{"name": "ops", "webhook": receiver.url + "/hook", "secret": "s3cret"}],
        "rules": [base],
    }


def _stream(start: float, end: float, every: float, values: Any) -> list[tuple[float, list[float]]]:
    out = []
    t = start
    while t < end:
        out.append((t, values(t)))
        t += every
    return out


def _window_median(
    stream: list[tuple[float, list[float]]], t: float, window: float
) -> float | None:
    counts = [0] * 10
    for ts, values in stream:
        if t - window <= ts < t:
            counts = [a + b for a, b in zip(counts, histogram(values), strict=True)]
    return hist_median(counts)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_confidence_rule_fires_within_for_plus_interval_and_resolves(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    drop, recover = base + 122, base + 305
    stream = _stream(base - 300, base + 600, 5.0, lambda t: LOW if drop <= t < recover else HIGH)
    # Independent: the first second at which the 60 s window's median is below 0.6, and the
    # first second after that at which it is back at or above.
    crossing = next(
        t for t in range(int(base), int(base) + 600) if (_window_median(stream, t, 60) or 1) < 0.6
    )
    back = next(
        t for t in range(crossing, int(base) + 600) if (_window_median(stream, t, 60) or 0) >= 0.6
    )
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    served = Served(
        f"sqlite:///{tmp_path / 'a.db'}",
        _rules(
            receiver,
            workspace,
            model=MODEL,
            metric="median_confidence",
            below=0.6,
            window="60s",
            **{"for": "30s"},
        ),
        clock,
    )
    try:
        key = served.db.create_key(workspace, {"ingest", "read"})
        post(served.url, workspace, key, [body(ts, MODEL, {"helmet": v}) for ts, v in stream])
        served.begin(base)
        arrivals: list[float] = []
        while clock() < base + 600:
            now = served.step()
            while len(arrivals) < len(receiver.received):
                arrivals.append(now)
        assert receiver.statuses() == ["firing", "resolved"]
        fired, resolved = receiver.bodies()
        alert = fired["alerts"][0]
        starts = _epoch(alert["startsAt"])
        assert crossing + 30 <= starts <= crossing + 30 + INTERVAL
        assert arrivals[0] == starts
        assert alert["labels"] == {
            "alertname": "helmet-low",
            "workspace": workspace,
            "model_id": MODEL,
            "class_name": "helmet",
        }
        assert float(alert["annotations"]["value"]) < 0.6
        assert alert["annotations"]["threshold"] == "0.6"
        assert alert["endsAt"] == "0001-01-01T00:00:00Z"
        assert fired["version"] == "4" and fired["receiver"] == "ops"
        assert fired["groupLabels"] == {"alertname": "helmet-low"}
        assert fired["commonLabels"] == alert["labels"]
        assert set(fired) >= {"externalURL", "groupKey", "truncatedAlerts", "commonAnnotations"}
        assert alert["generatorURL"].endswith("/dashboard#model=site-safety%2F3")
        assert len(alert["fingerprint"]) == 16
        ended = resolved["alerts"][0]
        assert resolved["status"] == "resolved" and ended["status"] == "resolved"
        assert ended["fingerprint"] == alert["fingerprint"]
        assert back <= _epoch(ended["endsAt"]) <= back + INTERVAL
        assert _epoch(ended["startsAt"]) == starts
        # The signature is HMAC-SHA256 of the raw body with the receiver's secret.
        raw = receiver.received[0].raw
        expected = "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
        assert receiver.received[0].headers["x-mmagg-signature-256"] == expected
        # The read API shows the instance and its history.
        answer = httpx.get(f"{served.url}/{workspace}/api/alerts", params={"api_key": key})
        assert answer.status_code == 200
        data = answer.json()
        assert [a["state"] for a in data["alerts"]] == ["resolved"]
        assert [e["status"] for e in data["recent"]][:3] == ["resolved", "firing", "pending"]
        assert data["rules"][0]["name"] == "helmet-low" and data["enabled"] is True
    finally:
        served.stop()


def test_silence_rule_fires_when_a_model_stops(tmp_path: Path, receiver: WebhookReceiver) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    served = Served(
        f"sqlite:///{tmp_path / 's.db'}",
        _rules(receiver, workspace, name="camera-silent", metric="silence", after="60s"),
        clock,
    )
    try:
        key = served.db.create_key(workspace, {"ingest", "read"})
        last = base + 90
        stream = _stream(base - 120, last + 1, 10.0, lambda t: HIGH)
        post(served.url, workspace, key, [body(ts, MODEL, {"person": v}) for ts, v in stream])
        served.begin(base)
        fired_at = None
        while clock() < base + 300 and fired_at is None:
            now = served.step()
            if receiver.received:
                fired_at = now
        assert fired_at is not None, "the silence rule never fired"
        assert last + 60 < fired_at <= last + 60 + INTERVAL
        alert = receiver.bodies()[0]["alerts"][0]
        assert alert["labels"]["model_id"] == MODEL and "class_name" not in alert["labels"]
        assert float(alert["annotations"]["value"]) > 60
        # It reports again: resolved.
        post(served.url, workspace, key, [body(clock() - 1, MODEL, {"person": HIGH})])
        served.step()
        assert receiver.statuses() == ["firing", "resolved"]
    finally:
        served.stop()


def test_restart_keeps_state_and_does_not_notify_twice(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    rules = _rules(
        receiver,
        workspace,
        metric="mean_confidence",
        below=0.6,
        window="60s",
        repeat_interval="10m",
        **{"for": "15s"},
    )
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    served = Served(url, rules, clock)
    key = served.db.create_key(workspace, {"ingest", "read"})
    stream = _stream(base - 60, base + 3600, 10.0, lambda t: LOW)
    try:
        post(served.url, workspace, key, [body(ts, MODEL, {"helmet": v}) for ts, v in stream])
        served.begin(base)
        for _ in range(4):
            served.step()
        assert receiver.statuses() == ["firing"]
    finally:
        served.stop()
    again = Served(url, rules, clock)
    try:
        for _ in range(4):
            again.step()
        assert receiver.statuses() == ["firing"], "a restart must not notify a firing alert again"
        data = httpx.get(f"{again.url}/{workspace}/api/alerts", params={"api_key": key}).json()
        assert [a["state"] for a in data["alerts"]] == ["firing"]
        # The repeat interval (10 min) still counts from the first notification.
        again.step(600)
        assert receiver.statuses() == ["firing", "firing"]
    finally:
        again.stop()


def test_failed_webhook_is_retried_counted_and_never_logs_the_url_secret(
    tmp_path: Path, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    rules = _rules(receiver, workspace, metric="mean_confidence", below=0.6, window="60s")
    rules["receivers"][0]["webhook"] = receiver.url + "/hook/TOKEN-abc123?key=zz-secret"
    receiver.fail_next = 5  # more than one round of 4 attempts
    caplog.set_level(logging.WARNING, logger="mmagg.server.alerts")
    served = Served(f"sqlite:///{tmp_path / 'f.db'}", rules, clock, retry_attempts=4)
    try:
        key = served.db.create_key(workspace, {"ingest", "read"})
        post(served.url, workspace, key, [body(base - 5, MODEL, {"helmet": LOW})])
        served.begin(base)
        served.step(1)
        served.step(1)
        assert receiver.statuses() == ["firing"], "delivered on the round after the failures"
        assert receiver.attempts == 6
        metrics = httpx.get(f"{served.url}/metrics").text
        assert 'mmagg_alert_webhook_failures_total{receiver="ops"} 5.0' in metrics
        assert 'mmagg_alert_notifications_failed_total{receiver="ops"} 1.0' in metrics
        assert 'mmagg_alert_notifications_total{receiver="ops",status="firing"} 1.0' in metrics
    finally:
        served.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "attempt 1/4 failed: HTTP 500" in logged
    assert "TOKEN-abc123" not in logged and "zz-secret" not in logged


def test_two_postgres_replicas_notify_once(pg_database_url: str, receiver: WebhookReceiver) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    rules = _rules(receiver, workspace, metric="median_confidence", below=0.6, window="60s")
    first = Served(pg_database_url, rules, clock, instance="replica-a")
    second = Served(pg_database_url, rules, clock, instance="replica-b")
    stopped = False
    try:
        key = first.db.create_key(workspace, {"ingest", "read"})
        stream = _stream(base - 120, base + 200, 5.0, lambda t: LOW if t < base + 60 else HIGH)
        post(second.url, workspace, key, [body(ts, MODEL, {"helmet": v}) for ts, v in stream])
        first.begin(base)
        second.settle()
        for _ in range(3):
            first.step(5)
            second.settle()
        assert receiver.statuses() == ["firing"]
        # The leader goes away; the other replica takes over and resolves, once.
        first.stop()
        stopped = True
        for _ in range(8):
            second.step()
        assert receiver.statuses() == ["firing", "resolved"]
    finally:
        if not stopped:
            first.stop()
        second.stop()


def test_drift_rule_fires_on_a_shifted_histogram(tmp_path: Path, receiver: WebhookReceiver) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:8]}"
    base = float(int(time.time()) - 7200)
    clock = FakeClock(base - 86400)  # parked: seeding happens before any evaluation
    rules = _rules(
        receiver,
        workspace,
        name="helmet-drift",
        metric="drift",
        model=MODEL,
        **{"class": "helmet"},
        above=0.25,
        window="60s",
        baseline="5m",
    )
    served = Served(f"sqlite:///{tmp_path / 'd.db'}", rules, clock)
    try:
        key = served.db.create_key(workspace, {"ingest", "read"})
        stream = _stream(base - 400, base + 200, 5.0, lambda t: LOW if t >= base + 30 else HIGH)
        post(served.url, workspace, key, [body(ts, MODEL, {"helmet": v}) for ts, v in stream])
        served.begin(base)
        assert receiver.received == []  # at base the window holds no shifted data yet
        served.step(60)
        assert receiver.statuses() == ["firing"]
        labels = receiver.bodies()[0]["alerts"][0]["labels"]
        assert labels["class_name"] == "helmet"
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metric": "median"}, "rules[0] 'helmet-low': metric: expected one of"),
        ({"below": "low"}, "rules[0] 'helmet-low': below: expected a number, got 'low'"),
        ({"below": 1.5}, "rules[0] 'helmet-low': below: expected a confidence in [0, 1]"),
        ({"window": "5 parsecs"}, "rules[0] 'helmet-low': window: expected a duration"),
        ({"receiver": "pager"}, "rules[0] 'helmet-low': receiver: expected one of ['ops']"),
        ({"above": 0.3}, "rules[0] 'helmet-low': below/above: expected exactly one"),
        ({"colour": "red"}, "rules[0] 'helmet-low': unknown field 'colour'"),
    ],
)
def test_invalid_rules_name_the_rule_and_field(change: dict[str, Any], message: str) -> None:
    rule = {
        "name": "helmet-low",
        "workspace": "demo",
        "metric": "median_confidence",
        "below": 0.6,
        "receiver": "ops",
    }
    rule.update(change)
    document = {"receivers": [{"name": "ops", "webhook": "http://127.0.0.1:1/x"}], "rules": [rule]}
    with pytest.raises(RulesError) as caught:
        parse_rules(document, "rules.yaml")
    assert str(caught.value).startswith("rules.yaml: ")
    assert message in str(caught.value)


def test_webhook_url_with_a_secret_is_not_echoed_in_errors() -> None:
    document = {"receivers": [{"name": "ops", "webhook": "ftp://host/T0K3N"}]}
    with pytest.raises(RulesError) as caught:
        parse_rules(document)
    assert "receivers[0] 'ops': webhook" in str(caught.value)
    assert "T0K3N" not in str(caught.value)


def test_sighup_reloads_rules_and_keeps_old_ones_when_invalid(tmp_path: Path) -> None:
    import os
    import signal

    from mmagg.server.alerts import install_sighup

    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: a, workspace: w, metric: silence, after: 60s}\n")
    db = Database("sqlite://")
    engine = AlertEngine.from_file(db, path, clock=lambda: time.time())
    previous = signal.getsignal(signal.SIGHUP)
    try:
        assert install_sighup(engine)
        path.write_text(
            "rules:\n  - {name: a, workspace: w, metric: silence, after: 60s}\n"
            "  - {name: b, workspace: w, metric: count_rate, below: 5}\n"
        )
        os.kill(os.getpid(), signal.SIGHUP)
        engine.tick()
        assert [r.name for r in engine.rules.rules] == ["a", "b"]
        path.write_text("rules:\n  - {name: c, workspace: w, metric: nope}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        engine.tick()
        assert [r.name for r in engine.rules.rules] == ["a", "b"]
    finally:
        signal.signal(signal.SIGHUP, previous)
        engine.close()
        db.close()


def _engine_with(tmp_path: Path, rule: dict[str, Any], reports: list[dict[str, Any]]) -> Any:
    from mmagg.server.schemas import REPORT_ADAPTER

    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    principal = db.authenticate(db.create_key("w", {"ingest", "read"}))
    assert principal is not None
    for item in reports:
        db.store_report(principal, REPORT_ADAPTER.validate_python(item), None)
    clock = FakeClock(0.0)
    engine = AlertEngine(
        db, parse_rules({"rules": [{"name": "r", "workspace": "w", **rule}]}), clock=clock
    )
    return db, engine, clock


def test_count_rate_counts_a_vanished_class_as_zero_per_minute(tmp_path: Path) -> None:
    base = float(int(time.time()) - 7200)
    reports = [
        body(base - 600 + 10 * i, MODEL, {"car": HIGH, "truck": HIGH[:3]}) for i in range(60)
    ]
    # From base - 120 on, trucks vanish: the window below has none, the baseline has some.
    reports = [
        r if i < 48 else body(base - 600 + 10 * i, MODEL, {"car": HIGH})
        for i, r in enumerate(reports)
    ]
    db, engine, clock = _engine_with(
        tmp_path, {"metric": "count_rate", "below": 5, "window": "60s", "baseline": "5m"}, reports
    )
    try:
        clock.now = base
        _, observed = engine.observe(engine.rules.rules[0], base)
        rates = {o.labels["class_name"]: o.value for o in observed}
        assert rates == {"car": 60.0, "truck": 0.0}  # 6 reports x 10 cars in 60 s; no trucks
        notes = engine.tick()
        assert [(n.status, n.labels["class_name"]) for n in notes] == [("firing", "truck")]
    finally:
        engine.close()
        db.close()


def test_class_mix_drift_fires_when_the_share_of_classes_changes(tmp_path: Path) -> None:
    base = float(int(time.time()) - 7200)
    reports = [
        body(base - 600 + 10 * i, MODEL, {"car": HIGH, "person": HIGH} if i < 54 else {"car": HIGH})
        for i in range(60)
    ]
    db, engine, clock = _engine_with(
        tmp_path,
        {
            "metric": "class_mix_drift",
            "above": 0.25,
            "window": "60s",
            "baseline": "5m",
            "min_count": 50,
        },
        reports,
    )
    try:
        clock.now = base
        notes = engine.tick()
        assert [n.labels for n in notes] == [
            {"alertname": "r", "workspace": "w", "model_id": MODEL}
        ]
        expected_shares = ([60, 0], [300, 300])  # window: cars only; baseline: half and half
        from mmagg.server.drift import psi as psi_of

        assert notes[0].value == pytest.approx(psi_of(*expected_shares))
    finally:
        engine.close()
        db.close()


def test_alerts_of_one_workspace_are_invisible_to_another(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'i.db'}")
    reports_key = db.create_key("alpha", {"ingest", "read"})
    other_key = db.create_key("beta", {"ingest", "read"})
    base = float(int(time.time()) - 7200)
    clock = FakeClock(base)
    rules = parse_rules(
        {"rules": [{"name": "quiet", "workspace": "alpha", "metric": "silence", "after": "60s"}]}
    )
    engine = AlertEngine(db, rules, clock=clock, interval=0.05)
    running = start_server(create_app(db=db, alerts=engine))
    try:
        post(running.base_url, "alpha", reports_key, [body(base - 600, MODEL, {"car": HIGH})])
        clock.advance(1)
        assert engine.wait_ticks(2)
        mine = httpx.get(f"{running.base_url}/alpha/api/alerts", params={"api_key": reports_key})
        theirs = httpx.get(f"{running.base_url}/beta/api/alerts", params={"api_key": other_key})
        assert [a["state"] for a in mine.json()["alerts"]] == ["firing"]
        assert theirs.json()["alerts"] == [] and theirs.json()["recent"] == []
        assert theirs.json()["rules"] == []
    finally:
        running.stop()
        db.close()


def test_serve_refuses_an_invalid_rules_file_naming_rule_and_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmagg.cli import app

    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - name: helmet-low\n    workspace: demo\n    metric: median_confidence\n"
        "    below: lots\n"
    )
    result = CliRunner().invoke(
        app,
        ["serve", "--alerts", str(path), "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2
    assert "rules[0] 'helmet-low': below: expected a number, got 'lots'" in result.output
