"""The blob format, the same in every store: ``MAGIC | u32 header length | header JSON | raw
little-endian tensor bytes`` (k0, v0, k1, v1, ...). The header is the whole reference but its
``ipc`` object (with its random token), so a reference that was edited in any field, or that
points at another request's blob, is refused. Tensors are rebuilt with ``torch.frombuffer``
from a dtype whitelist: never pickle, never ``torch.load``. torch is imported where tensors are
made (workers only, never clients).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

from fd_celery.errors import KVRefError
from fd_celery.kv.ref import ITEMSIZE, REF_FIELDS, KVRef, numel

if TYPE_CHECKING:
    from fd_celery.engine.base import KVCache

__all__ = [
    "MAGIC",
    "ALIGN",
    "CHECKSUM_PLACEHOLDER",
    "COPY_WINDOW",
    "header",
    "checksum",
    "copy_summed",
    "as_bytes_tensor",
    "raw_bytes",
    "check_header",
    "decode",
]

MAGIC = b"FDKV1\n"
#: Tensor bytes start at a multiple of this in a blob (the header is padded with spaces).
ALIGN = 64
#: A reference's checksum before the bytes are summed: as wide as a real one, so the header's
#: length (where the tensor bytes begin) is known before they are written.
CHECKSUM_PLACEHOLDER = "s64:" + "0" * 16
#: The copy into a pool slot sums each window while it is still in the core's cache.
COPY_WINDOW = 1 << 20
_HEADER_FIELDS = tuple(name for name in REF_FIELDS if name != "ipc")


def header(ref: KVRef) -> bytes:
    """The blob's header is the whole reference but ``ipc`` (any edited field is a mismatch),
    padded with spaces so that the tensor bytes start at a multiple of :data:`ALIGN`."""
    body = json.dumps(
        {name: value for name, value in ref.to_dict().items() if name in _HEADER_FIELDS}, sort_keys=True
    ).encode()
    head = len(MAGIC) + 4
    body += b" " * (-(head + len(body)) % ALIGN)
    return MAGIC + struct.pack("<I", len(body)) + body


def checksum(parts: list[Any]) -> str:
    """A 64-bit fingerprint of the tensor bytes, in one pass: the wrapping sum of their
    little-endian 64-bit words (a last partial word is zero-padded), over the bytes as one run.

    It catches truncation, a zeroed or stale page and corrupted bytes at memory speed (torch sums
    on every core: about 1 ms for 64 MB here). It is not a MAC: what stops a forged reference is
    the random token, the header that the blob must match, and the store's namespace.
    """
    import torch

    chunks = [as_bytes_tensor(p) for p in parts]
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


def copy_summed(dest: Any, parts: list[Any]) -> str:
    """Copy ``parts`` one after the other into the uint8 tensor ``dest`` and return the
    :func:`checksum` of the copy, in one pass: window by window, each summed right after it is
    written."""
    total, pos, window_end = 0, 0, 0
    summed = 0
    for part in parts:
        offset = 0
        while offset < len(part):
            if pos == window_end:
                window_end = pos + COPY_WINDOW
            n = min(len(part) - offset, window_end - pos)
            dest[pos : pos + n].copy_(part[offset : offset + n])
            pos, offset = pos + n, offset + n
            if pos == window_end:
                total += _word_sum(dest[summed:pos])
                summed = pos
    if pos > summed:
        total += _word_sum(dest[summed:pos])
    return _fingerprint(total)


def as_bytes_tensor(part: Any) -> Any:
    """A tensor or a buffer as a flat uint8 tensor over the same memory."""
    import torch

    if isinstance(part, torch.Tensor):
        return part.reshape(-1).view(torch.uint8)
    view = memoryview(part).cast("B")
    return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)


def raw_bytes(tensors: list[Any]) -> list[Any]:
    """The tensors' bytes in host memory, as flat uint8 tensors (what the host stores write)."""
    import torch

    return [t.cpu().reshape(-1).view(torch.uint8) for t in tensors]


def check_header(ref: KVRef, buffer: Any, expected: bytes) -> None:
    """The blob must begin with ``expected``, the one :func:`header` makes of ``ref``: the writer
    wrote exactly that, so any edited field (or another request's blob) is a mismatch."""
    view = memoryview(buffer)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise KVRefError(f"KV blob of request {ref.request_id} is not an fd_celery blob")
    if bytes(view[: len(expected)]) != expected:
        raise KVRefError(f"KV reference of request {ref.request_id} does not match its blob (tampered?)")


def decode(ref: KVRef, buffer: Any, device: str, begin: int) -> KVCache:
    """Tensors on the bytes after a checked header (``begin``) of a host buffer, once they pass
    their checksum."""
    import torch

    from fd_celery.engine.base import KVCache

    data = memoryview(buffer)[begin : begin + ref.nbytes]
    if len(data) != ref.nbytes or checksum([data]) != ref.checksum:
        raise KVRefError(f"KV blob of request {ref.request_id} fails its checksum")
    dtype = getattr(torch, ref.dtype)
    tensors, offset = [], 0
    for shape in ref.shapes:
        n = numel(shape) * ITEMSIZE[ref.dtype]
        t = (
            torch.frombuffer(data[offset : offset + n], dtype=torch.uint8)
            if n
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors.append(t.view(dtype).reshape(shape).to(device))
        offset += n
    return KVCache(keys=tensors[0::2], values=tensors[1::2])
