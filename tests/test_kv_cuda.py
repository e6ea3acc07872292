"""The ``cuda`` KV store: CUDA IPC hand-off between prefill and decode processes on one host.

Everywhere: a cuda reference's ``ipc`` object is checked field by field, the blob's header leaves
it out, the store is chosen as the nodes' hosts and devices allow, a cuda reference is refused on
another host or a node without CUDA (with a real worker: ``test_splitwise``), and the stores'
bookkeeping leaves a cuda blob's claim to its producer.

With CUDA (skipped cleanly elsewhere): the real hand-off, in one process and across processes
(a producer process, the test as decode), released when decode is done, released at expiry when
nobody came, a tampered reference refused, and a split cluster on the GPU giving the tokens of
one mixed GPU node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest
import torch

from fd_celery import keys
from fd_celery import kv as kvstore
from fd_celery.errors import KVRefError
from fd_celery.kv import blob as kvblob
from fd_celery.kv import cuda as kvcuda
from fd_celery.kv import index as kvindex
from fd_celery.kv.ref import blob_name
from fd_celery.local_cluster import LocalCluster, RedisServer
from tests.conftest import CUDA_IPC as IPC
from tests.conftest import reference_tokens

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch sees no GPU here)")


def _cuda_ref(**fields: Any) -> dict[str, Any]:
    token = uuid.uuid4().hex
    ref = kvstore.KVRef(
        kind="cuda",
        location=blob_name("kvc", "req-1", token),
        topic="kvc",
        request_id="req-1",
        token=token,
        dtype="float32",
        shapes=((2, 3, 4), (2, 3, 4)),
        num_tokens=3,
        nbytes=192,
        checksum="s64:" + "1" * 16,
        owner="p@host",
        host=socket.gethostname(),
        expires_at=time.time() + 60,
        first_token=5,
        prompt_tokens=3,
        ipc=dict(IPC),
    )
    return {**ref.to_dict(), **fields}


def test_a_well_formed_cuda_reference_survives_json():
    data = json.loads(json.dumps(_cuda_ref()))
    ref = kvstore.KVRef.from_dict(data)
    assert ref.kind == "cuda" and ref.ipc == IPC and ref.to_dict() == data


BAD_IPC = {
    "no ipc object": (None, "needs an ipc object"),
    "a field missing": ({k: v for k, v in IPC.items() if k != "event"}, "needs an ipc object"),
    "a field too many": ({**IPC, "path": "/etc/passwd"}, "needs an ipc object"),
    "a string for a number": ({**IPC, "storage_bytes": "1048576"}, "ipc.storage_bytes must be int"),
    "a bool for a number": ({**IPC, "device": True}, "ipc.device must be int"),
    "a negative offset": ({**IPC, "storage_offset": -64}, "out of range"),
    "a device past 255": ({**IPC, "device": 300}, "ipc.device=300 is out of range"),
    "a handle not base64": ({**IPC, "handle": "not base64!"}, "ipc.handle is not base64"),
    "a handle too long": ({**IPC, "handle": "QUJD" * 200}, "ipc.handle is longer"),
    "a counter file outside torch's": (
        {**IPC, "counter": "/../dev/shm/fdkv-x"},
        "not a torch reference counter",
    ),
    "a counter past its file": ({**IPC, "counter_offset": 10000}, "counter_offset=10000 is out of range"),
}


@pytest.mark.parametrize("case", list(BAD_IPC))
def test_bad_ipc_object_is_a_kv_ref_error(case):
    ipc, message = BAD_IPC[case]
    with pytest.raises(KVRefError, match=message):
        kvstore.KVRef.from_dict(_cuda_ref(ipc=ipc))


def test_other_kinds_carry_no_ipc_object():
    with pytest.raises(KVRefError, match="kind shm carries an ipc object"):
        kvstore.KVRef.from_dict(_cuda_ref(kind="shm"))


def test_the_blob_header_is_the_reference_without_its_ipc_object():
    """The header is written before the buffer is shared, so it cannot hold the handle; any other
    field edited still changes it."""
    ref = kvstore.KVRef.from_dict(_cuda_ref())
    other_handle = kvstore.KVRef.from_dict({**ref.to_dict(), "ipc": {**IPC, "handle": "WFla" * 21 + "WQ=="}})
    assert kvblob.header(ref) == kvblob.header(other_handle)
    assert IPC["handle"].encode() not in kvblob.header(ref)
    edited = kvstore.KVRef.from_dict({**ref.to_dict(), "first_token": 6})
    assert kvblob.header(edited) != kvblob.header(ref)


@pytest.mark.parametrize(
    "same_host,device,peer,forced,expected",
    [
        (True, "cuda", ["cuda", "shm", "redis"], "auto", "cuda"),
        (True, "cuda:1", ["cuda", "shm", "redis"], "auto", "cuda"),
        (True, "cuda", ["shm", "redis"], "auto", "shm"),  # the decode node is on the CPU
        (True, "cpu", ["cuda", "shm", "redis"], "auto", "shm"),  # prefill is on the CPU
        (True, "cpu", None, "auto", "shm"),  # a node that does not publish its stores
        (True, "cpu", ["redis"], "auto", "redis"),  # no /dev/shm on the decode side
        (False, "cuda", ["cuda", "shm", "redis"], "auto", "redis"),  # another host
        (True, "cuda", ["cuda", "shm", "redis"], "redis", "redis"),  # FD_KV_STORE
    ],
)
def test_the_store_follows_hosts_and_devices(same_host, device, peer, forced, expected):
    assert (
        kvstore.choose_store(same_host=same_host, device=device, peer_stores=peer, forced=forced) == expected
    )


def test_nodes_offer_cuda_only_on_cuda():
    assert kvstore.stores_offered("cuda:0")[0] == "cuda"
    assert "cuda" not in kvstore.stores_offered("cpu") and "redis" in kvstore.stores_offered("cpu")


def test_a_cuda_reference_is_refused_off_its_host_and_off_cuda():
    with pytest.raises(KVRefError, match="one host only"):
        kvstore.take(kvstore.KVRef.from_dict(_cuda_ref(host="elsewhere")), "cuda")
    with pytest.raises(KVRefError, match="needs a CUDA decode node"):
        kvstore.take(kvstore.KVRef.from_dict(_cuda_ref()), "cpu")


def test_an_expired_cuda_claim_stays_for_its_producer(redis_server: RedisServer):
    """The KV-bytes gauge prunes expired entries, but a cuda entry is its producer's claim: taking
    it away would leave the GPU buffer unreleased. Only one whose producer never came goes."""
    r, topic = redis_server.client(), f"kvc-{uuid.uuid4().hex[:6]}"
    now = time.time()
    r.hset(
        keys.kv_held(topic),
        mapping={
            "shm-old": f"p|10|{now - 5}|shm",
            "cuda-old": f"p|10|{now - 5}|cuda",
            "cuda-orphan": f"p|10|{now - 2 * kvindex.ORPHAN_CLAIM_S}|cuda",
            "live": f"p|10|{now + 60}|cuda",
        },
    )
    assert kvstore.bytes_held(r, topic) == {"p": 10}
    assert sorted(k.decode() for k in r.hkeys(keys.kv_held(topic))) == ["cuda-old", "live"]


# --------------------------------------------------------------------------- with CUDA


def _gpu_cache(prompt: str = "cuda ipc") -> tuple[Any, Any, int, list[int]]:
    from fd_celery.engine import SamplingParams, load_engine

    engine = load_engine("fd-tiny", "cuda")
    ids = engine.encode(prompt)
    cache, first = engine.prefill(ids, SamplingParams(0.0, 1))
    return engine, cache, first, ids


def _put(cache: Any, first: int, ids: list[int], client: Any, topic: str, ttl_s: float = 60) -> kvstore.KVRef:
    return kvstore.put(
        cache,
        kind="cuda",
        topic=topic,
        request_id=f"r-{uuid.uuid4().hex[:8]}",
        owner="p",
        host=socket.gethostname(),
        ttl_s=ttl_s,
        first_token=first,
        prompt_tokens=len(ids),
        client=client,
    )


@needs_cuda
def test_hand_off_in_one_process(redis_server: RedisServer):
    """A mixed node with a thread pool decodes what it prefilled: no IPC open (CUDA refuses a
    process's own handle), the buffer is taken from the producer's registry."""
    r, topic = redis_server.client(), f"kvc-{uuid.uuid4().hex[:6]}"
    _, cache, first, ids = _gpu_cache()
    ref = _put(cache, first, ids, r, topic)
    assert kvcuda.blobs_held() == 1 and r.hexists(keys.kv_held(topic), ref.location)
    taken = kvstore.take(ref, "cuda", r)
    for got, want in zip(taken.tensors(), cache.tensors()):
        assert torch.equal(got, want)
    assert kvcuda.blobs_held() == 0 and not r.hexists(keys.kv_held(topic), ref.location)
    with pytest.raises(KVRefError, match="missing"):
        kvstore.take(ref, "cuda", r)


PRODUCER = textwrap.dedent("""
    import json, socket, sys, time
    import redis, torch
    from fd_celery import kv as kvstore
    from fd_celery.kv import cuda as kvcuda
    from fd_celery.settings import node_knobs
    from fd_celery.engine import SamplingParams, load_engine

    port, topic, ttl, prompt = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    client = redis.Redis(port=port)
    engine = load_engine("fd-tiny", "cuda")
    ids = engine.encode(prompt)
    cache, first = engine.prefill(ids, SamplingParams(0.0, 1))
    ref = kvstore.put(cache, kind="cuda", topic=topic, request_id="ipc-1", owner="producer",
                      host=socket.gethostname(), ttl_s=ttl, first_token=first, prompt_tokens=len(ids),
                      client=client)
    del cache
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    print(json.dumps(ref.to_dict()), flush=True)
    sys.stdin.readline()  # decode is done, or will never come
    deadline = time.time() + ttl + node_knobs().kv_cuda_grace_s + 10
    while time.time() < deadline and (kvcuda.blobs_held() or torch.cuda.memory_allocated() > before - ref.nbytes):
        time.sleep(0.05)
    print(json.dumps({"held": kvcuda.blobs_held(), "freed": before - torch.cuda.memory_allocated()}), flush=True)
""")


def _producer(
    redis_server: RedisServer, topic: str, ttl_s: float, prompt: str
) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(redis_server.port), topic, str(ttl_s), prompt],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "FD_KV_CUDA_GRACE_S": "0.5"},
    )
    assert proc.stdout is not None and proc.stdin is not None
    return proc, json.loads(proc.stdout.readline())


def _producer_end(proc: subprocess.Popen) -> dict:
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdin.write("done\n")
    proc.stdin.flush()
    report = json.loads(proc.stdout.readline())
    proc.wait(timeout=30)
    return report


@needs_cuda
@pytest.mark.slow
def test_hand_off_across_processes_is_exact_and_frees_the_producers_memory(redis_server: RedisServer):
    r, topic = redis_server.client(), f"kvc-{uuid.uuid4().hex[:6]}"
    proc, data = _producer(redis_server, topic, 60, "across processes")
    try:
        ref = kvstore.KVRef.from_dict(data)
        taken = kvstore.take(ref, "cuda", r)
        _, cache, _, _ = _gpu_cache("across processes")
        for got, want in zip(taken.tensors(), cache.tensors()):
            assert torch.equal(got, want)
        with pytest.raises(KVRefError, match="missing"):
            kvstore.take(ref, "cuda", r)
    finally:
        report = _producer_end(proc)
    assert report["held"] == 0 and report["freed"] >= ref.nbytes


@needs_cuda
@pytest.mark.slow
def test_a_blob_nobody_takes_is_freed_at_its_expiry(redis_server: RedisServer):
    r, topic = redis_server.client(), f"kvc-{uuid.uuid4().hex[:6]}"
    proc, data = _producer(redis_server, topic, 1.0, "nobody comes")
    report = _producer_end(proc)
    assert report["held"] == 0 and report["freed"] >= data["nbytes"]
    assert r.hlen(keys.kv_held(topic)) == 0


@needs_cuda
@pytest.mark.slow
def test_a_tampered_cuda_reference_is_refused_and_the_blob_still_freed(redis_server: RedisServer):
    r, topic = redis_server.client(), f"kvc-{uuid.uuid4().hex[:6]}"
    proc, data = _producer(redis_server, topic, 60, "tampered")
    try:
        with pytest.raises(KVRefError, match="does not match"):
            kvstore.take(kvstore.KVRef.from_dict({**data, "first_token": data["first_token"] + 1}), "cuda", r)
    finally:
        report = _producer_end(proc)
    assert report["held"] == 0 and report["freed"] >= data["nbytes"]


@needs_cuda
@pytest.mark.slow
def test_split_cluster_on_the_gpu_gives_the_tokens_of_one_gpu_node(redis_server: RedisServer):
    topic = f"kvc-sw-{uuid.uuid4().hex[:6]}"
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "splitwise", "FD_DEVICE": "cuda"}
    with LocalCluster(redis_server, env=env) as cluster:
        nodes = cluster.add_split_pair(topic)
        client = cluster.client(topic, scheduler_name="splitwise")
        handles = [
            client.submit(f"gpu hand-off {i}", max_tokens=12, temperature=0.8, seed=i) for i in range(6)
        ]
        results = [h.result(timeout=120) for h in handles]
        ref = handles[0].async_result.get(timeout=10)  # the prefill task's result: the reference
    assert ref["kind"] == "cuda" and len(json.dumps(ref)) < 4096
    engine, _, _, _ = _gpu_cache()
    for i, result in enumerate(results):
        assert list(result.served_by) == nodes and result.extra["kv_store"] == "cuda"
        assert list(result.token_ids) == reference_tokens(engine, f"gpu hand-off {i}", 12, 0.8, i)
    assert redis_server.client().hlen(keys.kv_held(topic)) == 0
