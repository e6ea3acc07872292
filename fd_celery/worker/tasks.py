"""The fd_celery tasks. Each is a thin entry point; the work happens in :mod:`fd_celery.worker.generate`,
:mod:`~fd_celery.worker.prefill` and :mod:`~fd_celery.worker.decode`.

``fd.generate``: one node runs prefill and decode. ``fd.prefill`` and ``fd.decode``: the two
halves of a splitwise request, on different nodes. Every task takes keyword arguments only (the
request fields of :mod:`fd_celery.protocol`) and returns a JSON-safe result dict.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from fd_celery.errors import InvalidRequest, KVRefError, NoNodeAvailable, QueueFull, RequestExpired
from fd_celery.worker.decode import run_decode
from fd_celery.worker.generate import run_generate
from fd_celery.worker.prefill import run_prefill

__all__ = ["generate", "prefill", "decode"]

_OPTIONS: dict[str, Any] = {
    "bind": True,
    "serializer": "json",
    # A request is acked when it ends, so a worker that dies mid-request gives it back.
    "acks_late": True,
    "reject_on_worker_lost": True,
    # Client.submit sends ignore_result (fd_celery stores the SUCCESS record off the request's
    # path, see fd_celery.worker.run.guarded); failures are still stored by Celery.
    "store_errors_even_if_ignored": True,
    # STARTED is recorded by fd_celery itself (fd_celery.worker.run.Run.open): off the request's path,
    # without Celery's read-before-write and result-channel publish.
    "track_started": False,
    # The caller's mistakes and expired requests are expected outcomes: logged without a traceback.
    "throws": (InvalidRequest, RequestExpired, QueueFull, NoNodeAvailable, KVRefError),
}


class FDTask(Task):
    """The base of fd tasks: a request field named ``self`` would collide with Celery's own
    ``Task.__call__(self, ...)`` before any check of ours ran; refuse it here, clearly. A message
    whose body Celery could not unpack is refused before Celery tries (the strategy)."""

    Strategy = "fd_celery.worker.deadletter:guarded_strategy"

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        if "self" in kwargs:
            raise InvalidRequest("unknown request field(s) ['self']")
        return super().__call__(*args, **kwargs)


_OPTIONS["base"] = FDTask


@shared_task(name="fd.generate", **_OPTIONS)
def generate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate text for one request on this node (prefill and decode)."""
    return run_generate(self, args, kwargs)


@shared_task(name="fd.prefill", **_OPTIONS)
def prefill(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Splitwise, first half: build the KV cache here and hand it to a decode node. The result
    (in the backend) is the KV reference, never tensor data."""
    return run_prefill(self, args, kwargs)


@shared_task(name="fd.decode", **_OPTIONS)
def decode(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Splitwise, second half: resolve the KV reference and generate the rest here."""
    return run_decode(self, args, kwargs)
