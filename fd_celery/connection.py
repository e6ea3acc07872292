"""The scheduler's own Redis connection, and the edge where redis-py errors become ours."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import redis

from fd_celery.config import SchedulerConfig
from fd_celery.errors import BrokerUnavailable

__all__ = ["SOCKET_TIMEOUT_S", "BLOCK_MS", "redis_for", "redis_errors"]

# Blocking reads (XREAD BLOCK) wait at most BLOCK_MS; the socket timeout must stay above it, or
# redis-py 8's default of 5 s would turn a long block into a TimeoutError.
BLOCK_MS = 1000
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

_clients: dict[tuple[int, str, str], redis.Redis] = {}
_lock = threading.Lock()


def redis_for(config: SchedulerConfig, url: str | None = None) -> redis.Redis:
    """One shared client per process and Redis URL (pools are not shared across a fork)."""
    url = url or config.redis_url
    key = (os.getpid(), url, config.redacted_url())
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=SOCKET_TIMEOUT_S,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    health_check_interval=30,
                    decode_responses=False,
                )
                _clients[key] = client
    return client


@contextlib.contextmanager
def redis_errors(config: SchedulerConfig) -> Iterator[None]:
    """Turn redis-py connection and timeout errors into ``BrokerUnavailable`` naming the host
    (never the password)."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(
            f"Redis at {config.redacted_url()} refused the password: {type(exc).__name__}"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"Redis at {config.redacted_url()} is unreachable: {exc}") from None
