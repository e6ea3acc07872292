"""The KV hand-off as callers see it: :func:`put` writes a cache to a store and returns its
reference, :func:`take` loads it once, :func:`discard` lets it go; which store is the
reference's ``kind``, found in :mod:`fd_celery.kv.table`. What every store shares is done here:
the reference is built and checked, and the blob's bytes-held entry (:mod:`fd_celery.kv.index`)
kept, unless the store keeps it itself as its claim.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

from fd_celery.errors import KVRefError
from fd_celery.kv.base import KVStore
from fd_celery.kv.blob import CHECKSUM_PLACEHOLDER
from fd_celery.kv.index import note_held, note_taken
from fd_celery.kv.ref import ITEMSIZE, KVRef, blob_name
from fd_celery.kv.table import STORES, load_store, loaded_store

if TYPE_CHECKING:
    import redis

    from fd_celery.engine.base import KVCache

__all__ = ["put", "take", "discard", "store_for", "stores_offered", "choose_store", "sweep_shm", "close_pool"]


def store_for(kind: str) -> KVStore:
    """The store of ``kind``; an unknown kind is a ``KVRefError``."""
    store: KVStore = load_store(kind)
    return store


def put(
    cache: KVCache,
    *,
    kind: str,
    topic: str,
    request_id: str,
    owner: str,
    host: str,
    ttl_s: float,
    first_token: int,
    prompt_tokens: int,
    client: redis.Redis | None = None,
    hold: bool = True,
) -> KVRef:
    """Write ``cache`` to the store ``kind``; return its reference. With ``client`` the blob is
    also entered in the bytes-held index ``fd:<topic>:kvheld``; ``hold=False`` leaves that to the
    caller (:func:`note_held`, in the round trip that publishes the reference). A cuda blob is
    always entered: its entry is its claim."""
    tensors = [t.detach().contiguous() for t in cache.tensors()]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ITEMSIZE:
        raise KVRefError(f"cannot store a KV cache of dtypes {sorted(dtypes)}")
    store = store_for(kind)
    token = secrets.token_hex(16)
    ref = KVRef(
        kind=kind,
        location=store.location(topic, blob_name(topic, request_id, token)),
        topic=topic,
        request_id=request_id,
        token=token,
        dtype=dtypes.pop(),
        shapes=tuple(tuple(t.shape) for t in tensors),
        num_tokens=cache.num_tokens,
        nbytes=sum(t.numel() * t.element_size() for t in tensors),
        checksum=CHECKSUM_PLACEHOLDER,
        owner=owner,
        host=host,
        expires_at=time.time() + ttl_s,
        first_token=first_token,
        prompt_tokens=prompt_tokens,
    )
    ref = store.put(ref, tensors, client, ttl_s)
    if client is not None and hold and not store.claims_in_index:
        note_held(client, ref)
    return ref


def take(ref: KVRef, device: str, client: redis.Redis | None = None, release: bool = True) -> KVCache:
    """Load the blob of ``ref``, check it against the reference and release it from the store.

    Raises ``KVRefError`` for anything wrong; ``FileNotFoundError``-like absence is reported as
    ``KVRefError`` with ``missing`` in the message (the caller may redo prefill). With ``client``
    the blob also leaves the bytes-held index, unless ``release=False`` (the caller does it,
    :func:`note_taken`, off its path); a cuda blob is claimed there first, always.
    """
    ref.check()
    store = store_for(ref.kind)
    if client is not None and release and not store.claims_in_index:
        note_taken(client, ref)
    return store.take(ref, device, client)


def discard(ref: KVRef, client: redis.Redis | None = None) -> None:
    """Release a blob nobody will load (the hand-off failed)."""
    store = store_for(ref.kind)
    if client is not None and not store.claims_in_index:
        note_taken(client, ref)
    store.discard(ref, client)


def stores_offered(device: str) -> list[str]:
    """The KV stores a node on ``device`` can take blobs from (published with its heartbeat),
    the preferred first."""
    return [
        kind for kind in sorted(STORES, key=lambda k: store_for(k).rank) if store_for(kind).offered(device)
    ]


def choose_store(*, same_host: bool, device: str, peer_stores: list[str] | None, forced: str = "auto") -> str:
    """The store for a hand-off from a node on ``device`` to a decode node offering
    ``peer_stores`` (None: a node that does not say; it takes shm and redis): CUDA IPC when both
    are on CUDA on one host, shared memory on one host, Redis across hosts. ``forced`` (a store
    name, from ``FD_KV_STORE``) wins."""
    if forced in STORES:
        return forced
    offered = peer_stores if peer_stores is not None else ["shm", "redis"]
    if same_host:
        for kind in stores_offered(device):
            if kind in offered:
                return kind
    return "redis"


def sweep_shm(max_age_s: float, topic: str | None = None) -> int:
    """Remove the shm store's files that nobody will use (see :func:`fd_celery.kv.shm.sweep_shm`);
    how many went."""
    return store_for("shm").sweep(max_age_s, topic)


def close_pool() -> None:
    """Remove this process's idle recycled shm files (at exit, in a signal handler too: a process
    that never loaded the shm store has none, and nothing is imported for it)."""
    store = loaded_store("shm")
    if store is not None:
        store.close()
