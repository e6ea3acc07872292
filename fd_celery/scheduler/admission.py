"""Local scheduler admission: at most ``scheduler_max_size`` requests wait, checked atomically.

The pending set holds one ticket per admitted request that has not started yet, scored by its
deadline. Admission is one Lua script (``fd_celery/scripts/admit.lua``: drop tickets past their
deadline, count, add), so many client processes submitting at once can never push the queue over
the limit. A worker removes the ticket when the request starts. A ticket whose request was never published (the client died in
between) or never ran leaves by itself at its deadline: the count cannot drift past one TTL.
"""

from __future__ import annotations

import time
import uuid

import redis

from fd_celery.config import SchedulerConfig
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import QueueFull
from fd_celery.keys import pending_set
from fd_celery.scripts import ADMIT

__all__ = ["admit", "release"]


def admit(config: SchedulerConfig, deadline_s: float) -> str:
    """Take a place in the local queue; returns the ticket. Raises ``QueueFull`` when full."""
    client = redis_for(config)
    ticket = uuid.uuid4().hex
    now_ms = int(time.time() * 1000)
    with redis_errors(config):
        waiting = ADMIT(
            client,
            keys=[pending_set(config.scheduler_topic)],
            args=[now_ms, config.scheduler_max_size, ticket, int(deadline_s * 1000)],
        )
    if int(waiting) < 0:
        raise QueueFull(
            f"the local queue of topic {config.scheduler_topic!r} is full: "
            f"{config.scheduler_max_size} requests are waiting (scheduler_max_size)"
        )
    return ticket


def release(client: redis.Redis, config: SchedulerConfig, ticket: str) -> None:
    """The request started (or was turned away): its place is free."""
    client.zrem(pending_set(config.scheduler_topic), ticket)
