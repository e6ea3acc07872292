"""The bytes-held index ``fd:<topic>:kvheld`` (a hash): blob location -> ``owner|nbytes|
expires_at|kind``, what each node's blobs hold in the stores until when. Prefill enters a blob
when it publishes the reference, decode takes it out when it has the blob; the KV-bytes gauge
and ``fd status`` read it. For a store whose entry is also its claim (cuda: see
:mod:`fd_celery.kv.cuda`) the store keeps the entry itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fd_celery import keys
from fd_celery.kv.table import STORES, load_store

if TYPE_CHECKING:
    import redis

    from fd_celery.kv.ref import KVRef

__all__ = ["note_held", "note_taken", "held_value", "bytes_held", "ORPHAN_CLAIM_S"]

#: How long past its expiry an entry that is a claim stays (its producer claims it at expiry;
#: one whose producer never came is dropped after this).
ORPHAN_CLAIM_S = 3600.0


def note_held(target: Any, ref: KVRef) -> None:
    """Enter a blob in the bytes-held index (``target``: a client, or a pipeline to send)."""
    target.hset(keys.kv_held(ref.topic), ref.location, held_value(ref))


def note_taken(target: Any, ref: KVRef) -> None:
    """Take a blob out of the bytes-held index (decode has it)."""
    target.hdel(keys.kv_held(ref.topic), ref.location)


def held_value(ref: KVRef) -> str:
    """A blob's entry in ``fd:<topic>:kvheld``: who holds how many bytes until when, in which
    store. The entry of a cuda blob is also its claim (see :mod:`fd_celery.kv.cuda`)."""
    return f"{ref.owner}|{ref.nbytes}|{ref.expires_at}|{ref.kind}"


def bytes_held(client: redis.Redis, topic: str) -> dict[str, int]:
    """KV bytes each node's blobs hold in the stores now (expired entries are not counted)."""
    held: dict[str, int] = {}
    now = time.time()
    for location, value in client.hgetall(keys.kv_held(topic)).items():
        owner, nbytes, expires, *kind = (value.decode() if isinstance(value, bytes) else value).split("|")
        if float(expires) > now:
            held[owner] = held.get(owner, 0) + int(nbytes)
        elif not _is_claim(kind) or float(expires) + ORPHAN_CLAIM_S < now:
            # (a claim is its producer's to take: only one whose producer never came is dropped)
            client.hdel(keys.kv_held(topic), location)
    return held


def _is_claim(kind: list[str]) -> bool:
    return len(kind) == 1 and kind[0] in STORES and bool(load_store(kind[0]).claims_in_index)
