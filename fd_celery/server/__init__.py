"""The front door: an OpenAI-compatible HTTP server over the cluster (``fd-celery serve``).

``create_app(celery_app, settings)`` is the ASGI app; ``fd_celery.server.cli:app_from_env`` builds
it from the environment for any ASGI server. Needs ``pip install 'fd_celery[server]'``
(Starlette and uvicorn); importing this package does not, so ``fd-celery`` can list ``serve``
without them.
"""

from __future__ import annotations

from typing import Any

from fd_celery.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from fd_celery.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
