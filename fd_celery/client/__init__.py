"""The caller's side: submit requests through the scheduler and follow their output streams."""

from fd_celery.client.sync import Client, RequestHandle
from fd_celery.errors import ClientClosed

__all__ = ["Client", "RequestHandle", "ClientClosed"]
