"""The global scheduler with real workers: placement by load, stealing, orphans, node death.

Two small clusters on the session's Redis: ``g1``, four nodes that steal from a node at load
score 1 and spread their load table over two shards; ``g2``, two nodes that never steal from a
live node (``scheduler_min_load_score`` 100). Both use a short visibility timeout, so the request
of a killed node comes back within seconds.
"""

from __future__ import annotations

import collections
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from celery import Celery

import fd_celery
from fd_celery import keys
from fd_celery.local_cluster import LocalCluster, RedisServer
from fd_celery.scheduler import loadtable
from tests.conftest import reference_tokens, run_topic, wait_until

pytestmark = pytest.mark.slow

SHARDS = 2
VISIBILITY_S = 10
G1, G2 = run_topic("g1"), run_topic("g2")  # topics of the clusters g1 and g2


def _names_over_shards(count: int) -> list[str]:
    """Node names whose load entries land in every shard (the host name is part of the node)."""
    host = socket.gethostname()
    names: list[str] = []
    i = 0
    while len(names) < count:
        name = f"n{i}"
        names.append(name)
        i += 1
        if len(names) == count and len({keys.shard_of(f"{n}@{host}", SHARDS) for n in names}) < SHARDS:
            names.pop(0)
    return names


def _cluster(redis_server: RedisServer, topic: str, names: list[str], **env: str) -> LocalCluster:
    cluster = LocalCluster(
        redis_server,
        env={
            "FD_SCHEDULER_TOPIC": topic,
            "FD_SCHEDULER_NAME": "global",
            "FD_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
            **env,
        },
    )
    try:
        workers = [cluster.add_worker(name) for name in names]
        cluster.wait_live([w.node for w in workers], topic=topic)
    except Exception:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def g1(redis_server: RedisServer) -> Iterator[LocalCluster]:
    cluster = _cluster(
        redis_server,
        G1,
        _names_over_shards(4),
        FD_SCHEDULER_MIN_LOAD_SCORE="1",
        FD_SCHEDULER_LOAD_SHARDS_NUM=str(SHARDS),
    )
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def g2(redis_server: RedisServer, g1: LocalCluster) -> Iterator[LocalCluster]:
    cluster = _cluster(redis_server, G2, ["x", "y"], FD_SCHEDULER_MIN_LOAD_SCORE="100")
    yield cluster
    cluster.close()


def _client(redis_server: RedisServer, topic: str, **overrides: object) -> fd_celery.Client:
    app = Celery(f"client-{topic}", set_as_current=False)
    fd_celery.install(
        app, scheduler_port=redis_server.port, scheduler_topic=topic, scheduler_name="global", **overrides
    )
    return fd_celery.Client(app)


def _steal_counts(redis_server: RedisServer, topic: str) -> collections.Counter[str]:
    raw = redis_server.client().hgetall(keys.steals_hash(topic))
    return collections.Counter({k.decode(): int(v) for k, v in raw.items()})


def _assert_exactly_once(redis_server: RedisServer, topic: str, handle, result) -> None:
    """The caller's stream holds each chunk once, in order, and then one end."""
    entries = redis_server.client().xrange(keys.output_stream(topic, handle.request_id))
    seqs = [int(eid.split(b"-")[1]) - 1 for eid, _ in entries]
    assert seqs == list(range(len(entries)))
    assert [fields.get(b"end") for _, fields in entries].count(b"1") == 1
    assert len(entries) - 1 >= len(result.token_ids)


def test_busy_node_is_stolen_from_and_every_request_completes_once(redis_server, g1, engine):
    client = _client(redis_server, G1, scheduler_min_load_score=1)
    target = g1.workers[0].node
    before = _steal_counts(redis_server, G1)
    handles = [
        client.submit("steal me", max_tokens=80, seed=i, temperature=0.7, node=target) for i in range(16)
    ]
    results = [h.result(timeout=180) for h in handles]

    served = collections.Counter(r.served_by[0] for r in results)
    assert len(served) >= 3, f"the other nodes did not steal: {served}"
    nodes = {w.node for w in g1.workers}
    for handle, result, seed in zip(handles, results, range(16)):
        if not result.stolen:
            assert result.served_by[0] == target
        else:  # from the target, or from a thief that was busy again (a re-steal, even back)
            assert result.extra["stolen_from"] in nodes
        assert list(result.token_ids) == reference_tokens(engine, "steal me", 80, 0.7, seed)
        _assert_exactly_once(redis_server, G1, handle, result)
    after = _steal_counts(redis_server, G1)
    stolen = sum(r.stolen for r in results)
    made = sum(after[f"{w.node}:made"] - before[f"{w.node}:made"] for w in g1.workers)
    suffered = sum(after[f"{w.node}:suffered"] - before[f"{w.node}:suffered"] for w in g1.workers)
    assert made == suffered >= stolen, "every steal is counted once on each side"
    assert after[f"{target}:suffered"] - before[f"{target}:suffered"] >= stolen - (made - stolen)


