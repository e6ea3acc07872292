"""Work stealing: an idle node takes the oldest waiting request of a busy (or dead) node.

One Lua script (``fd_celery/scripts/steal.lua``) does the whole decision and the move atomically:
check that the thief's own queue is empty, pick a victim, LMOVE one message from the victim's
queue into the thief's, move the load (1/slots) from victim to thief, count the steal and mark the
request as stolen. The message keeps kombu's bookkeeping: kombu records a message as unacked only
when a consumer receives it, so the thief's BRPOP takes it like any message of its own. If the
thief dies before acking, kombu gives it back (after the visibility timeout) to the queue in its
routing key, the victim's queue, where live nodes steal it again if the victim is dead or busy.
:mod:`fd_celery.scheduler.model` says, in plain Python, what that decision must be.

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
from fd_celery.scripts import STEAL

__all__ = ["Steal", "steal_one", "stolen_from", "Thief", "WorkerView"]

logger = logging.getLogger(__name__)

TOP_CANDIDATES = 3  # thieves spread over the few most loaded victims, not all on the top one
MIN_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.2
IN_TRANSIT_TIMEOUT_S = 1.0  # a stolen message reaches our consumer well within this
FORGET_DEAD_MARGIN_S = 60.0  # beyond the visibility timeout plus kombu's restore sweep


@dataclass(frozen=True)
class Steal:
    victim: str
    request_id: str
    orphan: bool  # the victim was dead: its queue had no owner
    victim_score: float


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
    topic = config.scheduler_topic
    thief_shard = keys.load_shard(topic, role, keys.shard_of(thief, config.scheduler_load_shards_num))
    reply = STEAL(
        client,
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
            TOP_CANDIDATES,
            *PRIORITY_SUFFIXES,
        ],
    )
    if not reply:
        return None
    victim, request_id, orphan, score = reply
    return Steal(victim.decode(), request_id.decode(), bool(orphan), float(score))


def stolen_from(client: redis.Redis, config: SchedulerConfig, request_id: str) -> tuple[str, float] | None:
    """(victim, when the thief became idle, epoch s) if this request was stolen, else None."""
    raw: bytes | None = client.get(keys.stolen_marker(config.scheduler_topic, request_id))  # type: ignore[assignment]
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
                steal = steal_one(
                    self.client,
                    self.config,
                    self.role,
                    self.node,
                    int(idle_since * 1000),
                    self.forget_dead_after_s,
                    busy,
                )
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
            logger.info(
                "stole request %s from %s%s (load %.2f)",
                steal.request_id,
                steal.victim,
                " (dead)" if steal.orphan else "",
                steal.victim_score,
            )
            in_transit = (steal.request_id, started_before, now + IN_TRANSIT_TIMEOUT_S)
            idle_since, backoff_s, next_try = None, MIN_BACKOFF_S, now
