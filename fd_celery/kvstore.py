"""KV-cache hand-off for splitwise: blobs in a store, small JSON references in the result backend.

A blob is ``MAGIC | u32 header length | header JSON | raw little-endian tensor bytes`` (k0, v0,
k1, v1, ...). The reference (:class:`KVRef`) says where the blob is and what it must contain; the
blob's header is the whole reference (with a random token), so a reference that was edited in
any field, or that points at another request's blob, is refused. Tensors
are rebuilt with ``torch.frombuffer`` from a dtype whitelist: never pickle, never ``torch.load``.

Stores:
- ``shm``: a file in ``/dev/shm`` (POSIX shared memory; same host). The reader maps it and
  unlinks it at once: the pages live until the last tensor built on them is gone.
- ``redis``: one key, read and deleted in one GETDEL (across hosts).
Blob names are built from checked parts only (topic, request id, token), so a reference cannot
point outside its store's namespace.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import struct
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from . import keys
from .errors import KVRefError
from .keys import check_request_id

if TYPE_CHECKING:  # torch is imported where tensors are made: workers only, never clients
    from .engine.base import KVCache

__all__ = ["KVRef", "put", "take", "discard", "sweep_shm", "bytes_held", "SHM_DIR", "STORES", "MAX_KV_BYTES"]

MAGIC = b"FDKV1\n"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "fdkv-"
STORES = ("shm", "redis")
MAX_KV_BYTES = int(os.environ.get("FD_MAX_KV_BYTES", str(8 << 30)))  # a reference above this is refused
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # dtypes a blob may hold
_TOPIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class KVRef:
    """Where a request's KV cache waits for its decode node. Small, JSON, no tensor data."""

    kind: str  # "shm" or "redis"
    location: str  # shm file name, or Redis key
    topic: str
    request_id: str
    token: str  # random; the blob carries it too
    dtype: str
    shapes: tuple[tuple[int, ...], ...]  # k0, v0, k1, v1, ...
    num_tokens: int
    nbytes: int
    checksum: str  # fingerprint of the tensor bytes (see _checksum)
    owner: str  # the prefill node
    host: str
    expires_at: float  # epoch seconds; the blob expires with it
    first_token: int
    prompt_tokens: int
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
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
        except KVRefError:
            raise
        except (TypeError, KeyError, ValueError, OverflowError, AttributeError) as exc:
            raise KVRefError(f"malformed KV reference: {type(exc).__name__}: {exc}") from None
        return ref

    def check(self, now: float | None = None) -> None:
        if self.version != 1:
            raise KVRefError(f"KV reference version {self.version!r} is not supported")
        if self.kind not in STORES:
            raise KVRefError(f"KV reference of unknown kind {self.kind!r}; known: {', '.join(STORES)}")
        if self.dtype not in _ITEMSIZE:
            raise KVRefError(f"KV reference dtype {self.dtype!r} is not one of {', '.join(_ITEMSIZE)}")
        try:
            check_request_id(self.request_id)
        except Exception:
            raise KVRefError(f"KV reference has an invalid request id {self.request_id!r}") from None
        if not isinstance(self.nbytes, int) or not 0 <= self.nbytes <= MAX_KV_BYTES:
            raise KVRefError(f"KV reference of {self.nbytes!r} bytes is over the limit of {MAX_KV_BYTES}")
        itemsize = _ITEMSIZE[self.dtype]
        if sum(_numel(s) for s in self.shapes) * itemsize != self.nbytes:
            raise KVRefError("KV reference shapes do not add up to its byte size")
        if (now or time.time()) > float(self.expires_at):
            raise KVRefError(f"KV reference of request {self.request_id} expired")
        if not isinstance(self.location, str) or self.location != _location(self):
            raise KVRefError(f"KV reference location {self.location!r} is outside the {self.kind} store")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise KVRefError("KV reference has a negative dimension")
        n *= d
    return n


