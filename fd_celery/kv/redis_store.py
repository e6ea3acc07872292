"""The ``redis`` KV store: the blob is one Redis key ``fd:<topic>:kv:<blob name>`` that expires
with the request, read and deleted in one GETDEL (across hosts)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, cast

from fd_celery import keys
from fd_celery.errors import KVRefError
from fd_celery.kv.base import KVStore
from fd_celery.kv.blob import check_header, checksum, decode, header, raw_bytes
from fd_celery.kv.ref import KVRef

if TYPE_CHECKING:
    import redis

    from fd_celery.engine.base import KVCache

__all__ = ["STORE", "RedisStore"]


class RedisStore(KVStore):
    kind = "redis"
    rank = 2  # the one store across hosts, and the last choice on one

    def location(self, topic: str, name: str) -> str:
        return keys.kv_blob(topic, name)

    def put(self, ref: KVRef, tensors: list[Any], client: redis.Redis | None, ttl_s: float) -> KVRef:
        raw = raw_bytes(tensors)
        ref = dataclasses.replace(ref, checksum=checksum(raw))
        assert client is not None
        client.set(
            ref.location, b"".join([header(ref), *(p.numpy().tobytes() for p in raw)]), ex=max(1, int(ttl_s))
        )
        return ref

    def take(self, ref: KVRef, device: str, client: redis.Redis | None) -> KVCache:
        expected = header(ref)  # what the blob must begin with, byte for byte
        assert client is not None
        data = client.getdel(ref.location)
        if data is None:
            raise KVRefError(f"KV blob of request {ref.request_id} is missing (consumed or expired)")
        buffer = bytearray(cast(bytes, data))  # writable, so tensors built on it are ordinary tensors
        check_header(ref, buffer, expected)
        return decode(ref, buffer, device, len(expected))

    def discard(self, ref: KVRef, client: redis.Redis | None) -> None:
        if client is not None:
            client.delete(ref.location)


STORE = RedisStore()
