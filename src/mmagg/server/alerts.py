"""The alert engine of `mmagg serve --alerts rules.yaml` (docs/alerts.md).

Every `interval` seconds the engine (on exactly one replica: a lease row in the database)
computes each rule's metric per series (model, class), moves each alert instance through
pending -> firing -> resolved as Prometheus does, stores the state in the database and sends
one webhook per state change (Alertmanager's webhook format, version 4), and again every
`repeat_interval` while firing.

Delivery: before sending, the engine claims the notification with a compare-and-set on the
state row, so two replicas (or a restart) never send the same state twice; a failed send is
retried with back-off, then released, so the next evaluation tries again. A crash between the
claim and the send loses that one notification (the repeat interval re-sends a firing alert).

Example:
    >>> from mmagg.server.db import Database
    >>> from mmagg.server.alert_rules import parse_rules
    >>> db = Database("sqlite://")
    >>> engine = AlertEngine(db, parse_rules({"rules": [{"name": "quiet", "workspace": "acme",
    ...     "metric": "silence", "after": "60s"}]}), clock=lambda: 1_000_000.0)
    >>> engine.tick()
    []
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread
import httpx
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge

from mmagg import __version__
from mmagg.server import trends
from mmagg.server.alert_rules import EMPTY_RULES, Receiver, Rule, RulesError, RuleSet, load_rules
from mmagg.server.db import Database
from mmagg.server.drift import class_mix, psi
from mmagg.server.lease import Lease
from mmagg.server.queries import TimeRange
from mmagg.server.tables import alert_events, alert_state, workspaces

logger = logging.getLogger("mmagg.server.alerts")

DEFAULT_INTERVAL = 15.0
LEASE_NAME = "alert-evaluator"
SIGNATURE_HEADER = "X-Mmagg-Signature-256"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing
RECENT_SECONDS = 24 * 3600.0


def rfc3339(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC with a Z, as Alertmanager writes times."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def redact_url(url: str) -> str:
    """The scheme, host and port of `url` only: paths and queries of webhooks hold secrets.

    Example:
        >>> redact_url("https://user:pw@hooks.example.com/T0/B1/secret?token=x")
        'https://hooks.example.com/***'
    """
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}/***"


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex characters identifying a label set (like Alertmanager's fingerprint)."""
    text = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def signature(secret: str, body: bytes) -> str:
    """The value of the signature header: `sha256=` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Observation:
    """One series of a rule at one evaluation: its labels and metric value (None: no data)."""

    labels: dict[str, str]
    value: float | None


@dataclass(frozen=True)
class Notification:
    """One alert instance in one webhook."""

    rule: str
    status: str  # firing | resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None
    fingerprint: str
    value: float | None


class AlertMetrics:
    """The engine's Prometheus series, registered in the app's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.evaluations = Counter(
            "mmagg_alert_evaluations",
            "Alert evaluation rounds run (as the leader).",
            registry=registry,
        )
        self.evaluation_errors = Counter(
            "mmagg_alert_evaluation_errors",
            "Alert rules whose evaluation failed.",
            registry=registry,
        )
        self.notifications = Counter(
            "mmagg_alert_notifications",
            "Webhook notifications delivered, by receiver and status.",
            ["receiver", "status"],
            registry=registry,
        )
        self.webhook_failures = Counter(
            "mmagg_alert_webhook_failures",
            "Failed webhook attempts (each retry counts), by receiver.",
            ["receiver"],
            registry=registry,
        )
        self.notifications_failed = Counter(
            "mmagg_alert_notifications_failed",
            "Notifications given up after every retry (tried again next evaluation).",
            ["receiver"],
            registry=registry,
        )
        self.reload_errors = Counter(
            "mmagg_alert_rule_reload_errors", "Rule reloads (SIGHUP) rejected.", registry=registry
        )
        self.firing = Gauge("mmagg_alerts_firing", "Alert instances firing now.", registry=registry)


