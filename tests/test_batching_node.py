"""A node is an LLM server: a thread-pool worker runs one engine, many requests decode in one
batch, each still a Celery task, each token exactly what the engine gives the request alone;
and the node takes a request off Redis only when its engine has room."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

import fd_celery
from fd_celery import keys
from fd_celery.local_cluster import LocalCluster, RedisServer
from fd_celery.scheduler import loadtable
from tests.conftest import make_app, reference_tokens, run_topic, wait_until

TOPIC = run_topic("batching")


@pytest.fixture(scope="module")
def batching(redis_server: RedisServer) -> Iterator[tuple[LocalCluster, str]]:
    """One mixed node: ``-P threads -c 8``, room for 4 sequences at once."""
    with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": TOPIC, "FD_MAX_NUM_SEQS": "4"}) as cluster:
        worker = cluster.add_worker("bn", pool="threads", concurrency=8)
        cluster.wait_live([worker.node], topic=TOPIC)
        yield cluster, worker.node


def _stats(app, node: str) -> dict:
    replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
    return replies.get(node, {}).get("fd", {})


def test_concurrent_requests_share_one_batch_and_stay_exact(batching, redis_server, engine):
    cluster, node = batching
    rnd = random.Random(7)
    cases = [
        (
            "".join(chr(rnd.randint(97, 122)) for _ in range(rnd.randint(1, 40))),
            rnd.randint(4, 40),
            rnd.choice([0.0, 0.8, 1.3]),
            rnd.randint(0, 9999),
        )
        for _ in range(12)
    ]
    app = make_app(redis_server, scheduler_topic=TOPIC)
    with fd_celery.Client(app) as client:
        handles = [client.submit(p, max_tokens=mt, temperature=t, seed=s) for p, mt, t, s in cases]
        results = [h.result(timeout=120) for h in handles]
        for (prompt, max_tokens, temperature, seed), result in zip(cases, results):
            assert list(result.token_ids) == reference_tokens(
                engine, prompt, max_tokens, temperature, seed
            ), prompt
            assert result.served_by == (node,)
        stats = _stats(app, node)
    engine_stats = stats["engine"]
    assert engine_stats["widest_step"] >= 2, f"requests never shared a step: {engine_stats}"
    assert engine_stats["widest_step"] <= 4, "more sequences ran at once than FD_MAX_NUM_SEQS"
    assert engine_stats["max_num_seqs"] == 4
    assert engine_stats["free_blocks"] == engine_stats["total_blocks"], "a finished request kept KV blocks"
    # the scheduler sees the node in the real unit: 4 slots (the engine's), its free KV in tokens
    facts = redis_server.client().hgetall(keys.node_hash(TOPIC, node))
    assert facts[b"slots"] == b"4"
    idle_tokens = str(engine_stats["total_blocks"] * engine_stats["block_size"]).encode()
    wait_until(
        lambda: redis_server.client().hget(keys.node_hash(TOPIC, node), "kv_free_tokens") == idle_tokens,
        10,
        "the node publishing its free KV",
    )


def test_requests_beyond_the_engine_room_stay_in_redis(batching, redis_server):
    """Room for 4 sequences and 12 long requests: the node holds at most 4 at a time (Celery has
    8 threads); the rest wait in Redis, where thieves could take them, and all complete."""
    cluster, node = batching
    app = make_app(redis_server, scheduler_topic=TOPIC)
    redis = redis_server.client()
    lists = [
        name
        for q in (keys.role_queue(TOPIC, "mixed"), keys.node_queue(TOPIC, "mixed", node))
        for name in loadtable.queue_lists(q)
    ]
    most_held = 0
    with fd_celery.Client(app) as client:
        handles = [client.submit(f"long request {i}", max_tokens=300, seed=i) for i in range(12)]

        def running_and_queued() -> tuple[int, int] | None:
            nonlocal most_held
            stats = _stats(app, node)
            most_held = max(most_held, int(stats.get("running", 0)))
            running = stats.get("engine", {}).get("running", 0)
            queued = sum(int(redis.llen(name)) for name in lists)
            return (running, queued) if running >= 3 and queued >= 4 else None

        running, queued = wait_until(running_and_queued, 60, "the node running some, Redis holding the rest")
        assert running <= 4 and running + queued <= 12
        results = [h.result(timeout=240) for h in handles]
    assert most_held <= 4, f"the node took {most_held} requests off Redis with room for 4"
    assert all(len(r.token_ids) == 300 or r.finish_reason == "stop" for r in results)


def test_sampling_parameters_and_stop_tokens_in_one_batch(batching, redis_server, engine):
    """Requests with different sampling parameters share the batch; each equals its reference,
    and a stop token ends a request without being part of its output."""
    from fd_celery.engine import SamplingParams

    cluster, node = batching
    free = list(engine.generate(engine.encode("stop somewhere"), SamplingParams(0.9, 3), 40))
    stop = free[12]
    cases = [
        ("stop somewhere", {"temperature": 0.9, "seed": 3, "stop_token_ids": [stop]}),
        ("penalised", {"temperature": 0.0, "seed": 1, "frequency_penalty": 1.5, "presence_penalty": 0.5}),
        ("filtered", {"temperature": 1.2, "seed": 8, "top_k": 8, "top_p": 0.8, "min_p": 0.02}),
        ("no end", {"temperature": 0.7, "seed": 4, "ignore_eos": True, "min_tokens": 10}),
    ]
    app = make_app(redis_server, scheduler_topic=TOPIC)
    with fd_celery.Client(app) as client:
        handles = [client.submit(prompt, max_tokens=40, **fields) for prompt, fields in cases]
        results = [h.result(timeout=120) for h in handles]
    for (prompt, fields), result in zip(cases, results):
        sampling = SamplingParams(
            fields.pop("temperature"),
            fields.pop("seed"),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
        )
        expected = list(engine.generate(engine.encode(prompt), sampling, 40))
        stops = set(sampling.stop_token_ids) | ({engine.eos_token_id} if not sampling.ignore_eos else set())
        if expected and expected[-1] in stops:
            expected = expected[:-1]
        assert list(result.token_ids) == expected, prompt
    assert list(results[0].token_ids) == free[: free.index(stop)] and results[0].finish_reason == "stop"
