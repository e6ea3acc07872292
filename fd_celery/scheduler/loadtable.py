"""The global load table: which node is least loaded, kept honest by construction.

The load score of a node is ``(requests waiting in its own queue + max(requests it is running,
its KV cache in use counted in requests) + prefill tokens outstanding / PREFILL_TOKEN_UNIT) / its
slots``, where a batching node's slots are the requests its engine runs at once and its KV cache
in use counts ``slots x used blocks / total blocks``. The token term weighs splitwise
prefill work by prompt size: each prefill placed on a node is charged in its ledger
(``keys.prefill_ledger``) until the prefill ends, or until ``scheduler_release_load_expire_period``
has passed if its end never comes (the node died with it, say). Every ``scheduler_sync_period``
the node publishes it from the truth: the queue length is read by the publishing script itself
(LLEN), the running count is the worker's own state. In between, the router charges the node it
picks (+1/slots) and a steal moves 1/slots from victim to thief, so a burst spreads out before the
next publication; that publication then overwrites the score with the truth again. Nothing is
ever counted up and down over time, so nothing can drift.

The table is ``scheduler_load_shards_num`` sorted sets per role (``keys.load_shard``); a node lives
in shard ``crc32(node) % N``. Readers scan every shard and ignore nodes whose heartbeat is older
than ``scheduler_expire_period``. Publication and placement are ``fd_celery/scripts/publish.lua``
and ``place.lua``; :mod:`fd_celery.scheduler.model` says, in plain Python, what a placement must
decide.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import redis

from fd_celery import keys
from fd_celery.config import SchedulerConfig
from fd_celery.scripts import PLACE, PUBLISH

__all__ = [
    "queue_lists",
    "shard_keys",
    "publish",
    "place",
    "release",
    "PRIORITY_SUFFIXES",
    "PREFILL_TOKEN_UNIT",
]

#: Prompt tokens a prefill must process that weigh as much as one request in a queue.
PREFILL_TOKEN_UNIT = 256

# kombu's Redis transport keeps priority p of queue q in the list q + "\x06\x16" + p, for its
# default priority steps 0, 3, 6, 9 (priority 0, the plain list, is consumed first).
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold one Celery queue, in the order kombu consumes them."""
    return [queue + suffix for suffix in PRIORITY_SUFFIXES]


def shard_keys(config: SchedulerConfig, role: str) -> list[str]:
    return [keys.load_shard(config.scheduler_topic, role, i) for i in range(config.scheduler_load_shards_num)]


def publish(
    client: redis.Redis,
    config: SchedulerConfig,
    role: str,
    node: str,
    running: int,
    slots: int,
    own_queue: str,
    kv_running: float = 0.0,
    kv_free_tokens: int | None = None,
) -> tuple[float, int, bool]:
    """Publish the node's heartbeat and its load score from the truth; returns (score, waiting,
    whether the node's facts are still registered). ``kv_running``: the node's KV cache in use,
    counted in requests (``slots x used blocks / total blocks``); the score takes the larger of
    it and ``running``. ``kv_free_tokens`` becomes the node's fact of that name."""
    topic = config.scheduler_topic
    shard = keys.load_shard(topic, role, keys.shard_of(node, config.scheduler_load_shards_num))
    reply = PUBLISH(
        client,
        keys=[
            shard,
            keys.nodes_zset(topic),
            keys.node_hash(topic, node),
            keys.prefill_ledger(topic, node),
            *queue_lists(own_queue),
        ],
        args=[
            node,
            running,
            max(1, slots),
            int(time.time() * 1000),
            PREFILL_TOKEN_UNIT,
            repr(float(kv_running)),
            "" if kv_free_tokens is None else int(kv_free_tokens),
        ],
    )
    return float(reply[0]), int(reply[1]), bool(reply[2])


def ledger_entry(request_id: str, tokens: int) -> str:
    return f"{request_id}|{max(0, int(tokens))}"


def place(
    client: redis.Redis,
    config: SchedulerConfig,
    roles: Sequence[str],
    blur: float = 0.0,
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
    reply = PLACE(
        client,
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
        pipe.zrem(
            keys.load_shard(
                config.scheduler_topic, role, keys.shard_of(node, config.scheduler_load_shards_num)
            ),
            node,
        )
    pipe.execute()
