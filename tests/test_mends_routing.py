"""Issue 14.4: ``fd.generate`` in a splitwise cluster with no mixed node is refused at once with
``NoNodeAvailable`` (it used to be accepted and wait for ever), on every way in: ``send_task``,
``apply_async`` and ``celery call``; with a mixed node live it is served."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fd_celery.errors import NoNodeAvailable
from fd_celery.keys import role_queue
from fd_celery.local_cluster import LocalCluster
from tests.conftest import make_app, run_topic

KWARGS = {"prompt": "one node for both halves", "max_tokens": 3}
REFUSED_WITHIN_S = 2.0  # "at once": one registry read, not a wait


def queued(redis_server, topic: str) -> int:
    client = redis_server.client()
    return sum(int(client.llen(key)) for key in client.keys(f"*{topic}*") if client.type(key) == b"list")


def assert_refused(app, redis_server, topic: str) -> None:
    for send in (
        lambda: app.send_task("fd.generate", kwargs=KWARGS),
        lambda: app.tasks["fd.generate"].apply_async(kwargs=KWARGS),
    ):
        started = time.monotonic()
        with pytest.raises(NoNodeAvailable) as info:
            send()
        assert time.monotonic() - started < REFUSED_WITHIN_S
        message = str(info.value)
        assert "no live mixed node" in message and repr(topic) in message
        assert "fd.prefill" in message  # what to send instead
    assert queued(redis_server, topic) == 0, "a refused request was published"


def test_no_node_at_all_refuses_generate_at_once(redis_server):
    topic = run_topic("sw-nomixed-empty")
    app = make_app(redis_server, scheduler_topic=topic, scheduler_name="splitwise")
    assert_refused(app, redis_server, topic)
    assert not redis_server.client().llen(role_queue(topic, "mixed"))


def test_celery_call_of_generate_in_a_splitwise_cluster_says_why(redis_server):
    topic = run_topic("sw-nomixed-call")
    env = {
        **os.environ,
        "FD_SCHEDULER_PORT": str(redis_server.port),
        "FD_SCHEDULER_TOPIC": topic,
        "FD_SCHEDULER_NAME": "splitwise",
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.mixed", "call", "fd.generate"]
        + ["--kwargs", '{"prompt": "hi", "max_tokens": 4}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: NoNodeAvailable: no live mixed node"), done.stderr
    assert queued(redis_server, topic) == 0


def test_split_pair_without_mixed_node_refuses_generate_and_a_mixed_node_serves_it(redis_server):
    topic = run_topic("sw-nomixed")
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "splitwise"}
    with LocalCluster(redis_server, env=env) as cluster:
        cluster.add_split_pair(topic)
        app = make_app(redis_server, scheduler_topic=topic, scheduler_name="splitwise")
        assert_refused(app, redis_server, topic)
        # the split path itself works in this cluster
        split = app.send_task("fd.prefill", kwargs=KWARGS).get(timeout=120)
        assert split
        mixed = cluster.add_worker("mm")
        cluster.wait_live([mixed.node], topic=topic)
        result = app.send_task("fd.generate", kwargs=KWARGS).get(timeout=120)
        assert result["served_by"] == [mixed.node]
