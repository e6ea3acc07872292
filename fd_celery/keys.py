"""Every Redis key and Celery queue name fd_celery uses, in one place.

Layout (``T`` = ``scheduler_topic``; nodes of different topics share nothing)::

    fd:T:out:<request_id>   stream  one request's output: entries ``0-1``, ``0-2``, ... (seq + 1),
                                    field ``d`` = JSON chunk; the last entry of a finished
                                    request also has field ``end`` = ``1``
    fd:T:pending            zset    local scheduler admission: request id -> deadline (epoch ms)
    fd:T:nodes              zset    node name -> last heartbeat (epoch ms)
    fd:T:node:<node>        hash    node facts: role, slots, model, device, host, kv_stores, pid,
                                    started_ms; held (delivery tags) and swept (see recovery)
    fd:T:load:<role>:<i>    zset    load table: node -> load score (shard i = crc32(node) % N)
    fd:T:ptok:<node>        zset    prefill tokens charged to a node: "<request id>|<tokens>" ->
                                    release deadline (epoch ms); removed when the prefill ends
    fd:T:steals             hash    "<node>:made" / "<node>:suffered" -> steal counters
    fd:T:stolen:<req id>    string  the node a request was stolen from (expires with the TTL)
    fd:T:kv:<blob name>     string  a KV blob in the Redis store (expires with the TTL)
    fd:T:kvheld             hash    blob location -> "owner|bytes|expires|store": KV bytes nodes
                                    hold (for the cuda store also the blob's claim)
    fd:T:metrics:<name>     hash    Prometheus counters and histogram buckets, by node
    fd:T:wake:<client>:<i>  stream  wakes a client's reader thread i when it follows a new stream
    fd:T:dead               list    messages a node refused (see :mod:`fd_celery.worker.deadletter`)

Celery queues (kombu keeps each as a Redis list of the same name)::

    fd.T.<role>             the topic-wide queue of a role (``mixed``, ``prefill``, ``decode``)
    fd.T.<role>.<node>      one node's own queue
"""

from __future__ import annotations

import re

__all__ = [
    "ROLES",
    "PREFILL_ROLES",
    "DECODE_ROLES",
    "TASK_NAMES",
    "output_stream",
    "pending_set",
    "nodes_zset",
    "node_hash",
    "load_shard",
    "prefill_ledger",
    "shard_of",
    "steals_hash",
    "stolen_marker",
    "kv_blob",
    "kv_held",
    "metrics_hash",
    "wake_prefix",
    "dead_letter_list",
    "role_queue",
    "node_queue",
    "check_request_id",
]

ROLES = ("mixed", "prefill", "decode")
#: Who may run each half of a splitwise request.
PREFILL_ROLES = ("prefill", "mixed")
DECODE_ROLES = ("decode", "mixed")
#: The tasks fd_celery registers (and routes).
TASK_NAMES = ("fd.generate", "fd.prefill", "fd.decode")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def check_request_id(request_id: str) -> str:
    """Request ids end up in key names: allow a safe alphabet only (no glob or separator tricks)."""
    from fd_celery.errors import InvalidRequest

    if not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidRequest(
            f"request_id={request_id!r} is invalid; use 1-128 letters, digits, '_', '.', ':', '-'"
        )
    return request_id


def output_stream(topic: str, request_id: str) -> str:
    return f"fd:{topic}:out:{request_id}"


def pending_set(topic: str) -> str:
    return f"fd:{topic}:pending"


def nodes_zset(topic: str) -> str:
    return f"fd:{topic}:nodes"


def node_hash(topic: str, node: str) -> str:
    return f"fd:{topic}:node:{node}"


def load_shard(topic: str, role: str, shard: int) -> str:
    return f"fd:{topic}:load:{role}:{shard}"


def prefill_ledger(topic: str, node: str) -> str:
    return f"fd:{topic}:ptok:{node}"


def shard_of(node: str, shards: int) -> int:
    import zlib

    return zlib.crc32(node.encode()) % shards


def steals_hash(topic: str) -> str:
    return f"fd:{topic}:steals"


def stolen_marker(topic: str, request_id: str) -> str:
    return f"fd:{topic}:stolen:{request_id}"


def kv_blob(topic: str, name: str) -> str:
    return f"fd:{topic}:kv:{name}"


def kv_held(topic: str) -> str:
    return f"fd:{topic}:kvheld"


def metrics_hash(topic: str, name: str) -> str:
    return f"fd:{topic}:metrics:{name}"


def wake_prefix(topic: str, client_id: str) -> str:
    return f"fd:{topic}:wake:{client_id}"


def dead_letter_list(topic: str) -> str:
    return f"fd:{topic}:dead"


def role_queue(topic: str, role: str) -> str:
    return f"fd.{topic}.{role}"


def node_queue(topic: str, role: str, node: str) -> str:
    return f"fd.{topic}.{role}.{node}"
