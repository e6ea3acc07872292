"""``celery -A workers.mixed fd status``: the live nodes of a topic and what each is doing.

Run as a user runs it (a ``celery`` subprocess configured by the environment) against the
session's cluster, a small global cluster of its own (topic ``status``: steals, KV bytes, a node
killed and one stopped) and a node on paper (a registry entry with a queue and no process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import fd_celery
from fd_celery import keys
from fd_celery import kv as kvstore
from fd_celery.engine import SamplingParams
from fd_celery.local_cluster import LocalCluster, RedisServer
from fd_celery.scheduler import loadtable, registry
from tests.conftest import TOPIC, run_topic

REPO = Path(__file__).resolve().parents[1]
TOPIC_G = run_topic("status")
EXPIRE_S = 3.0  # the default scheduler_expire_period
FIELDS = {
    "node": str,
    "role": str,
    "load_score": float,
    "queue": int,
    "slots": int,
    "running": int,
    "heartbeat_age_s": float,
    "steals_made": int,
    "steals_suffered": int,
    "rescued": int,
    "kv_bytes": int,
}


def fd_cmd(port: int, topic: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD_")}
    env.update({"FD_SCHEDULER_PORT": str(port), "FD_SCHEDULER_TOPIC": topic, **env_vars})
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.mixed", "fd", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status(port: int, topic: str) -> dict[str, Any]:
    proc = fd_cmd(port, topic, "status", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def by_node(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["node"]: row for row in report["nodes"]}


def test_lists_exactly_the_live_nodes_of_the_session_cluster(redis_server, cluster):
    report = status(redis_server.port, TOPIC)
    assert report["topic"] == TOPIC and report["scheduler"] == "local"
    assert set(by_node(report)) == {w.node for w in cluster.workers if w.alive()}
    for row in report["nodes"]:
        for name, kind in FIELDS.items():
            assert isinstance(row[name], kind) or (kind is float and isinstance(row[name], int)), (name, row)
        assert row["role"] == "mixed" and row["slots"] == 1
        assert 0 <= row["heartbeat_age_s"] < EXPIRE_S
        assert row["queue"] >= 0 and row["running"] >= 0 and row["kv_bytes"] == 0
    assert set(report["shared_queues"]) == {"mixed", "prefill", "decode"}

    table = fd_cmd(redis_server.port, TOPIC, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert (
        lines[0].startswith(f"scheduler local, topic '{TOPIC}' on redis://") and "1 live node(s)" in lines[0]
    )
    for heading in (
        "node",
        "role",
        "load",
        "queue",
        "slots",
        "running",
        "heartbeat",
        "stole",
        "stolen from",
        "rescued",
        "KV held",
        "KV stores",
    ):
        assert heading in lines[1], lines[1]
    assert lines[2].startswith(cluster.workers[0].node) and " shm,redis " in lines[2]


def test_shows_how_many_messages_the_nodes_refused(redis_server, cluster):
    """A message no node can read (here: bytes that are not JSON) lands on the topic's
    dead-letter list, and ``fd status`` says so and where."""
    r = redis_server.client()
    dead = keys.dead_letter_list(TOPIC)
    before = r.llen(dead)
    r.lpush(keys.node_queue(TOPIC, "mixed", cluster.workers[0].node), b"\x00 not a message")
    deadline = time.monotonic() + 20
    while r.llen(dead) == before:
        assert time.monotonic() < deadline, "the unreadable message was not dead-lettered"
        time.sleep(0.1)
    assert status(redis_server.port, TOPIC)["dead_letters"] == before + 1
    table = fd_cmd(redis_server.port, TOPIC, "status").stdout
    assert f"refused messages: {before + 1} in Redis list {dead}" in table


def test_a_node_on_paper_shows_its_queue_and_load_then_expires(redis_server):
    """A registry entry whose queue holds 3 messages and whose process does not exist."""
    topic = f"paper-{uuid.uuid4().hex[:6]}"
    config = fd_celery.SchedulerConfig(scheduler_port=redis_server.port, scheduler_topic=topic)
    r = redis_server.client()
    node = "ghost@nowhere"
    registry.register(r, config, node, {"role": "mixed", "slots": 2, "model": "fd-tiny", "device": "cpu"})
    own = keys.node_queue(topic, "mixed", node)
    r.lpush(own, b"m1", b"m2")
    r.lpush(loadtable.queue_lists(own)[2], b"m3")  # a priority sub-queue counts too
    r.lpush(keys.role_queue(topic, "mixed"), b"shared")

    def beat() -> None:
        loadtable.publish(r, config, "mixed", node, running=1, slots=2, own_queue=own)

    # It beats while it is looked at (each `celery` command takes seconds on a busy machine,
    # longer than the expire period), then falls silent.
    stop = threading.Event()

    def beating() -> None:
        while not stop.wait(0.5):
            beat()

    beats = threading.Thread(target=beating)
    beat()
    beats.start()
    try:
        row = by_node(status(redis_server.port, topic))[node]
        assert (row["queue"], row["running"], row["slots"]) == (3, 1, 2)
        assert row["load_score"] == pytest.approx((3 + 1) / 2)
        report = status(redis_server.port, topic)
        assert report["shared_queues"]["mixed"] == 1
        table = fd_cmd(redis_server.port, topic, "status").stdout
        assert "waiting in topic-wide queues: mixed 1" in table
    finally:
        stop.set()
        beats.join()
    beat()
    silent_since = time.monotonic()
    while True:
        asked = time.monotonic()
        if node not in by_node(status(redis_server.port, topic)):
            break
        assert asked - silent_since < EXPIRE_S + 1, "a silent node stayed listed"
        time.sleep(0.2)
    assert time.monotonic() - silent_since >= EXPIRE_S - 0.5, "it left before its expire period"


def test_status_names_its_scheduler_and_topic_and_counts_rescues_apart(redis_server):
    """A node on paper that says it runs the global scheduler, with steals and rescues counted:
    asked from an app configured for splitwise, status names both schedulers, and shows rescues
    (requests taken from dead nodes) in their own column, not as steals."""
    topic = run_topic("status-names")
    config = fd_celery.SchedulerConfig(scheduler_port=redis_server.port, scheduler_topic=topic)
    r = redis_server.client()
    node = "ghost@nowhere"
    facts = {"role": "mixed", "slots": 2, "model": "fd-tiny", "device": "cpu", "scheduler": "global"}
    registry.register(r, config, node, facts)
    r.hset(keys.steals_hash(topic), mapping={f"{node}:made": 1, f"{node}:suffered": 3, f"{node}:rescued": 2})
    asked = {"FD_SCHEDULER_NAME": "splitwise", "FD_SCHEDULER_EXPIRE_PERIOD": "10m"}  # (on paper: no beat)

    table = fd_cmd(redis_server.port, topic, "status", **asked)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"scheduler splitwise, topic '{topic}' on redis://127.0.0.1:"), lines
    assert lines[1].startswith("note: nodes of this topic run the global scheduler, this app splitwise"), (
        lines
    )
    heads, ghost = lines[2], lines[3]
    cells = {
        h: ghost[heads.index(h) - 3 : heads.index(h) + len(h)].split()[-1] for h in ("stolen from", "rescued")
    }
    assert cells == {"stolen from": "3", "rescued": "2"}, (heads, ghost)

    proc = fd_cmd(redis_server.port, topic, "status", "--json", **asked)
    report = json.loads(proc.stdout)
    assert (report["scheduler"], report["topic"]) == ("splitwise", topic)
    row = by_node(report)[node]
    assert (row["steals_made"], row["steals_suffered"], row["rescued"], row["scheduler"]) == (
        1,
        3,
        2,
        "global",
    )
    registry.unregister(r, config, node)


@pytest.fixture(scope="module")
def gcluster(redis_server: RedisServer) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        redis_server,
        env={
            "FD_SCHEDULER_TOPIC": TOPIC_G,
            "FD_SCHEDULER_NAME": "global",
            "FD_SCHEDULER_MIN_LOAD_SCORE": "1",
        },
    )
    try:
        workers = [cluster.add_worker("sa"), cluster.add_worker("sb")]
        cluster.wait_live([w.node for w in workers], topic=TOPIC_G)
        yield cluster
    finally:
        cluster.close()


def test_steals_kv_bytes_and_nodes_leaving(redis_server, gcluster, engine):
    a, b = gcluster.workers
    app = Celery("client-status", set_as_current=False)
    fd_celery.install(
        app,
        scheduler_port=redis_server.port,
        scheduler_topic=TOPIC_G,
        scheduler_name="global",
        scheduler_min_load_score=1,
    )
    client = fd_celery.Client(app)
    results = [
        h.result(timeout=120)
        for h in [client.submit("status", max_tokens=40, seed=i, node=a.node) for i in range(8)]
    ]
    stolen = sum(res.stolen for res in results)
    assert stolen >= 1, "the idle node stole nothing"

    r = redis_server.client()
    cache, first = engine.prefill(engine.encode("kv"), SamplingParams(0.0, 1))
    ref = kvstore.put(
        cache,
        kind="redis",
        topic=TOPIC_G,
        request_id=uuid.uuid4().hex,
        owner=a.node,
        host="h",
        ttl_s=60,
        first_token=first,
        prompt_tokens=cache.num_tokens,
        client=r,
    )

    rows = by_node(status(redis_server.port, TOPIC_G))
    assert set(rows) == {a.node, b.node}
    counters = {k.decode(): int(v) for k, v in r.hgetall(keys.steals_hash(TOPIC_G)).items()}
    for node in (a.node, b.node):
        assert rows[node]["steals_made"] == counters.get(f"{node}:made", 0)
        assert rows[node]["steals_suffered"] == counters.get(f"{node}:suffered", 0)
    assert rows[a.node]["steals_suffered"] >= stolen and rows[b.node]["steals_made"] >= stolen
    assert rows[a.node]["kv_bytes"] == ref.nbytes > 0 and rows[b.node]["kv_bytes"] == 0
    assert rows[a.node]["queue"] == 0 and rows[a.node]["role"] == "mixed"

    # Killed: no goodbye, so it leaves the list when its heartbeat is older than the expire period.
    b.signal(signal.SIGKILL)
    killed = time.monotonic()
    while b.node in by_node(status(redis_server.port, TOPIC_G)):
        assert time.monotonic() - killed < EXPIRE_S + 2, "a dead node stayed listed"
        time.sleep(0.2)
    assert set(by_node(status(redis_server.port, TOPIC_G))) == {a.node}

    # Stopped: it unregisters on the way out.
    a.stop()
    assert by_node(status(redis_server.port, TOPIC_G)) == {}
    kvstore.discard(ref, r)


def test_redis_down_is_a_clear_error(tmp_path):
    from fd_celery.local_cluster import free_port

    port = free_port()
    proc = fd_cmd(port, TOPIC, "status", "--json")
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
