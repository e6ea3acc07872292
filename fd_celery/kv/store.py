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
- ``cuda``: the prefill process's GPU memory, mapped by decode through a CUDA IPC handle (same
  host, both nodes on CUDA): see :mod:`fd_celery.kv.cuda`.
Blob names are built from checked parts only (topic, request id, token), so a reference cannot
point outside its store's namespace.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import re
import secrets
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import redis

from fd_celery import keys
from fd_celery.errors import KVRefError
from fd_celery.keys import check_request_id

if TYPE_CHECKING:  # torch is imported where tensors are made: workers only, never clients
    from fd_celery.engine.base import KVCache

__all__ = ["KVRef", "put", "take", "discard", "note_held", "note_taken", "sweep_shm", "close_pool", "bytes_held",
           "stores_offered", "choose_store", "SHM_DIR", "STORES", "MAX_KV_BYTES"]

MAGIC = b"FDKV1\n"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "fdkv-"
STORES = ("shm", "redis", "cuda")
MAX_KV_BYTES = int(os.environ.get("FD_MAX_KV_BYTES", str(8 << 30)))  # a reference above this is refused
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # dtypes a blob may hold
_TOPIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")
_POOL_RE = re.compile(SHM_PREFIX + r"[A-Za-z0-9_.-]{1,64}-free-[0-9]{1,10}-[0-9a-f]{8}-[0-9]{1,3}")
_POOL_FILE_RE = re.compile(r"-free-([0-9]{1,10})-[0-9a-f]{8}-[0-9]{1,3}(-held)?$")  # group 1: the writer's pid
#: Tensor bytes start at a multiple of this in a blob (the header is padded with spaces).
ALIGN = 64


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
    checksum: str  # fingerprint of the tensor bytes (see _checksum)
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
        out = {name: getattr(self, name) for name in _REF_FIELDS}
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
        if self.pool and not (self.kind == "shm" and isinstance(self.pool, str)
                              and _POOL_RE.fullmatch(self.pool) and self.pool.startswith(f"{SHM_PREFIX}{self.topic}-")):
            raise KVRefError(f"KV reference pool name {self.pool!r} is outside the shm store")
        if self.kind == "cuda":
            from fd_celery.kv.cuda import check_ipc

            check_ipc(self.ipc)
        elif self.ipc is not None:
            raise KVRefError(f"KV reference of kind {self.kind} carries an ipc object")


def stores_offered(device: str) -> list[str]:
    """The KV stores a node on ``device`` can take blobs from (published with its heartbeat)."""
    return [*(["cuda"] if device.startswith("cuda") else []),
            *(["shm"] if os.path.isdir(SHM_DIR) else []), "redis"]


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


_REF_FIELDS = tuple(f.name for f in fields(KVRef))
_HEADER_FIELDS = tuple(name for name in _REF_FIELDS if name != "ipc")


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
    return keys.kv_blob(topic, name) if kind == "redis" else name


def _checksum(parts: list[Any]) -> str:
    """A 64-bit fingerprint of the tensor bytes, in one pass: the wrapping sum of their
    little-endian 64-bit words (a last partial word is zero-padded), over the bytes as one run.

    It catches truncation, a zeroed or stale page and corrupted bytes at memory speed (torch sums
    on every core: about 1 ms for 64 MB here). It is not a MAC: what stops a forged reference is
    the random token, the header that the blob must match, and the store's namespace.
    """
    import torch

    chunks = [_as_bytes_tensor(p) for p in parts]
    if any(len(c) % 8 for c in chunks[:-1]):  # words would straddle parts: sum the joined run
        chunks = [torch.cat(chunks)]
    return _fingerprint(sum(_word_sum(chunk) for chunk in chunks))


def _word_sum(chunk: Any) -> int:
    """The sum of a uint8 tensor's little-endian 64-bit words (a last partial word zero-padded)."""
    import torch

    whole = len(chunk) - len(chunk) % 8
    total = int(chunk[:whole].view(torch.int64).sum()) if whole else 0
    tail = bytes(chunk[whole:].tolist())
    return total + int.from_bytes(tail.ljust(8, b"\0"), "little", signed=True) if tail else total


def _fingerprint(total: int) -> str:
    return f"s64:{total % (1 << 64):016x}"


#: The copy into a pool slot sums each window while it is still in the core's cache.
_COPY_WINDOW = 1 << 20


