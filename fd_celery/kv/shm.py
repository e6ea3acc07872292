"""The ``shm`` KV store: a file in ``/dev/shm`` (POSIX shared memory; same host). The reader
maps it and takes its name away at once: the pages live until the last tensor built on them is
gone. A prefill process recycles a few files (:class:`_ShmPool`), so that a hand-off copies into
pages that are already there instead of making tmpfs allocate (and zero) fresh ones per blob.

Nothing here outlives its owners (:func:`sweep_shm`, run by every node at start and then every
few seconds, for every topic): a recycled file names its writer's pid and goes as soon as that
process is gone, however it ended (TERM, INT, kill -9); a blob on its way to a decode node belongs
to its request and goes when the request's TTL, which its header carries, has passed. When the
Redis that held the references goes for good, :func:`remove_blobs` removes their blobs at once.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import mmap
import os
import re
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fd_celery.errors import KVRefError
from fd_celery.kv.base import KVStore, pid_alive, refuse_ipc
from fd_celery.kv.blob import (
    MAGIC,
    as_bytes_tensor,
    check_header,
    checksum,
    copy_summed,
    decode,
    header,
    raw_bytes,
)
from fd_celery.kv.ref import SHM_DIR, SHM_PREFIX, KVRef
from fd_celery.settings import node_knobs

if TYPE_CHECKING:
    import redis

    from fd_celery.engine.base import KVCache

__all__ = ["STORE", "ShmStore", "sweep_shm", "remove_blobs", "close_pool", "EXPIRED_GRACE_S"]

_NAME_RE = re.compile(SHM_PREFIX + r"[A-Za-z0-9_.:-]{1,300}")  # any file of this store
_POOL_RE = re.compile(SHM_PREFIX + r"[A-Za-z0-9_.-]{1,64}-free-[0-9]{1,10}-[0-9a-f]{8}-[0-9]{1,3}")
_POOL_FILE_RE = re.compile(
    r"-free-([0-9]{1,10})-[0-9a-f]{8}-[0-9]{1,3}(-held)?$"
)  # group 1: the writer's pid
_GRANULE = 1 << 20  # slot files grow in whole MiB
_LEASE_GRACE_S = 60.0
#: (+ this: room in a slot for the pool name the header will carry)
_POOL_NAME_ROOM = 128
#: A blob goes this long after its request's TTL ran out (a take checks the expiry first; the
#: grace keeps the sweep out of a take that began just before it).
EXPIRED_GRACE_S = 5.0
_MAX_HEADER_BYTES = 64 * 1024  # a header longer than this is not one of ours


class ShmStore(KVStore):
    kind = "shm"
    rank = 1

    def offered(self, device: str) -> bool:
        return os.path.isdir(SHM_DIR)

    def put(self, ref: KVRef, tensors: list[Any], client: redis.Redis | None, ttl_s: float) -> KVRef:
        raw = raw_bytes(tensors)
        slot = _POOL.acquire(ref.topic, ref.location, len(header(ref)) + _POOL_NAME_ROOM + ref.nbytes, ttl_s)
        if slot is not None:
            return _put_pooled(slot, ref, raw)
        ref = dataclasses.replace(ref, checksum=checksum(raw))
        _write_shm(ref.location, header(ref), raw)
        return ref

    def take(self, ref: KVRef, device: str, client: redis.Redis | None) -> KVCache:
        expected = header(ref)  # what the blob must begin with, byte for byte
        buffer = _take_shm(ref, expected)
        try:
            return decode(ref, buffer, device, len(expected))
        except KVRefError:
            if ref.pool:
                _forget_slot(ref.pool)
            raise

    def discard(self, ref: KVRef, client: redis.Redis | None) -> None:
        path = os.path.join(SHM_DIR, ref.location)
        if ref.pool:
            _return_slot(path, os.path.join(SHM_DIR, ref.pool))
        else:
            _unlink_path(path)

    def check(self, ref: KVRef) -> None:
        if ref.pool and not (
            isinstance(ref.pool, str)
            and _POOL_RE.fullmatch(ref.pool)
            and ref.pool.startswith(f"{SHM_PREFIX}{ref.topic}-")
        ):
            raise KVRefError(f"KV reference pool name {ref.pool!r} is outside the shm store")
        refuse_ipc(ref)

    def sweep(self, max_age_s: float, topic: str | None = None) -> int:
        return sweep_shm(max_age_s, topic)

    def close(self) -> None:
        close_pool()


# --------------------------------------------------------------------------- the writer's pool


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
    blob_path: str = ""  # the name it was last lent under


class _ShmPool:
    """This process's recycled shared-memory files: at most ``FD_KV_SHM_POOL_SLOTS`` of them,
    holding at most ``FD_KV_SHM_POOL_BYTES`` together (tmpfs memory that stays allocated while
    the process lives). A blob that does not fit is written to a new file.

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
        knobs = node_knobs()
        if knobs.kv_shm_pool_slots <= 0 or size > knobs.kv_shm_pool_bytes:
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
                        self._drop(slot, remove=True)  # never came back: its decode node died
                    continue
                if slot.topic == topic and slot.size >= size:
                    os.rename(os.path.join(SHM_DIR, slot.free_name), blob_path)
                    os.utime(blob_path)  # sweep_shm goes by age
                    slot.lent_at, slot.blob_path = now, blob_path
                    return slot
            while self.slots and (
                len(self.slots) >= knobs.kv_shm_pool_slots
                or sum(sl.size for sl in self.slots) + size > knobs.kv_shm_pool_bytes
            ):
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
        index = next(
            i for i in range(node_knobs().kv_shm_pool_slots + 1) if i not in {sl.index for sl in self.slots}
        )
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
        slot = _Slot(
            index,
            topic,
            f"{SHM_PREFIX}{topic}-free-{self.id}-{index}",
            size,
            inode,
            mm,
            torch.frombuffer(mm, dtype=torch.uint8),
            now,
            blob_path,
        )
        self.slots.append(slot)
        return slot

    def give_back(self, slot: _Slot, path: str) -> None:
        """The writer's own return of a slot whose blob was never handed over."""
        try:
            os.rename(path, os.path.join(SHM_DIR, slot.free_name))
        except FileNotFoundError:
            pass

    def _drop(self, slot: _Slot, remove: bool = False) -> None:
        """Forget ``slot``; with ``remove``, also remove its file under the names it is lent
        under (the blob's, or held by a decode node), where it is still this slot's file."""
        self.slots.remove(slot)
        if remove:
            for path in (slot.blob_path, os.path.join(SHM_DIR, slot.free_name + "-held")):
                _unlink_if_inode(path, slot.inode)
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


