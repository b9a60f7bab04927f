"""The alert rules file of `mmagg serve --alerts rules.yaml` (docs/alerts.md has the reference).

`load_rules(path)` reads and validates it; every error names the rule and the field, what was
expected and what came, so a typo stops the server at start instead of silencing an alert.

Example:
    >>> rules = parse_rules({
    ...     "receivers": [{"name": "ops", "webhook": "http://127.0.0.1:9000/hook"}],
    ...     "rules": [{"name": "low", "workspace": "demo", "metric": "median_confidence",
    ...                "below": 0.6, "window": "60s", "for": "30s", "receiver": "ops"}],
    ... })
    >>> rule = rules.rules[0]
    >>> rule.threshold, rule.window, rule.for_seconds, rule.fires(0.5)
    (0.6, 60.0, 30.0, True)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

METRICS = (
    "median_confidence",
    "mean_confidence",
    "count_rate",
    "drift",
    "class_mix_drift",
    "silence",
)
CONFIDENCE_METRICS = ("median_confidence", "mean_confidence")
DEFAULT_WINDOW = 300.0
DEFAULT_BASELINE = 3600.0
DEFAULT_REPEAT = 4 * 3600.0
DEFAULT_DRIFT_MIN_COUNT = 100

_RULE_KEYS = {
    "name",
    "workspace",
    "model",
    "class",
    "device",
    "metric",
    "below",
    "above",
    "after",
    "window",
    "baseline",
    "for",
    "receiver",
    "repeat_interval",
    "min_count",
    "labels",
    "summary",
}
_RECEIVER_KEYS = {"name", "webhook", "secret"}
_TOP_KEYS = {"receivers", "rules", "external_url", "repeat_interval"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RulesError(ValueError):
    """The rules file is invalid; the message names the rule and the field."""


def parse_duration(value: Any, where: str) -> float:
    """Seconds from `90`, `90s`, `5m`, `1h30m`, `2d` or `500ms`.

    Example:
        >>> parse_duration("1h30m", "window"), parse_duration(15, "for")
        (5400.0, 15.0)
    """
    if isinstance(value, bool):
        raise RulesError(f"{where}: expected a duration like 60s, 5m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        pos = 0
        seconds = 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            raise RulesError(f"{where}: expected a duration like 60s, 5m or 1h, got {value!r}")
    else:
        raise RulesError(f"{where}: expected a duration like 60s, 5m or 1h, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise RulesError(f"{where}: expected a non-negative duration, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Receiver:
    """Where notifications go: a webhook URL and an optional HMAC secret."""

    name: str
    webhook: str
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Rule:
    """One alert rule; `fires(value)` is its condition."""

    name: str
    workspace: str
    metric: str
    threshold: float
    direction: str  # "below" | "above"
    window: float
    for_seconds: float
    model: str | None = None
    class_name: str | None = None
    device: str | None = None
    baseline: float = DEFAULT_BASELINE
    receiver: str | None = None
    repeat_interval: float = DEFAULT_REPEAT
    min_count: int = 1
    labels: tuple[tuple[str, str], ...] = ()
    summary: str | None = None

    def fires(self, value: float | None) -> bool:
        """Whether `value` meets the alert condition (never for a missing value)."""
        if value is None:
            return False
        return value < self.threshold if self.direction == "below" else value > self.threshold

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the read API."""
        return {
            "name": self.name,
            "metric": self.metric,
            "model": self.model,
            "class_name": self.class_name,
            "device_id": self.device,
            self.direction if self.metric != "silence" else "after": self.threshold,
            "window_seconds": None if self.metric == "silence" else self.window,
            "baseline_seconds": self.baseline
            if self.metric in ("drift", "class_mix_drift", "count_rate")
            else None,
            "for_seconds": self.for_seconds,
            "receiver": self.receiver,
        }


@dataclass(frozen=True)
class RuleSet:
    """A validated rules file."""

    receivers: dict[str, Receiver]
    rules: tuple[Rule, ...]
    external_url: str | None = None

    def for_workspace(self, workspace: str) -> list[Rule]:
        """The rules of one workspace."""
        return [r for r in self.rules if r.workspace == workspace]


EMPTY_RULES = RuleSet({}, ())


