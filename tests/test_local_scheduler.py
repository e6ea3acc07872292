"""The local scheduler's two promises: a length limit at submit, and a TTL that is enforced."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest

import fd_celery
from fd_celery import keys
from fd_celery.errors import QueueFull, RequestExpired
from fd_celery.streams import EXPIRED_RETENTION_S
from tests.conftest import TOPIC, make_app, wait_until

SUBMITTERS = 4
PER_SUBMITTER = 15
MAX_SIZE = 20


def _submit_many(port: int, topic: str, count: int, barrier_at: float) -> tuple[int, int]:
    """One client process: submit ``count`` requests at once; count admitted and refused."""
    from celery import Celery

    app = Celery("submitter", set_as_current=False)
    fd_celery.install(app, scheduler_port=port, scheduler_topic=topic, scheduler_max_size=MAX_SIZE)
    client = fd_celery.Client(app)
    # The scenario, not a wait for something: every submitter starts at the same instant.
    time.sleep(max(0.0, barrier_at - time.time()))
    admitted = refused = 0
    for _ in range(count):
        try:
            client.submit("queue me", max_tokens=1)
            admitted += 1
        except QueueFull:
            refused += 1
    return admitted, refused


def test_queue_full_is_exact_with_concurrent_submitters(redis_server):
    topic = f"full-{uuid.uuid4().hex[:8]}"  # no worker consumes it: the queue only fills
    start_at = time.time() + 3.0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(SUBMITTERS) as pool:
        counts = pool.starmap(
            _submit_many, [(redis_server.port, topic, PER_SUBMITTER, start_at)] * SUBMITTERS
        )
    admitted = sum(a for a, _ in counts)
    refused = sum(r for _, r in counts)

    assert admitted == MAX_SIZE
    assert refused == SUBMITTERS * PER_SUBMITTER - MAX_SIZE
    waiting = redis_server.client().llen(keys.role_queue(topic, "mixed"))
    assert waiting == MAX_SIZE, "a refused request was enqueued anyway, or an admitted one was lost"


def test_queue_full_error_names_the_limit(redis_server):
    topic = f"full-{uuid.uuid4().hex[:8]}"
    client = fd_celery.Client(make_app(redis_server, scheduler_topic=topic, scheduler_max_size=1))
    client.submit("one", max_tokens=1)
    with pytest.raises(QueueFull, match="scheduler_max_size"):
        client.submit("two", max_tokens=1)


def test_request_that_waited_past_its_ttl_never_starts(redis_server, client, node):
    # ~2,000 tokens keep fd-tiny busy for well over the victim's TTL on a fast machine too
    # (600 tokens took 0.4 s here, less than the TTL, and the victim was served).
    blocker = client.submit("keep the only slot busy", max_tokens=2000, seed=1)
    wait_until(lambda: blocker.async_result.state == "STARTED", 60, "the blocker to start", interval_s=0.02)
    short_ttl = fd_celery.Client(make_app(redis_server, scheduler_ttl="300ms"))
    victim = short_ttl.submit("too late", max_tokens=5)

    with pytest.raises(RequestExpired, match="scheduler_ttl"):
        list(victim.stream(timeout=120))
    blocker.result(timeout=120)
    # Once the slot frees, the worker takes the victim off the queue and refuses to start it.
    with pytest.raises(RequestExpired, match="not started"):  # plain Celery sees the same error
        victim.async_result.get(timeout=30)
    with pytest.raises(RequestExpired):
        victim.result(timeout=10)

    stream_key = keys.output_stream(TOPIC, victim.request_id)
    r = redis_server.client()
    assert r.xlen(stream_key) == 1, "the expired request produced output: it was started"
    assert 0 < r.ttl(stream_key) <= EXPIRED_RETENTION_S, "the expired request's stream is kept"


def test_request_no_node_picks_up_expires_for_the_caller(redis_server):
    topic = f"nobody-{uuid.uuid4().hex[:8]}"
    client = fd_celery.Client(make_app(redis_server, scheduler_topic=topic, scheduler_ttl=1))
    handle = client.submit("nobody listens", max_tokens=3)
    started = time.monotonic()
    with pytest.raises(RequestExpired, match="not started by any node"):
        handle.result(timeout=30)
    assert time.monotonic() - started < 10