def _unlink_if_inode(path: str, inode: int) -> None:
    try:
        if path and os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


_POOL = _ShmPool()
atexit.register(lambda: _POOL.close())


def close_pool() -> None:
    """Remove this process's idle slot files."""
    _POOL.close()


def _put_pooled(slot: _Slot, ref: KVRef, raw: list[Any]) -> KVRef:
    """Write the blob into a recycled slot: the tensor bytes first (into pages resident in the
    core, no page faults), summing them on the way, then write the header in front."""
    try:
        ref = dataclasses.replace(ref, pool=slot.free_name)
        start = len(header(ref))  # the checksum is fixed-width: the final header is as long
        summed = copy_summed(slot.view[start : start + ref.nbytes], raw)
        ref = dataclasses.replace(ref, checksum=summed)
        head = header(ref)
        assert len(head) == start
        slot.view[:start].copy_(as_bytes_tensor(bytearray(head)))
    except BaseException:
        _POOL.give_back(slot, os.path.join(SHM_DIR, ref.location))
        raise
    return ref


def _write_shm(name: str, head: bytes, raw: list[Any]) -> None:
    """One vectored write into a new tmpfs file (the kernel copies straight into its pages,
    cheaper than faulting in a fresh mapping page by page)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        parts = [memoryview(head), *(memoryview(p.numpy()).cast("B") for p in raw if len(p))]
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


# --------------------------------------------------------------------------- the reader


def _take_shm(ref: KVRef, expected: bytes) -> Any:
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
        size = min(stat.st_size, len(expected) + ref.nbytes)
        if size < len(MAGIC) + 4:
            raise KVRefError(f"KV blob of request {ref.request_id} is not an fd_celery blob")
        if ref.pool:
            mm = _map_slot(ref, fd, stat, size)
        else:  # private and writable (copy on write): tensors built on it are ordinary tensors
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    check_header(ref, mm, expected)  # before the blob is released: a mismatched reference leaves it be
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
    knobs = node_knobs()
    with _READER_LOCK:
        cached = _READER_MAPS.pop(ref.pool, None)
        if cached is None or cached[0] != inode or len(cached[1]) < size:
            # Private and writable (copy on write), so tensors built on it are ordinary tensors;
            # not MAP_POPULATE: populating a writable private mapping copies every page.
            cached = (
                inode,
                mmap.mmap(fd, file_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE),
            )
        _READER_MAPS[ref.pool] = cached  # the newest last
        while len(_READER_MAPS) > 1 and (
            len(_READER_MAPS) > knobs.kv_shm_pool_slots * 2
            or sum(len(m) for _, m in _READER_MAPS.values()) > knobs.kv_shm_pool_bytes
        ):
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


# --------------------------------------------------------------------------- the sweep


def sweep_shm(max_age_s: float, topic: str | None = None) -> int:
    """Remove what nobody will use (of ``topic``, or of every topic), whoever wrote it; returns
    how many files went:

    * a recycled file (free, or held by a decode node) whose writer process is gone;
    * a blob whose request's TTL ran out (``expires_at`` in its header) :data:`EXPIRED_GRACE_S`
      ago: no decode node can take it any more, whatever the sweeping node's own TTL;
    * anything not a recycled file of a live writer that is older than ``max_age_s`` (a blob
      whose header cannot be read, a slot held past any request's run).
    """
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
            if pool:
                gone = not pid_alive(int(pool.group(1)))  # a reader still mapping it keeps its pages
                if not gone and pool.group(2):
                    gone = now - os.stat(path).st_mtime > max_age_s
            else:
                expires_at = _blob_expiry(path, name)
                gone = (expires_at is not None and now > expires_at + EXPIRED_GRACE_S) or (
                    now - os.stat(path).st_mtime > max_age_s
                )
            if gone:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _blob_expiry(path: str, name: str) -> float | None:
    """The ``expires_at`` of the blob in file ``name``, from its header; None when the header is
    not (yet) this blob's: a recycled file carries its last blob's header until the new one is
    written (after the tensor bytes), so a header naming another location is not believed."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
                return None
            (length,) = struct.unpack("<I", head[len(MAGIC) :])
            if length > _MAX_HEADER_BYTES:
                return None
            meta = json.loads(fh.read(length))
        if not isinstance(meta, dict) or meta.get("location") != name:
            return None
        expires_at = meta.get("expires_at")
        if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)):
            return None
        return float(expires_at)
    except (OSError, ValueError):  # (gone meanwhile, or not JSON: the age rule decides)
        return None


def remove_blobs(names: Iterable[str]) -> int:
    """Remove the blob files ``names`` (file names in ``/dev/shm``, as KV references and the
    bytes-held index give them), for a caller who knows nobody will take them: the Redis that
    held their references is gone. Anything that is not a file name of this store is left alone.
    Returns how many files went."""
    removed = 0
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except FileNotFoundError:
            pass
    return removed


STORE = ShmStore()
