"""The baseline of ``fd-celery bench dispatch``: a plain Celery app with a no-op task.

``BENCH_PLAIN_MATCHED=1`` gives it fd_celery's worker settings (late acks, no prefetch), so the
comparison can separate the cost of those settings from the cost of fd_celery itself.
"""

from __future__ import annotations

import os

from celery import Celery

_url = f"redis://127.0.0.1:{os.environ.get('FD_SCHEDULER_PORT', '6379')}/0"
app = Celery("plain", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=os.environ.get("BENCH_PLAIN_QUEUE", "plain"),
    broker_connection_retry_on_startup=True,
)
if os.environ.get("BENCH_PLAIN_MATCHED") == "1":
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, worker_disable_prefetch=True)


@app.task(name="plain.noop")
def noop(**kwargs: object) -> dict[str, object]:
    return {"ok": True}
