"""The caller's side: submit requests through the scheduler and follow their output streams."""

from fd_celery.client.sync import Client, ClientClosed, RequestHandle

__all__ = ["Client", "RequestHandle", "ClientClosed"]
