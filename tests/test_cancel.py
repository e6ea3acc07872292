"""Cancelling a request stops it wherever it is, frees its KV on every node that held it, and
ends its stream with finish_reason "cancelled"; a queued request that is cancelled never starts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import fd_celery
from fd_celery import keys
from fd_celery.local_cluster import LocalCluster, RedisServer
from tests.conftest import make_app, reference_tokens, run_topic, wait_until

MIXED = run_topic("cancel-mixed")
SPLIT = run_topic("cancel-split")


def _engine_of(app, node: str) -> dict:
    replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
    return replies.get(node, {}).get("fd", {}).get("engine") or {}


def _idle(app, node: str) -> bool:
    engine = _engine_of(app, node)
    return bool(engine) and engine["running"] == 0 and engine["free_blocks"] == engine["total_blocks"]


@pytest.fixture(scope="module")
def mixed(redis_server: RedisServer) -> Iterator[str]:
    """One batching node with room for one sequence at a time."""
    with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": MIXED, "FD_MAX_NUM_SEQS": "1"}) as cluster:
        worker = cluster.add_worker("cm", pool="threads", concurrency=2)
        cluster.wait_live([worker.node], topic=MIXED)
        yield worker.node


def test_cancel_mid_stream_stops_the_request_and_frees_its_kv(mixed, redis_server, engine):
    app = make_app(redis_server, scheduler_topic=MIXED)
    with fd_celery.Client(app) as client:
        handle = client.submit("cancel me while I decode", max_tokens=2000, seed=5, temperature=0.9)
        seen = []
        for chunk in handle.stream(timeout=60):
            seen.extend(chunk.token_ids)
            if len(seen) >= 5:
                break
        assert handle.cancel() is True
        assert handle.cancel() is False, "a second cancel found the stream still open"
        result = handle.result(timeout=30)
        assert result.finish_reason == "cancelled"
        expected = reference_tokens(engine, "cancel me while I decode", 2000, 0.9, 5)
        assert list(result.token_ids) == expected[: len(result.token_ids)] and len(result.token_ids) >= 5
        wait_until(lambda: _idle(app, mixed), 30, "the node freeing the cancelled request's KV")
        # the node serves on, exactly
        after = client.submit("after the cancel", max_tokens=8, seed=1).result(timeout=60)
        assert list(after.token_ids) == reference_tokens(engine, "after the cancel", 8, 0.0, 1)
    counted = redis_server.client().hget(keys.metrics_hash(MIXED, "cancelled"), "requests")
    assert counted is not None and int(counted) >= 1


def test_a_queued_request_that_is_cancelled_never_starts(mixed, redis_server):
    app = make_app(redis_server, scheduler_topic=MIXED)
    redis = redis_server.client()
    with fd_celery.Client(app) as client:
        busy = client.submit("keep the only slot busy", max_tokens=400, seed=2)
        next(iter(busy.stream(timeout=60)))
        queued = client.submit("never run me", max_tokens=50, seed=3)
        assert queued.cancel() is True
        assert queued.result(timeout=10).finish_reason == "cancelled"
        assert busy.result(timeout=120).finish_reason in ("length", "stop")
        later = client.submit("a later request", max_tokens=4, seed=4).result(timeout=60)
        assert later.finish_reason in ("length", "stop")
    entries = redis.xrange(keys.output_stream(MIXED, queued.request_id))
    assert len(entries) == 1 and entries[0][1].get(b"end") == b"1", "the cancelled request wrote output"


@pytest.fixture(scope="module")
def split(redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    """A batching prefill node and a batching decode node."""
    env = {"FD_SCHEDULER_TOPIC": SPLIT, "FD_SCHEDULER_NAME": "splitwise"}
    with LocalCluster(redis_server, env=env) as cluster:
        nodes = [
            cluster.add_worker("cp", pool="threads", concurrency=2, env={"FD_ROLE": "prefill"}).node,
            cluster.add_worker("cd", pool="threads", concurrency=2, env={"FD_ROLE": "decode"}).node,
        ]
        cluster.wait_live(nodes, topic=SPLIT)
        yield nodes[0], nodes[1]


def test_cancel_during_decode_frees_the_decode_node(split, redis_server, engine):
    prefill_node, decode_node = split
    app = make_app(redis_server, scheduler_topic=SPLIT, scheduler_name="splitwise")
    with fd_celery.Client(app) as client:
        handle = client.submit("split, then cancelled", max_tokens=2000, seed=8)
        seen = []
        for chunk in handle.stream(timeout=60):
            seen.extend(chunk.token_ids)
            if len(seen) >= 4:  # the first token came from prefill; these from decode
                break
        assert _engine_of(app, decode_node).get("running") == 1
        assert handle.cancel() is True
        result = handle.result(timeout=30)
        assert result.finish_reason == "cancelled"
        expected = reference_tokens(engine, "split, then cancelled", 2000, 0.0, 8)
        assert list(result.token_ids) == expected[: len(result.token_ids)]
        wait_until(lambda: _idle(app, decode_node), 30, "the decode node freeing the cancelled KV")
        assert _idle(app, prefill_node)
