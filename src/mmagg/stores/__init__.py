"""Where windows and the interval clock live: process memory (default) or Redis."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mmagg.stores.base import Store
from mmagg.stores.memory import MemoryStore, default_store

__all__ = ["MemoryStore", "Store", "default_store", "resolve_store"]

REDIS_URL_ENV = "MMAGG_REDIS_URL"


def resolve_store(store: Store | str | None = None) -> Store:
    """The store to use: the given one, a Redis URL, ``MMAGG_REDIS_URL``, else process memory.

    Example:
        >>> resolve_store(None) is default_store()
        True
    """
    if store is not None and not isinstance(store, str):
        return store
    url = store or os.environ.get(REDIS_URL_ENV)
    if not url:
        return default_store()
    from mmagg.stores.redis import RedisStore  # optional extra: mmagg[redis]

    return RedisStore.for_url(url)


if TYPE_CHECKING:  # mypy checks here that every implementation satisfies the protocol
    from mmagg.stores.metered import MeteredStore
    from mmagg.stores.redis import RedisStore

    _IMPLEMENTATIONS: tuple[type[Store], ...] = (MemoryStore, RedisStore, MeteredStore)
