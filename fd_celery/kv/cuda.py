"""The ``cuda`` KV store: the cache stays in the prefill process's GPU memory and the decode
process on the same host maps it through a CUDA IPC handle, copies it once (device to device)
and lets go.

The blob is the same format as the other stores' (``MAGIC | header | tensor bytes``), in one
GPU buffer; the reference carries, besides the usual fields, an ``ipc`` object: torch's sharing
tuple for that buffer (``UntypedStorage._share_cuda_``), bytes as base64, never pickle. The
header inside the buffer is the reference without ``ipc`` (the handle exists only once the
buffer is written), so an edited field, or a handle that maps some other memory, is a mismatch.

Lifetime. torch counts the consumers of a shared buffer in a small shared-memory file (one
counter per buffer, set to 1 when shared; the consumer's mapping takes it to 0 when dropped).
On top of that, one party *claims* the blob by deleting its entry in ``fd:<topic>:kvheld``:
- decode claims it before opening the handle, then copies and drops the mapping;
- the producer keeps the buffer in :data:`_SENT` until the claim is seen (a reaper thread polls
  Redis every :data:`REAP_INTERVAL_S`), then drops it: torch frees it once the counter is 0;
- a blob nobody claimed by its expiry (+ ``FD_KV_CUDA_GRACE_S``) is claimed by the producer, which
  gives back the counter itself, so the memory is freed;
- a decode process that claimed but could not open the handle puts the entry back, so the
  producer reclaims it at expiry.
A decode in the producer's own process (a mixed node with a thread pool) takes the buffer from
:data:`_SENT` directly: CUDA cannot open a process's own IPC handle.
If the producer process is gone, its GPU memory went with it: decode finds the blob missing and
computes the prefill again.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fd_celery import keys
from fd_celery.errors import KVRefError
from fd_celery.kv.base import KVStore, pid_alive, refuse_pool
from fd_celery.kv.blob import as_bytes_tensor, checksum, header
from fd_celery.kv.index import held_value, note_held
from fd_celery.kv.ref import ITEMSIZE, KVRef, numel
from fd_celery.settings import node_knobs

if TYPE_CHECKING:
    import redis

    from fd_celery.engine.base import KVCache

logger = logging.getLogger(__name__)

__all__ = ["STORE", "CudaStore", "check_ipc", "blobs_held", "IPC_FIELDS"]

#: The ``ipc`` object of a ``cuda`` reference: field -> type.
IPC_FIELDS: dict[str, type] = {
    "pid": int,  # the producer process (a handle it exported cannot be opened by itself)
    "device": int,  # CUDA device index of the buffer
    "handle": str,  # base64: the CUDA IPC handle of the allocation that holds the buffer
    "storage_bytes": int,  # the shared storage's size
    "storage_offset": int,  # its offset in the allocation
    "counter": str,  # torch's reference-counter file (shared memory name)
    "counter_offset": int,  # this buffer's counter in it
    "event": str,  # base64: an IPC event recorded after the buffer was written
    "event_sync": bool,  # whether the reader must wait for that event
}
_COUNTER_RE = re.compile(r"/torch_[0-9]{1,10}(?:_[0-9]{1,20}){1,2}")
_MAX_HANDLE_BYTES = 512
_COUNTER_SLOTS = 10000  # torch's CUDA_IPC_REF_COUNTER_FILE_SIZE: offsets in a counter file
REAP_INTERVAL_S = 0.2
LIMBO_S = 5.0  # how long the reaper keeps collecting torch's limbo after letting go of a buffer


class CudaStore(KVStore):
    kind = "cuda"
    rank = 0  # no copy through host memory: the first choice where both ends are on CUDA
    claims_in_index = True

    def offered(self, device: str) -> bool:
        return device.startswith("cuda")

    def put(self, ref: KVRef, tensors: list[Any], client: redis.Redis | None, ttl_s: float) -> KVRef:
        return _put(ref, tensors, client)

    def take(self, ref: KVRef, device: str, client: redis.Redis | None) -> KVCache:
        return _take(ref, device, client)

    def discard(self, ref: KVRef, client: redis.Redis | None) -> None:
        _discard(ref, client)

    def check(self, ref: KVRef) -> None:
        refuse_pool(ref)
        check_ipc(ref.ipc)


def check_ipc(ipc: Any) -> None:
    """Shape and ranges of a reference's ``ipc`` object; anything off is a ``KVRefError``."""
    if not isinstance(ipc, dict) or set(ipc) != set(IPC_FIELDS):
        raise KVRefError(f"KV reference of kind cuda needs an ipc object with fields {', '.join(IPC_FIELDS)}")
    for name, kind in IPC_FIELDS.items():
        value = ipc[name]
        if type(value) is not kind:  # (exact type: bool is not an int here)
            raise KVRefError(f"KV reference ipc.{name} must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and isinstance(value, int) and not 0 <= value < 1 << 48:
            raise KVRefError(f"KV reference ipc.{name}={value} is out of range")
    for name in ("handle", "event"):
        if len(_b64(ipc, name)) > _MAX_HANDLE_BYTES:
            raise KVRefError(f"KV reference ipc.{name} is longer than {_MAX_HANDLE_BYTES} bytes")
    if not _COUNTER_RE.fullmatch(ipc["counter"]):
        raise KVRefError(f"KV reference ipc.counter {ipc['counter']!r} is not a torch reference counter")
    if ipc["counter_offset"] >= _COUNTER_SLOTS:
        raise KVRefError(f"KV reference ipc.counter_offset={ipc['counter_offset']} is out of range")
    if ipc["device"] > 255:
        raise KVRefError(f"KV reference ipc.device={ipc['device']} is out of range")


def _b64(ipc: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(ipc[name], validate=True)
    except (binascii.Error, ValueError):
        raise KVRefError(f"KV reference ipc.{name} is not base64") from None


# --------------------------------------------------------------------------- the producer


@dataclass
class _Sent:
    """A buffer this process shared and still owns."""

    buf: Any  # the uint8 GPU tensor: header + tensor bytes
    expires_at: float
    counter: bytes
    counter_offset: int
    client: redis.Redis
    held_key: str


class _Registry:
    """This process's shared buffers, and the thread that lets go of them once claimed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, _Sent] = {}
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        self.collect_until = 0.0  # torch's limbo may hold dropped buffers until then

    def add(self, location: str, sent: _Sent) -> None:
        with self.lock:
            if (
                self.pid != os.getpid()
            ):  # a forked child starts empty (the parent's GPU memory is not its own)
                self.sent, self.thread, self.pid, self.collect_until = {}, None, os.getpid(), 0.0
            self.sent[location] = sent
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="fd-kv-cuda-reaper", daemon=True)
                self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL_S)
            try:
                self.reap()
            except Exception as exc:  # noqa: BLE001 - Redis down: the next pass tries again
                logger.warning("CUDA KV reaper: %s", exc)

    def reap(self, now: float | None = None) -> int:
        """Drop the buffers decode has claimed; claim and release the expired ones. Returns how
        many buffers were let go."""
        import torch

        now = time.time() if now is None else now
        grace_s = node_knobs().kv_cuda_grace_s
        dropped = 0
        with self.lock:
            by_key: dict[tuple[int, str], list[str]] = {}
            for location, sent in self.sent.items():
                by_key.setdefault((id(sent.client), sent.held_key), []).append(location)
            for locations in by_key.values():
                first = self.sent[locations[0]]
                present = first.client.hmget(first.held_key, locations)
                for location, value in zip(locations, present):
                    sent = self.sent[location]
                    if value is None:  # decode claimed it: its mapping keeps the counter up
                        del self.sent[location]
                        dropped += 1
                    elif now > sent.expires_at + grace_s and sent.client.hdel(sent.held_key, location):
                        _release_counter(sent)  # never opened: give back the consumer's count
                        del self.sent[location]
                        dropped += 1
                        logger.info("CUDA KV blob %s expired unclaimed; released", location)
            if dropped:
                # A dropped buffer that a decode process still maps waits in torch's limbo until
                # its count is back to 0; decode lets go within milliseconds of its claim.
                self.collect_until = time.monotonic() + LIMBO_S
            collect = time.monotonic() < self.collect_until
        if collect:
            torch.cuda.ipc_collect()  # free what no consumer maps any more
        return dropped

    def claim(self, location: str, client: redis.Redis, held_key: str) -> tuple[bool, _Sent | None]:
        """Decode's claim (under the lock, so the reaper cannot drop a local buffer between the
        claim and the pop): whether it won, and the buffer if this process is its producer."""
        with self.lock:
            if not client.hdel(held_key, location):
                return False, None
            return True, self.sent.pop(location, None)


_SENT = _Registry()


def blobs_held() -> int:
    """How many shared buffers this process still owns."""
    with _SENT.lock:
        return len(_SENT.sent) if _SENT.pid == os.getpid() else 0


def _release_counter(sent: _Sent) -> None:
    import torch

    torch.UntypedStorage._release_ipc_counter_cuda(sent.counter, sent.counter_offset)


def _put(ref: KVRef, tensors: list[Any], client: redis.Redis | None) -> KVRef:
    """Write ``tensors`` (on one CUDA device) into a new GPU buffer behind a header, share it,
    and return ``ref`` completed with its checksum and ``ipc`` object."""
    import torch

    if client is None:
        raise KVRefError("the cuda KV store needs a Redis client (its claims live there)")
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise KVRefError(
            f"the cuda KV store needs a cache on one CUDA device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    start = len(header(ref))  # the checksum is fixed-width: the final header is as long
    buf = torch.empty(start + ref.nbytes, dtype=torch.uint8, device=device)
    offset = start
    for t in tensors:
        part = t.reshape(-1).view(torch.uint8)
        buf[offset : offset + len(part)].copy_(part)
        offset += len(part)
    ref = dataclasses.replace(ref, checksum=checksum([buf[start:]]))
    head = header(ref)
    assert len(head) == start
    buf[:start].copy_(as_bytes_tensor(bytearray(head)))
    # Shared after every write: torch records the IPC event on this stream now.
    dev, handle, size, offset_bytes, counter, counter_offset, event, sync = (
        buf.untyped_storage()._share_cuda_()
    )
    ipc = {
        "pid": os.getpid(),
        "device": int(dev),
        "handle": base64.b64encode(handle).decode(),
        "storage_bytes": int(size),
        "storage_offset": int(offset_bytes),
        "counter": counter.decode(),
        "counter_offset": int(counter_offset),
        "event": base64.b64encode(event).decode(),
        "event_sync": bool(sync),
    }
    ref = dataclasses.replace(ref, ipc=ipc)
    check_ipc(ipc)  # what this torch gives must be what readers accept
    # The claim exists before the registry knows the buffer: the reaper would take a missing
    # claim for decode's and let go of a buffer nobody opened.
    note_held(client, ref)
    _SENT.add(
        ref.location,
        _Sent(buf, ref.expires_at, counter, int(counter_offset), client, keys.kv_held(ref.topic)),
    )
    return ref


def _discard(ref: KVRef, client: redis.Redis | None) -> None:
    """The producer's own release of a blob nobody will take (the hand-off failed)."""
    if client is None:
        return
    won, local = _SENT.claim(ref.location, client, keys.kv_held(ref.topic))
    if won and local is not None:
        _release_counter(local)
        del local


# --------------------------------------------------------------------------- the consumer


def _take(ref: KVRef, device: str, client: redis.Redis | None) -> KVCache:
    """Claim the blob, map it (or take it from this process), check it, copy it to ``device``."""
    if ref.host != socket.gethostname():
        raise KVRefError(
            f"KV reference of kind cuda lives on host {ref.host!r}; CUDA IPC works on one host only"
        )
    if not str(device).startswith("cuda"):
        raise KVRefError(
            f"KV reference of kind cuda needs a CUDA decode node; this node's device is {device!r}"
        )
    if client is None:
        raise KVRefError("the cuda KV store needs a Redis client (its claims live there)")
    held_key = keys.kv_held(ref.topic)
    won, local = _SENT.claim(ref.location, client, held_key)
    if not won:
        raise KVRefError(f"KV blob of request {ref.request_id} is missing (consumed or expired)")
    if local is not None:
        _release_counter(local)  # nobody opens it: the count a consumer would give back, given back
        holder = [local.buf]
        del local
    else:
        try:
            holder = [_open(ref)]
        except KVRefError:
            client.hset(
                held_key, ref.location, held_value(ref)
            )  # unopened: the producer reclaims it at expiry
            raise
    return _load(ref, holder, device)


def _open(ref: KVRef) -> Any:
    """Map the producer's buffer (waiting for its writes): a uint8 tensor of header + data."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    ipc = ref.ipc
    assert ipc is not None
    total = len(header(ref)) + ref.nbytes
    if total > ipc["storage_bytes"]:
        raise KVRefError(
            f"KV reference of request {ref.request_id}: {total} bytes do not fit its shared buffer"
        )
    if not torch.cuda.is_available():
        raise KVRefError(
            f"KV reference of kind cuda needs CUDA in the decode process (request {ref.request_id})"
        )
    try:
        return rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size([total]),
            (1,),
            0,
            torch.storage.TypedStorage,
            torch.uint8,
            ipc["device"],
            _b64(ipc, "handle"),
            ipc["storage_bytes"],
            ipc["storage_offset"],
            False,
            ipc["counter"].encode(),
            ipc["counter_offset"],
            _b64(ipc, "event"),
            ipc["event_sync"],
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        # "missing": decode computes the prefill again, so the request still completes.
        why = (
            f"its prefill process {ipc['pid']} is gone"
            if not pid_alive(ipc["pid"])
            else f"its CUDA IPC handle cannot be opened here ({exc})"
        )
        raise KVRefError(f"KV blob of request {ref.request_id} is missing: {why}") from None


def _load(ref: KVRef, holder: list[Any], device: str) -> KVCache:
    """Check the header and checksum, and copy the tensors off the shared buffer (the one item of
    ``holder``), which is let go before this returns or raises: the producer's memory goes then."""
    import torch

    from fd_celery.engine.base import KVCache

    expected = header(ref)
    buf = holder.pop()
    matches = bytes(buf[: len(expected)].cpu().numpy()) == expected
    data = buf[len(expected) : len(expected) + ref.nbytes].to(device, copy=True) if matches else None
    del buf  # the mapping goes (torch syncs, then gives back its count), even if a check fails below
    if data is None:
        raise KVRefError(f"KV reference of request {ref.request_id} does not match its blob (tampered?)")
    if len(data) != ref.nbytes or checksum([data]) != ref.checksum:
        raise KVRefError(f"KV blob of request {ref.request_id} fails its checksum")
    dtype = getattr(torch, ref.dtype)
    tensors, offset = [], 0
    for shape in ref.shapes:
        n = numel(shape) * ITEMSIZE[ref.dtype]
        tensors.append(data[offset : offset + n].view(dtype).reshape(shape))
        offset += n
    return KVCache(keys=tensors[0::2], values=tensors[1::2])


STORE = CudaStore()
