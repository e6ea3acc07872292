"""Fault injection with real processes and a real Redis: kill -9, SIGSTOP, a Redis restart, a
steal storm.

Every test checks every request it sent: it either completed exactly once (its tokens are the
reference tokens of the built-in model, the caller's stream shows each chunk once and in order,
and the stream ends once) or failed with a clear ``FDCeleryError``. No request may hang (a
``ResultTimeout`` is a failure) and none may show duplicated or mixed output.

Each test starts its own small cluster (its own topic) with a short visibility timeout, so the
request of a killed worker comes back within seconds. Figures (faults, requests lost, duplicated,
failed, timings) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery, states

import fd_celery
from fd_celery import keys
from fd_celery.client.sync import RequestHandle
from fd_celery.errors import BrokerUnavailable, FDCeleryError, ResultTimeout
from fd_celery.local_cluster import LocalCluster, RedisServer, WorkerProcess, free_port
from fd_celery.observability import metrics
from fd_celery.protocol import GenerationResult, OutputChunk
from fd_celery.scheduler import recovery
from tests.conftest import reference_tokens, run_topic, wait_until

pytestmark = pytest.mark.slow

EXPIRE_S = 3.0  # scheduler_expire_period's default, 3000 ms
OUTAGE_CAP_S = 15.0  # a call made while Redis is down must answer within this
DOWN_SUBMIT_CAP_S = 6.0  # "quickly": a submit with Redis down answers within this


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Spec:
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    node: str | None = None


@dataclass
class Outcome:
    spec: Spec
    handle: RequestHandle
    chunks: list[OutputChunk] = field(default_factory=list)
    result: GenerationResult | None = None
    error: FDCeleryError | None = None


_REFERENCES: dict[Spec, list[int]] = {}


def _reference(engine: Any, spec: Spec) -> list[int]:
    key = Spec(spec.prompt, spec.max_tokens, spec.temperature, spec.seed)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_tokens(engine, spec.prompt, spec.max_tokens, spec.temperature, spec.seed)
    return _REFERENCES[key]


def _cluster(
    redis_server: RedisServer, topic: str, workers: Mapping[str, Mapping[str, str]], **env: str
) -> LocalCluster:
    cluster = LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": topic, **env})
    try:
        started = [cluster.add_worker(name, env=dict(worker_env)) for name, worker_env in workers.items()]
        cluster.wait_live([w.node for w in started], topic=topic)
    except Exception:
        cluster.close()
        raise
    return cluster


def _client(port: int, topic: str, **overrides: Any) -> fd_celery.Client:
    app = Celery(f"client-{topic}-{uuid.uuid4().hex[:4]}", set_as_current=False)
    fd_celery.install(app, scheduler_port=port, scheduler_topic=topic, **overrides)
    return fd_celery.Client(app)


def _worker(cluster: LocalCluster, name: str) -> WorkerProcess:
    return next(w for w in cluster.workers if w.name == name)


def _submit(client: fd_celery.Client, specs: list[Spec]) -> list[Outcome]:
    return [
        Outcome(
            spec,
            client.submit(
                spec.prompt,
                max_tokens=spec.max_tokens,
                temperature=spec.temperature,
                seed=spec.seed,
                node=spec.node,
            ),
        )
        for spec in specs
    ]


def _follow(outcome: Outcome, timeout_s: float) -> None:
    """Read the request as its caller does: the stream, then the result (or its error)."""
    try:
        for chunk in outcome.handle.stream(timeout=timeout_s):
            outcome.chunks.append(chunk)
        outcome.result = outcome.handle.result(timeout=10)
    except ResultTimeout:
        raise AssertionError(
            f"request {outcome.handle.request_id} hung: no end within {timeout_s}s "
            f"(saw {len(outcome.chunks)} chunks)"
        ) from None
    except FDCeleryError as exc:
        outcome.error = exc


def _stream_entries(r: redis.Redis, topic: str, request_id: str) -> list[tuple[int, dict[bytes, bytes]]]:
    entries: Any = r.xrange(keys.output_stream(topic, request_id))
    return [(int(eid.split(b"-")[1]) - 1, fields) for eid, fields in entries]


def _check_exactly_once(r: redis.Redis, topic: str, engine: Any, outcomes: list[Outcome]) -> dict[str, Any]:
    """Every request completed once with the reference tokens, or failed with a clear error.
    Returns the figures."""
    completed, duplicated = 0, 0
    failed: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    assert len({o.handle.request_id for o in outcomes}) == len(outcomes)
    for o in outcomes:
        rid = o.handle.request_id
        reference = _reference(engine, o.spec)
        entries = _stream_entries(r, topic, rid)
        seqs = [seq for seq, _ in entries]
        ends = [fields.get(b"end") for _, fields in entries].count(b"1")
        streamed = [t for c in o.chunks for t in c.token_ids]
        if seqs != list(range(len(seqs))):
            problems.append(f"{rid}: stream entries not unique and in order: {seqs}")
        if entries and (ends != 1 or entries[-1][1].get(b"end") != b"1"):
            problems.append(f"{rid}: stream has {ends} end entries (want one, last)")
        if [c.seq for c in o.chunks] != list(range(len(o.chunks))):
            problems.append(f"{rid}: caller saw chunks {[c.seq for c in o.chunks]}")
        if len(streamed) > len(reference):
            duplicated += 1
        if o.error is None:
            assert o.result is not None
            completed += 1
            if not entries:
                problems.append(f"{rid}: completed without an output stream")
            if list(o.result.token_ids) != reference:
                problems.append(
                    f"{rid}: result tokens differ from the reference (served by {o.result.served_by})"
                )
            if streamed != list(o.result.token_ids):
                problems.append(
                    f"{rid}: the caller's stream ({len(streamed)} tokens) differs from the result "
                    f"({len(o.result.token_ids)} tokens): lost or duplicated chunks"
                )
            if "".join(c.text for c in o.chunks) != o.result.text:
                problems.append(f"{rid}: streamed text differs from the result text")
        else:
            failed[type(o.error).__name__] += 1
            if not isinstance(o.error, FDCeleryError) or not o.error.message:
                problems.append(f"{rid}: unclear error {o.error!r}")
            if streamed != reference[: len(streamed)]:
                problems.append(
                    f"{rid}: failed after showing output that is not the reference (mixed output)"
                )
    assert not problems, "\n".join(problems)
    return {
        "requests": len(outcomes),
        "completed": completed,
        "failed": dict(failed),
        "lost": 0,
        "duplicated": duplicated,
    }


def _meta(app: Celery, request_id: str) -> dict[str, Any]:
    return app.backend.get_task_meta(request_id)


def _wait_running_on(
    client: fd_celery.Client,
    r: redis.Redis,
    topic: str,
    outcomes: list[Outcome],
    node: str,
    min_entries: int,
    timeout_s: float = 60,
) -> Outcome:
    """A request that ``node`` is running now, with at least ``min_entries`` stream entries and no
    end (``min_entries`` = 0: started, nothing written yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for o in outcomes:
            meta = _meta(client.app, o.handle.request_id)
            info = meta.get("result")
            if (
                meta.get("status") != states.STARTED
                or not isinstance(info, dict)
                or info.get("hostname") != node
            ):
                continue
            entries = _stream_entries(r, topic, o.handle.request_id)
            if any(f.get(b"end") for _, f in entries):
                continue
            if (min_entries == 0 and not entries) or (min_entries > 0 and len(entries) >= min_entries):
                return o
        time.sleep(0.005)
    raise AssertionError(f"no request was running on {node} within {timeout_s}s")


def _kill_and_follow(
    victim: WorkerProcess, r: redis.Redis, topic: str, engine: Any, outcomes: list[Outcome]
) -> tuple[float, dict[str, Any]]:
    """kill -9 ``victim``'s process group, read every request as its caller does, check each
    completed once or failed clearly: (seconds from the kill until the last ended, figures)."""
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for o in outcomes:
        _follow(o, timeout_s=90)
    recovered_s = time.monotonic() - killed_at
    return recovered_s, _check_exactly_once(r, topic, engine, outcomes)


def _report(name: str, **figures: Any) -> None:
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _call_with_cap(fn: Any, cap_s: float) -> tuple[float | None, BaseException | None]:
    """Run ``fn`` in a thread: (seconds it took, its exception or None); seconds is None when it
    had not answered within ``cap_s`` (a hang; the thread is left to finish by itself)."""
    box: dict[str, Any] = {}

    def target() -> None:
        start = time.monotonic()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc
        box["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(cap_s)
    if thread.is_alive():
        return None, None
    return box["elapsed"], box.get("error")


# --------------------------------------------------------------------------- kill -9


def test_kill9_global_node_mid_request(redis_server, engine):
    """kill -9 of a global mixed node's whole process group while it streams a request, with more
    waiting in its queue and another node busy: everything completes exactly once, and the
    running request is back in line after scheduler_expire_period (not the broker's visibility
    timeout, left at its default of scheduler_ttl + 1 h here)."""
    topic = f"fk-{uuid.uuid4().hex[:6]}"
    with _cluster(redis_server, topic, {"a": {}, "b": {}}, FD_SCHEDULER_NAME="global") as cluster:
        a, b = _worker(cluster, "a"), _worker(cluster, "b")
        client = _client(redis_server.port, topic, scheduler_name="global")
        specs = [Spec(f"kill the mixed node {i}", 300, 0.8, i, a.node if i < 4 else None) for i in range(6)]
        outcomes = _submit(client, specs)
        victim = _wait_running_on(client, redis_server.client(), topic, outcomes, a.node, min_entries=5)
        recovered_s, figures = _kill_and_follow(a, redis_server.client(), topic, engine, outcomes)
        assert not a.alive()
        assert figures["completed"] == len(specs), f"requests failed: {figures}"
        assert victim.result is not None and victim.result.served_by[0] == b.node
        assert recovered_s < 60, f"the killed node's request took {recovered_s:.0f}s to come back"
        given_back = redis_server.client().hget(metrics.metrics_key(topic, "givenback"), a.node)
        assert given_back is not None and int(given_back) >= 1, "the give-back is not in the metrics"
        _report("kill -9 global mixed node", faults=1, recovered_s=round(recovered_s, 1), **figures)


def test_kill9_before_the_node_listed_its_request(redis_server, engine):
    """A node killed after it received a request but before its heartbeat listed it as held
    (here its beats are 15 s apart and it dies within the first): the request is not left to the
    broker's visibility timeout (scheduler_ttl + 1 h) but found in kombu's unacked messages of the
    dead node's own queue, and finished elsewhere, exactly once."""
    topic = f"fku-{uuid.uuid4().hex[:6]}"
    with _cluster(
        redis_server,
        topic,
        {"a": {}, "b": {}},
        FD_SCHEDULER_NAME="global",
        FD_SCHEDULER_SYNC_PERIOD="15000",
        FD_SCHEDULER_EXPIRE_PERIOD="18000",
    ) as cluster:
        a, b = _worker(cluster, "a"), _worker(cluster, "b")
        r = redis_server.client()
        client = _client(
            redis_server.port,
            topic,
            scheduler_name="global",
            scheduler_sync_period=15000,
            scheduler_expire_period=18000,
        )
        outcomes = _submit(client, [Spec("die before listing it", 200, 0.8, 3, a.node)])
        victim = _wait_running_on(client, r, topic, outcomes, a.node, min_entries=1)
        assert r.hget(keys.node_hash(topic, a.node), recovery.HELD_FIELD) in (None, b"[]"), (
            "the node listed its request already: this test needs it to die first"
        )
        recovered_s, figures = _kill_and_follow(a, r, topic, engine, outcomes)
        assert figures["completed"] == 1, f"the request failed: {figures}"
        assert victim.result is not None and victim.result.served_by[0] == b.node
        assert int(r.hget(metrics.metrics_key(topic, "givenback"), a.node) or 0) == 1
        _report("kill -9 before the held list", faults=1, recovered_s=round(recovered_s, 1), **figures)


LONG_PROMPT = "The prefill node builds the KV cache of this long prompt. " * 20  # ~1200 bytes


def test_kill9_splitwise_prefill_node_mid_prefill(redis_server, engine):
    """kill -9 of a prefill node while it prefills, with more prefills queued on it: the other
    prefill node takes its orphans, and every request completes exactly once."""
    topic = f"fkp-{uuid.uuid4().hex[:6]}"
    with _cluster(
        redis_server,
        topic,
        {"p1": {"FD_ROLE": "prefill"}, "p2": {"FD_ROLE": "prefill"}, "d1": {"FD_ROLE": "decode"}},
        FD_SCHEDULER_NAME="splitwise",
    ) as cluster:
        p1, p2 = _worker(cluster, "p1"), _worker(cluster, "p2")
        client = _client(redis_server.port, topic, scheduler_name="splitwise")
        specs = [Spec(f"{i}: {LONG_PROMPT}", 24, 0.5, 10 + i, p1.node) for i in range(6)]
        outcomes = _submit(client, specs)
        _wait_running_on(client, redis_server.client(), topic, outcomes, p1.node, min_entries=0)
        recovered_s, figures = _kill_and_follow(p1, redis_server.client(), topic, engine, outcomes)
        assert figures["completed"] == len(specs), f"requests failed: {figures}"
        served = collections.Counter(o.result.served_by[0] for o in outcomes if o.result)
        assert served[p2.node] >= 1, f"p2 took none of p1's requests: {served}"
        _report(
            "kill -9 splitwise prefill node",
            faults=1,
            recovered_s=round(recovered_s, 1),
            prefill_served_by=dict(served),
            **figures,
        )


def test_kill9_splitwise_decode_node_mid_decode(redis_server, engine):
    """kill -9 of a decode node while it decodes (two decode nodes, requests spread over both):
    its decode comes back and is finished by the other one, exactly once."""
    topic = f"fkd-{uuid.uuid4().hex[:6]}"
    with _cluster(
        redis_server,
        topic,
        {"p1": {"FD_ROLE": "prefill"}, "d1": {"FD_ROLE": "decode"}, "d2": {"FD_ROLE": "decode"}},
        FD_SCHEDULER_NAME="splitwise",
    ) as cluster:
        d1, d2 = _worker(cluster, "d1"), _worker(cluster, "d2")
        client = _client(redis_server.port, topic, scheduler_name="splitwise")
        r = redis_server.client()
        specs = [Spec(f"decode dies {i}", 400, 0.7, 20 + i) for i in range(4)]
        outcomes = _submit(client, specs)
        deadline = time.monotonic() + 60
        while True:  # d1 holds a decode, and some decode is mid-stream
            running = r.hget(keys.node_hash(topic, d1.node), "running")
            mid = [
                o
                for o in outcomes
                if 5 <= len(_stream_entries(r, topic, o.handle.request_id)) < 300
                and not r.xrevrange(keys.output_stream(topic, o.handle.request_id), count=1)[0][1].get(b"end")
            ]
            if running is not None and int(running) >= 1 and mid:
                break
            assert time.monotonic() < deadline, "no decode was running on d1 within 60s"
            time.sleep(0.005)
        recovered_s, figures = _kill_and_follow(d1, r, topic, engine, outcomes)
        assert figures["completed"] == len(specs), f"requests failed: {figures}"
        decoded = collections.Counter(o.result.served_by[-1] for o in outcomes if o.result)
        assert decoded[d2.node] >= 1
        _report(
            "kill -9 splitwise decode node",
            faults=1,
            recovered_s=round(recovered_s, 1),
            decode_served_by=dict(decoded),
            **figures,
        )


# --------------------------------------------------------------------------- SIGSTOP


@pytest.mark.parametrize("visibility_s", [60, 2], ids=["running-request-kept", "running-request-redelivered"])
def test_sigstop_past_expire_period_then_sigcont(redis_server, engine, visibility_s):
    """A global node frozen (SIGSTOP) past scheduler_expire_period with requests waiting in its
    queue: another node serves them (orphan rule). With a visibility timeout shorter than the
    freeze, the frozen node's running request is also delivered again and runs twice. After
    SIGCONT no caller sees duplicated or mixed output."""
    topic = f"fs-{uuid.uuid4().hex[:6]}"
    with _cluster(
        redis_server,
        topic,
        {"a": {}, "b": {}},
        FD_SCHEDULER_NAME="global",
        FD_SCHEDULER_MIN_LOAD_SCORE="100",
        FD_VISIBILITY_TIMEOUT_S=str(visibility_s),
    ) as cluster:
        a, b = _worker(cluster, "a"), _worker(cluster, "b")
        client = _client(redis_server.port, topic, scheduler_name="global", scheduler_min_load_score=100)
        r = redis_server.client()
        specs = [Spec(f"frozen node {i}", 250, 0.9, 40 + i, a.node) for i in range(5)]
        outcomes = _submit(client, specs)
        frozen = _wait_running_on(client, r, topic, outcomes, a.node, min_entries=3)
        a.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            served_while_stopped: set[str] = set()
            deadline = stopped_at + 40
            while time.monotonic() < deadline:
                for o in outcomes:
                    rid = o.handle.request_id
                    last = r.xrevrange(keys.output_stream(topic, rid), count=1)
                    if last and last[0][1].get(b"end") and rid != frozen.handle.request_id:
                        served_while_stopped.add(rid)
                if served_while_stopped and time.monotonic() - stopped_at > EXPIRE_S + 1.5:
                    break
                time.sleep(0.02)
            stopped_s = time.monotonic() - stopped_at
        finally:
            a.signal(signal.SIGCONT)
        for o in outcomes:
            _follow(o, timeout_s=90)
        figures = _check_exactly_once(r, topic, engine, outcomes)
        assert served_while_stopped, f"nobody served the frozen node's queue in {stopped_s:.1f}s"
        by_id = {o.handle.request_id: o for o in outcomes}
        assert all(
            by_id[rid].result and by_id[rid].result.served_by[0] == b.node for rid in served_while_stopped
        )
        assert figures["completed"] == len(specs), f"requests failed: {figures}"
        assert a.alive() and b.alive()
        _report(
            f"SIGSTOP {stopped_s:.1f}s (visibility {visibility_s}s)",
            faults=1,
            served_by_others_while_stopped=len(served_while_stopped),
            frozen_request_served_by=list(frozen.result.served_by) if frozen.result else None,
            **figures,
        )
        # the node is serving again after SIGCONT
        after = client.submit("after the freeze", max_tokens=4, seed=1, node=a.node).result(timeout=60)
        assert after.served_by[0] == a.node


# --------------------------------------------------------------------------- Redis restart


def _restart_redis(server: RedisServer, down_s: float, during: Any) -> RedisServer:
    """Stop ``server`` (SIGTERM: Redis writes its AOF and exits), run ``during()`` while it is
    down, keep it down ``down_s`` in all, start a new redis-server on the same port and dir."""
    assert server.process is not None
    server.process.terminate()
    server.process.wait(10)
    stopped = time.monotonic()
    during()
    time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))  # the outage itself: nothing to wait for
    return RedisServer(port=server.port, appendonly=True, workdir=server.workdir).start()


