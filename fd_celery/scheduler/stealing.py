"""Work stealing: an idle node takes the oldest waiting request of a busy (or dead) node.

One Lua script does the whole decision and the move atomically: check that the thief's own queue
is empty, pick a victim, LMOVE one message from the victim's queue into the thief's, move the load
(1/slots) from victim to thief, count the steal and mark the request as stolen. The message keeps
kombu's bookkeeping: kombu records a message as unacked only when a consumer receives it, so the
thief's BRPOP takes it like any message of its own. If the thief dies before acking, kombu gives
it back (after the visibility timeout) to the queue in its routing key, the victim's queue, where
live nodes steal it again if the victim is dead or busy.

The decision lives in the script; :class:`Thief` only decides *when* to ask: whenever the node
has a free slot, at once after it becomes idle, then with exponential backoff while nothing is
there to steal, so an idle cluster costs Redis a few calls per second per node.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

from fd_celery import keys
from fd_celery.config import SchedulerConfig
from fd_celery.scheduler.loadtable import PRIORITY_SUFFIXES, shard_keys

__all__ = ["Steal", "steal_one", "stolen_from", "Thief", "WorkerView"]

logger = logging.getLogger(__name__)

TOP_CANDIDATES = 3  # thieves spread over the few most loaded victims, not all on the top one
MIN_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.2
IN_TRANSIT_TIMEOUT_S = 1.0  # a stolen message reaches our consumer well within this
FORGET_DEAD_MARGIN_S = 60.0  # beyond the visibility timeout plus kombu's restore sweep

# KEYS[1] = nodes zset (node -> heartbeat ms)    KEYS[2] = steals hash (counters)
# KEYS[3] = the thief's load shard                KEYS[4..] = every load shard of the role
#           (zset node -> load score)
# ARGV[1] = thief, ARGV[2] = now ms, ARGV[3] = expire period ms, ARGV[4] = min load score,
# ARGV[5] = random integer, ARGV[6] = node queue prefix "fd.T.<role>." (a node's queue is the
# prefix + its name; its lists are that + a priority suffix), ARGV[7] = stolen marker prefix,
# ARGV[8] = marker TTL s, ARGV[9] = node hash prefix, ARGV[10] = when the thief became idle (ms),
# ARGV[11..] = priority suffixes, in kombu's consume order.
# Returns false, or {victim, request id, 1 if the victim is dead else 0, victim's score}.
_STEAL = """
local thief, now, oldest = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[2]) - tonumber(ARGV[3])
local min_score, prefix = tonumber(ARGV[4]), ARGV[6]
local suffixes = {}
for i = 13, #ARGV do suffixes[#suffixes + 1] = ARGV[i] end
local forget_before = now - tonumber(ARGV[11])
for _, sfx in ipairs(suffixes) do
  if redis.call('LLEN', prefix .. thief .. sfx) > 0 then return false end
