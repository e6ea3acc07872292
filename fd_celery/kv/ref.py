"""The KV reference (:class:`KVRef`): where a request's KV cache waits for its decode node and
what the blob must contain. Small, JSON, no tensor data; it travels through the result backend,
so everything in it is checked before use (:meth:`KVRef.check`), and a blob's location is built
from checked parts only (topic, request id, token): a reference cannot point outside its store's
namespace. What only one store checks (a pool name, an ``ipc`` object) its store checks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields
from typing import Any

from fd_celery.errors import ConfigError, KVRefError
from fd_celery.keys import check_request_id
from fd_celery.kv.table import STORES, load_store
from fd_celery.settings import node_knobs

__all__ = ["KVRef", "REF_FIELDS", "ITEMSIZE", "SHM_DIR", "SHM_PREFIX", "max_kv_bytes", "numel", "blob_name"]

SHM_DIR = "/dev/shm"
#: Every blob's name begins with this (a file in SHM_DIR, or after ``fd:<topic>:kv:`` in Redis).
SHM_PREFIX = "fdkv-"
#: The dtypes a blob may hold, and their item sizes in bytes.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_TOPIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")


def max_kv_bytes() -> int:
    """The largest blob a reference may describe (``FD_MAX_KV_BYTES``), read when first needed."""
    return node_knobs().max_kv_bytes


@dataclass(frozen=True)
class KVRef:
    """Where a request's KV cache waits for its decode node. Small, JSON, no tensor data."""

    kind: str  # "shm", "redis" or "cuda"
    location: str  # shm file name, Redis key, or (cuda) the blob's name
    topic: str
    request_id: str
    token: str  # random; the blob carries it too
    dtype: str
    shapes: tuple[tuple[int, ...], ...]  # k0, v0, k1, v1, ...
    num_tokens: int
    nbytes: int
    checksum: str  # fingerprint of the tensor bytes (see fd_celery.kv.blob.checksum)
    owner: str  # the prefill node
    host: str
    expires_at: float  # epoch seconds; the blob expires with it
    first_token: int
    prompt_tokens: int
    version: int = 1
    #: shm blobs in a recycled file: the name the file goes back to when decode is done with it
    pool: str = ""
    #: cuda blobs: how to map the producer's GPU buffer (see :mod:`fd_celery.kv.cuda`); else None.
    #: The one field the blob's header does not repeat: it exists only once the blob is written.
    ipc: dict[str, Any] | None = field(default=None, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in REF_FIELDS}
        out["shapes"] = [list(s) for s in self.shapes]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> KVRef:
        """Parse and check a reference from JSON; anything off is a ``KVRefError``."""
        if not isinstance(data, dict):
            raise KVRefError(f"KV reference must be a JSON object, got {type(data).__name__}")
        try:
            ref = cls(**{**data, "shapes": tuple(tuple(int(d) for d in s) for s in data["shapes"])})
            ref.check()
        except (KVRefError, ConfigError):  # (a bad FD_MAX_KV_BYTES is the node's error, not the reference's)
            raise
        except (TypeError, KeyError, ValueError, OverflowError, AttributeError) as exc:
            raise KVRefError(f"malformed KV reference: {type(exc).__name__}: {exc}") from None
        return ref

    def check(self, now: float | None = None) -> None:
        if self.version != 1:
            raise KVRefError(f"KV reference version {self.version!r} is not supported")
        if self.kind not in STORES:
            raise KVRefError(f"KV reference of unknown kind {self.kind!r}; known: {', '.join(STORES)}")
        if self.dtype not in ITEMSIZE:
            raise KVRefError(f"KV reference dtype {self.dtype!r} is not one of {', '.join(ITEMSIZE)}")
        try:
            check_request_id(self.request_id)
        except Exception:  # noqa: BLE001 - any failure of the id check is a bad reference
            raise KVRefError(f"KV reference has an invalid request id {self.request_id!r}") from None
        limit = max_kv_bytes()
        if not isinstance(self.nbytes, int) or not 0 <= self.nbytes <= limit:
            raise KVRefError(f"KV reference of {self.nbytes!r} bytes is over the limit of {limit}")
        itemsize = ITEMSIZE[self.dtype]
        if sum(numel(s) for s in self.shapes) * itemsize != self.nbytes:
            raise KVRefError("KV reference shapes do not add up to its byte size")
        if (now or time.time()) > float(self.expires_at):
            raise KVRefError(f"KV reference of request {self.request_id} expired")
        if not isinstance(self.location, str) or self.location != _location(self):
            raise KVRefError(f"KV reference location {self.location!r} is outside the {self.kind} store")
        load_store(self.kind).check(self)  # what only its store knows: a pool name, an ipc object


#: The reference's fields, in JSON order.
REF_FIELDS = tuple(f.name for f in fields(KVRef))


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise KVRefError("KV reference has a negative dimension")
        n *= d
    return n


def blob_name(topic: str, request_id: str, token: str) -> str:
    return f"{SHM_PREFIX}{topic}-{request_id}-{token}"


def _location(ref: KVRef) -> str:
    """Where the blob of ``ref`` must be: built from its checked parts, never taken on trust."""
    if not isinstance(ref.topic, str) or not _TOPIC_RE.fullmatch(ref.topic):
        raise KVRefError(f"KV reference has an invalid topic {ref.topic!r}")
    if not isinstance(ref.token, str) or not _TOKEN_RE.fullmatch(ref.token):
        raise KVRefError("KV reference has an invalid token")
    return str(load_store(ref.kind).location(ref.topic, blob_name(ref.topic, ref.request_id, ref.token)))