def test_redis_restart_under_load(engine):
    """Redis (AOF on) restarted under load: workers and clients reconnect by themselves, queued
    requests complete after the restart, and calls made while Redis is down fail fast with
    BrokerUnavailable (a submit through the global scheduler, a caller waiting for a result; the
    local scheduler's submit is in test_submit_while_redis_is_down_fails_fast)."""
    server = RedisServer(appendonly=True).start()
    topic = run_topic("rr")
    cluster = LocalCluster(
        server,
        env={"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "global", "FD_VISIBILITY_TIMEOUT_S": "5"},
    )
    try:
        workers = [cluster.add_worker("a"), cluster.add_worker("b")]
        cluster.wait_live([w.node for w in workers], topic=topic)
        client = _client(server.port, topic, scheduler_name="global")
        local_client = _client(server.port, topic)  # the local scheduler's client, same workers
        for c in (client, local_client):  # both have talked to Redis before the outage
            c.submit("warm up", max_tokens=2, seed=0).result(timeout=60)
        specs = [Spec(f"redis restarts {i}", 200, 0.6, 60 + i) for i in range(8)]
        outcomes = _submit(client, specs)
        r = server.client()
        deadline = time.monotonic() + 60
        while not any(r.exists(keys.output_stream(topic, o.handle.request_id)) for o in outcomes):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        queued = {
            o.handle.request_id
            for o in outcomes
            if not r.exists(keys.output_stream(topic, o.handle.request_id))
        }
        answers: dict[str, tuple[float | None, BaseException | None]] = {}

        def while_down() -> None:
            calls = [
                ("submit_global", lambda: client.submit("while down", max_tokens=2)),
                ("result_wait", lambda: outcomes[-1].handle.result(timeout=30)),
            ]
            for name, fn in calls:
                answers[name] = _call_with_cap(fn, OUTAGE_CAP_S)

        server = _restart_redis(server, down_s=3.0, during=while_down)
        restarted_at = time.monotonic()
        for o in outcomes:
            _follow(o, timeout_s=90)
        recovered_s = time.monotonic() - restarted_at
        figures = _check_exactly_once(server.client(), topic, engine, outcomes)
        _report(
            "Redis restart (SIGTERM, AOF, down >= 3s)",
            faults=1,
            queued_at_stop=len(queued),
            recovered_s=round(recovered_s, 1),
            **{
                f"{k}_answers_in_s": (round(v[0], 3) if v[0] is not None else f"hang>{OUTAGE_CAP_S}")
                for k, v in answers.items()
            },
            **{f"{k}_error": type(v[1]).__name__ for k, v in answers.items()},
            **figures,
        )
        lost = [
            o.handle.request_id for o in outcomes if o.handle.request_id in queued and o.error is not None
        ]
        assert not lost, f"requests queued before the restart did not complete: {lost}"
        # new work flows again through both clients
        for c in (client, local_client):
            assert c.submit("after the restart", max_tokens=3, seed=2).result(timeout=60).token_ids
        hung = [name for name, (elapsed, _) in answers.items() if elapsed is None]
        assert not hung, f"calls made while Redis was down hung past {OUTAGE_CAP_S}s: {hung}"
        for name, (_, exc) in answers.items():
            assert isinstance(exc, BrokerUnavailable), f"{name} while Redis was down gave {exc!r}"
            assert f"127.0.0.1:{server.port}" in str(exc), f"{name}: the error does not name the host: {exc}"
    finally:
        cluster.close()
        server.stop()


def test_redis_blip_mid_stream_loses_no_chunk(engine):
    """Redis goes away for a fraction of a second while a long request streams, and comes back
    while the worker is still generating: the caller still sees every token once, in order (or
    the request fails with a clear error).

    Regression: OutputWriter used to drop a batch that failed and append the next ones, leaving a
    gap that the stream's caller skipped while the result had every token."""
    server = RedisServer(appendonly=True).start()
    topic = run_topic("blip")
    cluster = LocalCluster(
        server,
        env={"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "global", "FD_VISIBILITY_TIMEOUT_S": "5"},
    )
    try:
        worker = cluster.add_worker("w")
        cluster.wait_live([worker.node], topic=topic)
        client = _client(server.port, topic, scheduler_name="global")
        outcomes = _submit(client, [Spec("a blip in the middle", 1200, 0.5, 3)])
        key = keys.output_stream(topic, outcomes[0].handle.request_id)
        deadline = time.monotonic() + 60
        while server.client().xlen(key) < 150:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server = _restart_redis(server, down_s=0.3, during=lambda: None)
        _follow(outcomes[0], timeout_s=90)
        entries = _stream_entries(server.client(), topic, outcomes[0].handle.request_id)
        seqs = [seq for seq, _ in entries]
        gaps = [(x, y) for x, y in zip(seqs, seqs[1:]) if y != x + 1]
        _report(
            "Redis blip (0.3 s) mid-stream",
            faults=1,
            entries=len(entries),
            gaps=gaps[:3],
            streamed_tokens=sum(len(c.token_ids) for c in outcomes[0].chunks),
            result_tokens=len(outcomes[0].result.token_ids) if outcomes[0].result else None,
            error=type(outcomes[0].error).__name__ if outcomes[0].error else None,
        )
        _check_exactly_once(server.client(), topic, engine, outcomes)
    finally:
        cluster.close()
        server.stop()


@pytest.mark.parametrize("state", ["cold", "warm"])
@pytest.mark.parametrize("scheduler", ["local", "global", "splitwise"])
def test_submit_while_redis_is_down_fails_fast(scheduler, state):
    """Submit while Redis is down fails with BrokerUnavailable naming the host, within seconds:
    for a client app that never reached Redis (cold), and for one that had (warm: one request
    submitted before Redis went away).

    Regression: the local scheduler's submit used to wait ~20 s for Celery's result consumer and
    then raise a bare RuntimeError ('Retry limit exceeded ... must be restarted')."""
    server = RedisServer().start() if state == "warm" else None
    port = server.port if server is not None else free_port()
    topic = run_topic(f"down-{scheduler}")
    client = _client(port, topic, scheduler_name=scheduler)
    if server is not None:
        if scheduler == "splitwise":  # a live decode node, or submit refuses before publishing
            server.client().zadd(keys.nodes_zset(topic), {"d@x": time.time() * 1000 + 60_000})
            server.client().hset(keys.node_hash(topic, "d@x"), "role", json.dumps("decode"))
        client.submit("before the outage", max_tokens=2)  # stays queued: no worker
        server.stop()
    elapsed, exc = _call_with_cap(lambda: client.submit("nobody home", max_tokens=2), DOWN_SUBMIT_CAP_S)
    _report(
        f"submit with Redis down ({scheduler}, {state} client)",
        answers_in_s=round(elapsed, 3) if elapsed is not None else f"no answer in {DOWN_SUBMIT_CAP_S}s",
        error=type(exc).__name__ if exc else None,
    )
    assert elapsed is not None, f"submit gave no answer within {DOWN_SUBMIT_CAP_S}s"
    assert isinstance(exc, BrokerUnavailable), f"got {exc!r}"
    assert f"127.0.0.1:{port}" in str(exc)


# --------------------------------------------------------------------------- steal storm

STORM_REQUESTS = 2000


@pytest.mark.timeout(480)  # five workers to start, then up to 240 s of requests, then every stream checked
def test_steal_storm(redis_server):
    """One busy global node, four thieves, 2000 short requests all sent to the busy node: every
    request completes exactly once from the caller's view."""
    topic = f"storm-{uuid.uuid4().hex[:6]}"
    names = ["busy", "t1", "t2", "t3", "t4"]
    with _cluster(
        redis_server, topic, {n: {} for n in names}, FD_SCHEDULER_NAME="global", FD_MODEL="bench-sleep:2"
    ) as cluster:
        busy = _worker(cluster, "busy")
        client = _client(redis_server.port, topic, scheduler_name="global")
        r = redis_server.client()
        started = time.monotonic()
        handles = [
            client.submit(f"storm {i}", max_tokens=1 + i % 3, seed=i, node=busy.node)
            for i in range(STORM_REQUESTS)
        ]
        submitted_s = time.monotonic() - started
        deadline = started + 240
        results: list[GenerationResult] = []
        failures: list[str] = []
        for handle in handles:
            try:
                results.append(handle.result(timeout=max(1.0, deadline - time.monotonic())))
            except ResultTimeout:
                raise AssertionError(f"request {handle.request_id} hung") from None
            except FDCeleryError as exc:
                failures.append(f"{handle.request_id}: {exc!r}")
        elapsed_s = time.monotonic() - started

        ids = [h.request_id for h in handles]
        assert len(set(ids)) == STORM_REQUESTS
        assert not failures, failures[:10]
        assert [res.request_id for res in results] == ids
        pipe = r.pipeline(transaction=False)
        for rid in ids:
            pipe.xrange(keys.output_stream(topic, rid))
        bad: list[str] = []
        for i, (rid, entries, res) in enumerate(zip(ids, pipe.execute(), results)):
            seqs = [int(eid.split(b"-")[1]) - 1 for eid, _ in entries]
            ends = [f.get(b"end") for _, f in entries].count(b"1")
            chunk_tokens = [
                t for _, f in entries if not f.get(b"end") for t in json.loads(f[b"d"])["token_ids"]
            ]
            if seqs != list(range(len(seqs))) or ends != 1 or len(res.token_ids) != 1 + i % 3:
                bad.append(f"{rid}: seqs {seqs}, {ends} ends, {len(res.token_ids)} tokens")
            elif entries[-1][1].get(b"end") != b"1":
                bad.append(f"{rid}: the end is not the last entry")
            elif chunk_tokens and chunk_tokens != list(res.token_ids)[: len(chunk_tokens)]:
                bad.append(f"{rid}: chunks {chunk_tokens} vs result {list(res.token_ids)}")
        assert not bad, bad[:10]
        steals = {k.decode(): int(v) for k, v in r.hgetall(keys.steals_hash(topic)).items()}
        served = collections.Counter(res.served_by[0] for res in results)
        stolen = sum(res.stolen for res in results)
        assert served[busy.node] + stolen == STORM_REQUESTS
        assert sum(v for k, v in steals.items() if k.endswith(":made")) == stolen
        assert steals.get(f"{busy.node}:suffered", 0) == stolen
        assert stolen > 0 and len(served) == len(names), f"the thieves did not steal: {served}"
        _report(
            "steal storm",
            requests=STORM_REQUESTS,
            completed=len(results),
            lost=0,
            duplicated=0,
            submit_s=round(submitted_s, 1),
            total_s=round(elapsed_s, 1),
            rate_per_s=round(STORM_REQUESTS / elapsed_s),
            stolen=stolen,
            served_by={k.split("@")[0]: v for k, v in served.items()},
            steals={k.split("@")[0] + ":" + k.rsplit(":", 1)[1]: v for k, v in steals.items()},
        )


def test_kill9_batching_node_with_many_requests_in_flight(redis_server, engine):
    """kill -9 of a thread-pool node that decodes many requests in one batch: every request (in
    flight or still queued on it) completes exactly once on the other node, tokens exact."""
    topic = f"fkb-{uuid.uuid4().hex[:6]}"
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": "global", "FD_MAX_NUM_SEQS": "16"}
    with LocalCluster(redis_server, env=env) as cluster:
        a = cluster.add_worker("a", pool="threads", concurrency=16)
        b = cluster.add_worker("b", pool="threads", concurrency=16)
        cluster.wait_live([a.node, b.node], topic=topic)
        client = _client(redis_server.port, topic, scheduler_name="global")
        specs = [Spec(f"batched, then killed {i}", 150, 0.8, i, a.node) for i in range(16)]
        outcomes = _submit(client, specs)

        def batch_running() -> bool:
            replies = client.app.control.inspect(destination=[a.node], timeout=5).stats() or {}
            running = (replies.get(a.node, {}).get("fd", {}).get("engine") or {}).get("running", 0)
            return running >= 8

        wait_until(batch_running, 60, "node a decoding a batch of at least 8")
        _wait_running_on(client, redis_server.client(), topic, outcomes, a.node, min_entries=3)
        recovered_s, figures = _kill_and_follow(a, redis_server.client(), topic, engine, outcomes)
        assert not a.alive()
        assert figures["completed"] == len(specs), f"requests failed: {figures}"
        assert any(o.result is not None and o.result.served_by[0] == b.node for o in outcomes)
        _report(
            "kill -9 batching node",
            faults=1,
            in_flight=len(specs),
            recovered_s=round(recovered_s, 1),
            **figures,
        )