end
local cands = {}
for i = 4, #KEYS do
  local rows = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    local node, score = rows[j], tonumber(rows[j + 1])
    if node ~= thief then
      local beat = redis.call('ZSCORE', KEYS[1], node)
      local dead = (not beat) or tonumber(beat) < oldest
      if dead or score >= min_score then
        local first, waiting = nil, 0
        for _, sfx in ipairs(suffixes) do
          local n = redis.call('LLEN', prefix .. node .. sfx)
          if n > 0 and not first then first = sfx end
          waiting = waiting + n
        end
        -- A live node keeps what it can start itself: only requests beyond its free slots
        -- (slots - running) can be stolen, so a request just stolen is not stolen again.
        local free = 0
        if not dead then
          local facts = redis.call('HMGET', ARGV[9] .. node, 'slots', 'running')
          free = math.max(0, (tonumber(facts[1]) or 1) - (tonumber(facts[2]) or 0))
        end
        if first and waiting > free then
          cands[#cands + 1] = {node, first, score, dead, KEYS[i]}
        end
        if dead and not first and (not beat or tonumber(beat) < forget_before) then
          redis.call('ZREM', KEYS[i], node)
        end
      end
    end
  end
end
if #cands == 0 then return false end
table.sort(cands, function(a, b)
  if a[4] ~= b[4] then return a[4] end
  return a[3] > b[3]
end)
local c = cands[(tonumber(ARGV[5]) % math.min(3, #cands)) + 1]
local msg = redis.call('LMOVE', prefix .. c[1] .. c[2], prefix .. thief .. c[2], 'RIGHT', 'RIGHT')
if not msg then return false end
local function slots(node)
  return math.max(1, tonumber(redis.call('HGET', ARGV[9] .. node, 'slots') or '1') or 1)
end
redis.call('ZINCRBY', c[5], -1 / slots(c[1]), c[1])
redis.call('ZINCRBY', KEYS[3], 1 / slots(thief), thief)
-- The thief's running count as of now: the request in its queue is one it can start at once,
-- so no other thief may take it before the next heartbeat says so.
redis.call('HSET', ARGV[9] .. thief, 'running', ARGV[12])
redis.call('HINCRBY', KEYS[2], thief .. ':made', 1)
redis.call('HINCRBY', KEYS[2], c[1] .. ':suffered', 1)
local ok, decoded = pcall(cjson.decode, msg)
local id = ''
if ok and type(decoded) == 'table' and type(decoded.headers) == 'table'
   and type(decoded.headers.id) == 'string' then
  id = decoded.headers.id
  redis.call('SET', ARGV[7] .. id, c[1] .. '|' .. ARGV[10], 'EX', ARGV[8])
end
return {c[1], id, c[4] and 1 or 0, tostring(c[3])}
"""


@dataclass(frozen=True)
class Steal:
    victim: str
    request_id: str
    orphan: bool  # the victim was dead: its queue had no owner
    victim_score: float


_scripts: dict[int, redis.commands.core.Script] = {}


def steal_one(
    client: redis.Redis,
    config: SchedulerConfig,
    role: str,
    thief: str,
    idle_since_ms: int,
    forget_dead_after_s: float,
    running: int,
) -> Steal | None:
    """Try once: move one waiting request from a victim's queue into ``thief``'s."""
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_STEAL)
    topic = config.scheduler_topic
    thief_shard = keys.load_shard(topic, role, keys.shard_of(thief, config.scheduler_load_shards_num))
    reply = script(
        keys=[keys.nodes_zset(topic), keys.steals_hash(topic), thief_shard, *shard_keys(config, role)],
        args=[
            thief,
            int(time.time() * 1000),
            int(config.scheduler_expire_period),
            config.scheduler_min_load_score,
            random.getrandbits(31),
            keys.node_queue(topic, role, ""),
            keys.stolen_marker(topic, ""),
            max(1, int(config.ttl_s)),
            keys.node_hash(topic, ""),
            idle_since_ms,
            int(forget_dead_after_s * 1000),
            running,
            *PRIORITY_SUFFIXES,
        ],
    )
    if not reply:
        return None
    victim, request_id, orphan, score = reply
    return Steal(victim.decode(), request_id.decode(), bool(orphan), float(score))


def stolen_from(client: redis.Redis, config: SchedulerConfig, request_id: str) -> tuple[str, float] | None:
    """(victim, when the thief became idle, epoch s) if this request was stolen, else None."""
    raw = client.get(keys.stolen_marker(config.scheduler_topic, request_id))
    if raw is None:
        return None
    victim, _, idle_ms = raw.decode().rpartition("|")
    return victim, int(idle_ms) / 1000.0


class WorkerView(Protocol):
    """What the thief needs to know about its own worker (its main process state)."""

    def held(self) -> int:
        """Requests the worker holds now: running, or received and about to run."""

    def arrived(self, request_id: str, started_before: int) -> bool:
        """Whether ``request_id`` has reached the worker (or any request started since the
        worker's started-count was ``started_before``)."""

    def started_count(self) -> int:
        """Requests started so far (a counter that only grows)."""


class Thief:
    """The stealing loop of one node, in the worker's main process."""

    def __init__(
        self,
        client: redis.Redis,
        config: SchedulerConfig,
        role: str,
        node: str,
        slots: int,
        worker: WorkerView,
        visibility_timeout_s: float,
    ) -> None:
        self.client, self.config, self.role, self.node = client, config, role, node
        self.forget_dead_after_s = visibility_timeout_s + FORGET_DEAD_MARGIN_S
        self.slots = slots
        self.worker = worker
        self.steals_made = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd-thief", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        poll_s = min(self.config.sync_period_s, MIN_BACKOFF_S)
        backoff_s, next_try = MIN_BACKOFF_S, 0.0
        idle_since: float | None = None
        last_busy = self.slots
        in_transit: tuple[str, int, float] | None = None  # (request id, started count, give up at)
        while not self._stop.wait(poll_s):
            now = time.monotonic()
            if in_transit is not None:
                # The stolen message is in our queue but our consumer may not have it yet: no
                # second steal until it arrives, or a free slot would be filled twice.
                request_id, started_before, give_up_at = in_transit
                if not self.worker.arrived(request_id, started_before) and now < give_up_at:
                    continue
                in_transit = None
            busy = self.worker.held()
            if busy >= self.slots:
                idle_since, backoff_s = None, MIN_BACKOFF_S
                last_busy = busy
                continue
            if idle_since is None or busy < last_busy:  # a slot just came free: look at once
                idle_since, backoff_s, next_try = time.time(), MIN_BACKOFF_S, now
            last_busy = busy
            if now < next_try:
                continue
            started_before = self.worker.started_count()
            try:
                steal = steal_one(self.client, self.config, self.role, self.node,
                                  int(idle_since * 1000), self.forget_dead_after_s, busy)
            except redis.RedisError as exc:
                logger.warning("steal attempt failed: %s", exc)
                next_try = now + MAX_BACKOFF_S
                continue
            if steal is None:
                # Nothing was stealable until now: a later steal's reaction counts from here.
                idle_since = time.time()
                next_try = now + backoff_s
                backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
                continue
            self.steals_made += 1
            logger.info("stole request %s from %s%s (load %.2f)", steal.request_id, steal.victim,
                        " (dead)" if steal.orphan else "", steal.victim_score)
            in_transit = (steal.request_id, started_before, now + IN_TRANSIT_TIMEOUT_S)
            idle_since, backoff_s, next_try = None, MIN_BACKOFF_S, now