def _blob_name(topic: str, request_id: str, token: str) -> str:
    return f"{SHM_PREFIX}{topic}-{request_id}-{token}"


def _location(ref: KVRef) -> str:
    """Where the blob of ``ref`` must be: built from its checked parts, never taken on trust."""
    if not isinstance(ref.topic, str) or not _TOPIC_RE.fullmatch(ref.topic):
        raise KVRefError(f"KV reference has an invalid topic {ref.topic!r}")
    if not isinstance(ref.token, str) or not _TOKEN_RE.fullmatch(ref.token):
        raise KVRefError("KV reference has an invalid token")
    return _blob_location(ref.kind, ref.topic, _blob_name(ref.topic, ref.request_id, ref.token))


def _blob_location(kind: str, topic: str, name: str) -> str:
    """A blob's location in its store: the tmpfs file name, or the Redis key."""
    return name if kind == "shm" else keys.kv_blob(topic, name)


def _checksum(parts: list[Any]) -> str:
    """A 128-bit fingerprint of the tensor bytes: wrapping sum and xor of their 64-bit words.

    It catches corruption and truncation (any changed word changes both) at memory speed, about
    7x faster than zlib.crc32 here. It is not a MAC: what stops a forged reference is the random
    token and the header that the blob must match, and the store's namespace.
    """
    import numpy as np

    total, mixed = 0, 0
    for part in parts:
        data = np.frombuffer(part, dtype=np.uint8)
        whole = len(data) - len(data) % 8
        words = data[:whole].view(np.uint64)
        total = (total + int(np.add.reduce(words, dtype=np.uint64))) % (1 << 64)
        mixed ^= int(np.bitwise_xor.reduce(words)) if len(words) else 0
        for i, byte in enumerate(data[whole:].tolist()):
            total = (total + (byte << (8 * i))) % (1 << 64)
    return f"sx64:{total:016x}:{mixed:016x}"


def _header(ref: KVRef) -> bytes:
    """The blob's header is the whole reference: any edited field is a mismatch."""
    body = json.dumps(ref.to_dict(), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(body)) + body


def put(
    cache: KVCache, *, kind: str, topic: str, request_id: str, owner: str, host: str, ttl_s: float,
    first_token: int, prompt_tokens: int, client: redis.Redis | None = None,
) -> KVRef:
    """Write ``cache`` to the store ``kind``; return its reference."""
    import torch

    tensors = [t.detach().contiguous() for t in cache.tensors()]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ITEMSIZE:
        raise KVRefError(f"cannot store a KV cache of dtypes {sorted(dtypes)}")
    raw = [t.cpu().view(torch.uint8).numpy() for t in tensors]
    token = secrets.token_hex(16)
    name = _blob_name(topic, request_id, token)
    ref = KVRef(
        kind=kind, location=_blob_location(kind, topic, name), topic=topic,
        request_id=request_id,
        token=token, dtype=dtypes.pop(), shapes=tuple(tuple(t.shape) for t in tensors),
        num_tokens=cache.num_tokens, nbytes=sum(p.nbytes for p in raw), checksum=_checksum(raw),
        owner=owner, host=host, expires_at=time.time() + ttl_s, first_token=first_token,
        prompt_tokens=prompt_tokens,
    )
    header = _header(ref)
    if kind == "shm":
        _write_shm(name, header, raw)
    elif kind == "redis":
        assert client is not None
        client.set(ref.location, b"".join([header, *(p.tobytes() for p in raw)]), ex=max(1, int(ttl_s)))
    else:
        raise KVRefError(f"unknown KV store {kind!r}; known: {', '.join(STORES)}")
    if client is not None:
        client.hset(keys.kv_held(topic), ref.location, f"{owner}|{ref.nbytes}|{ref.expires_at}")
    return ref


