"""Serve an app with uvicorn from a background thread (the demo and embedding use it)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from mmagg.server.protocols import DEFAULT_HEADER_TIMEOUT, guarded_protocol


class BackgroundServer:
    """uvicorn in a named daemon thread on a loopback port chosen by the OS.

    The socket is bound before uvicorn starts, so there is no window in which another
    process can take the port. It is created with an explicit `IPPROTO_TCP`: asyncio only
    sets TCP_NODELAY on sockets whose `proto` says TCP, and without it every response pays
    a ~40 ms Nagle/delayed-ACK stall. A connection must send its request headers within
    `header_timeout` seconds (`mmagg.server.protocols`).

    Example:
        >>> from mmagg.server import create_app
        >>> with BackgroundServer(create_app("sqlite://")) as server:
        ...     server.url.startswith("http://127.0.0.1:")
        True
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=guarded_protocol(header_timeout),
            # The app decides whom to believe (`mmagg.server.clients`), not uvicorn.
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="mmagg-backend",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        """Start serving; return once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the backend did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to finish in-flight requests and exit; wait up to `timeout`."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
