"""The records Celery's result backend keeps for fd tasks, written by fd_celery itself.

STARTED goes out from a writer thread before any output (off the request's path, without Celery's
read-before-write); SUCCESS of a ``Client`` request goes with the stream's end entry when the
backend is the scheduler's Redis, or from a writer thread; the prefill task's SUCCESS is the KV
reference. Same keys and encoding as Celery's own, so ``AsyncResult`` reads them as usual.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from celery import states

from fd_celery.streams import Record

__all__ = ["mark_started", "write_record", "success_record", "same_redis"]


def mark_started(backend: Any, pipe: Any, task_id: str, node: str) -> None:
    """Celery's STARTED state (what ``track_started`` would store), written by a writer thread
    before any output of the request. ``NX``: it never replaces the state of a run that already
    ended (SUCCESS or FAILURE stored first) nor an earlier run's STARTED. Callers see it as
    ``AsyncResult.state``; ``RequestHandle`` counts on it to tell a request that started before
    its deadline from one that never started."""
    write_record(backend, pipe, task_id, states.STARTED, {"pid": os.getpid(), "hostname": node})


def write_record(backend: Any, pipe: Any, task_id: str, status: str, result: Any) -> None:
    """The record Celery's result backend keeps for a task in ``status``: same key, same
    encoding. On the writer's pipeline when the backend is the scheduler's Redis (the derived
    setup); on the backend's own Redis, at once, when the app chose another; through Celery's
    own ``store_result`` for a backend that is not Redis. STARTED never replaces a record (NX);
    SUCCESS is also published, for ``AsyncResult.get()`` callers waiting on the channel."""
    if not _is_redis(backend):
        backend.store_result(task_id, result, status)
        return
    key, payload = _record(backend, task_id, status, result)
    own = None if same_redis(backend, pipe) else backend.client.pipeline(transaction=False)
    target = pipe if own is None else own
    target.set(key, payload, nx=status == states.STARTED, ex=_result_expiry_s(backend))
    if status == states.SUCCESS:
        target.publish(key, payload)
    if own is not None:
        own.execute()


def _record(backend: Any, task_id: str, status: str, result: Any) -> tuple[str, bytes]:
    """The key and encoded value Celery's result backend keeps for a task in ``status`` (done
    now, for a final state)."""
    done = datetime.now(timezone.utc).isoformat() if status in states.READY_STATES else None
    meta = {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": done,
        "task_id": task_id,
    }
    return backend.get_key_for_task(task_id), backend.encode(meta)


def success_record(backend: Any, task_id: str, result: dict[str, Any]) -> Record:
    return (*_record(backend, task_id, states.SUCCESS, result), _result_expiry_s(backend))


def _is_redis(backend: Any) -> bool:
    return hasattr(backend, "client") and hasattr(backend, "get_key_for_task")


def same_redis(backend: Any, pipe: Any) -> bool:
    """Whether the result backend is Redis, and the server and database ``pipe`` talks to."""
    params = getattr(backend, "connparams", None) if _is_redis(backend) else None
    mine = pipe.connection_pool.connection_kwargs
    return isinstance(params, dict) and all(
        params.get(k) == mine.get(k) for k in ("host", "port", "path", "db")
    )


def _result_expiry_s(backend: Any) -> int:
    expires = backend.expires  # result_expires: a timedelta, seconds, or None (then a day)
    return max(1, int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires or 86400))
