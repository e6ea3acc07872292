"""Issue 14.1: nothing fd_celery writes to /dev/shm outlives its owners, whatever way they end.

A recycled file names its writer's pid and goes once that process is gone (a surviving node's
sweep, or the next start's); a blob on its way to a decode node goes when its request's TTL (in
its header) has passed, whatever the sweeping node's own TTL; the blobs whose references lived in
a Redis that is stopped for good go with it. Real processes, real files, real Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from fd_celery import kv
from fd_celery.engine import SamplingParams
from fd_celery.kv import SHM_DIR
from fd_celery.kv import shm as kv_shm
from fd_celery.local_cluster import LocalCluster, RedisServer
from tests.conftest import make_app, run_topic, shm_files, wait_until

_PID_RE = re.compile(r"-free-([0-9]+)-")


def put_blob(engine: Any, topic: str, request_id: str, ttl_s: float, client: Any = None) -> kv.KVRef:
    cache, _ = engine.prefill(engine.encode("what the sweep finds"), SamplingParams(0.0, 1))
    return kv.put(
        cache,
        kind="shm",
        topic=topic,
        request_id=request_id,
        owner="p@h",
        host="h",
        ttl_s=ttl_s,
        first_token=0,
        prompt_tokens=cache.num_tokens,
        client=client,
    )


def writer_killed_mid_work(topic: str) -> None:
    """A process that wrote two pooled blobs (one handed over and not taken, one given back to
    its pool, so a free slot file) and was killed with SIGKILL: no exit handler ran."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from fd_celery import kv
        from fd_celery.engine import SamplingParams, load_engine
        engine = load_engine("fd-tiny", "cpu")
        cache, _ = engine.prefill(engine.encode("a writer killed"), SamplingParams(0.0, 1))
        common = dict(kind="shm", topic={topic!r}, owner="p@h", host="h", first_token=0,
                      prompt_tokens=cache.num_tokens)
        kv.put(cache, request_id="in-transit", ttl_s=600, **common)
        kv.discard(kv.put(cache, request_id="given-back", ttl_s=600, **common))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_sweep_removes_what_dead_writers_left_and_expired_blobs_only(engine):
    topic = run_topic("shm-sweep")
    writer_killed_mid_work(topic)
    left = shm_files(topic)
    free = [n for n in left if _PID_RE.search(n) and not n.endswith("-held")]
    transit = [n for n in left if n.startswith(f"fdkv-{topic}-in-transit-")]
    assert free and transit, left
    expired = put_blob(engine, topic, "expired", ttl_s=-(kv_shm.EXPIRED_GRACE_S + 1))
    live = put_blob(engine, topic, "live", ttl_s=600)
    try:
        # a sweeping node whose own TTL is far longer than the expired blob's (900 s + grace)
        kv.sweep_shm(960.0)
        after = set(shm_files(topic))
        assert not after & set(free), "the free slot file of a dead writer is still there"
        assert expired.location not in after, "a blob past its TTL is still there"
        assert live.location in after, "a blob within its TTL was swept"
        assert set(transit) <= after, "a blob in transit within its TTL was swept"
    finally:
        kv.discard(live)
        kv_shm.remove_blobs(transit)
        kv.close_pool()  # this process's own slot files (a live writer's: the sweep leaves them)
    assert shm_files(topic) == []


def test_a_stopped_redis_takes_the_blobs_it_indexed_with_it(engine):
    topic = run_topic("shm-redis-gone")
    server = RedisServer().start()
    try:
        indexed = put_blob(engine, topic, "indexed", ttl_s=600, client=server.client())
        other = put_blob(engine, topic, "not-indexed", ttl_s=600)  # another Redis's, say
    finally:
        server.stop()
    try:
        assert os.path.exists(os.path.join(SHM_DIR, other.location))
        assert not os.path.exists(os.path.join(SHM_DIR, indexed.location))
    finally:
        kv.discard(other)
        kv.close_pool()
    assert shm_files(topic) == []