def _copy_summed(dest: Any, parts: list[Any]) -> str:
    """Copy ``parts`` one after the other into the uint8 tensor ``dest`` and return the
    :func:`_checksum` of the copy, in one pass: window by window, each summed right after it is
    written."""
    total, pos, window_end = 0, 0, 0
    summed = 0
    for part in parts:
        offset = 0
        while offset < len(part):
            if pos == window_end:
                window_end = pos + _COPY_WINDOW
            n = min(len(part) - offset, window_end - pos)
            dest[pos : pos + n].copy_(part[offset : offset + n])
            pos, offset = pos + n, offset + n
            if pos == window_end:
                total += _word_sum(dest[summed:pos])
                summed = pos
    if pos > summed:
        total += _word_sum(dest[summed:pos])
    return _fingerprint(total)


def _as_bytes_tensor(part: Any) -> Any:
    import torch

    if isinstance(part, torch.Tensor):
        return part.reshape(-1).view(torch.uint8)
    view = memoryview(part).cast("B")
    return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)


def _header(ref: KVRef) -> bytes:
    """The blob's header is the whole reference but ``ipc`` (any edited field is a mismatch),
    padded with spaces so that the tensor bytes start at a multiple of :data:`ALIGN`."""
    body = json.dumps({name: value for name, value in ref.to_dict().items() if name in _HEADER_FIELDS},
                      sort_keys=True).encode()
    head = len(MAGIC) + 4
    body += b" " * (-(head + len(body)) % ALIGN)
    return MAGIC + struct.pack("<I", len(body)) + body


_CHECKSUM_PLACEHOLDER = "s64:" + "0" * 16


def put(
    cache: KVCache, *, kind: str, topic: str, request_id: str, owner: str, host: str, ttl_s: float,
    first_token: int, prompt_tokens: int, client: redis.Redis | None = None, hold: bool = True,
) -> KVRef:
    """Write ``cache`` to the store ``kind``; return its reference. With ``client`` the blob is
    also entered in the bytes-held index ``fd:<topic>:kvheld``; ``hold=False`` leaves that to the
    caller (:func:`note_held`, in the round trip that publishes the reference). A cuda blob is
    always entered: its entry is its claim."""
    import torch

    tensors = [t.detach().contiguous() for t in cache.tensors()]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ITEMSIZE:
        raise KVRefError(f"cannot store a KV cache of dtypes {sorted(dtypes)}")
    if kind not in STORES:
        raise KVRefError(f"unknown KV store {kind!r}; known: {', '.join(STORES)}")
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    token = secrets.token_hex(16)
    name = _blob_name(topic, request_id, token)
    ref = KVRef(
        kind=kind, location=_blob_location(kind, topic, name), topic=topic,
        request_id=request_id,
        token=token, dtype=dtypes.pop(), shapes=tuple(tuple(t.shape) for t in tensors),
        num_tokens=cache.num_tokens, nbytes=nbytes, checksum=_CHECKSUM_PLACEHOLDER,
        owner=owner, host=host, expires_at=time.time() + ttl_s, first_token=first_token,
        prompt_tokens=prompt_tokens,
    )
    if kind == "cuda":
        from fd_celery.kv import cuda as kvcuda

        return kvcuda.put(ref, tensors, client)  # (it enters the blob in the index: its claim)
    raw = [t.cpu().reshape(-1).view(torch.uint8) for t in tensors]
    # (+ 128: room for the pool name the header will carry)
    slot = _POOL.acquire(topic, name, len(_header(ref)) + 128 + nbytes, ttl_s) if kind == "shm" else None
    if slot is not None:
        ref = _put_pooled(slot, ref, raw)
    else:
        import dataclasses

        ref = dataclasses.replace(ref, checksum=_checksum(raw))
        header = _header(ref)
        if kind == "shm":
            _write_shm(name, header, raw)
        else:
            assert client is not None
            client.set(ref.location, b"".join([header, *(p.numpy().tobytes() for p in raw)]), ex=max(1, int(ttl_s)))
    if client is not None and hold:
        note_held(client, ref)
    return ref


def note_held(target: Any, ref: KVRef) -> None:
    """Enter a blob in the bytes-held index (``target``: a client, or a pipeline to send)."""
    target.hset(keys.kv_held(ref.topic), ref.location, _held_value(ref))


def note_taken(target: Any, ref: KVRef) -> None:
    """Take a blob out of the bytes-held index (decode has it)."""
    target.hdel(keys.kv_held(ref.topic), ref.location)


def _held_value(ref: KVRef) -> str:
    """A blob's entry in ``fd:<topic>:kvheld``: who holds how many bytes until when, in which
    store. The entry of a cuda blob is also its claim (see :mod:`fd_celery.kv.cuda`)."""
    return f"{ref.owner}|{ref.nbytes}|{ref.expires_at}|{ref.kind}"