class WebhookSender:
    """POSTs JSON to a receiver with retries and exponential back-off."""

    def __init__(
        self,
        metrics: AlertMetrics,
        *,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.metrics = metrics
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def send(self, receiver: Receiver, body: bytes) -> bool:
        """Deliver `body`; True on a 2xx answer within the attempts."""
        headers = {"Content-Type": "application/json", "User-Agent": f"mmagg/{__version__}"}
        if receiver.secret:
            headers[SIGNATURE_HEADER] = signature(receiver.secret, body)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            problem: str
            try:
                response = self._client.post(receiver.webhook, content=body, headers=headers)
            except httpx.HTTPError as error:
                # The exception text may quote the URL; log only its type.
                problem = type(error).__name__
            else:
                if 200 <= response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}"
            self.metrics.webhook_failures.labels(receiver=receiver.name).inc()
            logger.warning(
                "mmagg: webhook %r (%s) attempt %d/%d failed: %s",
                receiver.name,
                redact_url(receiver.webhook),
                attempt,
                self.attempts,
                problem,
            )
            if attempt < self.attempts:
                self.sleep(delay)
                delay *= 2
        self.metrics.notifications_failed.labels(receiver=receiver.name).inc()
        return False


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first = dicts[0]
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def webhook_body(
    receiver: str, rule: str, alerts: list[Notification], external_url: str
) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) for one group of alerts of one rule."""
    status = "firing" if any(a.status == "firing" for a in alerts) else "resolved"
    group_labels = {"alertname": rule}
    items = []
    for a in alerts:
        model = a.labels.get("model_id")
        generator = f"{external_url}/dashboard" + (
            f"#model={quote(model, safe='')}" if model else ""
        )
        items.append(
            {
                "status": a.status,
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": rfc3339(a.starts_at),
                "endsAt": ZERO_TIME if a.ends_at is None else rfc3339(a.ends_at),
                "generatorURL": generator,
                "fingerprint": a.fingerprint,
            }
        )
    return {
        "version": "4",
        "groupKey": "{}:" + "{" + f'alertname="{rule}"' + "}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": items,
    }


def _format(value: float | None, metric: str) -> str:
    if value is None:
        return "no data"
    if metric == "silence":
        return f"{value:.0f}s"
    return f"{value:.4g}"


class AlertEngine:
    """Evaluates a `RuleSet` against the database and notifies its receivers.

    `clock` is injectable (tests step it instead of sleeping through `for:` durations);
    `on_notify(notifications)` is called after each round with the state changes (the demo
    prints them). Run `tick()` directly or `run()` as a task.
    """

    def __init__(
        self,
        db: Database,
        rules: RuleSet = EMPTY_RULES,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
        rules_path: str | Path | None = None,
        external_url: str = "http://127.0.0.1:9090",
        lease_ttl: float | None = None,
        instance: str | None = None,
        on_notify: Callable[[list[Notification]], None] | None = None,
        retry_backoff: float = 0.5,
        retry_attempts: int = 4,
    ) -> None:
        self.db = db
        self.rules = rules
        self.interval = interval
        self.clock = clock
        self.rules_path = Path(rules_path) if rules_path is not None else None
        self.external_url = (rules.external_url or external_url).rstrip("/")
        self.lease = Lease(
            db,
            LEASE_NAME,
            ttl=lease_ttl if lease_ttl is not None else max(3 * interval, 30.0),
            holder=instance,
        )
        self.instance = self.lease.holder
        self.on_notify = on_notify
        self.metrics = AlertMetrics()
        self._retry = (retry_attempts, retry_backoff)
        self.sender = WebhookSender(self.metrics, attempts=retry_attempts, backoff=retry_backoff)
        self.ticks = 0
        self._tick_lock = threading.Lock()
        self._ticked = threading.Condition()
        self._reload_requested = False

    @classmethod
    def from_file(cls, db: Database, path: str | Path, **kwargs: Any) -> AlertEngine:
        """An engine on the rules in `path` (raises `RulesError` with the rule and field)."""
        return cls(db, load_rules(path), rules_path=path, **kwargs)

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Register the engine's series in `registry` (the app's `/metrics`)."""
        self.metrics = AlertMetrics(registry)
        attempts, backoff = self._retry
        self.sender.close()
        self.sender = WebhookSender(self.metrics, attempts=attempts, backoff=backoff)

    def close(self) -> None:
        """Release the lease (so another replica takes over at once) and the HTTP client."""
        self.lease.release()
        self.sender.close()

    # rules

    def request_reload(self) -> None:
        """Reload the rules file before the next evaluation (the SIGHUP handler calls this)."""
        self._reload_requested = True

    def reload(self) -> bool:
        """Re-read the rules file now; keep the old rules when the new file is invalid."""
        self._reload_requested = False
        if self.rules_path is None:
            return False
        try:
            rules = load_rules(self.rules_path)
        except (RulesError, OSError) as error:
            self.metrics.reload_errors.inc()
            logger.error("mmagg: alert rules not reloaded, keeping the old ones: %s", error)
            return False
        self.rules = rules
        logger.info("mmagg: reloaded %d alert rules from %s", len(rules.rules), self.rules_path)
        return True

    # leadership

    def is_leader(self, now: float) -> bool:
        """Take or renew the evaluator lease; False while another replica holds it."""
        return self.lease.acquire(now)

    # evaluation

    def _workspace_id(self, conn: sa.Connection, name: str) -> int | None:
        found = conn.execute(sa.select(workspaces.c.id).where(workspaces.c.name == name)).scalar()
        return None if found is None else int(found)

    def observe(self, rule: Rule, now: float) -> tuple[int | None, list[Observation]]:
        """The rule's series and their values at `now`."""
        with self.db.read() as conn:
            workspace_id = self._workspace_id(conn, rule.workspace)
            if workspace_id is None:
                return None, []
            where = trends.Filter(rule.model, rule.class_name, rule.device)
            base_labels = {"alertname": rule.name, "workspace": rule.workspace, **dict(rule.labels)}
            if rule.device is not None:
                base_labels["device_id"] = rule.device
            found: list[Observation] = []

            def labels(model: str, class_name: str | None) -> dict[str, str]:
                out = dict(base_labels, model_id=model)
                if class_name is not None:
                    out["class_name"] = class_name
                return out

            if rule.metric == "silence":
                seen = trends.last_seen(
                    conn, workspace_id, where, per_class=rule.class_name is not None
                )
                for (model, class_name), last in sorted(seen.items(), key=lambda kv: kv[0][0]):
                    found.append(Observation(labels(model, class_name), max(now - last, 0.0)))
                return workspace_id, found
            recent = trends.period_stats(
                conn, workspace_id, TimeRange(now - rule.window, now), where
            )
            before = TimeRange(now - rule.window - rule.baseline, now - rule.window)
            if rule.metric in ("drift", "class_mix_drift", "count_rate"):
                base = trends.period_stats(conn, workspace_id, before, where)
            else:
                base = {}
        if rule.metric == "class_mix_drift":
            models = sorted({m for m, _ in recent.keys() | base.keys()})
            for model in models:
                r = {c: s.predictions for (m, c), s in recent.items() if m == model}
                b = {c: s.predictions for (m, c), s in base.items() if m == model}
                enough = sum(r.values()) >= rule.min_count and sum(b.values()) >= rule.min_count
                found.append(
                    Observation(labels(model, None), psi(*class_mix(r, b)) if enough else None)
                )
            return workspace_id, found
        for key in sorted(recent.keys() | base.keys()):
            model, class_name = key
            stats = recent.get(key, trends.Stats())
            value: float | None
            if rule.metric == "count_rate":
                value = stats.predictions / (rule.window / 60.0)
            elif rule.metric == "drift":
                old = base.get(key, trends.Stats())
                enough = stats.predictions >= rule.min_count and old.predictions >= rule.min_count
                value = psi(stats.histogram, old.histogram) if enough else None
            elif stats.predictions < rule.min_count:
                value = None
            elif rule.metric == "mean_confidence":
                value = stats.mean
            else:
                value = stats.quantile(0.5)
            found.append(Observation(labels(model, class_name), value))
        return workspace_id, found

    def _annotations(
        self, rule: Rule, obs_labels: dict[str, str], value: float | None
    ) -> dict[str, str]:
        what = rule.metric.replace("_", " ")
        subject = obs_labels.get("class_name")
        where = obs_labels.get("model_id", "")
        target = f"{subject} on {where}" if subject else where
        if rule.metric == "silence":
            silent = _format(value, rule.metric)
            summary = f"{target} has not reported for {silent} (limit {rule.threshold:.0f}s)"
        else:
            summary = (
                f"{what} of {target} is {_format(value, rule.metric)} "
                f"({rule.direction} {rule.threshold:g}, window {rule.window:g}s)"
            )
        return {
            "summary": rule.summary or summary,
            "metric": rule.metric,
            "value": _format(value, rule.metric) if value is None else repr(round(value, 6)),
            "threshold": repr(rule.threshold),
            "comparison": rule.direction,
        }

    def tick(self) -> list[Notification]:
        """One evaluation round (if this replica leads); returns the notifications sent."""
        with self._tick_lock:
            if self._reload_requested:
                self.reload()
            now = self.clock()
            sent: list[Notification] = []
            try:
                if self.is_leader(now):
                    self.metrics.evaluations.inc()
                    sent = self._evaluate(now)
            finally:
                with self._ticked:
                    self.ticks += 1
                    self._ticked.notify_all()
            if sent and self.on_notify is not None:
                self.on_notify(sent)
            return sent

    def wait_ticks(self, count: int, timeout: float = 10.0) -> bool:
        """Block until `count` more evaluation rounds finished (tests use it)."""
        with self._ticked:
            target = self.ticks + count
            return self._ticked.wait_for(lambda: self.ticks >= target, timeout)

    def _evaluate(self, now: float) -> list[Notification]:
        rules = {r.name: r for r in self.rules.rules}
        pending: list[tuple[Rule, Notification, dict[str, Any]]] = []
        for rule in self.rules.rules:
            try:
                workspace_id, observations = self.observe(rule, now)
                pending.extend(self._advance(rule, workspace_id, observations, now))
            except Exception:  # one broken rule must not stop the others
                self.metrics.evaluation_errors.inc()
                logger.exception("mmagg: evaluating alert rule %r failed", rule.name)
        self._forget_removed_rules(set(rules))
        sent = self._deliver(pending, now)
        with self.db.read() as conn:
            firing = conn.execute(
                sa.select(sa.func.count())
                .select_from(alert_state)
                .where(alert_state.c.state == "firing")
            ).scalar()
        self.metrics.firing.set(int(firing or 0))
        return sent

    def _forget_removed_rules(self, names: set[str]) -> None:
        with self.db.write() as conn:
            query = sa.delete(alert_state)
            if names:
                query = query.where(alert_state.c.rule_name.not_in(sorted(names)))
            conn.execute(query)

    def _advance(
        self, rule: Rule, workspace_id: int | None, observations: list[Observation], now: float
    ) -> list[tuple[Rule, Notification, dict[str, Any]]]:
        """Move every instance of `rule` one step; return what needs notifying."""
        due: list[tuple[Rule, Notification, dict[str, Any]]] = []
        with self.db.write() as conn:
            rows = {
                row.fingerprint: row
                for row in conn.execute(
                    sa.select(alert_state).where(alert_state.c.rule_name == rule.name)
                )
            }
            seen: set[str] = set()
            for obs in observations:
                fp = fingerprint(obs.labels)
                seen.add(fp)
                row = rows.get(fp)
                active = rule.fires(obs.value)
                self._step(conn, rule, workspace_id, fp, obs.labels, obs.value, active, row, now)
            for fp, row in rows.items():
                if fp not in seen:
                    self._step(
                        conn,
                        rule,
                        row.workspace_id,
                        fp,
                        json.loads(row.labels),
                        None,
                        False,
                        row,
                        now,
                    )
            for row in conn.execute(
                sa.select(alert_state).where(alert_state.c.rule_name == rule.name)
            ):
                if row.state not in ("firing", "resolved"):
                    continue
                repeat_due = (
                    row.state == "firing"
                    and row.notified_status == "firing"
                    and row.notified_at is not None
                    and now - row.notified_at >= rule.repeat_interval
                )
                if row.notified_status == row.state and not repeat_due:
                    continue
                labels = json.loads(row.labels)
                note = Notification(
                    rule=rule.name,
                    status=row.state,
                    labels=labels,
                    annotations=self._annotations(rule, labels, row.value),
                    starts_at=row.fired_at if row.fired_at is not None else now,
                    ends_at=row.resolved_at if row.state == "resolved" else None,
                    fingerprint=row.fingerprint,
                    value=row.value,
                )
                claim = {"id": row.id, "status": row.notified_status, "at": row.notified_at}
                due.append((rule, note, claim))
        return due

    def _step(
        self,
        conn: sa.Connection,
        rule: Rule,
        workspace_id: int | None,
        fp: str,
        labels: dict[str, str],
        value: float | None,
        active: bool,
        row: Any,
        now: float,
    ) -> None:
        def event(status: str) -> None:
            if workspace_id is None:
                return
            conn.execute(
                sa.insert(alert_events).values(
                    workspace_id=workspace_id,
                    rule_name=rule.name,
                    fingerprint=fp,
                    labels=json.dumps(labels, sort_keys=True),
                    status=status,
                    value=value,
                    threshold=rule.threshold,
                    at=now,
                )
            )

        state = row.state if row is not None else "inactive"
        if active:
            if state in ("inactive", "resolved"):
                firing_now = rule.for_seconds <= 0
                values: dict[str, Any] = {
                    "state": "firing" if firing_now else "pending",
                    "value": value,
                    "threshold": rule.threshold,
                    "active_since": now,
                    "updated_at": now,
                }
                if firing_now:
                    values.update(fired_at=now, resolved_at=None)
                if row is None:
                    if workspace_id is None:
                        return
                    conn.execute(
                        sa.insert(alert_state).values(
                            rule_name=rule.name,
                            fingerprint=fp,
                            workspace_id=workspace_id,
                            labels=json.dumps(labels, sort_keys=True),
                            **values,
                        )
                    )
                else:
                    conn.execute(
                        sa.update(alert_state).where(alert_state.c.id == row.id).values(**values)
                    )
                event("firing" if firing_now else "pending")
                return
            values = {"value": value, "updated_at": now}
            if state == "pending" and now - float(row.active_since) >= rule.for_seconds:
                values.update(state="firing", fired_at=now, resolved_at=None)
                event("firing")
            conn.execute(sa.update(alert_state).where(alert_state.c.id == row.id).values(**values))
            return
        if state == "pending":
            if row.fired_at is None or row.notified_status is None:
                conn.execute(sa.delete(alert_state).where(alert_state.c.id == row.id))
            else:
                conn.execute(
                    sa.update(alert_state)
                    .where(alert_state.c.id == row.id)
                    .values(state="resolved", updated_at=now)
                )
            event("inactive")
        elif state == "firing":
            conn.execute(
                sa.update(alert_state)
                .where(alert_state.c.id == row.id)
                .values(state="resolved", resolved_at=now, updated_at=now, value=value)
            )
            event("resolved")

    def _claim(self, claim: dict[str, Any], status: str, now: float) -> bool:
        with self.db.write() as conn:
            status_match = (
                alert_state.c.notified_status.is_(None)
                if claim["status"] is None
                else alert_state.c.notified_status == claim["status"]
            )
            at_match = (
                alert_state.c.notified_at.is_(None)
                if claim["at"] is None
                else alert_state.c.notified_at == claim["at"]
            )
            updated = conn.execute(
                sa.update(alert_state)
                .where(alert_state.c.id == claim["id"], status_match, at_match)
                .values(notified_status=status, notified_at=now)
            )
            return bool(updated.rowcount == 1)

    def _release(self, claim: dict[str, Any]) -> None:
        with self.db.write() as conn:
            conn.execute(
                sa.update(alert_state)
                .where(alert_state.c.id == claim["id"])
                .values(notified_status=claim["status"], notified_at=claim["at"])
            )

    def _deliver(
        self, due: list[tuple[Rule, Notification, dict[str, Any]]], now: float
    ) -> list[Notification]:
        groups: dict[tuple[str, str | None, str], list[tuple[Notification, dict[str, Any]]]] = (
            defaultdict(list)
        )
        for rule, note, claim in due:
            if self._claim(claim, note.status, now):
                groups[(rule.name, rule.receiver, note.status)].append((note, claim))
        sent: list[Notification] = []
        for (rule_name, receiver_name, status), members in groups.items():
            notes = [n for n, _ in members]
            receiver = self.rules.receivers.get(receiver_name) if receiver_name else None
            if receiver is None:
                sent.extend(notes)  # no receiver: the dashboard and `on_notify` only
                continue
            body = webhook_body(receiver.name, rule_name, notes, self.external_url)
            payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
            if self.sender.send(receiver, payload):
                self.metrics.notifications.labels(receiver=receiver.name, status=status).inc(
                    len(notes)
                )
                sent.extend(notes)
            else:
                for _, claim in members:
                    self._release(claim)
        return sent

    async def run(self) -> None:
        """Evaluate every `interval` seconds until cancelled."""
        while True:
            try:
                await anyio.to_thread.run_sync(self.tick)
            except Exception:  # the next round tries again; never take the server down
                self.metrics.evaluation_errors.inc()
                logger.exception("mmagg: alert evaluation failed")
            await anyio.sleep(self.interval)

    # the read API

    def snapshot(
        self, workspace_id: int, now: float | None = None, limit: int = 200
    ) -> dict[str, Any]:
        """Current (pending, firing) and recent alerts of a workspace, for the read API."""
        now = time.time() if now is None else now
        with self.db.read() as conn:
            return alerts_payload(conn, workspace_id, now, limit)


