"""The KV stores, by kind: one table of ``kind -> "module:attribute"`` naming each store object
(a :class:`fd_celery.kv.base.KVStore`). A store's module is imported when a reference of its
kind is first checked or used, never with the package: a client that only checks references
does not load a store it does not use, and torch stays inside the stores' functions anyway.

Adding a store: one module that defines its ``STORE``, and one row here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from fd_celery.errors import KVRefError

__all__ = ["STORE_TABLE", "STORES", "load_store", "loaded_store"]

STORE_TABLE: dict[str, str] = {
    "shm": "fd_celery.kv.shm:STORE",  # a file in /dev/shm: same host
    "redis": "fd_celery.kv.redis_store:STORE",  # one Redis key: across hosts
    "cuda": "fd_celery.kv.cuda:STORE",  # the producer's GPU memory, by CUDA IPC: same host, both on CUDA
}
#: The store kinds, in the table's order.
STORES: tuple[str, ...] = tuple(STORE_TABLE)


def load_store(kind: str) -> Any:
    """The store of ``kind`` (a ``KVStore``; typed as such by :func:`fd_celery.kv.dispatch.store_for`,
    since this table sits below the modules that define it), its module imported on first use."""
    if kind not in STORES:  # (a tuple: an unhashable kind is just unknown)
        raise KVRefError(f"unknown KV store {kind!r}; known: {', '.join(STORES)}")
    module, _, attribute = STORE_TABLE[kind].partition(":")
    return getattr(importlib.import_module(module), attribute)


def loaded_store(kind: str) -> Any | None:
    """The store of ``kind`` if this process has loaded it already, else None (nothing imported:
    what a process never used it has nothing of to let go at exit)."""
    module, _, attribute = STORE_TABLE[kind].partition(":")
    return getattr(sys.modules.get(module), attribute, None)
