"""Serve an app with uvicorn: on a bound socket, in N worker processes sharing one socket
(`mmagg serve --workers N`), or from a background thread (the demo and embedding use it)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType, TracebackType
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


# uvicorn's per-process life-cycle lines; with N workers the supervisor says it once instead.
_LIFECYCLE = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Shutting down",
    "Waiting for application shutdown",
    "Application shutdown complete",
    "Finished server process",
)


def quiet_lifecycle_logs() -> None:
    """Drop uvicorn's start/stop lines in this process (a worker of `serve_workers`)."""
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: not record.getMessage().startswith(_LIFECYCLE)
    )


def _exit_with_parent(parent: int) -> None:
    """Have the kernel send this (forked) process SIGTERM when the supervisor dies, even
    by SIGKILL, so that no worker outlives it (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl here: the supervisor's own stop remains
            pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def describe_exit(status: int) -> str:
    """`os.wait` status in words: "exit code 3" or "signal SIGKILL"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(number).name}"
        except ValueError:
            return f"signal {number}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class WorkerSupervisor:
    """Fork `workers` processes that each run `target(sock)` on one listening socket, and
    watch them until they stop (`mmagg serve --workers N`).

    The kernel spreads the connections the socket accepts over the processes. SIGINT and
    SIGTERM stop every worker gracefully (SIGTERM to each; SIGKILL to any still running
    after `grace` seconds); SIGHUP is passed on (alert rules reload). Each worker also gets
    SIGTERM from the kernel should the supervisor itself die. A worker that dies while the
    others serve is reported, the others are stopped, and `run` returns 1: restarting is
    left to what runs `mmagg serve` (systemd, a container's restart policy), which then
    sees the failure instead of a crash loop hidden inside. POSIX only (needs `os.fork`).
    """

    def __init__(
        self,
        sock: socket.socket,
        target: Callable[[socket.socket], None],
        workers: int,
        *,
        report: Callable[[str], None] = print,
        grace: float = 30.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        if not hasattr(os, "fork"):
            raise RuntimeError("--workers needs os.fork (Linux, macOS): run one process here")
        self.sock = sock
        self.target = target
        self.workers = workers
        self.report = report
        self.grace = grace
        self.pids: dict[int, int] = {}  # pid -> worker number
        self._stop_requested: int | None = None
        self._stopping_since: float | None = None

    def _spawn(self, number: int) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the worker: never returns into the supervisor's code
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # The supervisor passes SIGHUP on to every worker: one without alert rules (which
            # install their own handler) must not die of it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _exit_with_parent(parent)
            self.target(self.sock)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return 0  # unreachable

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._send(signal.SIGHUP)
        elif self._stop_requested is None:
            self._stop_requested = signum

    def _send(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            self._send(signal.SIGTERM)

    def run(self) -> int:
        """Start the workers and supervise them; 0 after a requested stop, 1 if one died."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        failed = False
        try:
            for number in range(1, self.workers + 1):
                self.pids[self._spawn(number)] = number
            while self.pids:
                if self._stop_requested is not None:
                    self._stop()
                if (
                    self._stopping_since is not None
                    and time.monotonic() - self._stopping_since > self.grace
                ):
                    self.report(f"workers still running after {self.grace:g} s: killing them")
                    self._send(signal.SIGKILL)
                    self._stopping_since = time.monotonic()  # and wait for them to go
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    time.sleep(0.1)
                    continue
                number = self.pids.pop(pid, 0)
                if not number or self._stop_requested is not None:
                    continue  # a worker stopping as asked (Ctrl-C reaches workers directly)
                if self._stopping_since is not None:
                    continue
                failed = True
                self.report(
                    f"worker {number} (pid {pid}) stopped with {describe_exit(status)}: "
                    f"stopping the other {len(self.pids)} and exiting"
                )
                self._stop()
        finally:
            if self.pids:  # an error in the supervisor itself: leave nothing behind
                self._send(signal.SIGKILL)
                for pid in list(self.pids):
                    os.waitpid(pid, 0)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.sock.close()
        return 1 if failed else 0


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
