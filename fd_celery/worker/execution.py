"""Running requests on a worker: checks, the engine, the output stream, the KV hand-off.

Runs inside the pool process (prefork child or thread). A request may be delivered more than once
(acks are late), so every run first looks at the request's output stream: if an earlier run ended
it, this run returns (or raises) what that run ended with and computes nothing; if an earlier run
died half-way, this one computes again (the engine is exact) but writes only what is missing.

- ``fd.generate``: prefill and decode here.
- ``fd.prefill``: prefill here, write the first token, choose the decode node (fresh load),
  store the KV cache, put the reference in the result backend, send ``fd.decode``.
- ``fd.decode``: resolve the reference, load and release the blob, decode the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, Task, states

from fd_celery import keys, kv
from fd_celery.config import SchedulerConfig
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import (
    FDCeleryError,
    InvalidRequest,
    KVRefError,
    NoNodeAvailable,
    RequestExpired,
    WorkerError,
    error_from_dict,
    error_to_dict,
)
from fd_celery.keys import check_request_id, output_stream
from fd_celery.protocol import (
    RESULT_DEFERRED,
    RESULT_HEADER,
    DecodeRequest,
    GenerateRequest,
    GenerationResult,
    OutputChunk,
    parse_decode_kwargs,
    parse_request,
)
from fd_celery.scheduler import admission, loadtable
from fd_celery.scheduler.stealing import stolen_from
from fd_celery.settings import get_config, get_node_settings
from fd_celery.streams import (
    END_RETENTION_S,
    EXPIRED_RETENTION_S,
    OutputWriter,
    Record,
    StreamEntry,
    last_entry,
    writer_for,
)

__all__ = ["run_generate", "run_prefill", "run_decode", "engine_for", "seed_for"]

logger = logging.getLogger(__name__)

_engines = threading.local()

CHUNK_FLUSH_S = 0.002  # chunks wait at most this long before they go to the writer threads


def engine_for(app: Celery) -> Any:
    """This thread's engine (loaded once per pool process or thread, never per request)."""
    settings = get_node_settings(app)
    wanted = (settings.model, settings.device)
    cached = getattr(_engines, "value", None)
    if cached is None or cached[0] != wanted:
        from fd_celery.engine import load_engine

        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        logger.info("loading model %s on %s", settings.model, settings.device)
        cached = (wanted, load_engine(settings.model, settings.device))
        _engines.value = cached
    return cached[1]


@dataclass
class _Output:
    """One run's view of its request's output stream: the next seq, and how to end.

    Chunks are handed to the writer threads at most every ``CHUNK_FLUSH_S``: a fast model's
    tokens travel a few at a time, and a short request's chunks go out with its end entry in
    one round trip.
    """

    writer: OutputWriter
    key: str
    ttl_s: float
    topic: str = ""
    node: str = ""
    seq: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    buffer: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    flushed_at: float = field(default_factory=time.monotonic)
    #: result -> the SUCCESS record to store with the end entry, in the same step (a request whose
    #: caller reads the stream, when the result backend is the scheduler's Redis); else None
    success_record: Callable[[dict[str, Any]], Record] | None = None

    def chunk(self, text: str, token_ids: tuple[int, ...], write: bool = True) -> None:
        if write:
            self.buffer.append((self.seq, OutputChunk(self.seq, text, token_ids).to_dict()))
            if time.monotonic() - self.flushed_at >= CHUNK_FLUSH_S:
                self.flush()
        self.seq += 1
        self.token_ids.extend(token_ids)
        self.text.append(text)

    def flush(self) -> None:
        """Hand buffered chunks to the writer now (the first token must not wait: TTFT)."""
        if self.buffer:
            self.writer.write(self.key, self.buffer, self.ttl_s)
            self.buffer, self.flushed_at = [], time.monotonic()

    def end(self, payload: dict[str, Any], retention_s: float) -> dict[str, Any]:
        """Write the end entry; returns the end as stored (an earlier run's, if there was one)."""
        ours = {"seq": self.seq, **payload}
        items = [*self.buffer, (self.seq, ours)]
        self.buffer = []
        record = self.success_record(payload["result"]) if self.success_record and "result" in payload else None
        stored = self.writer.finish(self.key, items, retention_s, record=record)
        if stored == ours:  # this run ended the request (not an earlier one): count it once
            self.writer.defer(lambda pipe: _record_end(pipe, self.topic, self.node, ours), retry=False)
        return stored

    def fail(self, exc: FDCeleryError) -> dict[str, Any]:
        retention = EXPIRED_RETENTION_S if isinstance(exc, RequestExpired) else END_RETENTION_S
        return _outcome(self.end({"error": error_to_dict(exc)}, retention))


