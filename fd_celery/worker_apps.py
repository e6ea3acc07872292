"""Worker apps configured from the environment alone (what ``workers/`` and docker use)."""

from __future__ import annotations

import os

from celery import Celery

from .app import install

__all__ = ["make_app"]


def make_app(role: str) -> Celery:
    """A Celery app for a node of ``role``; ``FD_ROLE`` set in the environment wins."""
    os.environ.setdefault("FD_ROLE", role)
    app = Celery(f"fd_celery.{role}")
    install(app)
    return app
