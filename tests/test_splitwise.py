"""Splitwise with real prefill and decode workers: exact tokens across the hand-off, references
in the result backend, blobs released, bad references refused, and nothing lost when a decode
node dies or goes silent.

Cluster (topic ``sw``): ``p1`` (prefill, KV store chosen automatically: shared memory here),
``p2`` (prefill, KV store forced to Redis), ``d1`` and ``d2`` (decode).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from celery import Celery, states

import fd_celery
from fd_celery import keys
from fd_celery import kv as kvstore
from fd_celery.engine import SamplingParams
from fd_celery.errors import KVRefError, NoNodeAvailable
from fd_celery.kv import blob as kvblob
from fd_celery.local_cluster import LocalCluster, RedisServer
from fd_celery.settings import node_knobs
from tests.conftest import CUDA_IPC, reference_tokens, run_topic, wait_until

pytestmark = pytest.mark.slow

TOPIC = run_topic("sw")
VISIBILITY_S = 8


@pytest.fixture(scope="module")
def sw(redis_server: RedisServer) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        redis_server,
        env={
            "FD_SCHEDULER_TOPIC": TOPIC,
            "FD_SCHEDULER_NAME": "splitwise",
            "FD_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        },
    )
    try:
        workers = [
            cluster.add_worker("p1", env={"FD_ROLE": "prefill"}),
            cluster.add_worker("p2", env={"FD_ROLE": "prefill", "FD_KV_STORE": "redis"}),
            cluster.add_worker("d1", env={"FD_ROLE": "decode"}),
            cluster.add_worker("d2", env={"FD_ROLE": "decode"}),
        ]
        cluster.wait_live([w.node for w in workers], topic=TOPIC)
        yield cluster
    finally:
        cluster.close()


def _worker(cluster: LocalCluster, name: str):
    return next(w for w in cluster.workers if w.name == name)


@pytest.fixture(scope="module")
def sw_app(redis_server: RedisServer, sw: LocalCluster) -> Celery:
    app = Celery("client-sw", set_as_current=False)
    fd_celery.install(
        app, scheduler_port=redis_server.port, scheduler_topic=TOPIC, scheduler_name="splitwise"
    )
    return app


@pytest.fixture
def sw_client(sw_app: Celery) -> fd_celery.Client:
    return fd_celery.Client(sw_app)


CASES = [("Split me", 0.0, 0), ("héllo wörld", 0.9, 3), ("The cache moves", 1.3, 77), ("x", 0.5, 5)]


@pytest.mark.parametrize("prefill", ["p1", "p2"])
@pytest.mark.parametrize("prompt,temperature,seed", CASES)
def test_split_run_equals_one_node(sw, sw_client, engine, prefill, prompt, temperature, seed):
    handle = sw_client.submit(
        prompt, max_tokens=24, temperature=temperature, seed=seed, node=_worker(sw, prefill).node
    )
    chunks = list(handle.stream(timeout=60))
    result = handle.result(timeout=10)

    assert list(result.token_ids) == reference_tokens(engine, prompt, 24, temperature, seed)
    assert "".join(c.text for c in chunks) == result.text
    assert result.served_by[0] == _worker(sw, prefill).node
    assert result.served_by[1] in {_worker(sw, "d1").node, _worker(sw, "d2").node}
    ref = handle.async_result.get(timeout=10)  # the prefill task's result: a KV reference
    assert ref["kind"] == ("redis" if prefill == "p2" else "shm")
    assert ref["request_id"] == handle.request_id and ref["num_tokens"] == result.prompt_tokens
    assert ref["nbytes"] > 0 and len(str(ref)) < 4096, "the reference must not carry tensor data"


def test_prefill_placement_uses_both_prefill_nodes(sw, sw_client):
    results = [
        h.result(timeout=60) for h in [sw_client.submit("place", max_tokens=3, seed=i) for i in range(12)]
    ]
    assert {r.served_by[0] for r in results} == {_worker(sw, "p1").node, _worker(sw, "p2").node}


def test_prefill_placement_weighs_prompt_tokens_and_releases_them(redis_server):
    """Two prefill nodes on paper (registry entries, real Redis, real scripts): a long prompt
    weighs on its node until its prefill ends, so short prompts go to the other node; a charge
    whose end never comes is released after scheduler_release_load_expire_period."""
    from fd_celery.scheduler import loadtable, registry

    topic = f"sw-tokens-{uuid.uuid4().hex[:6]}"
    config = fd_celery.SchedulerConfig(
        scheduler_port=redis_server.port,
        scheduler_topic=topic,
        scheduler_name="splitwise",
        scheduler_release_load_expire_period=1,
    )
    r = redis_server.client()
    nodes = ("pa@paper", "pb@paper")

    def publish_all() -> dict[str, float]:
        for node in nodes:
            registry.register(
                r, config, node, {"role": "prefill", "slots": 1, "model": "fd-tiny", "device": "cpu"}
            )
            loadtable.publish(
                r,
                config,
                "prefill",
                node,
                running=0,
                slots=1,
                own_queue=keys.node_queue(topic, "prefill", node),
            )
        return loadtable.scores(r, config, "prefill")

    assert publish_all() == {nodes[0]: 0.0, nodes[1]: 0.0}
    big, _ = loadtable.place(r, config, ("prefill",), 0.5, prefill=("long", 4096))
    other = nodes[1] if big == nodes[0] else nodes[0]
    small = [loadtable.place(r, config, ("prefill",), 0.5, prefill=(f"short{i}", 16))[0] for i in range(6)]
    assert small == [other] * 6, "short prompts went to the node busy with a 4096-token prompt"
    scores = publish_all()  # from the truth: the ledgers
    assert scores[big] == pytest.approx(4096 / loadtable.PREFILL_TOKEN_UNIT)
    assert scores[other] == pytest.approx(6 * 16 / loadtable.PREFILL_TOKEN_UNIT)
    loadtable.release(r, config, other, loadtable.ledger_entry("short0", 16))  # a prefill ended
    assert publish_all()[other] == pytest.approx(5 * 16 / loadtable.PREFILL_TOKEN_UNIT)
    # scheduler_release_load_expire_period (1 s): the other ends never came
    wait_until(
        lambda: publish_all() == {nodes[0]: 0.0, nodes[1]: 0.0}, 10, "the charges with no end to expire"
    )
    assert r.zcard(keys.prefill_ledger(topic, big)) == 0


def _fake_prefill(
    sw_app: Celery, engine, request_id: str, store: str, **tamper
) -> tuple[dict, kvstore.KVRef]:
    """A real blob and a real reference, as a prefill node writes them; then edited."""
    ids = engine.encode("tamper")
    cache, first = engine.prefill(ids, SamplingParams(0.0, 1))
    ref = kvstore.put(
        cache,
        kind=store,
        topic=TOPIC,
        request_id=request_id,
        owner="p1@test",
        host="test",
        ttl_s=60,
        first_token=first,
        prompt_tokens=len(ids),
        client=_redis(sw_app),
    )
    return {**ref.to_dict(), **tamper}, ref


def _send_decode(sw_app: Celery, node: str, request_id: str, prefill_id: str) -> None:
    """An ``fd.decode`` as a prefill node sends it, for the reference stored under ``prefill_id``."""
    sw_app.send_task(
        "fd.decode",
        task_id=f"{request_id}-d",
        kwargs={
            "request_id": request_id,
            "prefill_id": prefill_id,
            "node": node,
            "request": {
                "prompt": "tamper",
                "max_tokens": 5,
                "temperature": 0.0,
                "seed": 1,
                "token_ids": None,
                "node": None,
            },
            "submitted": time.time(),
            "started": time.time(),
            "first_token_at": time.time(),
        },
    )


def _redis(app: Celery):
    from fd_celery.connection import redis_for

    return redis_for(fd_celery.get_config(app))


TAMPERED = {
    "shapes changed": {"shapes": [[2, 3, 32]] * 8},
    "checksum changed": {"checksum": "00000000"},
    "path traversal": {"location": "../../etc/passwd"},
    "unknown kind": {"kind": "nfs"},
    "too large": {"nbytes": 1 << 60},
    "expired": {"expires_at": 1.0},
    "token changed": {"token": "0" * 32},
}


@pytest.mark.parametrize("store", ["shm", "redis"])
@pytest.mark.parametrize("case", list(TAMPERED))
def test_bad_reference_gives_kv_ref_error_and_decode_keeps_serving(
    sw, sw_app, sw_client, engine, store, case
):
    request_id = f"tamper-{uuid.uuid4().hex[:10]}"
    data, real = _fake_prefill(sw_app, engine, request_id, store, **TAMPERED[case])
    prefill_id = f"{request_id}-p"
    sw_app.backend.store_result(prefill_id, data, states.SUCCESS)
    _send_decode(sw_app, _worker(sw, "d1").node, request_id, prefill_id)
    with pytest.raises(KVRefError):
        sw_app.AsyncResult(f"{request_id}-d").get(timeout=60)
    kvstore.discard(real, _redis(sw_app))
    after = sw_client.submit("still serving", max_tokens=4).result(timeout=60)
    assert after.token_ids


def test_nodes_publish_the_kv_stores_they_take(sw, sw_app):
    facts = _redis(sw_app).hget(keys.node_hash(TOPIC, _worker(sw, "d1").node), "kv_stores")
    assert json.loads(facts) == ["shm", "redis"]  # a CPU node: no CUDA IPC


def test_cuda_reference_on_a_cpu_decode_node_is_refused_and_it_keeps_serving(sw, sw_app, sw_client, engine):
    """A cuda reference (well formed) reaching a node without CUDA: a clear KVRefError, the blob's
    claim untouched, and the node serves the next request."""
    request_id = f"cudaref-{uuid.uuid4().hex[:10]}"
    data, real = _fake_prefill(sw_app, engine, request_id, "shm")
    data.update(kind="cuda", pool="", host=socket.gethostname(), ipc=CUDA_IPC)
    prefill_id = f"{request_id}-p"
    sw_app.backend.store_result(prefill_id, data, states.SUCCESS)
    _send_decode(sw_app, _worker(sw, "d1").node, request_id, prefill_id)
    with pytest.raises(KVRefError, match="needs a CUDA decode node"):
        sw_app.AsyncResult(f"{request_id}-d").get(timeout=60)
    assert _redis(sw_app).hexists(keys.kv_held(TOPIC), real.location)
    kvstore.discard(real, _redis(sw_app))
    assert sw_client.submit("still serving", max_tokens=4).result(timeout=60).token_ids


def test_no_decode_node_is_an_error_at_submit(redis_server):
    topic = f"sw-nodecode-{uuid.uuid4().hex[:6]}"
    with LocalCluster(
        redis_server, env={"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "splitwise"}
    ) as lonely:
        worker = lonely.add_worker("lp", env={"FD_ROLE": "prefill"})
        lonely.wait_live([worker.node], topic=topic)
        app = Celery("client-lonely", set_as_current=False)
        fd_celery.install(
            app, scheduler_port=redis_server.port, scheduler_topic=topic, scheduler_name="splitwise"
        )
        with pytest.raises(NoNodeAvailable, match="decode"):
            fd_celery.Client(app).submit("nobody decodes", max_tokens=4)


def test_a_silent_decode_node_is_no_longer_chosen(sw, sw_client, redis_server):
    from fd_celery.scheduler import registry

    d1, d2 = _worker(sw, "d1"), _worker(sw, "d2")
    nodes = redis_server.client()
    d2.signal(signal.SIGSTOP)
    try:
        # silent for scheduler_expire_period (3000 ms)
        wait_until(
            lambda: not registry.is_live(nodes, sw_client.config, d2.node), 30, "the stopped d2 to expire"
        )
        results = [
            h.result(timeout=60) for h in [sw_client.submit("quiet", max_tokens=3, seed=i) for i in range(8)]
        ]
        assert {r.served_by[1] for r in results} == {d1.node}
    finally:
        d2.signal(signal.SIGCONT)
    wait_until(
        lambda: registry.is_live(nodes, sw_client.config, d2.node), 30, "d2 to beat again after SIGCONT"
    )


def test_no_blob_is_left_after_200_requests(sw, sw_client, redis_server):
    handles = [sw_client.submit("leak check", max_tokens=3, seed=i) for i in range(200)]
    results = [h.result(timeout=120) for h in handles]
    assert len({r.request_id for r in results}) == 200
    files = [n for n in os.listdir(kvstore.SHM_DIR) if n.startswith(f"{kvstore.SHM_PREFIX}{TOPIC}-")]
    # What may stay: the prefill processes' recycled files, idle under their free names.
    leftover_shm = [
        n for n in files if not re.fullmatch(rf"{kvstore.SHM_PREFIX}{TOPIC}-free-\d+-[0-9a-f]{{8}}-\d+", n)
    ]
    leftover_redis = redis_server.client().keys(f"fd:{TOPIC}:kv:*")
    assert leftover_shm == [] and leftover_redis == []
    charged = {
        k: redis_server.client().zrange(k, 0, -1) for k in redis_server.client().keys(f"fd:{TOPIC}:ptok:*")
    }
    assert not any(charged.values()), f"prefill charges not released: {charged}"
    deadline = time.monotonic() + 5  # decode's writer thread takes each blob out of the index
    while redis_server.client().hlen(keys.kv_held(TOPIC)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kvstore.bytes_held(redis_server.client(), TOPIC) == {}
    prefill_processes = sum(1 for w in sw.workers if w.alive() and w.node.startswith("p"))
    assert len(files) <= node_knobs().kv_shm_pool_slots * max(1, prefill_processes)


def test_shm_slots_are_recycled_and_gone_when_the_nodes_stop(redis_server):
    """Hand-offs through shared memory reuse the prefill process's files (one per blob in
    flight, not one per request), and a node that stops takes its files with it."""
    topic = f"sw-pool-{uuid.uuid4().hex[:6]}"
    prefix = f"{kvstore.SHM_PREFIX}{topic}-"
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "splitwise"}
    with LocalCluster(redis_server, env=env) as cluster:
        nodes = cluster.add_split_pair(topic)
        client = cluster.client(topic, scheduler_name="splitwise")
        seen: set[str] = set()
        pools = set()
        for i in range(12):
            handle = client.submit(f"pool {i}", max_tokens=3, seed=i)
            assert handle.result(timeout=60).served_by == tuple(nodes)
            ref = handle.async_result.get(timeout=10)
            assert ref["kind"] == "shm" and ref["pool"]
            pools.add(ref["pool"])
            seen.update(n for n in os.listdir(kvstore.SHM_DIR) if n.startswith(prefix))
        assert seen and all("-free-" in n for n in seen), seen
        assert len(seen) == 1 and seen == pools, (
            f"one request at a time should use one recycled file, saw {sorted(seen)}"
        )
    assert [n for n in os.listdir(kvstore.SHM_DIR) if n.startswith(prefix)] == []


def test_decode_node_killed_mid_request_still_completes(sw, sw_client, engine, redis_server):
    d1, d2 = _worker(sw, "d1"), _worker(sw, "d2")
    handles = [sw_client.submit("survive", max_tokens=900, seed=i) for i in range(2)]
    deadline = time.monotonic() + 60
    victim_handle = None
    while victim_handle is None and time.monotonic() < deadline:
        for handle in handles:  # a decode is running on d1 once d1's stream chunks go past seq 1
            entries = redis_server.client().xlen(keys.output_stream(TOPIC, handle.request_id))
            meta = sw_client.app.backend.get_task_meta(handle.request_id)
            if entries > 3 and meta.get("status") == states.SUCCESS:
                victim_handle = handle
                break
        time.sleep(0.01)
    assert victim_handle is not None
    d1.signal(signal.SIGKILL)

    for i, handle in enumerate(handles):
        result = handle.result(timeout=120)
        assert list(result.token_ids) == reference_tokens(engine, "survive", 900, 0.0, i)
        assert result.served_by[1] in {d1.node, d2.node}
    assert not d1.alive()


# --------------------------------------------------------------------------- the shm store, in one process


def _blob_cache(engine: Any, prompt: str = "pool slots in one process") -> Any:
    cache, _ = engine.prefill(engine.encode(prompt), SamplingParams(0.0, 1))
    return cache


def _put_shm(cache: Any, request_id: str) -> kvstore.KVRef:
    return kvstore.put(
        cache,
        kind="shm",
        topic=run_topic("pool-unit"),
        request_id=request_id,
        owner="p@h",
        host="h",
        ttl_s=60,
        first_token=0,
        prompt_tokens=cache.num_tokens,
    )


def test_shm_slot_lifecycle(engine):
    """A pooled blob: taken once (a second take finds it missing), held while tensors built on
    its pages live, back under its free name when they are gone, and reused by the next put."""
    import gc

    cache = _blob_cache(engine)
    ref = _put_shm(cache, "pool-a")
    free = os.path.join(kvstore.SHM_DIR, ref.pool)
    assert (
        ref.pool and not os.path.exists(free) and os.path.exists(os.path.join(kvstore.SHM_DIR, ref.location))
    )
    taken = kvstore.take(ref, "cpu")
    for got, want in zip(taken.tensors(), cache.tensors()):
        assert torch.equal(got, want)
    with pytest.raises(KVRefError, match="missing"):
        kvstore.take(ref, "cpu")
    assert os.path.exists(free + "-held") and not os.path.exists(free)
    inode = os.stat(free + "-held").st_ino
    del taken, got
    gc.collect()
    assert os.path.exists(free) and not os.path.exists(free + "-held")
    again = _put_shm(cache, "pool-b")
    assert again.pool == ref.pool and os.stat(os.path.join(kvstore.SHM_DIR, again.location)).st_ino == inode
    kvstore.discard(again)
    assert os.path.exists(free)


def test_shm_pool_name_cannot_leave_the_store(engine):
    ref = _put_shm(_blob_cache(engine), "pool-c")
    try:
        for bad in (
            "../../tmp/x",
            "fdkv-other-free-123-01234567-0",
            ref.pool + "/../x",
            "/dev/shm/" + ref.pool,
        ):
            with pytest.raises(KVRefError, match="pool name"):
                kvstore.KVRef.from_dict({**ref.to_dict(), "pool": bad})
        edited = kvstore.KVRef.from_dict({**ref.to_dict(), "pool": ref.pool[:-1] + "9"})
        with pytest.raises(KVRefError, match="does not match"):
            kvstore.take(edited, "cpu")
    finally:
        kvstore.discard(ref)


@pytest.mark.parametrize("window", [8, 64, 1 << 20])
def test_pool_copy_sums_what_it_copies(window, monkeypatch):
    """The pool's one-pass copy gives the checksum of the plain sum, whatever the part sizes
    (float32 parts of odd length put words across parts) and wherever the windows fall."""
    import random

    monkeypatch.setattr(kvblob, "COPY_WINDOW", window)
    rng = random.Random(window)
    for _ in range(200):
        parts = [
            torch.randint(0, 256, (rng.choice([0, 1, 3, 4, 7, 8, 60, 64, 65, 200]),), dtype=torch.uint8)
            for _ in range(rng.randint(0, 6))
        ]
        dest = torch.empty(sum(len(p) for p in parts), dtype=torch.uint8)
        checksum = kvblob.copy_summed(dest, parts)
        assert torch.equal(dest, torch.cat(parts)) if parts else len(dest) == 0
        assert checksum == kvblob.checksum(parts)


@pytest.mark.parametrize("store", ["shm", "redis"])
def test_decode_delivered_after_its_request_ended_releases_the_blob(sw, sw_app, sw_client, engine, store):
    """A decode that arrives after its request ended (the second decode of a prefill that ran
    twice) computes nothing, but releases the blob its reference names instead of leaving it to
    the TTL sweep."""
    done = sw_client.submit("ended already", max_tokens=4, seed=2)
    first = done.result(timeout=60)
    data, ref = _fake_prefill(sw_app, engine, done.request_id, store)
    prefill_id = f"{done.request_id}-again"
    sw_app.backend.store_result(prefill_id, data, states.SUCCESS)
    r = _redis(sw_app)
    assert r.hexists(keys.kv_held(TOPIC), ref.location)
    from fd_celery.scheduler import registry

    d2 = _worker(sw, "d2")  # (the node this file never kills: d1 dies in the kill -9 test)
    wait_until(lambda: registry.is_live(r, sw_client.config, d2.node), 30, "d2 to be live")
    _send_decode(sw_app, d2.node, done.request_id, prefill_id)
    again = sw_app.AsyncResult(f"{done.request_id}-d").get(timeout=60)
    assert again["token_ids"] == list(first.token_ids), "the late decode did not return the request's end"
    assert not r.hexists(keys.kv_held(TOPIC), ref.location), "the blob is still in the bytes-held index"
    if store == "shm":
        assert not os.path.exists(os.path.join(kvstore.SHM_DIR, ref.location)), "the shm blob was left"
    else:
        assert not r.exists(ref.location), "the Redis blob was left"


SAMPLED = {"top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3, "frequency_penalty": 0.4, "min_tokens": 5}


def test_split_run_with_sampling_parameters_equals_one_engine(sw, sw_client, engine):
    """Penalties need the prompt and the first token on the decode node: the tokens equal the
    reference run of the same parameters in one engine."""
    from fd_celery.engine import SamplingParams

    result = sw_client.submit("Split, sampled", max_tokens=32, temperature=0.9, seed=12, **SAMPLED).result(
        timeout=60
    )
    sampling = SamplingParams(0.9, 12, **SAMPLED)
    expected = list(engine.generate(engine.encode("Split, sampled"), sampling, 32))
    if expected and expected[-1] == engine.eos_token_id:
        expected = expected[:-1]
    assert list(result.token_ids) == expected
    assert len(result.served_by) == 2