@dataclass
class _Run:
    """What every task needs: config, Redis, this node, the request's output stream."""

    task: Task
    config: SchedulerConfig
    client: redis.Redis
    request_id: str
    out: _Output
    previous: StreamEntry | None
    started: float
    result_stored: bool = False  # the task already put its result in the backend itself

    @classmethod
    def open(cls, task: Task, request_id: Any, look_back: bool = True) -> _Run:
        """``look_back``: read the stream's last entry first, to skip work an earlier run did.
        Without it a rerun computes again, and the stream still takes nothing twice."""
        config = get_config(task.app)
        request_id = check_request_id(request_id)  # it names keys: check before any is touched
        client = redis_for(config)
        out = _Output(
            writer=writer_for(client, config.scheduler_writer_parallel, config.scheduler_writer_batch_size),
            key=output_stream(config.scheduler_topic, request_id),
            ttl_s=config.ttl_s,
            topic=config.scheduler_topic,
            node=str(task.request.hostname),
        )
        previous = None
        if look_back:
            with redis_errors(config):
                previous = last_entry(client, out.key)
        # (task.request belongs to this thread; the backend record is the task's, which for
        # fd.decode is not the request's id)
        backend, node, task_id = task.backend, str(task.request.hostname), str(task.request.id)
        out.writer.defer(lambda pipe: _mark_started(backend, pipe, task_id, node), key=out.key)
        run = cls(task, config, client, request_id, out, previous, time.time())
        if task.request.get(RESULT_HEADER) == RESULT_DEFERRED and _same_redis(backend, client):
            out.success_record = lambda result: _success_record(backend, task_id, result)
        return run

    @property
    def node(self) -> str:
        return str(self.task.request.hostname)

    def ended_before(self) -> bool:
        if self.previous is not None and self.previous.end:
            logger.info("request %s already ended in an earlier run; not running it again", self.request_id)
            return True
        return False


def _mark_started(backend: Any, pipe: Any, task_id: str, node: str) -> None:
    """Celery's STARTED state (what ``track_started`` would store), written by a writer thread
    before any output of the request. ``NX``: it never replaces the state of a run that already
    ended (SUCCESS or FAILURE stored first) nor an earlier run's STARTED. Callers see it as
    ``AsyncResult.state``; ``RequestHandle`` counts on it to tell a request that started before
    its deadline from one that never started."""
    _write_record(backend, pipe, task_id, states.STARTED, {"pid": os.getpid(), "hostname": node})


def _write_record(backend: Any, pipe: Any, task_id: str, status: str, result: Any) -> None:
    """The record Celery's result backend keeps for a task in ``status``: same key, same
    encoding. On the writer's pipeline when the backend is the scheduler's Redis (the derived
    setup); on the backend's own Redis, at once, when the app chose another; through Celery's
    own ``store_result`` for a backend that is not Redis. STARTED never replaces a record (NX);
    SUCCESS is also published, for ``AsyncResult.get()`` callers waiting on the channel."""
    if not _is_redis(backend):
        backend.store_result(task_id, result, status)
        return
    key, payload = _record(backend, task_id, status, result)
    own = None if _same_redis(backend, pipe) else backend.client.pipeline(transaction=False)
    target = pipe if own is None else own
    target.set(key, payload, nx=status == states.STARTED, ex=_result_expiry_s(backend))
    if status == states.SUCCESS:
        target.publish(key, payload)
    if own is not None:
        own.execute()


