"""fd_celery: FastDeploy's request schedulers (local, global, splitwise) on Celery and Redis.

Public surface::

    install(app, config=None, **overrides) -> SchedulerConfig   make a Celery app an fd_celery app
    Client(app).submit(...) -> RequestHandle                       send a request
    RequestHandle.stream() / .result()                             follow it
    SchedulerConfig, GenerationResult, OutputChunk                 data
    fd_celery.errors                                               the error tree
"""

from __future__ import annotations

from fd_celery.app import install
from fd_celery.client import Client, RequestHandle
from fd_celery.config import SchedulerConfig
from fd_celery.errors import (
    BrokerUnavailable,
    ClientClosed,
    ConfigError,
    FDCeleryError,
    InvalidRequest,
    KVRefError,
    NoNodeAvailable,
    QueueFull,
    RequestExpired,
    ResultTimeout,
    WorkerError,
)
from fd_celery.protocol import GenerationResult, OutputChunk
from fd_celery.settings import get_config

__version__ = "0.1.0"

__all__ = [
    # setup
    "install",
    "get_config",
    "SchedulerConfig",
    # requests
    "Client",
    "RequestHandle",
    "GenerationResult",
    "OutputChunk",
    # errors
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
]