def _put_pooled(slot: _Slot, ref: KVRef, raw: list[Any]) -> KVRef:
    """Copy the tensors into a recycled file whose pages are already mapped (a memcpy on every
    core, no page faults), summing them on the way, then write the header in front."""
    import dataclasses

    try:
        ref = dataclasses.replace(ref, pool=slot.free_name)
        start = len(_header(ref))  # the checksum is fixed-width: the final header is as long
        checksum = _copy_summed(slot.view[start : start + ref.nbytes], raw)
        ref = dataclasses.replace(ref, checksum=checksum)
        header = _header(ref)
        assert len(header) == start
        slot.view[:start].copy_(_as_bytes_tensor(bytearray(header)))
    except BaseException:
        _POOL.give_back(slot, os.path.join(SHM_DIR, ref.location))
        raise
    return ref


def bytes_held(client: redis.Redis, topic: str) -> dict[str, int]:
    """KV bytes each node's blobs hold in the stores now (expired entries are not counted)."""
    held: dict[str, int] = {}
    now = time.time()
    for location, value in client.hgetall(keys.kv_held(topic)).items():
        owner, nbytes, expires, *kind = value.decode().split("|")
        if float(expires) > now:
            held[owner] = held.get(owner, 0) + int(nbytes)
        elif kind != ["cuda"] or float(expires) + _CUDA_ORPHAN_S < now:
            # (a cuda entry is its producer's to claim: only one whose producer never came is dropped)
            client.hdel(keys.kv_held(topic), location)
    return held


_CUDA_ORPHAN_S = 3600.0


# --------------------------------------------------------------------------- the shm pool


#: Recycled shm files per process, and the most bytes they may hold together (tmpfs memory that
#: stays allocated while the process lives). A blob that does not fit is written to a new file.
POOL_SLOTS = int(os.environ.get("FD_KV_SHM_POOL_SLOTS", "4"))
POOL_BYTES = int(os.environ.get("FD_KV_SHM_POOL_BYTES", str(1 << 30)))
_GRANULE = 1 << 20
_LEASE_GRACE_S = 60.0


@dataclass
class _Slot:
    """One recycled file: mapped once (shared, pages resident), lent to one blob at a time."""

    index: int
    topic: str
    free_name: str
    size: int
    inode: int
    mm: mmap.mmap
    view: Any  # a uint8 tensor over ``mm``
    lent_at: float


