"""The node registry: who is alive in a topic, and what each node is.

A node heartbeats every ``scheduler_sync_period`` (a score in the ``nodes`` zset, epoch ms, written
with its load by :func:`fd_celery.scheduler.loadtable.publish`) and keeps its facts in its own hash. A node whose heartbeat is older than ``scheduler_expire_period``
is dead: it is not listed and not routed to, whatever its hash still says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from fd_celery.config import SchedulerConfig
from fd_celery.keys import node_hash, nodes_zset

__all__ = ["NodeInfo", "register", "unregister", "live_nodes", "is_live"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    heartbeat_age_s: float
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return str(self.facts.get("role", "?"))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.name, "heartbeat_age_s": round(self.heartbeat_age_s, 3), **self.facts}


def _now_ms() -> int:
    return int(time.time() * 1000)


def register(client: redis.Redis, config: SchedulerConfig, node: str, facts: Mapping[str, Any]) -> None:
    """Publish a node's facts and its first heartbeat."""
    topic = config.scheduler_topic
    pipe = client.pipeline(transaction=True)
    pipe.delete(node_hash(topic, node))
    pipe.hset(node_hash(topic, node), mapping={k: json.dumps(v) for k, v in facts.items()})
    pipe.zadd(nodes_zset(topic), {node: _now_ms()})
    pipe.execute()


def unregister(client: redis.Redis, config: SchedulerConfig, node: str) -> None:
    topic = config.scheduler_topic
    pipe = client.pipeline(transaction=True)
    pipe.zrem(nodes_zset(topic), node)
    pipe.delete(node_hash(topic, node))
    pipe.execute()


def live_nodes(client: redis.Redis, config: SchedulerConfig) -> list[NodeInfo]:
    """Nodes that heartbeat within ``scheduler_expire_period``, with their facts, by name."""
    topic = config.scheduler_topic
    now = _now_ms()
    oldest = now - int(config.scheduler_expire_period)
    rows: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        nodes_zset(topic), oldest, "+inf", withscores=True
    )
    names = sorted(name.decode() for name, _ in rows)
    beats = {name.decode(): score for name, score in rows}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(node_hash(topic, name))
    infos = []
    for name, raw in zip(names, pipe.execute()):
        facts = {k.decode(): json.loads(v) for k, v in raw.items()}
        infos.append(NodeInfo(name=name, heartbeat_age_s=max(0.0, (now - beats[name]) / 1000.0), facts=facts))
    return infos


def is_live(client: redis.Redis, config: SchedulerConfig, node: str) -> bool:
    score = client.zscore(nodes_zset(config.scheduler_topic), node)
    return score is not None and _now_ms() - score <= config.scheduler_expire_period
