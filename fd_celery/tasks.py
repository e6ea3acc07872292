"""The fd_celery tasks. Each is a thin entry point; the work happens in :mod:`fd_celery.execution`.

``fd.generate``: one node runs prefill and decode. Every task takes keyword arguments only (the
request fields of :mod:`fd_celery.protocol`) and returns a JSON-safe result dict.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from .errors import InvalidRequest, KVRefError, NoNodeAvailable, QueueFull, RequestExpired

__all__ = ["generate", "TASK_NAMES"]

TASK_NAMES = ("fd.generate",)

_OPTIONS: dict[str, Any] = {
    "bind": True,
    "serializer": "json",
    # A request is acked when it ends, so a worker that dies mid-request gives it back.
    "acks_late": True,
    "reject_on_worker_lost": True,
    "track_started": True,
    # The caller's mistakes and expired requests are expected outcomes: logged without a traceback.
    "throws": (InvalidRequest, RequestExpired, QueueFull, NoNodeAvailable, KVRefError),
}


@shared_task(name="fd.generate", **_OPTIONS)
def generate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate text for one request on this node (prefill and decode)."""
    from .execution import run_generate

    return run_generate(self, args, kwargs)