class _ShmPool:
    """This process's recycled shared-memory files, so that a hand-off copies into pages that are
    already there instead of making tmpfs allocate (and zero) fresh ones for every blob.

    The life of a slot: it is renamed from its free name ``fdkv-<topic>-free-<pid>-<pool>-<i>`` to the
    blob's name and filled (:func:`put`); decode renames it to ``<free name>-held`` when it takes
    the blob (so a second take finds it missing), builds tensors on its pages, and renames it back
    to the free name when the last of those tensors is gone. A slot that is not back within the
    request's TTL (its decode node died) is dropped here; :func:`sweep_shm` removes its file.
    """

    def __init__(self) -> None:
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"  # the pid lets sweep_shm tell a dead pool
        self.slots: list[_Slot] = []
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def acquire(self, topic: str, blob_name: str, size: int, ttl_s: float) -> _Slot | None:
        if POOL_SLOTS <= 0 or size > POOL_BYTES:
            return None
        with self.lock:
            if self.pid != os.getpid():  # a forked child starts its own pool
                self.__init__()  # type: ignore[misc]
            now = time.monotonic()
            blob_path = os.path.join(SHM_DIR, blob_name)
            for slot in sorted(self.slots, key=lambda sl: sl.size):
                free = _free_inode(slot)
                if free is None:
                    if now - slot.lent_at > ttl_s + _LEASE_GRACE_S:
                        self._drop(slot)  # never came back: its decode node died
                    continue
                if slot.topic == topic and slot.size >= size:
                    os.rename(os.path.join(SHM_DIR, slot.free_name), blob_path)
                    os.utime(blob_path)  # sweep_shm goes by age
                    slot.lent_at = now
                    return slot
            while self.slots and (len(self.slots) >= POOL_SLOTS
                                  or sum(sl.size for sl in self.slots) + size > POOL_BYTES):
                idle = [sl for sl in self.slots if _free_inode(sl) is not None]
                if not idle:
                    return None  # every slot is lent: this blob gets a file of its own
                victim = min(idle, key=lambda sl: sl.size)
                _unlink(victim.free_name)
                self._drop(victim)
            return self._create(topic, blob_path, size, now)

    def _create(self, topic: str, blob_path: str, size: int, now: float) -> _Slot | None:
        import torch

        size = -(-size // _GRANULE) * _GRANULE
        index = next(i for i in range(POOL_SLOTS + 1) if i not in {sl.index for sl in self.slots})
        fd = os.open(blob_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC here, not SIGBUS on a write later
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            inode = os.fstat(fd).st_ino
        except OSError:
            os.unlink(blob_path)
            return None  # no room in /dev/shm for a slot: a file of its own may still fit
        finally:
            os.close(fd)
        slot = _Slot(index, topic, f"{SHM_PREFIX}{topic}-free-{self.id}-{index}", size, inode, mm,
                     torch.frombuffer(mm, dtype=torch.uint8), now)
        self.slots.append(slot)
        return slot

    def give_back(self, slot: _Slot, path: str) -> None:
        """The writer's own return of a slot whose blob was never handed over."""
        try:
            os.rename(path, os.path.join(SHM_DIR, slot.free_name))
        except FileNotFoundError:
            pass

    def _drop(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        del slot.view  # the mapping is unmapped when the last view of it is gone

    def close(self) -> None:
        """Remove this process's idle slot files (at exit); lent ones are swept by age."""
        with self.lock:
            if self.pid != os.getpid():
                return
            for slot in list(self.slots):
                if _free_inode(slot) is not None:
                    _unlink(slot.free_name)
                self._drop(slot)


def _free_inode(slot: _Slot) -> int | None:
    """The slot's inode if its file is back under its free name (and is still its file)."""
    try:
        inode = os.stat(os.path.join(SHM_DIR, slot.free_name)).st_ino
    except FileNotFoundError:
        return None
    return inode if inode == slot.inode else None


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


_POOL = _ShmPool()
atexit.register(lambda: _POOL.close())


def close_pool() -> None:
    _POOL.close()


def _write_shm(name: str, header: bytes, raw: list[Any]) -> None:
    """One vectored write into a new tmpfs file (the kernel copies straight into its pages,
    cheaper than faulting in a fresh mapping page by page)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        parts = [memoryview(header), *(memoryview(p.numpy()).cast("B") for p in raw if len(p))]
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


def take(ref: KVRef, device: str, client: redis.Redis | None = None, release: bool = True) -> KVCache:
    """Load the blob of ``ref``, check it against the reference and release it from the store.

    Raises ``KVRefError`` for anything wrong; ``FileNotFoundError``-like absence is reported as
    ``KVRefError`` with ``missing`` in the message (the caller may redo prefill). With ``client``
    the blob also leaves the bytes-held index, unless ``release=False`` (the caller does it,
    :func:`note_taken`, off its path); a cuda blob is claimed there first, always.
    """
    ref.check()
    if ref.kind == "cuda":
        from fd_celery.kv import cuda as kvcuda

        return kvcuda.take(ref, device, client, _held_value(ref))
    if client is not None and release:
        note_taken(client, ref)
    header = _header(ref)  # what the blob must begin with, byte for byte
    if ref.kind == "shm":
        buffer = _take_shm(ref, header)
    else:
        assert client is not None
        data = client.getdel(ref.location)
        if data is None:
            raise KVRefError(f"KV blob of request {ref.request_id} is missing (consumed or expired)")
        buffer = bytearray(data)  # writable, so tensors built on it are ordinary tensors
        _check_header(ref, buffer, header)
    return _decode_blob(ref, buffer, device, len(header))


def _take_shm(ref: KVRef, header: bytes) -> Any:
    """Map the blob privately; take its name away at once, so that a second take finds it
    missing. A plain file is unlinked (the mapping keeps its pages); a pool slot is renamed to
    ``<free name>-held`` and goes back to its free name when the tensors on it are gone."""
    path = os.path.join(SHM_DIR, ref.location)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KVRefError(f"KV blob {ref.location} is missing (consumed or expired)") from None
    try:
        stat = os.fstat(fd)
        size = min(stat.st_size, len(header) + ref.nbytes)
        if size < len(MAGIC) + 4:
            raise KVRefError(f"KV blob of request {ref.request_id} is not an fd_celery blob")
        if ref.pool:
            mm = _map_slot(ref, fd, stat, size)
        else:  # private and writable (copy on write): tensors built on it are ordinary tensors
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    _check_header(ref, mm, header)  # before the blob is released: a mismatched reference leaves it be
    if not ref.pool:
        _unlink_path(path)
        return mm
    held = os.path.join(SHM_DIR, ref.pool + "-held")
    try:
        os.rename(path, held)
    except FileNotFoundError:
        raise KVRefError(f"KV blob {ref.location} is missing (consumed or expired)") from None
    weakref.finalize(mm, _return_slot, held, os.path.join(SHM_DIR, ref.pool))
    return mm


def _map_slot(ref: KVRef, fd: int, stat: os.stat_result, size: int) -> Any:
    """The first ``size`` bytes of a pool slot, through a mapping this process keeps per slot
    file: the pages stay mapped from one blob to the next, so taking a blob costs no mmap and
    no page faults. The returned array is the tensors' base: the slot goes back to its writer
    when the array is gone."""
    import numpy as np

    inode, file_size = stat.st_ino, stat.st_size
    with _READER_LOCK:
        cached = _READER_MAPS.pop(ref.pool, None)
        if cached is None or cached[0] != inode or len(cached[1]) < size:
            # Private and writable (copy on write), so tensors built on it are ordinary tensors;
            # not MAP_POPULATE: populating a writable private mapping copies every page.
            cached = (inode, mmap.mmap(fd, file_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        _READER_MAPS[ref.pool] = cached  # the newest last
        while len(_READER_MAPS) > 1 and (len(_READER_MAPS) > POOL_SLOTS * 2
                                         or sum(len(m) for _, m in _READER_MAPS.values()) > POOL_BYTES):
            _READER_MAPS.pop(next(iter(_READER_MAPS)))  # tensors still on it keep it mapped
    return np.frombuffer(cached[1], dtype=np.uint8, count=size)


def _forget_slot(pool: str) -> None:
    """A slot whose bytes failed their check: map it afresh next time (a page written through
    this process's private mapping would hide the writer's next blob)."""
    with _READER_LOCK:
        _READER_MAPS.pop(pool, None)


_READER_MAPS: dict[str, tuple[int, mmap.mmap]] = {}
_READER_LOCK = threading.Lock()


def _unlink_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _return_slot(held: str, free: str) -> None:
    """Decode is done with a pool slot's pages: give the file back to its writer."""
    try:
        os.rename(held, free)
    except OSError:
        pass  # swept meanwhile: the writer drops the slot after its lease


def _check_header(ref: KVRef, buffer: Any, header: bytes) -> None:
    """The blob must begin with ``header``, the one :func:`_header` makes of ``ref``: the writer
    wrote exactly that, so any edited field (or another request's blob) is a mismatch."""
    view = memoryview(buffer)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise KVRefError(f"KV blob of request {ref.request_id} is not an fd_celery blob")
    if bytes(view[: len(header)]) != header:
        raise KVRefError(f"KV reference of request {ref.request_id} does not match its blob (tampered?)")


def _decode_blob(ref: KVRef, buffer: Any, device: str, begin: int) -> KVCache:
    """Tensors on the bytes after a checked header (``begin``), once they pass their checksum."""
    import torch

    from fd_celery.engine.base import KVCache

    data = memoryview(buffer)[begin : begin + ref.nbytes]
    if len(data) != ref.nbytes or _checksum([data]) != ref.checksum:
        if ref.pool:
            _forget_slot(ref.pool)
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
    if ref.kind == "cuda":
        from fd_celery.kv import cuda as kvcuda

        kvcuda.discard(ref, client)
        return
    if client is not None:
        client.hdel(keys.kv_held(ref.topic), ref.location)
    if ref.kind == "shm":
        path = os.path.join(SHM_DIR, ref.location)
        if ref.pool:
            _return_slot(path, os.path.join(SHM_DIR, ref.pool))
        else:
            _unlink_path(path)
    elif client is not None:
        client.delete(ref.location)


def sweep_shm(max_age_s: float, topic: str | None = None) -> int:
    """Remove what nobody will use (of ``topic``, or of every topic): blobs older than
    ``max_age_s`` (their request expired), the idle slot files of processes that are gone, and
    slots held longer than that (their decode node died). Returns how many files went."""
    removed, now = 0, time.time()
    prefix = f"{SHM_PREFIX}{topic}-" if topic is not None else SHM_PREFIX
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(SHM_DIR, name)
        pool = _POOL_FILE_RE.search(name)
        try:
            if pool and not _alive(int(pool.group(1))):
                os.unlink(path)  # the writer is gone; a reader still mapping it keeps its pages
                removed += 1
            elif (not pool or pool.group(2)) and now - os.stat(path).st_mtime > max_age_s:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
