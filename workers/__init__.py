"""Ready worker apps, one per role: ``celery -A workers.mixed worker`` (or prefill, decode).

Each is configured from the environment only: ``FD_SCHEDULER_*`` for the scheduler and its Redis
(127.0.0.1:6379 by default), ``FD_MODEL`` and ``FD_DEVICE`` for the engine.
"""

from __future__ import annotations

import os

from celery import Celery

from fd_celery import install
from fd_celery.errors import ConfigError

__all__ = ["make_app"]


def make_app(role: str) -> Celery:
    """A Celery app for a node of ``role``; ``FD_ROLE`` set in the environment wins.

    ``FD_VISIBILITY_TIMEOUT_S`` sets how long Redis waits before it gives the request of a dead
    worker to another (default: ``scheduler_ttl`` + 3600 s; it must exceed the longest request).
    """
    os.environ.setdefault("FD_ROLE", role)
    app = Celery(f"fd_celery.{role}")
    visibility = os.environ.get("FD_VISIBILITY_TIMEOUT_S", "")
    if visibility:
        try:
            seconds = float(visibility)
        except ValueError:
            raise ConfigError(f"FD_VISIBILITY_TIMEOUT_S={visibility!r} is not a number of seconds") from None
        app.conf.broker_transport_options = {"visibility_timeout": seconds}
    install(app)
    return app
