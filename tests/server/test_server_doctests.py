"""The examples in the backend's docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mmagg._cli_errors",
    "mmagg.server",
    "mmagg.server.alert_rules",
    "mmagg.server.alerts",
    "mmagg.server.app",
    "mmagg.server.auth",
    "mmagg.server.bounds",
    "mmagg.server.clients",
    "mmagg.server.db",
    "mmagg.server.demo",
    "mmagg.server.drift",
    "mmagg.server.gcguard",
    "mmagg.server.guards",
    "mmagg.server.keys_api",
    "mmagg.server.lease",
    "mmagg.server.medians",
    "mmagg.server.metrics",
    "mmagg.server.partitions",
    "mmagg.server.protocols",
    "mmagg.server.ratelimit",
    "mmagg.server.retention",
    "mmagg.server.rollups",
    "mmagg.server.runner",
    "mmagg.server.schemas",
    "mmagg.server.tables",
    "mmagg.server.trends",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    failed, _attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failed == 0
