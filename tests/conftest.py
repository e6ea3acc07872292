"""Fixtures: a real redis-server on a free port, real ``celery worker`` processes, real model.

One Redis and one mixed worker serve the whole session (topic ``test``); tests that need their own
scheduler settings use their own topic or their own client app. Client-side settings (TTL,
``scheduler_max_size``) live in the submitting app, so most tests share the one worker.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import fd_celery
from fd_celery.local_cluster import LocalCluster, RedisServer

TOPIC = "test"

#: A well-formed ``ipc`` object of a cuda KV reference, as torch's ``_share_cuda_`` gives it
#: (base64 of 64-byte CUDA handles): for checking references where no GPU is.
CUDA_IPC: dict[str, Any] = {
    "pid": 4242, "device": 0, "handle": "QUJD" * 21 + "QQ==", "storage_bytes": 1 << 20, "storage_offset": 0,
    "counter": "/torch_4242_3141592653_0", "counter_offset": 7, "event": "RVZU" * 21 + "RQ==",
    "event_sync": True,
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    # Results still subscribed to the backend unsubscribe when collected: let them, while Redis
    # is still up, rather than in a finalizer after it is gone.
    gc.collect()
    server.stop()


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer) -> Iterator[LocalCluster]:
    """The session's cluster: one mixed worker ``w1`` (prefork, one slot) on topic ``test``."""
    with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": TOPIC}) as cluster:
        worker = cluster.add_worker("w1")
        cluster.wait_live([worker.node], topic=TOPIC)
        yield cluster


@pytest.fixture(scope="session")
def node(cluster: LocalCluster) -> str:
    return cluster.workers[0].node


def make_app(redis_server: RedisServer, **overrides: Any) -> Celery:
    """A client app of its own (its own config), on the test Redis."""
    app = Celery(f"client-{uuid.uuid4().hex[:6]}", set_as_current=False)
    overrides.setdefault("scheduler_topic", TOPIC)
    fd_celery.install(app, scheduler_port=redis_server.port, **overrides)
    return app


@pytest.fixture
def app(redis_server: RedisServer, cluster: LocalCluster) -> Celery:
    return make_app(redis_server)


@pytest.fixture
def client(app: Celery) -> fd_celery.Client:
    return fd_celery.Client(app)


@pytest.fixture
def engine() -> Any:
    """The same built-in model the workers run, in this process: the reference."""
    from fd_celery.engine import load_engine

    return load_engine("fd-tiny", "cpu")


def reference_tokens(engine: Any, prompt: str, max_tokens: int, temperature: float, seed: int) -> list[int]:
    from fd_celery.engine import SamplingParams

    tokens = []
    for token in engine.generate(engine.encode(prompt), SamplingParams(temperature, seed), max_tokens):
        if token == engine.eos_token_id:
            break
        tokens.append(token)
    return tokens


@pytest.fixture(scope="session")
def envelope_template(redis_server: RedisServer) -> dict[str, Any]:
    """A real kombu envelope for an fd.generate message, as a plain Celery producer sends it
    (the start of the raw messages that test_hostile and test_security push into queues)."""
    raw = Celery("raw-producer", broker=redis_server.url(), backend=redis_server.url(), set_as_current=False)
    raw.conf.update(task_serializer="json", accept_content=["json"])
    scratch = f"fd-scratch-{uuid.uuid4().hex[:8]}"
    raw.send_task("fd.generate", kwargs={"prompt": "template", "max_tokens": 2}, queue=scratch)
    item: Any = redis_server.client().lpop(scratch)
    raw.close()
    assert item is not None
    template = json.loads(item)
    assert template["properties"]["body_encoding"] == "base64" and template["content-type"] == "application/json"
    return template
