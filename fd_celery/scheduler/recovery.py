"""The requests of a dead node go back to their queue after ``scheduler_expire_period``.

With late acks, a request that a worker held (running it, or received and about to run it) stays
in kombu's ``unacked`` hash until the worker acks it. If the worker dies, kombu puts the message
back only when the broker's visibility timeout has passed (``scheduler_ttl`` + 1 h by default, as
it must exceed the longest request). fd_celery knows sooner: a node that has not heartbeat for
``scheduler_expire_period`` is dead. So:

* every node publishes, with its heartbeat, the delivery tags of the messages it holds (the
  ``held`` field of its node hash, written when it changes);
* every node, about once a second, looks for dead nodes of its topic with a ``held`` list, claims
  the list (only one node gets it), and moves each message still in ``unacked`` back to the
  queue it came from, first in line, as kombu itself restores it (``redelivered`` set).

A request runs again from the start elsewhere; its output stream takes nothing twice, so the
caller sees no repeat. A node that was only frozen (SIGSTOP) and comes back finds its request
taken over: it finishes too, and its writes are no-ops.

A message received in the last sync period before a node died is not yet in its list. So, once
per death (the ``swept`` field of its node hash, cleared when it registers or publishes again),
the claiming node also looks through ``unacked`` for messages routed to the dead node's own
queues that no live node lists as held and that were delivered more than :data:`UNLISTED_AGE_S`
ago (or half an expire period, if shorter; a live thief that took one from the dead node's queue
has listed it by then), and moves
those back too. Messages taken from a role's shared queue carry no node: for those the
visibility timeout still holds.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from fd_celery import keys
from fd_celery.config import SchedulerConfig
from fd_celery.observability import metrics
from fd_celery.scheduler.loadtable import queue_lists
from fd_celery.scripts import RESTORE

__all__ = ["publish_held", "restore_dead_nodes", "HELD_FIELD", "INTERVAL_S"]

logger = logging.getLogger(__name__)

HELD_FIELD = "held"
SWEPT_FIELD = "swept"
INTERVAL_S = 1.0
UNLISTED_AGE_S = 1.0
_PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's Redis priority steps, one list each (loadtable.PRIORITY_SUFFIXES)


def publish_held(client: redis.Redis, config: SchedulerConfig, node: str, tags: Sequence[str]) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.node_hash(config.scheduler_topic, node), HELD_FIELD, json.dumps(sorted(tags)))
    pipe.hdel(keys.node_hash(config.scheduler_topic, node), SWEPT_FIELD)  # alive: a next death is swept
    pipe.execute()


def restore_dead_nodes(
    client: redis.Redis, config: SchedulerConfig, transport_options: Mapping[str, Any]
) -> int:
    """Requeue what dead nodes of the topic held; returns how many messages went back."""
    if transport_options.get("global_keyprefix"):
        return 0  # kombu's keys are prefixed: leave its messages to the visibility timeout
    topic = config.scheduler_topic
    oldest = int(time.time() * 1000) - int(config.scheduler_expire_period)
    rows: list[bytes] = client.zrangebyscore(keys.nodes_zset(topic), "-inf", f"({oldest}")  # type: ignore[assignment]
    dead = [name.decode() for name in rows]
    if not dead:
        return 0
    pipe = client.pipeline(transaction=False)
    for node in dead:
        pipe.hget(keys.node_hash(topic, node), HELD_FIELD)
    unacked = str(transport_options.get("unacked_key", "unacked"))
    index = str(transport_options.get("unacked_index_key", "unacked_index"))
    restored = 0
    live_held: set[str] | None = None
    for node, raw in zip(dead, pipe.execute()):
        count = 0
        if raw and raw != b"[]" and client.hdel(keys.node_hash(topic, node), HELD_FIELD):  # ours to claim
            try:
                tags = [t for t in json.loads(raw) if isinstance(t, str)]
            except ValueError:
                tags = []
            count += sum(_restore(client, topic, unacked, index, tag) for tag in tags)
        if client.hsetnx(keys.node_hash(topic, node), SWEPT_FIELD, "1"):  # once per death
            if live_held is None:
                live_held = _live_held(client, config)
            age_s = min(UNLISTED_AGE_S, config.expire_period_s / 2)
            count += _restore_unlisted(client, topic, node, unacked, index, live_held, age_s)
        if count:
            logger.warning(
                "node %s is dead (no heartbeat for %gms): %d request(s) it held are back in their queues",
                node,
                config.scheduler_expire_period,
                count,
            )
            metrics.record_given_back(client, topic, node, count)
        restored += count
    return restored


def _live_held(client: redis.Redis, config: SchedulerConfig) -> set[str]:
    """The delivery tags every live node of the topic says it holds."""
    from fd_celery.scheduler.registry import live_nodes

    held: set[str] = set()
    for info in live_nodes(client, config):
        tags = info.facts.get(HELD_FIELD)
        if isinstance(tags, list):
            held.update(t for t in tags if isinstance(t, str))
    return held


def _restore_unlisted(
    client: redis.Redis, topic: str, node: str, unacked: str, index: str, live_held: set[str], age_s: float
) -> int:
    """Messages of ``node``'s own queues still unacked, listed by no live node and delivered more
    than ``age_s`` ago: received by ``node`` after it last published its list."""
    queues = {keys.node_queue(topic, role, node) for role in keys.ROLES}
    before = time.time() - age_s
    count = 0
    for raw_tag, entry in client.hscan_iter(unacked, count=500):
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else raw_tag
        if tag in live_held:
            continue
        try:
            routing_key = json.loads(entry)[2]
        except (ValueError, TypeError, IndexError):
            continue
        if routing_key not in queues:
            continue
        delivered = client.zscore(index, tag)
        if delivered is not None and delivered < before:
            count += _restore(client, topic, unacked, index, tag)
    return count


def _restore(client: redis.Redis, topic: str, unacked: str, index: str, tag: str) -> int:
    entry = client.hget(unacked, tag)
    if entry is None:
        return 0  # acked, or restored already
    try:
        message, _exchange, routing_key = json.loads(entry)
        properties = message["properties"]
    except (ValueError, TypeError, KeyError):
        return 0
    if not isinstance(routing_key, str) or not routing_key.startswith(keys.role_queue(topic, "")):
        return 0  # not one of this topic's queues: kombu's visibility timeout handles it
    if isinstance(message.get("headers"), dict):
        message["headers"]["redelivered"] = True
    if isinstance(properties.get("delivery_info"), dict):
        properties["delivery_info"]["redelivered"] = True
    priority = properties.get("priority") or 0
    step = bisect.bisect(_PRIORITY_STEPS, priority if isinstance(priority, int) else 0) - 1
    queue = queue_lists(routing_key)[max(0, step)]
    return int(RESTORE(client, keys=[unacked, index, queue], args=[tag, entry, json.dumps(message)]))
