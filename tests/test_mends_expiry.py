"""Issue 14.3: one "expired" error. A caller catching ``RequestExpired`` gets it on every path
(``Client``, ``send_task(...).get()``, ``apply_async(...).get()``), also when Celery's own
``expires`` (a caller's, or fd_celery's backstop behind ``scheduler_ttl``) is what ran out,
never Celery's ``TaskRevokedError('expired')``."""

from __future__ import annotations

import time
import uuid

import pytest
from celery import states

import fd_celery
from fd_celery.errors import RequestExpired
from fd_celery.keys import output_stream
from fd_celery.local_cluster import LocalCluster
from tests.conftest import make_app, run_topic, wait_until

KWARGS = {"prompt": "too late", "max_tokens": 4}


def assert_expired(async_result) -> None:
    with pytest.raises(RequestExpired) as info:
        async_result.get(timeout=60)
    assert type(info.value) is RequestExpired, repr(info.value)
    assert "TTL" in str(info.value) or "expired" in str(info.value)
    assert async_result.state == states.FAILURE


@pytest.mark.parametrize("how", ["send_task", "apply_async"])
def test_an_expires_already_past_gives_request_expired(app, client, how):
    """``expires`` in the past: Celery's own check would revoke it on receipt."""
    if how == "send_task":
        async_result = app.send_task("fd.generate", kwargs=KWARGS, expires=-1)
    else:
        async_result = app.tasks["fd.generate"].apply_async(kwargs=KWARGS, expires=-1)
    assert_expired(async_result)
    # the request's output stream ends with the same error (what a Client would read)
    end = client.submit("still serving", max_tokens=2).result(timeout=60)
    assert end.token_ids


def test_a_caller_expires_before_the_ttl_still_serves_in_time(app):
    """The control: an ``expires`` still ahead changes nothing."""
    result = app.send_task("fd.generate", kwargs=KWARGS, expires=120).get(timeout=60)
    assert result["token_ids"]


def test_the_ttl_backstop_gives_request_expired_on_every_path(redis_server):
    """No node up for longer than ``scheduler_ttl`` plus Celery's backstop: when a node comes up,
    send_task, apply_async and Client callers all get ``RequestExpired``."""
    topic = run_topic("expiry")
    app = make_app(redis_server, scheduler_topic=topic, scheduler_ttl=1)
    sent = [
        app.send_task("fd.generate", kwargs=KWARGS),
        app.tasks["fd.generate"].apply_async(kwargs=KWARGS),
    ]
    client = fd_celery.Client(app)
    handle = client.submit("too late", max_tokens=4, request_id=f"late-{uuid.uuid4().hex[:8]}")
    # past the TTL and Celery's expires backstop of every message sent above
    from fd_celery.app import EXPIRES_BACKSTOP_GRACE_S

    past = time.time() + 1 + EXPIRES_BACKSTOP_GRACE_S + 0.5
    wait_until(lambda: time.time() > past, 30, "the backstop to run out")
    with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": topic}) as cluster:
        worker = cluster.add_worker("late")
        cluster.wait_live([worker.node], topic=topic)
        for async_result in sent:
            assert_expired(async_result)
        with pytest.raises(RequestExpired):
            handle.result(timeout=60)
        # and the node took them off its queue: the stream of each says so
        for async_result in sent:
            assert redis_server.client().exists(output_stream(topic, async_result.id))
        assert "TaskRevokedError" not in worker.log()
    client.close()
