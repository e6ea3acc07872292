"""Every Redis key and Celery queue name fd_celery uses, in one place.

Layout (``T`` = ``scheduler_topic``; nodes of different topics share nothing)::

    fd:T:out:<request_id>   stream  one request's output: entries ``0-1``, ``0-2``, ... (seq + 1),
                                    field ``d`` = JSON chunk; the last entry of a finished
                                    request also has field ``end`` = ``1``
    fd:T:pending            zset    local scheduler admission: request id -> deadline (epoch ms)
    fd:T:nodes              zset    node name -> last heartbeat (epoch ms)
    fd:T:node:<node>        hash    node facts: role, slots, model, device, host, pid, started_ms

Celery queues (kombu keeps each as a Redis list of the same name)::

    fd.T.<role>             the topic-wide queue of a role (``mixed``, ``prefill``, ``decode``)
    fd.T.<role>.<node>      one node's own queue
"""

from __future__ import annotations

import re

__all__ = [
    "ROLES",
    "output_stream",
    "pending_set",
    "nodes_zset",
    "node_hash",
    "role_queue",
    "node_queue",
    "check_request_id",
]

ROLES = ("mixed", "prefill", "decode")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def check_request_id(request_id: str) -> str:
    """Request ids end up in key names: allow a safe alphabet only (no glob or separator tricks)."""
    from .errors import InvalidRequest

    if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
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


def role_queue(topic: str, role: str) -> str:
    return f"fd.{topic}.{role}"


def node_queue(topic: str, role: str, node: str) -> str:
    return f"fd.{topic}.{role}.{node}"
