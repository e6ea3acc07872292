"""Local scheduler admission: at most ``scheduler_max_size`` requests wait, checked atomically.

The pending set holds one ticket per admitted request that has not started yet, scored by its
deadline. Admission is one Lua script (drop tickets past their deadline, count, add), so many
client processes submitting at once can never push the queue over the limit. A worker removes the
ticket when the request starts. A ticket whose request was never published (the client died in
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

__all__ = ["admit", "release"]

# KEYS[1] = pending set (zset: ticket -> deadline, epoch ms)
# ARGV[1] = now (ms), ARGV[2] = max size, ARGV[3] = ticket, ARGV[4] = deadline (ms)
# Returns the number waiting before this one when admitted, or -1 when full.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) - tonumber(ARGV[1]) then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])  -- the set outlives its last ticket, no longer
end
return waiting
"""

_scripts: dict[int, redis.commands.core.Script] = {}


def admit(config: SchedulerConfig, deadline_s: float) -> str:
    """Take a place in the local queue; returns the ticket. Raises ``QueueFull`` when full."""
    client = redis_for(config)
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_ADMIT)
    ticket = uuid.uuid4().hex
    now_ms = int(time.time() * 1000)
    with redis_errors(config):
        waiting = script(
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
