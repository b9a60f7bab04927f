"""Fixtures of the reliability suite (helpers live in ``reliability_support``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from reliability_support import PortCaptureServer, RecordingTransport, free_port


@pytest.fixture
def restartable_server() -> Iterator[PortCaptureServer]:
    """A capture server on a fixed port, not started: the test decides when it listens."""
    server = PortCaptureServer(free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def recording_transport() -> Iterator[RecordingTransport]:
    transport = RecordingTransport()
    yield transport
    transport.close()