def bytes_held(client: redis.Redis, topic: str) -> dict[str, int]:
    """KV bytes each node's blobs hold in the stores now (expired entries are not counted)."""
    held: dict[str, int] = {}
    now = time.time()
    for location, value in client.hgetall(keys.kv_held(topic)).items():
        owner, _, rest = value.decode().partition("|")
        nbytes, _, expires = rest.partition("|")
        if float(expires) > now:
            held[owner] = held.get(owner, 0) + int(nbytes)
        else:
            client.hdel(keys.kv_held(topic), location)
    return held


def _write_shm(name: str, header: bytes, raw: list[Any]) -> None:
    """One vectored write into a new tmpfs file (the kernel copies straight into its pages,
    cheaper than faulting in a fresh mapping page by page)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        parts = [memoryview(header), *(memoryview(p).cast("B") for p in raw if p.nbytes)]
        total = sum(len(p) for p in parts)
        written = 0
        while written < total:  # writev may write less than asked
            n = os.writev(fd, parts)
            written += n
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def take(ref: KVRef, device: str, client: redis.Redis | None = None) -> KVCache:
    """Load the blob of ``ref``, check it against the reference and release it from the store.

    Raises ``KVRefError`` for anything wrong; ``FileNotFoundError``-like absence is reported as
    ``KVRefError`` with ``missing`` in the message (the caller may redo prefill).
    """
    ref.check()
    if client is not None:
        client.hdel(keys.kv_held(ref.topic), ref.location)
    if ref.kind == "shm":
        buffer = _take_shm(ref.location)
    else:
        assert client is not None
        data = client.getdel(ref.location)
        if data is None:
            raise KVRefError(f"KV blob of request {ref.request_id} is missing (consumed or expired)")
        buffer = bytearray(data)  # writable, so tensors built on it are ordinary tensors
    return _decode_blob(ref, buffer, device)


def _take_shm(name: str) -> Any:
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KVRefError(f"KV blob {name} is missing (consumed or expired)") from None
    try:
        size = os.fstat(fd).st_size
        # Private and writable (copy on write), so tensors built on it are ordinary tensors.
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)  # released: the mapping keeps the pages until the tensors are gone
    return mm


def _decode_blob(ref: KVRef, buffer: Any, device: str) -> KVCache:
    import torch

    from .engine.base import KVCache

    view = memoryview(buffer)
    if bytes(view[: len(MAGIC)]) != MAGIC or len(view) < len(MAGIC) + 4:
        raise KVRefError(f"KV blob of request {ref.request_id} is not an fd_celery blob")
    (length,) = struct.unpack("<I", view[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(bytes(view[start : start + length]))
    except ValueError:
        raise KVRefError(f"KV blob of request {ref.request_id} has a corrupt header") from None
    expected = json.loads(_header(ref)[start:])
    if header != expected:
        raise KVRefError(f"KV reference of request {ref.request_id} does not match its blob (tampered?)")
    data = view[start + length :]
    if len(data) != ref.nbytes or _checksum([data]) != ref.checksum:
        raise KVRefError(f"KV blob of request {ref.request_id} fails its checksum")
    dtype = getattr(torch, ref.dtype)
    tensors, offset = [], 0
    for shape in ref.shapes:
        n = _numel(shape) * _ITEMSIZE[ref.dtype]
        t = torch.frombuffer(data[offset : offset + n], dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        tensors.append(t.view(dtype).reshape(shape).to(device))
        offset += n
    return KVCache(keys=tensors[0::2], values=tensors[1::2])


def discard(ref: KVRef, client: redis.Redis | None = None) -> None:
    """Release a blob nobody will load (the hand-off failed)."""
    if client is not None:
        client.hdel(keys.kv_held(ref.topic), ref.location)
    if ref.kind == "shm":
        try:
            os.unlink(os.path.join(SHM_DIR, ref.location))
        except FileNotFoundError:
            pass
    elif client is not None:
        client.delete(ref.location)


def sweep_shm(max_age_s: float) -> int:
    """Remove shm blobs older than ``max_age_s`` (their request expired); returns how many."""
    removed, now = 0, time.time()
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if now - os.stat(path).st_mtime > max_age_s:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