def _record(backend: Any, task_id: str, status: str, result: Any) -> tuple[str, bytes]:
    """The key and encoded value Celery's result backend keeps for a task in ``status`` (done
    now, for a final state)."""
    from datetime import datetime, timezone

    done = datetime.now(timezone.utc).isoformat() if status in states.READY_STATES else None
    meta = {"status": status, "result": result, "traceback": None, "children": [], "date_done": done,
            "task_id": task_id}
    return backend.get_key_for_task(task_id), backend.encode(meta)


def _success_record(backend: Any, task_id: str, result: dict[str, Any]) -> Record:
    return (*_record(backend, task_id, states.SUCCESS, result), _result_expiry_s(backend))


def _is_redis(backend: Any) -> bool:
    return hasattr(backend, "client") and hasattr(backend, "get_key_for_task")


def _same_redis(backend: Any, pipe: Any) -> bool:
    """Whether the result backend is Redis, and the server and database ``pipe`` talks to."""
    params = getattr(backend, "connparams", None) if _is_redis(backend) else None
    mine = pipe.connection_pool.connection_kwargs
    return isinstance(params, dict) and all(params.get(k) == mine.get(k) for k in ("host", "port", "path", "db"))


def _result_expiry_s(backend: Any) -> int:
    expires = backend.expires  # result_expires: a timedelta, seconds, or None (then a day)
    return max(1, int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires or 86400))


def _record_end(pipe: Any, topic: str, node: str, end: dict[str, Any]) -> None:
    from fd_celery.observability import metrics

    result = end.get("result")
    if isinstance(result, dict):
        served = result.get("served_by") or [node]
        metrics.record_end(pipe, topic, node, "ok", result.get("ttft_s"), result.get("tpot_s"),
                           len(result.get("token_ids") or ()),
                           first_node=served[0] if len(served) > 1 else None)
    else:
        error = end.get("error") if isinstance(end.get("error"), dict) else {}
        metrics.record_end(pipe, topic, node, str(error.get("type", "WorkerError")), None, None, 0)


def _header(task: Task, name: str) -> float | None:
    value = task.request.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _outcome(end: dict[str, Any]) -> dict[str, Any]:
    """What a run returns for a stream's end entry: its result, or its error raised."""
    if "result" in end:
        return dict(end["result"])
    raise error_from_dict(end.get("error"))


def _guarded(run: _Run, work: Any) -> dict[str, Any]:
    """Run ``work``; any failure becomes the request's end entry, which the caller sees."""
    try:
        result = work()
    except FDCeleryError as exc:
        return run.out.fail(exc)
    except Exception as exc:
        logger.exception("request %s failed in the engine", run.request_id)
        return run.out.fail(WorkerError(f"the worker failed the request: {type(exc).__name__}: {exc}"))
    # Client.submit: the SUCCESS record, unless it went with the end entry or the task stored it
    if run.task.request.get(RESULT_HEADER) == RESULT_DEFERRED and not run.result_stored and not run.out.success_record:
        backend, task_id = run.task.backend, str(run.task.request.id)
        # (from a writer thread: Client.submit sends ignore_result, so Celery does not store it)
        run.out.writer.defer(lambda pipe: _write_record(backend, pipe, task_id, states.SUCCESS, result),
                             key=run.out.key)
    return result


# --------------------------------------------------------------------------- checks


