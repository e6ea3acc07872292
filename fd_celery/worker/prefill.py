"""``fd.prefill``: the first half of a splitwise request.

Prefill here, write the first token, choose the decode node (fresh load), store the KV cache,
put the reference in the result backend (the prefill task's SUCCESS), send ``fd.decode``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from typing import Any

from celery import Task, states

from fd_celery import keys, kv
from fd_celery.connection import redis_errors
from fd_celery.errors import NoNodeAvailable
from fd_celery.observability import metrics
from fd_celery.protocol import RESULT_DEFERRED, RESULT_HEADER, DecodeRequest, GenerateRequest
from fd_celery.scheduler import loadtable
from fd_celery.settings import get_node_settings, node_knobs
from fd_celery.streams import END_RETENTION_S
from fd_celery.worker.records import write_record
from fd_celery.worker.run import (
    Decoded,
    Run,
    admitted,
    build_result,
    guarded,
    header_float,
    outcome,
    prompt_ids_of,
    sampling_for,
    stops_of,
)
from fd_celery.worker.runner import runner_for

__all__ = ["run_prefill"]

logger = logging.getLogger(__name__)


def run_prefill(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Prefill here; hand the KV cache to a decode node. Returns the KV reference (JSON)."""
    run = Run.open(task, task.request.id)
    if run.ended_before():
        return outcome(run.previous.data)  # type: ignore[union-attr]

    def work() -> dict[str, Any]:
        try:
            request = admitted(run, args, kwargs)
            from fd_celery.engine import TextStreamer

            runner = runner_for(task.app)
            engine = runner.engine
            prompt_ids = prompt_ids_of(engine, request)
            sampling = sampling_for(request, run.request_id)
            cache, first = runner.prefill(prompt_ids, sampling)
        finally:
            _release_prefill_charge(run)
        first_at = time.time()
        if first not in stops_of(engine, request):
            run.out.chunk(TextStreamer(engine).push(first), (first,))
            if request.max_tokens > 1:
                run.out.flush()  # the first token reaches the caller before the hand-off
        return _hand_off(run, request, engine, prompt_ids, cache, first, first_at)

    return guarded(run, work)


def _release_prefill_charge(run: Run) -> None:
    """The router charged this prefill's prompt tokens to the node it chose (``fd_charge``
    header); the prefill work is over, so the tokens no longer weigh on that node."""
    charge = run.task.request.get("fd_charge")
    if not (isinstance(charge, list) and len(charge) == 2 and all(isinstance(c, str) for c in charge)):
        return
    try:
        with redis_errors(run.config):
            loadtable.release(run.client, run.config, charge[0], charge[1])
    except Exception as exc:  # noqa: BLE001 - it is released after release_load_expire_period anyway
        logger.warning("request %s: could not release its prefill charge: %s", run.request_id, exc)


def _hand_off(
    run: Run,
    request: GenerateRequest,
    engine: Any,
    prompt_ids: list[int],
    cache: Any,
    first: int,
    first_at: float,
) -> dict[str, Any]:
    submitted = header_float(run.task, "fd_submitted") or run.started
    stopped = first in stops_of(engine, request)
    if stopped or request.max_tokens == 1:  # nothing left to decode
        done = Decoded("stop" if stopped else "length", first_at, first_at, 1)
        result = build_result(run, request, engine, prompt_ids, (run.node,), submitted, first_at, done)
        return outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))
    with redis_errors(run.config):
        placed = loadtable.place(run.client, run.config, keys.DECODE_ROLES)
    if placed is None:
        raise NoNodeAvailable(
            f"no live decode node in topic {run.config.scheduler_topic!r} when prefill of "
            f"request {run.request_id} ended"
        )
    decode_node, decode_role = placed
    kind = _store_for(run, decode_node)
    with redis_errors(run.config):
        ref = kv.put(
            cache,
            kind=kind,
            topic=run.config.scheduler_topic,
            request_id=run.request_id,
            owner=run.node,
            host=socket.gethostname(),
            ttl_s=run.config.ttl_s,
            first_token=first,
            prompt_tokens=len(prompt_ids),
            client=run.client,
            hold=False,
        )
    try:
        _publish_reference(run, ref)
        decode = DecodeRequest(
            run.request_id, str(run.task.request.id), decode_node, request, submitted, run.started, first_at
        )
        run.result_stored = True
        # The queue is named here: placement just found the node live (the router need not ask again).
        run.task.app.send_task(
            "fd.decode",
            kwargs=decode.to_kwargs(),
            task_id=str(uuid.uuid4()),
            queue=keys.node_queue(run.config.scheduler_topic, decode_role, decode_node),
            ignore_result=True,
            headers={RESULT_HEADER: RESULT_DEFERRED},
        )
    except Exception:
        kv.discard(ref, run.client)
        raise
    logger.info(
        "request %s: prefill done, KV (%d bytes, %s) handed to %s",
        run.request_id,
        ref.nbytes,
        ref.kind,
        decode_node,
    )
    run.out.writer.defer(
        lambda pipe: metrics.record_handoff(pipe, run.config.scheduler_topic, run.node, ref.nbytes, ref.kind),
        retry=False,
    )
    return ref.to_dict()


def _publish_reference(run: Run, ref: kv.KVRef) -> None:
    """The reference travels through the result backend: stored as the prefill task's SUCCESS
    before decode is sent, in one round trip with the blob's bytes-held entry."""
    with redis_errors(run.config):
        pipe = run.client.pipeline(transaction=False)
        kv.note_held(pipe, ref)
        write_record(run.task.backend, pipe, str(run.task.request.id), states.SUCCESS, ref.to_dict())
        pipe.execute()


def _store_for(run: Run, decode_node: str) -> str:
    """CUDA IPC or shared memory when the decode node is on this host (as both nodes' devices
    allow), Redis otherwise; ``FD_KV_STORE`` forces one."""
    host, stores = _node_kv_facts(run, decode_node)
    return kv.choose_store(
        same_host=host == socket.gethostname(),
        device=get_node_settings(run.task.app).device,
        peer_stores=stores,
        forced=node_knobs().kv_store,
    )


def _node_kv_facts(run: Run, node: str) -> tuple[str | None, list[str] | None]:
    """A decode node's host and KV stores: read once per expire period (they change only when a
    node of that name comes back elsewhere), not on every hand-off."""
    now = time.monotonic()
    cached = _KV_FACTS.get(node)
    if cached is not None and cached[0] > now:
        return cached[1], cached[2]
    with redis_errors(run.config):
        host, stores = run.client.hmget(keys.node_hash(run.config.scheduler_topic, node), "host", "kv_stores")
    facts = (
        json.loads(host) if host is not None else None,
        json.loads(stores) if stores is not None else None,
    )
    if len(_KV_FACTS) > 1024:
        _KV_FACTS.clear()
    _KV_FACTS[node] = (now + run.config.expire_period_s, *facts)
    return facts


_KV_FACTS: dict[str, tuple[float, str | None, list[str] | None]] = {}
