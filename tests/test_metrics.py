"""Prometheus metrics: recorded into Redis by the workers, exported by ``celery -A APP fd metrics``.

The recording functions are called directly against the test Redis (each test on a topic of its
own); the exporter runs as a user runs it, and is scraped with ``--once`` and over HTTP.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import fd_celery
from fd_celery import keys
from fd_celery.local_cluster import free_port
from fd_celery.observability import exporter, metrics
from tests.conftest import TOPIC

REPO = Path(__file__).resolve().parents[1]


def dead_redis(port: int | None = None) -> redis.Redis:
    """A client of a port nothing listens on, that fails at once (no retries)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        port=port or free_port(), socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )


def _env(port: int, topic: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD_")}
    env.update({"FD_SCHEDULER_PORT": str(port), "FD_SCHEDULER_TOPIC": topic, "PYTHONUNBUFFERED": "1"})
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.mixed", "fd", "metrics", *args]


def scrape(port: int, topic: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``fd metrics --once``, parsed: {(sample name, sorted labels): value}."""
    proc = subprocess.run(
        _cmd("--once"), env=_env(port, topic), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse(proc.stdout)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def topic() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def test_recorded_events_are_exported(redis_server, topic):
    r = redis_server.client()
    for ttft, tpot, tokens in [(0.004, 0.002, 10), (0.3, 0.009, 5), (200.0, 3.0, 2), (0.05, None, 1)]:
        metrics.record_end(r, topic, "a@h", "ok", ttft, tpot, tokens)
    metrics.record_end(r, topic, "a@h", "RequestExpired", None, None, 0)
    metrics.record_end(r, topic, "b@h", "WorkerError", 0.2, None, 3)
    metrics.record_end(r, topic, "d@h", "ok", 0.7, 0.03, 4, first_node="p@h")  # splitwise: TTFT at prefill
    metrics.record_rejected(r, topic, "QueueFull")
    metrics.record_rejected(r, topic, "QueueFull")
    metrics.record_handoff(r, topic, "p@h", 1000, "shm")
    metrics.record_handoff(r, topic, "p@h", 24, "shm")
    metrics.record_handoff(r, topic, "p@h", 7, "redis")
    r.hincrby(keys.steals_hash(topic), "b@h:made", 3)
    r.hincrby(keys.steals_hash(topic), "a@h:suffered", 3)
    metrics.record_given_back(r, topic, "z@h", 2)
    from fd_celery.worker import deadletter

    deadletter.dead_letter(r, keys.dead_letter_list(topic), "fd.x.mixed", "not JSON", b"\x00junk")

    s = scrape(redis_server.port, topic)
    assert value(s, "fd_up") == 1
    # TTFT on a@h: 0.004, 0.3, 200 (over the last bound), 0.05; buckets are cumulative
    assert value(s, "fd_ttft_seconds_bucket", node="a@h", le="0.005") == 1
    assert value(s, "fd_ttft_seconds_bucket", node="a@h", le="0.05") == 2
    assert value(s, "fd_ttft_seconds_bucket", node="a@h", le="0.5") == 3
    assert value(s, "fd_ttft_seconds_bucket", node="a@h", le="120.0") == 3
    assert value(s, "fd_ttft_seconds_bucket", node="a@h", le="+Inf") == 4
    assert value(s, "fd_ttft_seconds_count", node="a@h") == 4
    assert value(s, "fd_ttft_seconds_sum", node="a@h") == pytest.approx(200.354)
    # TPOT only for requests of more than one token
    assert value(s, "fd_tpot_seconds_count", node="a@h") == 3
    assert value(s, "fd_tpot_seconds_bucket", node="a@h", le="0.0025") == 1
    assert value(s, "fd_tpot_seconds_bucket", node="a@h", le="0.01") == 2
    assert value(s, "fd_tpot_seconds_sum", node="a@h") == pytest.approx(3.011)
    # a failed request with a first token still counts for TTFT; splitwise TTFT goes to prefill
    assert value(s, "fd_ttft_seconds_count", node="b@h") == 1
    assert value(s, "fd_ttft_seconds_count", node="p@h") == 1
    assert value(s, "fd_ttft_seconds_count", node="d@h") == 0
    assert value(s, "fd_tpot_seconds_count", node="d@h") == 1

    assert value(s, "fd_requests_total", node="a@h", outcome="ok") == 4
    assert value(s, "fd_requests_total", node="a@h", outcome="RequestExpired") == 1
    assert value(s, "fd_requests_total", node="b@h", outcome="WorkerError") == 1
    assert value(s, "fd_requests_total", node="d@h", outcome="ok") == 1
    assert value(s, "fd_requests_expired_total", node="a@h") == 1
    assert value(s, "fd_output_tokens_total", node="a@h") == 18
    assert value(s, "fd_requests_rejected_total", reason="QueueFull") == 2
    assert value(s, "fd_kv_handoffs_total", node="p@h", kind="shm") == 2
    assert value(s, "fd_kv_handoff_bytes_total", node="p@h", kind="shm") == 1024
    assert value(s, "fd_kv_handoff_bytes_total", node="p@h", kind="redis") == 7
    assert value(s, "fd_steals_made_total", node="b@h") == 3
    assert value(s, "fd_steals_suffered_total", node="a@h") == 3
    assert value(s, "fd_nodes_live", role="mixed") == 0  # nothing heartbeats in this topic
    assert value(s, "fd_requests_given_back_total", node="z@h") == 2
    assert value(s, "fd_dead_letters") == 1

    # one pipelined round trip per event, into a few hashes under fd:<topic>:metrics:
    names = {k.decode() for k in r.scan_iter(f"fd:{topic}:metrics:*")}
    assert names == {
        f"fd:{topic}:metrics:{n}"
        for n in ("ttft", "tpot", "requests", "tokens", "rejected", "handoffs", "givenback")
    }


def test_recording_never_raises(redis_server, topic, caplog):
    dead = dead_redis()
    with caplog.at_level(logging.WARNING, logger="fd_celery.observability.metrics"):
        metrics.record_end(dead, topic, "a@h", "ok", 0.1, 0.01, 5)
        metrics.record_rejected(dead, topic, "QueueFull")
        metrics.record_handoff(dead, topic, "a@h", 10, "shm")
    assert len([rec for rec in caplog.records if "metrics" in rec.getMessage()]) == 3

    r = redis_server.client()
    # odd values are skipped, odd labels made safe; nothing raises
    metrics.record_end(r, topic, "a@h", "ok", float("nan"), -1.0, 3)
    metrics.record_end(r, topic, "a|b\n{x}", 'Bad"Name', math.inf, None, 0)
    metrics.record_end(r, topic, "a@h", "ok", "soon", object(), "many")  # type: ignore[arg-type]
    s = scrape(redis_server.port, topic)
    assert value(s, "fd_ttft_seconds_count", node="a@h") == 0
    assert value(s, "fd_requests_total", node="a@h", outcome="ok") == 2
    assert value(s, "fd_output_tokens_total", node="a@h") == 3
    assert value(s, "fd_requests_total", node="a_b__x_", outcome="Bad_Name") == 1


def test_live_cluster_gauges(redis_server, cluster, node):
    s = scrape(redis_server.port, TOPIC)
    assert value(s, "fd_up") == 1
    assert value(s, "fd_nodes_live", role="mixed") == len([w for w in cluster.workers if w.alive()])
    assert ("fd_queue_depth", (("node", node), ("role", "mixed"))) in s
    assert ("fd_load_score", (("node", node), ("role", "mixed"))) in s
    assert value(s, "fd_node_slots", node=node) == 1
    assert 0 <= value(s, "fd_heartbeat_age_seconds", node=node) < 3
    assert ("fd_shared_queue_depth", (("role", "mixed"),)) in s


def test_requests_through_the_cluster_are_counted(redis_server, client, node):
    """Needs the worker hooks (``metrics.record_end`` where a request ends)."""
    before = scrape(redis_server.port, TOPIC)
    results = [
        h.result(timeout=60) for h in [client.submit("count me", max_tokens=6, seed=i) for i in range(3)]
    ]
    assert all(res.served_by == (node,) for res in results)
    deadline = time.monotonic() + 5
    while True:
        after = scrape(redis_server.port, TOPIC)
        grown = value(after, "fd_ttft_seconds_count", node=node) - value(
            before, "fd_ttft_seconds_count", node=node
        )
        if grown >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert grown == 3, (
        "no worker recorded these requests' ends: is metrics.record_end called where a "
        "request ends (fd_celery/worker/run.py)?"
        if grown == 0
        else grown
    )
    assert (
        value(after, "fd_requests_total", node=node, outcome="ok")
        - value(before, "fd_requests_total", node=node, outcome="ok")
    ) == 3
    assert value(after, "fd_output_tokens_total", node=node) - value(
        before, "fd_output_tokens_total", node=node
    ) == sum(len(res.token_ids) for res in results)
    ttft_sum = value(after, "fd_ttft_seconds_sum", node=node) - value(
        before, "fd_ttft_seconds_sum", node=node
    )
    assert ttft_sum == pytest.approx(sum(res.ttft_s for res in results), rel=1e-6)


def test_http_exporter(redis_server, topic):
    metrics.record_rejected(redis_server.client(), topic, "QueueFull")
    port = free_port()
    proc = subprocess.Popen(
        _cmd("--port", str(port), "--address", "127.0.0.1"),
        env=_env(redis_server.port, topic),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/metrics" in banner, banner + proc.stdout.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            body = reply.read().decode()
        s = parse(body)
        assert value(s, "fd_up") == 1
        assert value(s, "fd_requests_rejected_total", reason="QueueFull") == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_exporter_reports_redis_down(redis_server, topic):
    config = fd_celery.SchedulerConfig(scheduler_port=free_port(), scheduler_topic=topic)
    dead = dead_redis(config.scheduler_port)
    assert value(parse(exporter.exposition(dead, config).decode()), "fd_up") == 0

    proc = subprocess.run(
        _cmd("--once"),
        env=_env(config.scheduler_port, topic),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"127.0.0.1:{config.scheduler_port}" in proc.stderr and "Traceback" not in proc.stderr
