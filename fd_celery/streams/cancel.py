"""Cancelling a request: its output stream ends as cancelled (``fd_celery/scripts/cancel.lua``).

The end entry is the signal. A node still working on the request learns of it from the reply
of its next append (the stream has ended: see :meth:`OutputWriter.ended`), stops its sequence at
once and frees its KV, on a prefill node and a decode node alike; a request still queued never
gets further than its first append. Nothing polls, and the token path gains no round trip.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from fd_celery import keys
from fd_celery.scripts import CANCEL
from fd_celery.streams.entries import END_RETENTION_S

__all__ = ["cancel_stream", "CANCELLED"]

#: The ``finish_reason`` of a cancelled request.
CANCELLED = "cancelled"


def cancel_stream(client: redis.Redis, topic: str, request_id: str) -> tuple[bool, dict[str, Any]]:
    """End the request's stream as cancelled: ``(True, end)`` when this call ended it,
    ``(False, end)`` when it had already ended (finished, failed, or cancelled before)."""
    reply = CANCEL(
        client,
        keys=[keys.output_stream(topic, request_id), keys.metrics_hash(topic, "cancelled")],
        args=[request_id, int(END_RETENTION_S * 1000)],
    )
    ours, end = reply
    return bool(int(ours)), dict(json.loads(end))
