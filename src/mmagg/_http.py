"""Process-wide HTTP set-up, done before the first frame: one connection pool per tenant.

Building an ``httpx.Client`` imports httpx (~100 ms) and builds a TLS context (tens of
milliseconds, loading the CA bundle); a video loop must never pay that on a frame. So the
faces call :func:`warm_up` in their constructors, and every exporter of one tenant (backend
URL + API-key fingerprint) shares one pool, leased with :func:`lease` and given back with
:meth:`PoolLease.release` (the pool closes when its last lease is given back). The TLS
context is built once per process and shared by the pools (it holds no connection).

Tenants never share a pool; a forked child never uses its parent's pools (it builds its
own on first use: sockets must not be shared across processes).

Example:
    >>> from mmagg.tenant import Tenant
    >>> a = lease(Tenant.of("http://127.0.0.1:9", "key-a"))
    >>> b = lease(Tenant.of("http://127.0.0.1:9", "key-a"))
    >>> c = lease(Tenant.of("http://127.0.0.1:9", "key-b"))
    >>> a.http is b.http, a.http is c.http
    (True, False)
    >>> for held in (a, b, c):
    ...     held.release()
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

    from mmagg.tenant import Tenant

__all__ = ["PoolLease", "lease", "live_pools", "warm_up"]

_lock = threading.Lock()
_pid = os.getpid()
_ssl_context: ssl.SSLContext | None = None
_warm = False


@dataclass(eq=False)
class _Pool:
    http: httpx.Client
    transport: httpx.BaseTransport | None
    leases: int = 0


_pools: dict[tuple[Tenant, int], _Pool] = {}


@dataclass(eq=False)
class PoolLease:
    """A hold on the shared pool of one tenant; :meth:`release` gives it back once."""

    http: httpx.Client
    _key: tuple[Tenant, int]
    _pid: int
    _released: bool = field(default=False)

    def release(self) -> None:
        """Give the pool back; the last lease closes it. A no-op in a forked child (the
        pool belongs to the parent) and on a second call."""
        if self._released or self._pid != os.getpid():
            return
        self._released = True
        with _lock:
            pool = _pools.get(self._key)
            if pool is None or pool.http is not self.http:
                return
            pool.leases -= 1
            if pool.leases > 0:
                return
            del _pools[self._key]
        pool.http.close()


def _check_fork() -> None:
    global _pid
    if _pid != os.getpid():  # forget the parent's pools: their sockets are the parent's
        _pid = os.getpid()
        _pools.clear()


def _context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        import httpx

        # What httpx builds per client (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), once.
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


def warm_up() -> None:
    """Import httpx (and ``numpy.ma``, which the window's first ``np.unique`` would import
    on a frame), build the TLS context and read the system info, once per process.

    Called by the faces' constructors; cheap (a flag check) after the first call.
    """
    global _warm
    if _warm:
        return
    with _lock:
        if _warm:
            return
        import httpx  # noqa: F401  (the import is the point)
        import numpy.ma  # noqa: F401  (np.unique imports it on first use: not on a frame)

        from mmagg.payload import inference_server_version, system_info

        _context()
        system_info()
        inference_server_version()
        _warm = True


def lease(tenant: Tenant, transport: httpx.BaseTransport | None = None) -> PoolLease:
    """The shared connection pool of ``tenant`` (and ``transport``, when one is injected),
    built on first use in this process."""
    warm_up()
    key = (tenant, 0 if transport is None else id(transport))
    with _lock:
        _check_fork()
        pool = _pools.get(key)
        if pool is None:
            import httpx

            pool = _pools[key] = _Pool(
                httpx.Client(
                    transport=transport,
                    verify=_context(),
                    headers={"User-Agent": "mmagg"},
                    follow_redirects=False,
                ),
                transport,
            )
        pool.leases += 1
        return PoolLease(pool.http, key, os.getpid())


def live_pools() -> int:
    """How many pools this process holds now (for tests and diagnostics)."""
    with _lock:
        _check_fork()
        return len(_pools)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_check_fork)
