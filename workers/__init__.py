"""Ready worker apps, one per role: ``celery -A workers.mixed worker`` (or prefill, decode).

Each is configured from the environment only: ``FD_SCHEDULER_*`` for the scheduler and its Redis
(127.0.0.1:6379 by default), ``FD_MODEL`` and ``FD_DEVICE`` for the engine, and the node's knobs
(:class:`fd_celery.settings.NodeKnobs`).
"""

from __future__ import annotations

import os

from celery import Celery

from fd_celery import install
from fd_celery.settings import node_knobs

__all__ = ["make_app"]


def make_app(role: str) -> Celery:
    """A Celery app for a node of ``role``; ``FD_ROLE`` set in the environment wins.

    ``FD_VISIBILITY_TIMEOUT_S`` sets how long Redis waits before it gives the request of a dead
    worker to another (default: ``scheduler_ttl`` + 3600 s; it must exceed the longest request).
    A bad value of any knob is a ``ConfigError`` naming it, here, before the worker starts.
    """
    os.environ.setdefault("FD_ROLE", role)
    app = Celery(f"fd_celery.{role}")
    visibility_s = node_knobs().visibility_timeout_s
    if visibility_s is not None:
        app.conf.broker_transport_options = {"visibility_timeout": visibility_s}
    install(app)
    return app
