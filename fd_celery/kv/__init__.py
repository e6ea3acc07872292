"""KV-cache hand-off for splitwise: blobs in a store, small JSON references (:class:`KVRef`) that
travel through the result backend. Callers use this package's names only; which store holds a
blob is the reference's ``kind``.

The layout: :mod:`~fd_celery.kv.ref` (the reference, its limits and locations),
:mod:`~fd_celery.kv.blob` (the blob format and checksum), :mod:`~fd_celery.kv.index` (the
bytes-held index), :mod:`~fd_celery.kv.base` (what a store is), :mod:`~fd_celery.kv.table` (the
stores by kind, imported on first use: :mod:`~fd_celery.kv.shm`,
:mod:`~fd_celery.kv.redis_store`, :mod:`~fd_celery.kv.cuda`), and
:mod:`~fd_celery.kv.dispatch` (put, take, discard, and the choice of a store).
"""

from __future__ import annotations

from collections.abc import Iterable

from fd_celery.kv.dispatch import choose_store, close_pool, discard, put, stores_offered, sweep_shm, take
from fd_celery.kv.index import bytes_held, note_held, note_taken
from fd_celery.kv.ref import SHM_DIR, SHM_PREFIX, KVRef, max_kv_bytes
from fd_celery.kv.table import STORES

__all__ = [
    # the reference
    "KVRef",
    "STORES",
    "SHM_DIR",
    "SHM_PREFIX",
    "MAX_KV_BYTES",
    # the hand-off
    "put",
    "take",
    "discard",
    "stores_offered",
    "choose_store",
    # the bytes-held index
    "note_held",
    "note_taken",
    "bytes_held",
    # housekeeping
    "sweep_shm",
    "remove_shm_blobs",
    "close_pool",
]

#: (read when asked, below: a bad ``FD_MAX_KV_BYTES`` is an error where a reference is checked,
#: not where this package is imported)
MAX_KV_BYTES: int


def remove_shm_blobs(names: Iterable[str]) -> int:
    """Remove the shm blob files ``names`` at once (their references' Redis is gone for good);
    see :func:`fd_celery.kv.shm.remove_blobs`."""
    from fd_celery.kv.shm import remove_blobs  # (the stores load on first use)

    return remove_blobs(names)


def __getattr__(name: str) -> int:
    if name == "MAX_KV_BYTES":
        return max_kv_bytes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
