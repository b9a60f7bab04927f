"""uvicorn's HTTP protocols with a deadline for request headers (slow-client guard).

uvicorn times out idle keep-alive connections, but not a connection that is sending its
request headers: a client that opens a connection and sends a byte now and then (or nothing
at all) holds it forever, and a few thousand such clients exhaust the server's file
descriptors. Here every request's headers must be complete within `header_timeout`
seconds of the connection opening (or of the first byte of a following request on a
kept-alive connection); otherwise the connection is closed.

`mmagg serve` and `mmagg.server.runner.BackgroundServer` use these classes; an app served
by a plain `uvicorn.run` does not get the guard.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT = 10.0


class _HeaderDeadline:
    """The timer logic shared by both protocol classes (a mixin over uvicorn's)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    # Cooperative overrides: the mixin comes first in the MRO, so `super()` is uvicorn's.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        before = self.cycle  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        self._after_data(before)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
            self._header_timer = loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            transport.close()

    def _after_data(self, cycle_before: Any) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is not cycle_before:
            # A new request cycle: its headers are complete.
            self._disarm_header_timer()
        elif cycle is None or cycle.response_complete:
            # Bytes of a request whose headers are not complete yet.
            self._arm_header_timer()


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline."""


class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with the header deadline."""


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> type[asyncio.Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with the given header deadline.

    httptools when it is installed (what uvicorn's `auto` picks), else h11.

    Example:
        >>> guarded_protocol(5.0).header_timeout
        5.0
    """
    if header_timeout <= 0:
        raise ValueError(f"header_timeout: expected a positive number, got {header_timeout}")
    try:
        import httptools  # noqa: F401

        base: type[Any] = GuardedHttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        base = GuardedH11Protocol
    protocol: type[asyncio.Protocol] = type(
        base.__name__, (base,), {"header_timeout": float(header_timeout)}
    )
    return protocol
