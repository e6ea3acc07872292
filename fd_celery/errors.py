"""The one error tree of fd_celery.

Every error a caller can get is an :class:`FDCeleryError`. Foreign errors (redis-py, Celery) are
turned into one of these at the edge, with ``raise X(...) from None`` where the cause adds nothing.

Each error takes a single message argument, so that Celery's JSON result backend can rebuild it
on the caller's side (it stores ``exc_type``, ``exc_module`` and ``args``): a worker raising
``InvalidRequest("max_tokens must be ...")`` reaches ``AsyncResult.get()`` as that same class.
"""

from __future__ import annotations

__all__ = [
    "FDCeleryError",
    "ConfigError",
    "InvalidRequest",
    "QueueFull",
    "RequestExpired",
    "NoNodeAvailable",
    "KVRefError",
    "ResultTimeout",
    "BrokerUnavailable",
    "WorkerError",
    "ClientClosed",
    "error_from_dict",
    "error_to_dict",
]


class FDCeleryError(Exception):
    """Base of every error that fd_celery raises to its callers."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(FDCeleryError, ValueError):
    """A configuration value is invalid, or a ``scheduler_*`` key is unknown."""


class InvalidRequest(FDCeleryError, ValueError):
    """The request itself is malformed: wrong types, empty prompt, too many tokens, ..."""


class QueueFull(FDCeleryError):
    """Admission refused: the local queue already holds ``scheduler_max_size`` requests."""


class RequestExpired(FDCeleryError):
    """The request waited longer than ``scheduler_ttl`` and was never started."""


class NoNodeAvailable(FDCeleryError):
    """No live node can take the request."""


class KVRefError(FDCeleryError):
    """A KV-cache reference is expired, tampered with, too large or of an unknown kind."""


class ResultTimeout(FDCeleryError, TimeoutError):
    """The caller's own wait (``result(timeout=...)``) ran out; the request may still finish."""


class BrokerUnavailable(FDCeleryError, ConnectionError):
    """Redis (broker, result backend or scheduler store) cannot be reached."""


class WorkerError(FDCeleryError):
    """The worker failed the request for a reason outside the caller's control."""


class ClientClosed(FDCeleryError, RuntimeError):
    """The ``Client`` was closed: it submits nothing more and follows no stream."""


def error_to_dict(exc: FDCeleryError) -> dict[str, str]:
    """An error as JSON, for the end entry of an output stream."""
    return {"type": type(exc).__name__, "message": exc.message}


def error_from_dict(data: object) -> FDCeleryError:
    """Rebuild an error written by :func:`error_to_dict`; unknown types become ``WorkerError``."""
    if not isinstance(data, dict):
        return WorkerError(f"malformed error from worker: {data!r}")
    cls = _BY_NAME.get(str(data.get("type")), WorkerError)
    return cls(str(data.get("message", "")))


_BY_NAME: dict[str, type[FDCeleryError]] = {
    name: obj
    for name, obj in list(globals().items())
    if isinstance(obj, type) and issubclass(obj, FDCeleryError)
}