def test_load_table_spans_shards_and_placement_spreads_requests(redis_server, g1):
    config = _client(redis_server, G1, scheduler_load_shards_num=SHARDS).config
    r = redis_server.client()
    in_shards = [r.zcard(k) for k in loadtable.shard_keys(config, "mixed")]
    assert all(n >= 1 for n in in_shards), f"a shard is empty: {in_shards}"
    client = _client(redis_server, G1, scheduler_load_shards_num=SHARDS, scheduler_min_load_score=100)
    results = [
        h.result(timeout=120) for h in [client.submit("spread", max_tokens=40, seed=i) for i in range(12)]
    ]
    placed = collections.Counter(r.served_by[0] for r in results)
    assert len(placed) == len(g1.workers), f"placement by load left nodes idle: {placed}"


def test_no_steals_below_min_load_score_and_none_across_topics(redis_server, g1, g2):
    client = _client(redis_server, G2, scheduler_min_load_score=100)
    target = g2.workers[0].node
    before = _steal_counts(redis_server, G2)
    results = [
        h.result(timeout=180)
        for h in [client.submit("mine", max_tokens=40, seed=i, node=target) for i in range(8)]
    ]
    assert {r.served_by[0] for r in results} == {target}, "a node stole below min_load_score or across topics"
    assert not any(r.stolen for r in results)
    assert _steal_counts(redis_server, G2) == before


def test_stolen_request_survives_the_death_of_its_thief(redis_server, g1, engine):
    client = _client(redis_server, G1, scheduler_min_load_score=1)
    victim = g1.workers[0]
    handles = [client.submit("survive", max_tokens=600, seed=100 + i, node=victim.node) for i in range(4)]
    thief, doomed = _first_running_thief(redis_server, handles, victim.node, g1)
    thief.signal(signal.SIGKILL)

    for i, handle in enumerate(handles):
        result = handle.result(timeout=120)
        assert list(result.token_ids) == reference_tokens(engine, "survive", 600, 0.0, 100 + i)
        _assert_exactly_once(redis_server, G1, handle, result)
    rerun = next(h for h in handles if h.request_id == doomed).result(timeout=1)
    assert rerun.served_by[0] != thief.node


def _first_running_thief(redis_server, handles, victim: str, cluster: LocalCluster):
    """Wait until a stolen request runs on a thief; return (that worker, the request id)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for handle in handles:
            info = handle.async_result.info if handle.async_result.state == "STARTED" else None
            host = info.get("hostname") if isinstance(info, dict) else None
            if host and host != victim:
                return next(w for w in cluster.workers if w.node == host), handle.request_id
        time.sleep(0.01)
    raise AssertionError("no request was stolen within 60 s")


def test_dead_nodes_waiting_queue_is_drained_by_the_others(redis_server, g2, engine):
    client = _client(redis_server, G2, scheduler_min_load_score=100)
    doomed, survivor = g2.workers
    handles = [client.submit("orphan", max_tokens=300, seed=i, node=doomed.node) for i in range(6)]
    wait_until(
        lambda: handles[0].async_result.state == "STARTED",
        60,
        "the doomed node's first request to start",
        interval_s=0.01,
    )
    doomed.signal(signal.SIGKILL)

    results = [h.result(timeout=120) for h in handles]
    assert all(r.served_by[0] == survivor.node for r in results[1:])
    for i, (handle, result) in enumerate(zip(handles, results)):
        assert list(result.token_ids) == reference_tokens(engine, "orphan", 300, 0.0, i)
        _assert_exactly_once(redis_server, G2, handle, result)
