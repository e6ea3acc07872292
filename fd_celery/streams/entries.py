"""What an output stream holds: one entry per chunk of a request, the last one marked ``end``.

Each request has one Redis stream (``keys.output_stream``). Entry ids are ``0-<seq+1>``, which
makes writing idempotent: the append script (``fd_celery/scripts/append.lua``) skips every chunk
whose seq is not above the last one written, so a request run twice (at-least-once delivery)
never shows its caller a chunk twice. Its last entry carries ``end`` and the final result (or the
error), written once: a second run gets the first run's final result back and returns that, so
the result backend agrees too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["StreamEntry", "Record", "decode_entry", "last_entry", "END_RETENTION_S", "EXPIRED_RETENTION_S"]

END_RETENTION_S = 600  # a finished stream stays readable this long after its end
EXPIRED_RETENTION_S = 60  # the error entry of an expired request: long enough for a reader to see

#: A result-backend record to store with a stream's end: (key, encoded value, expiry in s).
Record = tuple[str, bytes, int]


@dataclass
class StreamEntry:
    seq: int
    data: dict[str, Any]
    end: bool


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    """One stream entry as XREAD or XRANGE returns it."""
    seq = int(entry_id.split(b"-")[1]) - 1
    return StreamEntry(seq=seq, data=json.loads(fields[b"d"]), end=fields.get(b"end") == b"1")


def last_entry(client: redis.Redis, key: str) -> StreamEntry | None:
    rows: list[tuple[bytes, dict[bytes, bytes]]] = client.xrevrange(key, count=1)  # type: ignore[assignment]
    return decode_entry(*rows[0]) if rows else None