def _admitted(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GenerateRequest:
    """A fresh request: release its admission ticket, enforce the TTL, check its fields."""
    task = run.task
    ticket = task.request.get("fd_ticket")
    if isinstance(ticket, str):
        with redis_errors(run.config):
            admission.release(run.client, run.config, ticket)
    deadline = _header(task, "fd_deadline")
    if deadline is not None and run.started > deadline:
        submitted = _header(task, "fd_submitted") or deadline
        raise RequestExpired(
            f"request {run.request_id} waited {run.started - submitted:.3f}s, past its TTL of "
            f"{deadline - submitted:.3f}s (scheduler_ttl); it was not started"
        )
    if args:
        raise InvalidRequest(f"{task.name} takes keyword arguments only, got {len(args)} positional")
    return parse_request(kwargs)


def _prompt_ids(engine: Any, request: GenerateRequest) -> list[int]:
    ids = list(request.token_ids) if request.token_ids is not None else engine.encode(request.prompt)
    bad = next((t for t in ids if t >= engine.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the model's vocabulary of {engine.vocab_size}")
    if len(ids) + request.max_tokens > engine.max_context:
        raise InvalidRequest(
            f"prompt of {len(ids)} tokens plus max_tokens={request.max_tokens} exceeds the "
            f"model's context of {engine.max_context} tokens"
        )
    return ids


def seed_for(request: GenerateRequest, request_id: str) -> int:
    """An unseeded request still samples the same tokens when it runs again (or is split)."""
    if request.seed is not None:
        return request.seed
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------- token loop


@dataclass
class _Decoded:
    finish_reason: str
    first_at: float
    last_at: float
    produced: int


def _stream_tokens(
    engine: Any, out: _Output, tokens: Any, streamer: Any, skip: int, more_after_first: bool
) -> _Decoded:
    """Write each token of ``tokens`` as a chunk (the first ``skip`` were written by an earlier
    run); stop at end-of-sequence. The first chunk goes out at once when more will follow (a
    one-token request's chunk goes with its end instead)."""
    finish_reason, first_at, last_at, produced = "length", 0.0, 0.0, 0
    for token in tokens:
        last_at = time.time()
        first_at = first_at or last_at
        if token == engine.eos_token_id:
            finish_reason = "stop"
            break
        out.chunk(streamer.push(token), (token,), write=out.seq >= skip)
        produced += 1
        if produced == 1 and more_after_first:
            out.flush()
    tail = streamer.flush()
    if tail:
        out.chunk(tail, (), write=out.seq >= skip)
    return _Decoded(finish_reason, first_at, last_at, produced)


def _decode_steps(engine: Any, cache: Any, token: int, sampling: Any, count: int) -> Any:
    for _ in range(count):
        if token == engine.eos_token_id:
            return
        token = engine.decode_step(cache, token, sampling)
        yield token


# --------------------------------------------------------------------------- fd.generate


def run_generate(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # The hot path reads nothing first: reruns are rare, and the stream's append script already
    # skips what an earlier run wrote and hands back an earlier end (see fd_celery.streams.stream).
    run = _Run.open(task, task.request.id, look_back=False)
    skip = 0

    def work() -> dict[str, Any]:
        request = _admitted(run, args, kwargs)
        with redis_errors(run.config):
            stolen = stolen_from(run.client, run.config, run.request_id) if run.config.scheduler_name == "global" else None
        from fd_celery.engine import SamplingParams, TextStreamer

        engine = engine_for(task.app)
        prompt_ids = _prompt_ids(engine, request)
        sampling = SamplingParams(request.temperature, seed_for(request, run.request_id))
        done = _stream_tokens(engine, run.out, engine.generate(prompt_ids, sampling, request.max_tokens),
                              TextStreamer(engine), skip, request.max_tokens > 1)
        submitted = _header(task, "fd_submitted") or run.started
        result = _result(run, request, engine, prompt_ids, (run.node,), submitted, done.first_at, done,
                         stolen=stolen is not None)
        if stolen is not None:
            result.extra.update(stolen_from=stolen[0], steal_reaction_s=max(0.0, run.started - stolen[1]))
        return _outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))

    return _guarded(run, work)


def _result(
    run: _Run, request: GenerateRequest, engine: Any, prompt_ids: list[int], served_by: tuple[str, ...],
    submitted: float, first_at: float, done: _Decoded, stolen: bool = False, started: float | None = None,
) -> GenerationResult:
    tokens = len(run.out.token_ids)
    return GenerationResult(
        request_id=run.request_id,
        text="".join(run.out.text),
        token_ids=tuple(run.out.token_ids),
        finish_reason=done.finish_reason,
        served_by=served_by,
        stolen=stolen,
        ttft_s=max(0.0, first_at - submitted),
        tpot_s=(done.last_at - first_at) / (tokens - 1) if tokens > 1 else 0.0,
        queue_s=max(0.0, (run.started if started is None else started) - submitted),
        prompt_tokens=len(prompt_ids),
        model=engine.model_name,
        extra={},
    )


# --------------------------------------------------------------------------- fd.prefill


def run_prefill(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Prefill here; hand the KV cache to a decode node. Returns the KV reference (JSON)."""
    run = _Run.open(task, task.request.id)
    if run.ended_before():
        return _outcome(run.previous.data)  # type: ignore[union-attr]

    def work() -> dict[str, Any]:
        try:
            request = _admitted(run, args, kwargs)
            from fd_celery.engine import SamplingParams, TextStreamer

            engine = engine_for(task.app)
            prompt_ids = _prompt_ids(engine, request)
            sampling = SamplingParams(request.temperature, seed_for(request, run.request_id))
            cache, first = engine.prefill(prompt_ids, sampling)
        finally:
            _release_prefill_charge(run)
        first_at = time.time()
        if first != engine.eos_token_id:
            run.out.chunk(TextStreamer(engine).push(first), (first,))
            if request.max_tokens > 1:
                run.out.flush()  # the first token reaches the caller before the hand-off
        return _hand_off(run, request, engine, prompt_ids, cache, first, first_at)

    return _guarded(run, work)


def _release_prefill_charge(run: _Run) -> None:
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
    run: _Run, request: GenerateRequest, engine: Any, prompt_ids: list[int], cache: Any, first: int,
    first_at: float,
) -> dict[str, Any]:
    submitted = _header(run.task, "fd_submitted") or run.started
    if first == engine.eos_token_id or request.max_tokens == 1:  # nothing left to decode
        done = _Decoded("stop" if first == engine.eos_token_id else "length", first_at, first_at, 1)
        result = _result(run, request, engine, prompt_ids, (run.node,), submitted, first_at, done)
        return _outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))
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
            cache, kind=kind, topic=run.config.scheduler_topic, request_id=run.request_id, owner=run.node,
            host=socket.gethostname(), ttl_s=run.config.ttl_s, first_token=first,
            prompt_tokens=len(prompt_ids), client=run.client, hold=False,
        )
    try:
        _publish_reference(run, ref)
        decode = DecodeRequest(run.request_id, str(run.task.request.id), decode_node, request, submitted,
                               run.started, first_at)
        run.result_stored = True
        # The queue is named here: placement just found the node live (the router need not ask again).
        run.task.app.send_task("fd.decode", kwargs=decode.to_kwargs(), task_id=str(uuid.uuid4()),
                               queue=keys.node_queue(run.config.scheduler_topic, decode_role, decode_node),
                               ignore_result=True, headers={RESULT_HEADER: RESULT_DEFERRED})
    except Exception:
        kv.discard(ref, run.client)
        raise
    logger.info("request %s: prefill done, KV (%d bytes, %s) handed to %s",
                run.request_id, ref.nbytes, ref.kind, decode_node)
    from fd_celery.observability import metrics

    run.out.writer.defer(lambda pipe: metrics.record_handoff(pipe, run.config.scheduler_topic, run.node,
                                                             ref.nbytes, ref.kind), retry=False)
    return ref.to_dict()


def _publish_reference(run: _Run, ref: kv.KVRef) -> None:
    """The reference travels through the result backend: stored as the prefill task's SUCCESS
    before decode is sent, in one round trip with the blob's bytes-held entry."""
    with redis_errors(run.config):
        pipe = run.client.pipeline(transaction=False)
        kv.note_held(pipe, ref)
        _write_record(run.task.backend, pipe, str(run.task.request.id), states.SUCCESS, ref.to_dict())
        pipe.execute()


def _store_for(run: _Run, decode_node: str) -> str:
    """CUDA IPC or shared memory when the decode node is on this host (as both nodes' devices
    allow), Redis otherwise; ``FD_KV_STORE`` forces one."""
    host, stores = _node_kv_facts(run, decode_node)
    return kv.choose_store(
        same_host=host == socket.gethostname(), device=get_node_settings(run.task.app).device,
        peer_stores=stores, forced=os.environ.get("FD_KV_STORE", "auto"),
    )


def _node_kv_facts(run: _Run, node: str) -> tuple[str | None, list[str] | None]:
    """A decode node's host and KV stores: read once per expire period (they change only when a
    node of that name comes back elsewhere), not on every hand-off."""
    now = time.monotonic()
    cached = _KV_FACTS.get(node)
    if cached is not None and cached[0] > now:
        return cached[1], cached[2]
    with redis_errors(run.config):
        host, stores = run.client.hmget(keys.node_hash(run.config.scheduler_topic, node), "host", "kv_stores")
    facts = (json.loads(host) if host is not None else None, json.loads(stores) if stores is not None else None)
    if len(_KV_FACTS) > 1024:
        _KV_FACTS.clear()
    _KV_FACTS[node] = (now + run.config.expire_period_s, *facts)
    return facts


_KV_FACTS: dict[str, tuple[float, str | None, list[str] | None]] = {}


# --------------------------------------------------------------------------- fd.decode


def run_decode(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if args:
        raise InvalidRequest(f"fd.decode takes keyword arguments only, got {len(args)} positional")
    decode = parse_decode_kwargs(kwargs)
    run = _Run.open(task, decode.request_id)
    if run.ended_before():
        return _outcome(run.previous.data)  # type: ignore[union-attr]
    skip = run.previous.seq + 1 if run.previous is not None else 1

    def work() -> dict[str, Any]:
        from fd_celery.engine import SamplingParams, TextStreamer

        engine = engine_for(task.app)
        request = decode.request
        ref = _resolve(run, decode)
        prompt_ids = _prompt_ids(engine, request)
        sampling = SamplingParams(request.temperature, seed_for(request, run.request_id))
        cache = _load_cache(run, ref, engine, prompt_ids, sampling)
        run.out.chunk(TextStreamer(engine).push(ref.first_token), (ref.first_token,), write=False)
        streamer = TextStreamer(engine, emitted_ids=[ref.first_token])
        done = _stream_tokens(
            engine, run.out, _decode_steps(engine, cache, ref.first_token, sampling, request.max_tokens - 1),
            streamer, skip, more_after_first=False,
        )
        if done.produced == 0:
            done.last_at = decode.first_token_at
        result = _result(run, request, engine, prompt_ids, (ref.owner, run.node), decode.submitted,
                         decode.first_token_at, done, started=decode.started)
        result.extra.update(kv_store=ref.kind, kv_bytes=ref.nbytes,
                            handoff_s=max(0.0, run.started - decode.first_token_at))
        return _outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))

    return _guarded(run, work)


def _resolve(run: _Run, decode: DecodeRequest) -> kv.KVRef:
    """The KV reference, read from the result backend where the prefill task put it."""
    meta = run.task.backend.get_task_meta(decode.prefill_id)
    if meta.get("status") != states.SUCCESS:
        raise KVRefError(f"no KV reference for request {decode.request_id} in the result backend")
    ref = kv.KVRef.from_dict(meta.get("result"))
    if ref.topic != run.config.scheduler_topic:  # topics share nothing, KV blobs included
        raise KVRefError(f"KV reference of topic {ref.topic!r} refused by a node of {run.config.scheduler_topic!r}")
    if ref.request_id != decode.request_id:
        raise KVRefError(f"KV reference belongs to request {ref.request_id}, not {decode.request_id}")
    return ref


def _load_cache(run: _Run, ref: kv.KVRef, engine: Any, prompt_ids: list[int], sampling: Any) -> Any:
    """The blob; if an earlier decode run already took it (and died), prefill again here: the
    engine is exact, so the cache is the same."""
    device = get_node_settings(run.task.app).device
    try:
        with redis_errors(run.config):
            cache = kv.take(ref, device, run.client, release=False)
        run.out.writer.defer(lambda pipe: kv.note_taken(pipe, ref))  # the index, off the path
    except KVRefError as exc:
        if "missing" not in str(exc):
            raise
        logger.warning("request %s: %s; computing the prefill again here", run.request_id, exc)
        cache, _ = engine.prefill(prompt_ids, sampling)
    if cache.num_tokens != len(prompt_ids):
        raise KVRefError(f"KV cache of {cache.num_tokens} tokens does not match the prompt of {len(prompt_ids)}")
    return cache