def _text(value: Any, where: str, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise RulesError(f"{where}: required, expected a non-empty string")
        return None
    if not isinstance(value, str) or not value.strip():
        raise RulesError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RulesError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _url(value: Any, where: str) -> str:
    text = _text(value, where, required=True)
    assert text is not None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo the URL: its path or query may hold a token.
        raise RulesError(f"{where}: expected an http:// or https:// URL with a host")
    return text


def _receiver(item: Any, index: int) -> Receiver:
    where = f"receivers[{index}]"
    if not isinstance(item, dict):
        raise RulesError(f"{where}: expected a mapping with name and webhook, got {item!r}")
    name = _text(item.get("name"), f"{where}.name", required=True)
    assert name is not None
    where = f"receivers[{index}] {name!r}"
    unknown = sorted(set(item) - _RECEIVER_KEYS)
    if unknown:
        raise RulesError(
            f"{where}: unknown field {unknown[0]!r}; expected {sorted(_RECEIVER_KEYS)}"
        )
    webhook = _url(item.get("webhook"), f"{where}: webhook")
    secret = item.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise RulesError(f"{where}: secret: expected a non-empty string")
    return Receiver(name, webhook, secret)


def _rule(item: Any, index: int, receivers: dict[str, Receiver], repeat: float) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(item, dict):
        raise RulesError(f"{where}: expected a mapping, got {item!r}")
    name = _text(item.get("name"), f"{where}: name", required=True)
    assert name is not None
    where = f"rules[{index}] {name!r}"
    unknown = sorted(set(item) - _RULE_KEYS)
    if unknown:
        raise RulesError(
            f"{where}: unknown field {unknown[0]!r}; expected one of {sorted(_RULE_KEYS)}"
        )
    workspace = _text(item.get("workspace"), f"{where}: workspace", required=True)
    assert workspace is not None
    metric = item.get("metric")
    if metric not in METRICS:
        raise RulesError(f"{where}: metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    model = _text(item.get("model"), f"{where}: model")
    class_name = _text(item.get("class"), f"{where}: class")
    device = _text(item.get("device"), f"{where}: device")
    if metric == "class_mix_drift" and class_name is not None:
        raise RulesError(f"{where}: class: class_mix_drift compares all classes, omit class")
    if metric == "silence":
        for key in ("below", "above", "window", "baseline"):
            if key in item:
                raise RulesError(f"{where}: {key}: silence takes `after:` only, got {key}")
        if "after" not in item:
            raise RulesError(f"{where}: after: required for silence, expected a duration like 60s")
        threshold = parse_duration(item["after"], f"{where}: after")
        direction = "above"
        window = 0.0
    else:
        if "after" in item:
            raise RulesError(f"{where}: after: only for metric silence, use below: or above:")
        given = [k for k in ("below", "above") if k in item]
        if len(given) != 1:
            raise RulesError(
                f"{where}: below/above: expected exactly one of below: or above:, got "
                f"{given or 'neither'}"
            )
        direction = given[0]
        threshold = _number(item[direction], f"{where}: {direction}")
        if metric in CONFIDENCE_METRICS and not 0 <= threshold <= 1:
            raise RulesError(
                f"{where}: {direction}: expected a confidence in [0, 1], got {threshold}"
            )
        window = parse_duration(item.get("window", DEFAULT_WINDOW), f"{where}: window")
        if window <= 0:
            raise RulesError(
                f"{where}: window: expected a positive duration, got {item['window']!r}"
            )
    if metric not in ("drift", "class_mix_drift", "count_rate") and "baseline" in item:
        raise RulesError(f"{where}: baseline: only for drift, class_mix_drift and count_rate")
    baseline = parse_duration(item.get("baseline", DEFAULT_BASELINE), f"{where}: baseline")
    if metric in ("drift", "class_mix_drift") and baseline <= 0:
        raise RulesError(
            f"{where}: baseline: expected a positive duration, got {item['baseline']!r}"
        )
    receiver = _text(item.get("receiver"), f"{where}: receiver")
    if receiver is not None and receiver not in receivers:
        raise RulesError(
            f"{where}: receiver: expected one of {sorted(receivers) or 'the receivers: list'}, "
            f"got {receiver!r}"
        )
    default_min = DEFAULT_DRIFT_MIN_COUNT if metric in ("drift", "class_mix_drift") else 1
    min_count = item.get("min_count", default_min)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise RulesError(f"{where}: min_count: expected a positive integer, got {min_count!r}")
    labels = item.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and _LABEL_NAME.match(k) and isinstance(v, str)
        for k, v in labels.items()
    ):
        raise RulesError(f"{where}: labels: expected a mapping of label names to strings")
    summary = _text(item.get("summary"), f"{where}: summary")
    return Rule(
        name=name,
        workspace=workspace,
        metric=metric,
        threshold=threshold,
        direction=direction,
        window=window,
        for_seconds=parse_duration(item.get("for", 0), f"{where}: for"),
        model=model,
        class_name=class_name,
        device=device,
        baseline=baseline,
        receiver=receiver,
        repeat_interval=parse_duration(
            item.get("repeat_interval", repeat), f"{where}: repeat_interval"
        ),
        min_count=min_count,
        labels=tuple(sorted(labels.items())),
        summary=summary,
    )


def parse_rules(data: Any, source: str = "rules") -> RuleSet:
    """Validate a parsed rules document; raise `RulesError` naming `source`, rule and field."""
    try:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RulesError(
                "top level: expected a mapping with receivers: and rules:, "
                f"got {type(data).__name__}"
            )
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise RulesError(
                f"top level: unknown field {unknown[0]!r}; expected {sorted(_TOP_KEYS)}"
            )
        raw_receivers = data.get("receivers") or []
        if not isinstance(raw_receivers, list):
            raise RulesError("receivers: expected a list")
        receivers: dict[str, Receiver] = {}
        for index, item in enumerate(raw_receivers):
            receiver = _receiver(item, index)
            if receiver.name in receivers:
                raise RulesError(f"receivers[{index}] {receiver.name!r}: name: used twice")
            receivers[receiver.name] = receiver
        repeat = parse_duration(data.get("repeat_interval", DEFAULT_REPEAT), "repeat_interval")
        raw_rules = data.get("rules") or []
        if not isinstance(raw_rules, list):
            raise RulesError("rules: expected a list")
        rules: list[Rule] = []
        names: set[str] = set()
        for index, item in enumerate(raw_rules):
            rule = _rule(item, index, receivers, repeat)
            if rule.name in names:
                raise RulesError(
                    f"rules[{index}] {rule.name!r}: name: used twice; names must be unique"
                )
            names.add(rule.name)
            rules.append(rule)
        external = data.get("external_url")
        if external is not None:
            external = _url(external, "external_url").rstrip("/")
        return RuleSet(receivers, tuple(rules), external)
    except RulesError as error:
        raise RulesError(f"{source}: {error}") from None


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a YAML rules file."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RulesError(f"{path}: not valid YAML: {error}") from None
    return parse_rules(data, str(path))
