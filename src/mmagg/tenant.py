"""Who a report belongs to: the backend URL plus a fingerprint of the API key.

Everything mmagg keys on the client side (windows, reporters, HTTP clients, Redis keys)
is namespaced by a :class:`Tenant` plus the aggregator key, so two workflows of two
customers that both name their aggregator ``"camera-1"`` never share data. The API key
itself is never kept in a key or a name: only a salted, truncated SHA-256 of it.

Example:
    >>> a = Tenant.of("http://127.0.0.1:9/", "key-a")
    >>> b = Tenant.of("http://127.0.0.1:9", "key-b")
    >>> a.base_url, a == Tenant.of("http://127.0.0.1:9", "key-a"), a.id == b.id
    ('http://127.0.0.1:9', True, False)
    >>> a.scoped("camera-1").endswith(":camera-1"), "key-a" in a.scoped("camera-1")
    (True, False)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Tenant", "key_fingerprint"]

# Domain separation: the fingerprint differs from the SHA-256 a backend stores for the key.
_SALT = b"mmagg-tenant-v1\x00"


def key_fingerprint(api_key: str) -> str:
    """A non-reversible, stable 16-hex-digit fingerprint of ``api_key``.

    Example:
        >>> len(key_fingerprint("secret")), key_fingerprint("secret") == key_fingerprint("x")
        (16, False)
    """
    return hashlib.sha256(_SALT + api_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Tenant:
    """A backend URL (no trailing ``/``) and the fingerprint of the API key used on it."""

    base_url: str
    fingerprint: str

    @classmethod
    def of(cls, base_url: str, api_key: str) -> Tenant:
        """The tenant of ``api_key`` on ``base_url`` (the key is not kept)."""
        return cls(base_url.rstrip("/"), key_fingerprint(api_key))

    @property
    def id(self) -> str:
        """16 hex digits naming the tenant in store keys (same in every process)."""
        raw = f"{self.base_url}\x00{self.fingerprint}".encode("utf-8", "surrogatepass")
        return "t" + hashlib.sha256(raw).hexdigest()[:15]

    def scoped(self, aggregator_key: str) -> str:
        """The store key of ``aggregator_key`` for this tenant: ``"<id>:<aggregator_key>"``."""
        return f"{self.id}:{aggregator_key}"
