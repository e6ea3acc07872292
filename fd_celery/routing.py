"""The router: every ``fd.*`` message is checked, admitted and given its queue here.

Celery calls :func:`route_task` (installed in ``task_routes``) for ``Client.submit``,
``Task.apply_async`` and ``app.send_task`` alike, in the caller's process, just before publishing;
so plain Celery users get the same checks, TTL and placement as the client. What the worker needs
to know about the submission travels in message headers:

- ``fd_submitted``: epoch seconds at submit (for queue time and TTFT);
- ``fd_deadline``: epoch seconds after which the request must not start (``scheduler_ttl``);
- ``fd_ticket``: the local scheduler's admission ticket, released when the request starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, current_app

from . import admission, keys, loadtable, registry
from .app import get_config
from .connection import redis_errors, redis_for
from .errors import NoNodeAvailable
from .protocol import GenerateRequest, parse_request

__all__ = ["route_task", "FD_TASK_NAMES"]

FD_TASK_NAMES = frozenset({"fd.generate"})


def route_task(
    name: str,
    args: Any,
    kwargs: Mapping[str, Any] | None,
    options: dict[str, Any],
    task: Any = None,
    **_: Any,
) -> dict[str, Any] | None:
    if name not in FD_TASK_NAMES:
        return None
    app: Celery = task.app if task is not None else current_app
    config = get_config(app)
    request = parse_request(kwargs if kwargs is not None else {})
    now = time.time()
    headers: dict[str, Any] = {"fd_submitted": now, "fd_deadline": now + config.ttl_s}
    queue = _queue_for(app, request)
    if config.scheduler_name == "local" and config.scheduler_max_size > 0:
        headers["fd_ticket"] = admission.admit(config, headers["fd_deadline"])
    # Celery lets explicit options win over a route: merge into headers the caller passed.
    if isinstance(options.get("headers"), dict):
        options["headers"].update(headers)
    return {"queue": queue, "headers": headers, "kwargsrepr": _redacted(request)}


def _queue_for(app: Celery, request: GenerateRequest) -> str:
    """``node=``: that node's own queue. Local: the topic's shared queue, which every node
    consumes. Global: the own queue of the least loaded live node; with no node live, the shared
    queue, which the first node to come up drains (the request waits within its TTL)."""
    config = get_config(app)
    topic = config.scheduler_topic
    if request.node is not None:
        with redis_errors(config):
            live = registry.is_live(redis_for(config), config, request.node)
        if not live:
            raise NoNodeAvailable(f"node {request.node!r} is not live in topic {topic!r}")
        return keys.node_queue(topic, "mixed", request.node)
    if config.scheduler_name == "global":
        with redis_errors(config):
            node = loadtable.place(redis_for(config), config, "mixed")
        if node is not None:
            return keys.node_queue(topic, "mixed", node)
    return keys.role_queue(topic, "mixed")


def _redacted(request: GenerateRequest) -> str:
    """What Celery logs and Flower show as the kwargs: sizes, never the prompt text."""
    size = (
        f"prompt=<{len(request.prompt)} chars>"
        if request.prompt is not None
        else f"token_ids=<{len(request.token_ids or ())} ids>"
    )
    extra = f", node={request.node!r}" if request.node else ""
    return f"{{{size}, max_tokens={request.max_tokens}, temperature={request.temperature}{extra}}}"