def test_remove_blobs_touches_nothing_outside_the_store(tmp_path):
    outside = tmp_path / "keep"
    outside.write_text("x")
    assert kv_shm.remove_blobs([str(outside), "../" + str(outside), "fdkv-x/../../etc/passwd", 7]) == 0
    assert outside.exists()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def _pids_in(names: list[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _PID_RE.search(n))}


def test_killed_nodes_leave_nothing_a_survivor_or_the_next_start_does_not_sweep(redis_server):
    """A splitwise pair with a short TTL: kill -9 the prefill node's pool child (its main
    process survives and sweeps its slot files), leave blobs in transit to a stopped decode
    node, kill -9 both nodes whole; a node started afterwards (another topic, the default TTL of
    900 s) sweeps every file they left once the requests' TTL has passed."""
    topic = run_topic("shm-kill")
    ttl_s = 3
    env = {
        "FD_SCHEDULER_TOPIC": topic,
        "FD_SCHEDULER_NAME": "splitwise",
        "FD_SCHEDULER_TTL": str(ttl_s),
        # a stopped decode node stays routable long enough to be handed blobs on a busy machine
        "FD_SCHEDULER_EXPIRE_PERIOD": "120s",
    }
    with LocalCluster(redis_server, env=env) as cluster:
        cluster.add_split_pair(topic)
        prefill, decode = cluster.workers
        # the nodes' TTL (3 s) bounds their blobs; the requests' own TTL leaves room for a busy machine
        app = make_app(redis_server, scheduler_topic=topic, scheduler_name="splitwise", scheduler_ttl=300)
        for i in range(3):
            assert app.send_task("fd.prefill", kwargs={"prompt": f"warm {i}", "max_tokens": 2}).get(
                timeout=120
            )
        assert prefill.process is not None
        (child,) = _children(prefill.process.pid)
        wait_until(lambda: child in _pids_in(shm_files(topic)), 30, "the prefill child's slot files")
        os.kill(child, signal.SIGKILL)
        wait_until(
            lambda: child not in _pids_in(shm_files(topic)),
            30,
            "the surviving prefill main process to sweep its killed child's slot files",
        )

        decode.signal(signal.SIGSTOP)  # still routable for an expire period
        for i in range(2):
            app.send_task("fd.prefill", kwargs={"prompt": f"in transit {i}", "max_tokens": 2})
        wait_until(
            lambda: [n for n in shm_files(topic) if not _PID_RE.search(n)],
            30,
            "blobs handed to the stopped decode node",
        )
        for worker in (prefill, decode):
            worker.signal(signal.SIGKILL)
        for worker in (prefill, decode):
            assert worker.process is not None
            worker.process.wait(10)
        left = shm_files(topic)
        in_transit = [n for n in left if not _PID_RE.search(n)]
        assert in_transit, f"no blob in transit was left to sweep: the test proves nothing ({left})"

        other = run_topic("shm-next-start")
        with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": other}) as later:
            node = later.add_worker("next")
            later.wait_live([node.node], topic=other)
            started = time.monotonic()
            wait_until(lambda: shm_files(topic) == [], 60, f"the next start to sweep {left}")
            print(
                f"\nnext start swept {len(left)} file(s) within {time.monotonic() - started:.1f}s of joining"
            )


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_node_stopped_by_a_signal_leaves_no_file(redis_server, how):
    topic = run_topic(f"shm-stop-{how.name.lower()}")
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "splitwise"}
    with LocalCluster(redis_server, env=env) as cluster:
        cluster.add_split_pair(topic)
        with cluster.client(topic, scheduler_name="splitwise") as client:  # (prefill and decode done)
            for i in range(3):
                assert client.submit(f"stop {i}", max_tokens=2).result(timeout=120).token_ids
        assert shm_files(topic), "no slot file to remove: the test proves nothing"
        for worker in cluster.workers:
            worker.signal(how)
        for worker in cluster.workers:
            assert worker.process is not None
            worker.process.wait(30)
        try:
            wait_until(lambda: shm_files(topic) == [], 30, f"no KV file after {how.name}")
        except AssertionError:
            raise AssertionError(f"KV files left after {how.name}: {shm_files(topic)}") from None