def alerts_payload(
    conn: sa.Connection, workspace_id: int, now: float, limit: int = 200
) -> dict[str, Any]:
    """JSON of `GET /{workspace}/api/alerts`: alert instances and the last day's transitions."""
    from mmagg.server.queries import iso

    current = []
    rows = conn.execute(
        sa.select(alert_state)
        .where(alert_state.c.workspace_id == workspace_id)
        .order_by(alert_state.c.rule_name, alert_state.c.fingerprint)
    )
    for row in rows:
        current.append(
            {
                "rule": row.rule_name,
                "fingerprint": row.fingerprint,
                "state": row.state,
                "labels": json.loads(row.labels),
                "value": row.value,
                "threshold": row.threshold,
                "active_since": iso(row.active_since),
                "fired_at": iso(row.fired_at),
                "resolved_at": iso(row.resolved_at),
                "last_evaluated_at": iso(row.updated_at),
                "notified": row.notified_status,
            }
        )
    events = conn.execute(
        sa.select(alert_events)
        .where(
            alert_events.c.workspace_id == workspace_id, alert_events.c.at >= now - RECENT_SECONDS
        )
        .order_by(alert_events.c.at.desc(), alert_events.c.id.desc())
        .limit(limit)
    )
    recent = [
        {
            "rule": row.rule_name,
            "fingerprint": row.fingerprint,
            "status": row.status,
            "labels": json.loads(row.labels),
            "value": row.value,
            "threshold": row.threshold,
            "at": iso(row.at),
        }
        for row in events
    ]
    return {"alerts": current, "recent": recent}


def install_sighup(engine: AlertEngine) -> bool:
    """Reload `engine`'s rules on SIGHUP (main thread, POSIX only); True if installed."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGHUP, lambda _signum, _frame: engine.request_reload())
    return True
