"""What a KV store is: :class:`KVStore`, the interface the shm, redis and cuda stores implement,
one module each, found by kind in :mod:`fd_celery.kv.table`. The dispatcher
(:mod:`fd_celery.kv.dispatch`) does what is common to every store around them: it builds and
checks the reference and keeps the bytes-held index, unless the store's entry there is its claim.
"""

from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, ClassVar

from fd_celery.errors import KVRefError

if TYPE_CHECKING:
    import redis

    from fd_celery.engine.base import KVCache
    from fd_celery.kv.ref import KVRef

__all__ = ["KVStore", "refuse_pool", "refuse_ipc", "pid_alive"]


class KVStore(abc.ABC):
    """A place where a blob (see :mod:`fd_celery.kv.blob`) waits for its decode node. The hooks
    that are not abstract do nothing, or refuse what a store does not use."""

    #: The reference's ``kind`` of this store (its row in the table).
    kind: ClassVar[str]
    #: On one host, where both ends offer more than one store, the lowest rank is chosen.
    rank: ClassVar[int]
    #: Whether the blob's entry in the bytes-held index is also its claim, kept by the store
    #: itself (entered by ``put`` always, claimed by ``take`` and ``discard``). Otherwise the
    #: dispatcher enters and removes it around the store.
    claims_in_index: ClassVar[bool] = False

    def offered(self, device: str) -> bool:
        """Whether a node on ``device`` can take blobs from this store."""
        return True

    def location(self, topic: str, name: str) -> str:
        """Where the blob called ``name`` lives in this store (its file or key)."""
        return name

    @abc.abstractmethod
    def put(self, ref: KVRef, tensors: list[Any], client: redis.Redis | None, ttl_s: float) -> KVRef:
        """Write ``tensors`` (contiguous, one dtype) as the blob of ``ref``, whose checksum is
        still :data:`fd_celery.kv.blob.CHECKSUM_PLACEHOLDER`; return the reference completed."""

    @abc.abstractmethod
    def take(self, ref: KVRef, device: str, client: redis.Redis | None) -> KVCache:
        """Load the blob of a checked ``ref`` onto ``device`` and release it from the store; a
        blob that is not there is a ``KVRefError`` saying ``missing``."""

    @abc.abstractmethod
    def discard(self, ref: KVRef, client: redis.Redis | None) -> None:
        """Release a blob nobody will load (the hand-off failed)."""

    def check(self, ref: KVRef) -> None:
        """What only this store checks of a reference (the generic checks passed); anything off
        is a ``KVRefError``. By default it carries no pool name and no ``ipc`` object."""
        refuse_pool(ref)
        refuse_ipc(ref)

    def sweep(self, max_age_s: float, topic: str | None = None) -> int:
        """Remove what nobody will use any more (blobs older than ``max_age_s``, of ``topic`` or
        of every topic); how many went."""
        return 0

    def close(self) -> None:  # noqa: B027 - a hook: most stores keep nothing
        """Let go of what this process keeps for reuse (at exit)."""


def refuse_pool(ref: KVRef) -> None:
    if ref.pool:
        raise KVRefError(f"KV reference pool name {ref.pool!r} is outside the shm store")


def refuse_ipc(ref: KVRef) -> None:
    if ref.ipc is not None:
        raise KVRefError(f"KV reference of kind {ref.kind} carries an ipc object")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still exists (a blob's writer, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
