"""The run of one request on a node: its output stream, its checks, its token loop, its end.

Runs inside the pool process (prefork child or thread). A request may be delivered more than once
(acks are late), so a run can look at the request's output stream first: if an earlier run ended
it, this run returns (or raises) what that run ended with and computes nothing; if an earlier run
died half-way, this one computes again (the engine is exact) but writes only what is missing.
The three tasks (:mod:`fd_celery.worker.generate`, :mod:`~fd_celery.worker.prefill`,
:mod:`~fd_celery.worker.decode`) are built from these pieces.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task, states

from fd_celery.config import SchedulerConfig
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import (
    FDCeleryError,
    InvalidRequest,
    RequestExpired,
    WorkerError,
    error_from_dict,
    error_to_dict,
)
from fd_celery.keys import check_request_id, output_stream
from fd_celery.observability import metrics
from fd_celery.protocol import (
    RESULT_DEFERRED,
    RESULT_HEADER,
    GenerateRequest,
    GenerationResult,
    OutputChunk,
    parse_request,
)
from fd_celery.scheduler import admission
from fd_celery.settings import get_config
from fd_celery.streams import (
    END_RETENTION_S,
    EXPIRED_RETENTION_S,
    OutputWriter,
    Record,
    StreamEntry,
    last_entry,
    writer_for,
)
from fd_celery.streams.cancel import CANCELLED
from fd_celery.worker.records import mark_started, same_redis, success_record, write_record

__all__ = [
    "Run",
    "Output",
    "Decoded",
    "guarded",
    "outcome",
    "admitted",
    "prompt_ids_of",
    "seed_for",
    "sampling_for",
    "stops_of",
    "stream_tokens",
    "build_result",
    "header_float",
    "CHUNK_FLUSH_S",
]

logger = logging.getLogger(__name__)

CHUNK_FLUSH_S = 0.002  # chunks wait at most this long before they go to the writer threads


@dataclass
class Output:
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
        record = (
            self.success_record(payload["result"]) if self.success_record and "result" in payload else None
        )
        stored = self.writer.finish(self.key, items, retention_s, record=record)
        if stored == ours:  # this run ended the request (not an earlier one): count it once
            self.writer.defer(lambda pipe: record_end(pipe, self.topic, self.node, ours), retry=False)
        return stored

    def fail(self, exc: FDCeleryError) -> dict[str, Any]:
        retention = EXPIRED_RETENTION_S if isinstance(exc, RequestExpired) else END_RETENTION_S
        return outcome(self.end({"error": error_to_dict(exc)}, retention))


@dataclass
class Run:
    """What every task needs: config, Redis, this node, the request's output stream."""

    task: Task
    config: SchedulerConfig
    client: redis.Redis
    request_id: str
    out: Output
    previous: StreamEntry | None
    started: float
    result_stored: bool = False  # the task already put its result in the backend itself

    @classmethod
    def open(cls, task: Task, request_id: Any, look_back: bool = True) -> Run:
        """``look_back``: read the stream's last entry first, to skip work an earlier run did.
        Without it a rerun computes again, and the stream still takes nothing twice."""
        config = get_config(task.app)
        request_id = check_request_id(request_id)  # it names keys: check before any is touched
        client = redis_for(config)
        out = Output(
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
        out.writer.defer(lambda pipe: mark_started(backend, pipe, task_id, node), key=out.key)
        run = cls(task, config, client, request_id, out, previous, time.time())
        if task.request.get(RESULT_HEADER) == RESULT_DEFERRED and same_redis(backend, client):
            out.success_record = lambda result: success_record(backend, task_id, result)
        return run

    @property
    def node(self) -> str:
        return str(self.task.request.hostname)

    def ended_before(self) -> bool:
        if self.previous is not None and self.previous.end:
            logger.info("request %s already ended in an earlier run; not running it again", self.request_id)
            return True
        return False


def record_end(pipe: Any, topic: str, node: str, end: dict[str, Any]) -> None:
    result = end.get("result")
    if isinstance(result, dict):
        served = result.get("served_by") or [node]
        metrics.record_end(
            pipe,
            topic,
            node,
            "ok",
            result.get("ttft_s"),
            result.get("tpot_s"),
            len(result.get("token_ids") or ()),
            first_node=served[0] if len(served) > 1 else None,
        )
    else:
        error = end.get("error")
        error = error if isinstance(error, dict) else {}
        metrics.record_end(pipe, topic, node, str(error.get("type", "WorkerError")), None, None, 0)


def header_float(task: Task, name: str) -> float | None:
    value = task.request.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def outcome(end: dict[str, Any]) -> dict[str, Any]:
    """What a run returns for a stream's end entry: its result, or its error raised."""
    if "result" in end:
        return dict(end["result"])
    raise error_from_dict(end.get("error"))


def guarded(run: Run, work: Any) -> dict[str, Any]:
    """Run ``work``; any failure becomes the request's end entry, which the caller sees."""
    try:
        result = work()
    except FDCeleryError as exc:
        return run.out.fail(exc)
    except Exception as exc:
        logger.exception("request %s failed in the engine", run.request_id)
        return run.out.fail(WorkerError(f"the worker failed the request: {type(exc).__name__}: {exc}"))
    # Client.submit: the SUCCESS record, unless it went with the end entry or the task stored it
    if (
        run.task.request.get(RESULT_HEADER) == RESULT_DEFERRED
        and not run.result_stored
        and not run.out.success_record
    ):
        backend, task_id = run.task.backend, str(run.task.request.id)
        # (from a writer thread: Client.submit sends ignore_result, so Celery does not store it)
        run.out.writer.defer(
            lambda pipe: write_record(backend, pipe, task_id, states.SUCCESS, result), key=run.out.key
        )
    return result


# --------------------------------------------------------------------------- checks


def admitted(run: Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GenerateRequest:
    """A fresh request: release its admission ticket, enforce the TTL, check its fields."""
    task = run.task
    ticket = task.request.get("fd_ticket")
    if isinstance(ticket, str):
        with redis_errors(run.config):
            admission.release(run.client, run.config, ticket)
    deadline = header_float(task, "fd_deadline")
    if deadline is not None and run.started > deadline:
        submitted = header_float(task, "fd_submitted") or deadline
        raise RequestExpired(
            f"request {run.request_id} waited {run.started - submitted:.3f}s, past its TTL of "
            f"{deadline - submitted:.3f}s (scheduler_ttl); it was not started"
        )
    if args:
        raise InvalidRequest(f"{task.name} takes keyword arguments only, got {len(args)} positional")
    return parse_request(kwargs)


def prompt_ids_of(engine: Any, request: GenerateRequest) -> list[int]:
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


def sampling_for(request: GenerateRequest, request_id: str) -> Any:
    """The engine's sampling parameters of a request (torch comes with them: workers only)."""
    from fd_celery.engine import SamplingParams

    return SamplingParams(request.temperature, seed_for(request, request_id), **request.sampling_kwargs())


def stops_of(engine: Any, request: GenerateRequest) -> frozenset[int]:
    """The tokens that end a request and are not part of its output."""
    eos = () if request.ignore_eos or engine.eos_token_id is None else (engine.eos_token_id,)
    return frozenset((*eos, *request.stop_token_ids))


# --------------------------------------------------------------------------- token loop


@dataclass
class Decoded:
    finish_reason: str
    first_at: float
    last_at: float
    produced: int


def stream_tokens(
    engine: Any,
    out: Output,
    tokens: Any,
    streamer: Any,
    skip: int,
    more_after_first: bool,
    stops: frozenset[int] | None = None,
) -> Decoded:
    """Write each token of ``tokens`` as a chunk (the first ``skip`` were written by an earlier
    run); stop at end-of-sequence. The first chunk goes out at once when more will follow (a
    one-token request's chunk goes with its end instead)."""
    finish_reason, first_at, last_at, produced = "length", 0.0, 0.0, 0
    if stops is None:
        stops = frozenset(() if engine.eos_token_id is None else (engine.eos_token_id,))
    try:
        for token in tokens:
            last_at = time.time()
            first_at = first_at or last_at
            if token in stops:
                finish_reason = "stop"
                break
            out.chunk(streamer.push(token), (token,), write=out.seq >= skip)
            produced += 1
            if produced == 1 and more_after_first:
                out.flush()
            if out.writer.ended(out.key):  # cancelled: the caller ended the stream
                finish_reason = CANCELLED
                break
    finally:
        # a run that stops early (cancelled, an error) gives the sequence's KV blocks back now
        if getattr(tokens, "finish_reason", "") is None:
            tokens.abort()
    tail = streamer.flush()
    if tail:
        out.chunk(tail, (), write=out.seq >= skip)
    return Decoded(finish_reason, first_at, last_at, produced)


def build_result(
    run: Run,
    request: GenerateRequest,
    engine: Any,
    prompt_ids: list[int],
    served_by: tuple[str, ...],
    submitted: float,
    first_at: float,
    done: Decoded,
    stolen: bool = False,
    started: float | None = None,
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
