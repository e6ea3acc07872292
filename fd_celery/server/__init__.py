"""The front door: an OpenAI-compatible HTTP server over the cluster (``fd-celery serve``).

``create_app(celery_app, settings)`` is the ASGI app; ``fd_celery.server.cli:app_from_env`` builds
it from the environment for any ASGI server. Needs ``pip install 'fd_celery[server]'``.
"""

from fd_celery.server.app import create_app
from fd_celery.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
