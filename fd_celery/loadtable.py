"""The global load table: which node is least loaded, kept honest by construction.

The load score of a node is ``(requests waiting in its own queue + requests it is running) /
its slots``. Every ``scheduler_sync_period`` the node publishes it from the truth: the queue length
is read by the publishing script itself (LLEN), the running count is the worker's own state. In
between, the router charges the node it picks (+1/slots) and a steal moves 1/slots from victim to
thief, so a burst spreads out before the next publication; that publication then overwrites the
score with the truth again. Nothing is ever counted up and down over time, so nothing can drift.

The table is ``scheduler_load_shards_num`` sorted sets per role (``keys.load_shard``); a node lives in
shard ``crc32(node) % N``. Readers scan every shard and ignore nodes whose heartbeat is older than
``scheduler_expire_period``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import redis

from . import keys
from .config import SchedulerConfig

__all__ = ["queue_lists", "shard_keys", "publish", "place", "PRIORITY_SUFFIXES"]

# kombu's Redis transport keeps priority p of queue q in the list q + "\x06\x16" + p, for its
# default priority steps 0, 3, 6, 9 (priority 0, the plain list, is consumed first).
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold one Celery queue, in the order kombu consumes them."""
    return [queue + suffix for suffix in PRIORITY_SUFFIXES]


def shard_keys(config: SchedulerConfig, role: str) -> list[str]:
    return [
        keys.load_shard(config.scheduler_topic, role, i) for i in range(config.scheduler_load_shards_num)
    ]


# KEYS[1] = the node's load shard (zset node -> score), KEYS[2] = nodes zset (node -> heartbeat
# ms), KEYS[3] = the node's hash (field running), KEYS[4..] = the lists of the node's own queue.
# ARGV[1] = node, ARGV[2] = requests running, ARGV[3] = slots, ARGV[4] = now (ms)
# Returns the published score (as a string: Lua would truncate a number), the waiting count, and
# 1 if the node's facts are still there (0 after Redis lost its data: the node registers again).
_PUBLISH = """
local waiting = 0
for i = 4, #KEYS do waiting = waiting + redis.call('LLEN', KEYS[i]) end
local score = (waiting + tonumber(ARGV[2])) / tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local known = redis.call('HEXISTS', KEYS[3], 'role')
redis.call('HSET', KEYS[3], 'running', ARGV[2])
return {tostring(score), waiting, known}
"""

# KEYS[1] = nodes zset, KEYS[2..] = every load shard of the roles considered
# ARGV[1] = now (ms), ARGV[2] = expire period (ms), ARGV[3] = a random integer (Lua's own
# math.random is seeded identically on every call), ARGV[4] = node hash prefix "fd:T:node:",
# ARGV[5] = blur: nodes within this much of the lowest score are equally good
# Picks at random among the live nodes with the lowest scores, charges it one request; returns
# {node, its shard key}.
_PLACE = """
local oldest = tonumber(ARGV[1]) - tonumber(ARGV[2])
local blur = tonumber(ARGV[5])
local live, best_score = {}, nil
for i = 2, #KEYS do
  local rows = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    local node, score = rows[j], tonumber(rows[j + 1])
    local beat = redis.call('ZSCORE', KEYS[1], node)
    if beat and tonumber(beat) >= oldest then
      live[#live + 1] = {node, score, KEYS[i]}
      if best_score == nil or score < best_score then best_score = score end
    end
  end
end
if best_score == nil then return false end
local band = {}
for _, c in ipairs(live) do
  if c[2] <= best_score + blur + 1e-9 then band[#band + 1] = c end
end
local pick = band[(tonumber(ARGV[3]) % #band) + 1]
local slots = tonumber(redis.call('HGET', ARGV[4] .. pick[1], 'slots') or '1') or 1
redis.call('ZINCRBY', pick[3], 1 / math.max(slots, 1), pick[1])
return {pick[1], pick[3]}
"""

_scripts: dict[tuple[int, str], redis.commands.core.Script] = {}


def _script(client: redis.Redis, source: str) -> redis.commands.core.Script:
    key = (id(client), source)
    script = _scripts.get(key)
    if script is None:
        script = _scripts[key] = client.register_script(source)
    return script


def publish(
    client: redis.Redis, config: SchedulerConfig, role: str, node: str, running: int, slots: int,
    own_queue: str,
) -> tuple[float, int, bool]:
    """Publish the node's heartbeat and its load score from the truth; returns (score, waiting,
    whether the node's facts are still registered)."""
    topic = config.scheduler_topic
    shard = keys.load_shard(topic, role, keys.shard_of(node, config.scheduler_load_shards_num))
    reply = _script(client, _PUBLISH)(
        keys=[shard, keys.nodes_zset(topic), keys.node_hash(topic, node), *queue_lists(own_queue)],
        args=[node, running, max(1, slots), int(time.time() * 1000)],
    )
    return float(reply[0]), int(reply[1]), bool(reply[2])


def place(
    client: redis.Redis, config: SchedulerConfig, roles: Sequence[str], blur: float = 0.0
) -> tuple[str, str] | None:
    """A live node of one of ``roles`` with the lowest load (at random among those within
    ``blur`` of it), charged one request: ``(node, role)``; None when none is live."""
    topic = config.scheduler_topic
    shards = [key for role in roles for key in shard_keys(config, role)]
    reply = _script(client, _PLACE)(
        keys=[keys.nodes_zset(topic), *shards],
        args=[
            int(time.time() * 1000),
            int(config.scheduler_expire_period),
            random.getrandbits(31),
            keys.node_hash(topic, ""),
            blur,
        ],
    )
    if not reply:
        return None
    node, shard = (part.decode() for part in reply)
    return node, shard.split(":")[-2]


def scores(client: redis.Redis, config: SchedulerConfig, role: str) -> dict[str, float]:
    """Every node's current score in the table (live or not), for status and tests."""
    out: dict[str, float] = {}
    pipe = client.pipeline(transaction=False)
    for shard in shard_keys(config, role):
        pipe.zrange(shard, 0, -1, withscores=True)
    for rows in pipe.execute():
        out.update({name.decode(): float(score) for name, score in rows})
    return out


def remove(client: redis.Redis, config: SchedulerConfig, role: str, nodes: Sequence[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for node in nodes:
        pipe.zrem(keys.load_shard(config.scheduler_topic, role, keys.shard_of(node, config.scheduler_load_shards_num)), node)
    pipe.execute()
