"""Serve an app with uvicorn from a background thread (the demo and embedding use it)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from mmagg.server.protocols import DEFAULT_HEADER_TIMEOUT, guarded_protocol


class BindError(OSError):
    """The server could not listen where it was asked to; the message says what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host:port` (port 0: any free port), ready for uvicorn.

    Binding before anything is announced means a printed URL is always one that listens.

    Raises:
        BindError: the port is taken, not allowed, or the host is not an address here.

    Example:
        >>> sock = bind_socket("127.0.0.1", 0)
        >>> try:
        ...     bind_socket("127.0.0.1", sock.getsockname()[1])
        ... except BindError as error:
        ...     "is already in use" in str(error)
        True
        >>> sock.close()
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        where = f"{host}:{port}"
        if error.errno == errno.EADDRINUSE:
            suggestion = port + 1 if 0 < port < 65535 else 9091
            raise BindError(
                f"port {port} on {host} is already in use (another mmagg serve?): pick another "
                f"with --port {suggestion}, or --port 0 for any free port",
            ) from None
        if error.errno == errno.EACCES:
            raise BindError(
                f"not allowed to listen on {where} (ports below 1024 need privileges): "
                "pick a port above 1024 with --port",
            ) from None
        if error.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME):
            raise BindError(
                f"{host} is not an address of this machine: use --host 127.0.0.1 (this machine "
                "only) or --host 0.0.0.0 (every interface)",
            ) from None
        raise BindError(f"cannot listen on {where}: {error.strerror}") from None
    except (socket.gaierror, UnicodeError) as error:
        sock.close()
        raise BindError(f"--host {host!r} is not a host name or address here ({error})") from None
    # Listening now: a connection made as soon as the URL is printed waits in the backlog
    # until uvicorn accepts it, instead of being refused.
    sock.listen(2048)
    return sock


def serve_on(sock: socket.socket, app: Any, **config: Any) -> None:
    """Run uvicorn on an already bound socket until it is stopped (Ctrl-C)."""
    server = uvicorn.Server(uvicorn.Config(app, **config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


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
