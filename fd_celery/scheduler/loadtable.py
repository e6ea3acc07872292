"""The global load table: which node is least loaded, kept honest by construction.

The load score of a node is ``(requests waiting in its own queue + requests it is running +
prefill tokens outstanding / PREFILL_TOKEN_UNIT) / its slots``. The token term weighs splitwise
prefill work by prompt size: each prefill placed on a node is charged in its ledger
(``keys.prefill_ledger``) until the prefill ends, or until ``scheduler_release_load_expire_period``
has passed if its end never comes (the node died with it, say). Every ``scheduler_sync_period`` the node publishes it from the truth: the queue length
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

from fd_celery import keys
from fd_celery.config import SchedulerConfig

__all__ = ["queue_lists", "shard_keys", "publish", "place", "release", "PRIORITY_SUFFIXES", "PREFILL_TOKEN_UNIT"]

#: Prompt tokens a prefill must process that weigh as much as one request in a queue.
PREFILL_TOKEN_UNIT = 256

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
# ms), KEYS[3] = the node's hash (field running), KEYS[4] = the node's prefill ledger,
# KEYS[5..] = the lists of the node's own queue.
# ARGV[1] = node, ARGV[2] = requests running, ARGV[3] = slots, ARGV[4] = now (ms),
# ARGV[5] = PREFILL_TOKEN_UNIT
# Returns the published score (as a string: Lua would truncate a number), the waiting count, and
# 1 if the node's facts are still there (0 after Redis lost its data: the node registers again).
_PUBLISH = """
local waiting = 0
for i = 5, #KEYS do waiting = waiting + redis.call('LLEN', KEYS[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
local tokens = 0
for _, entry in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  tokens = tokens + (tonumber(string.match(entry, '|(%d+)$')) or 0)
end
local score = (waiting + tonumber(ARGV[2]) + tokens / tonumber(ARGV[5])) / tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local known = redis.call('HEXISTS', KEYS[3], 'role')
redis.call('HSET', KEYS[3], 'running', ARGV[2])
return {tostring(score), waiting, known}
"""

# KEYS[1] = nodes zset, KEYS[2..] = every load shard of the roles considered
# ARGV[1] = now (ms), ARGV[2] = expire period (ms), ARGV[3] = a random integer (Lua's own
# math.random is seeded identically on every call), ARGV[4] = node hash prefix "fd:T:node:",
# ARGV[5] = blur: nodes within this much of the lowest score are equally good,
# ARGV[6] = the charge in requests (1 + prefill tokens / PREFILL_TOKEN_UNIT),
# ARGV[7] = prefill ledger prefix "fd:T:ptok:" ('' for none), ARGV[8] = ledger entry,
# ARGV[9] = its release deadline (ms)
# Picks at random among the live nodes with the lowest scores, charges it; returns
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
redis.call('ZINCRBY', pick[3], tonumber(ARGV[6]) / math.max(slots, 1), pick[1])
if ARGV[7] ~= '' then redis.call('ZADD', ARGV[7] .. pick[1], ARGV[9], ARGV[8]) end
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
        keys=[shard, keys.nodes_zset(topic), keys.node_hash(topic, node), keys.prefill_ledger(topic, node),
              *queue_lists(own_queue)],
        args=[node, running, max(1, slots), int(time.time() * 1000), PREFILL_TOKEN_UNIT],
    )
    return float(reply[0]), int(reply[1]), bool(reply[2])


def ledger_entry(request_id: str, tokens: int) -> str:
    return f"{request_id}|{max(0, int(tokens))}"


def place(
    client: redis.Redis, config: SchedulerConfig, roles: Sequence[str], blur: float = 0.0,
    prefill: tuple[str, int] | None = None,
) -> tuple[str, str] | None:
    """A live node of one of ``roles`` with the lowest load (at random among those within
    ``blur`` of it), charged one request: ``(node, role)``; None when none is live.

    ``prefill=(request id, prompt tokens)`` charges the tokens too, in the node's prefill ledger,
    until :func:`release` (the prefill ended) or ``scheduler_release_load_expire_period``."""
    topic = config.scheduler_topic
    shards = [key for role in roles for key in shard_keys(config, role)]
    now_ms = int(time.time() * 1000)
    charge, ledger, entry, release_ms = 1.0, "", "", 0
    if prefill is not None:
        charge = 1.0 + max(0, prefill[1]) / PREFILL_TOKEN_UNIT
        ledger, entry = keys.prefill_ledger(topic, ""), ledger_entry(*prefill)
        release_ms = now_ms + int(config.release_load_expire_period_s * 1000)
    reply = _script(client, _PLACE)(
        keys=[keys.nodes_zset(topic), *shards],
        args=[
            now_ms,
            int(config.scheduler_expire_period),
            random.getrandbits(31),
            keys.node_hash(topic, ""),
            blur,
            charge,
            ledger,
            entry,
            release_ms,
        ],
    )
    if not reply:
        return None
    node, shard = (part.decode() for part in reply)
    return node, shard.split(":")[-2]


def release(client: redis.Redis, config: SchedulerConfig, node: str, entry: str) -> None:
    """The prefill charged as ``entry`` to ``node`` ended: its tokens no longer weigh."""
    client.zrem(keys.prefill_ledger(config.scheduler_topic, node), entry)


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
