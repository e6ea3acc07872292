"""The router: every ``fd.*`` message is checked, admitted and given its queue here.

Celery calls :func:`route_task` (installed in ``task_routes``) for ``Client.submit``,
``Task.apply_async`` and ``app.send_task`` alike, in the sending process, just before publishing;
so plain Celery users get the same checks, TTL and placement as the client. What the worker needs
to know about the submission travels in message headers:

- ``fd_submitted``: epoch seconds at submit (for queue time and TTFT);
- ``fd_deadline``: epoch seconds after which the request must not start (``scheduler_ttl``);
- ``fd_ticket``: the local scheduler's admission ticket, released when the request starts.

Where a request goes:

================  ==========================================================================
``node=`` given   that node's own queue (``NoNodeAvailable`` if it is not live)
local             the topic's shared queue of mixed nodes
global            the own queue of the least loaded live mixed node
splitwise         ``fd.prefill``: a prefill-capable node (prefill or mixed) chosen by load with
                  a blur band (``NoNodeAvailable`` at once when no decode-capable node is live);
                  ``fd.generate``: a mixed node (``NoNodeAvailable`` at once when none is live:
                  no prefill or decode node would ever take it); ``fd.decode`` is sent by the
                  prefill node to the decode node it chose when prefill ended
================  ==========================================================================

In local and global mode, with no node live, a request waits in its role's shared queue, which
every node of the role consumes: the first to come up takes it, within the TTL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery, current_app

from fd_celery import keys
from fd_celery.config import SchedulerConfig
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import InvalidRequest, NoNodeAvailable, QueueFull
from fd_celery.observability import metrics
from fd_celery.protocol import GenerateRequest, parse_decode_kwargs, parse_request
from fd_celery.scheduler import admission, loadtable, registry
from fd_celery.settings import get_config

__all__ = ["route_task", "PREFILL_BLUR"]
# Splitwise prefill placement: nodes within this load score of the least loaded are equally
# good, so loads a sync period old do not send a burst to one node (FastDeploy's "blur").
PREFILL_BLUR = 0.5


def route_task(
    name: str,
    args: Any,
    kwargs: Mapping[str, Any] | None,
    options: dict[str, Any],
    task: Any = None,
    **_: Any,
) -> dict[str, Any] | None:
    if name not in keys.TASK_NAMES:
        return None
    app: Celery = task.app if task is not None else current_app
    config = get_config(app)
    if name == "fd.decode":  # a continuation: already admitted, bounded by its KV reference
        decode = parse_decode_kwargs(kwargs if kwargs is not None else {})
        named = getattr(options.get("queue"), "name", options.get("queue"))  # (Celery made it a Queue)
        if isinstance(named, str) and named.endswith(f".{decode.node}"):
            queue = named  # prefill names it: its placement just saw the node live
        else:
            queue = _node_queue(config, decode.node)
        return {"queue": queue, "kwargsrepr": f"{{request_id={decode.request_id!r}}}"}
    if args:  # (a list or tuple; Celery passes () or None when there are none)
        raise InvalidRequest(
            f"{name} takes keyword arguments only (kwargs={{'prompt': ..., 'max_tokens': ...}}; "
            f'celery call {name} --kwargs \'{{"prompt": "Hi", "max_tokens": 16}}\'), '
            f"got {len(args)} positional argument(s)"
        )
    request = parse_request(kwargs if kwargs is not None else {})
    now = time.time()
    headers: dict[str, Any] = {"fd_submitted": now, "fd_deadline": now + config.ttl_s}
    queue = _queue_for(config, name, request, headers)
    if config.scheduler_name == "local" and config.scheduler_max_size > 0:
        try:
            headers["fd_ticket"] = admission.admit(config, headers["fd_deadline"])
        except QueueFull:
            metrics.record_rejected(redis_for(config), config.scheduler_topic, "QueueFull")
            raise
    # Celery lets explicit options win over a route: merge into headers the caller passed.
    if isinstance(options.get("headers"), dict):
        options["headers"].update(headers)
    return {"queue": queue, "headers": headers, "kwargsrepr": _redacted(request)}


def _queue_for(config: SchedulerConfig, name: str, request: GenerateRequest, headers: dict[str, Any]) -> str:
    if request.node is not None:
        return _node_queue(config, request.node)
    topic = config.scheduler_topic
    if config.scheduler_name == "local":
        return keys.role_queue(topic, "mixed")
    roles: tuple[str, ...] = ("mixed",)
    blur, prefill = 0.0, None
    if config.scheduler_name == "splitwise" and name == "fd.prefill":
        roles, blur = keys.PREFILL_ROLES, PREFILL_BLUR
        _require_live(config, keys.DECODE_ROLES, "decode")
        # Weigh the prefill by its prompt (token ids, or UTF-8 bytes as the estimate for text).
        prefill = (
            uuid.uuid4().hex,
            len(request.token_ids)
            if request.token_ids is not None
            else len((request.prompt or "").encode("utf-8", "replace")),
        )
    elif config.scheduler_name == "splitwise":  # fd.generate: one node runs both halves
        _require_live(
            config,
            ("mixed",),
            "mixed",
            hint="; in a splitwise cluster fd.generate runs on a mixed node only: send fd.prefill "
            "(as Client.submit does) to split it across prefill and decode nodes",
        )
    with redis_errors(config):
        placed = loadtable.place(redis_for(config), config, roles, blur, prefill=prefill)
    if placed is None:
        return keys.role_queue(topic, roles[0])
    node, role = placed
    if prefill is not None:  # the prefill task releases it when it ends
        headers["fd_charge"] = [node, loadtable.ledger_entry(*prefill)]
    return keys.node_queue(topic, role, node)


def _require_live(config: SchedulerConfig, roles: tuple[str, ...], what: str, hint: str = "") -> None:
    """Fail at submit, not after prefill (or never), when no node could finish the request."""
    with redis_errors(config):
        nodes = registry.live_nodes(redis_for(config), config)
    if not any(node.role in roles for node in nodes):
        metrics.record_rejected(redis_for(config), config.scheduler_topic, "NoNodeAvailable")
        raise NoNodeAvailable(
            f"no live {what} node ({' or '.join(roles)}) in topic {config.scheduler_topic!r}{hint}"
        )


def _node_queue(config: SchedulerConfig, node: str) -> str:
    """The own queue of a live node, whatever its role."""
    topic = config.scheduler_topic
    client = redis_for(config)
    with redis_errors(config):
        live = registry.is_live(client, config, node)
        role = client.hget(keys.node_hash(topic, node), "role") if live else None
    if not live or role is None:
        raise NoNodeAvailable(f"node {node!r} is not live in topic {topic!r}")
    return keys.node_queue(topic, json.loads(role), node)


def _redacted(request: GenerateRequest) -> str:
    """What Celery logs and Flower show as the kwargs: sizes, never the prompt text."""
    size = (
        f"prompt=<{len(request.prompt)} chars>"
        if request.prompt is not None
        else f"token_ids=<{len(request.token_ids or ())} ids>"
    )
    extra = f", node={request.node!r}" if request.node else ""
    return f"{{{size}, max_tokens={request.max_tokens}, temperature={request.temperature}{extra}}}"
