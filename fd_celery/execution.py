"""Running a request on a worker: checks, the engine, and the output stream.

Runs inside the pool process (prefork child or thread). A request may be delivered more than once
(acks are late), so every run first looks at the request's output stream: if an earlier run ended
it, this run returns (or raises) what that run ended with and computes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task

from . import admission
from .app import get_config, get_node_settings
from .config import SchedulerConfig
from .connection import redis_errors, redis_for
from .errors import (
    FDCeleryError,
    InvalidRequest,
    RequestExpired,
    WorkerError,
    error_from_dict,
    error_to_dict,
)
from .keys import check_request_id, output_stream
from .protocol import GenerateRequest, GenerationResult, OutputChunk, parse_request
from .stealing import stolen_from
from .stream import END_RETENTION_S, EXPIRED_RETENTION_S, OutputWriter, last_entry, writer_for

__all__ = ["run_generate", "engine_for"]

logger = logging.getLogger(__name__)

_engines = threading.local()


def engine_for(app: Celery) -> Any:
    """This thread's engine (loaded once per pool process or thread, never per request)."""
    settings = get_node_settings(app)
    wanted = (settings.model, settings.device)
    cached = getattr(_engines, "value", None)
    if cached is None or cached[0] != wanted:
        from .engine import load_engine

        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        logger.info("loading model %s on %s", settings.model, settings.device)
        cached = (wanted, load_engine(settings.model, settings.device))
        _engines.value = cached
    return cached[1]


@dataclass
class _Output:
    """One run's view of its output stream: the next seq, and how to end."""

    writer: OutputWriter
    key: str
    ttl_s: float
    seq: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def chunk(self, text: str, token_ids: tuple[int, ...]) -> None:
        self.writer.write(self.key, self.seq, OutputChunk(self.seq, text, token_ids).to_dict(), self.ttl_s)
        self.seq += 1
        self.token_ids.extend(token_ids)
        self.text.append(text)

    def end(self, payload: dict[str, Any], retention_s: float) -> dict[str, Any]:
        """Write the end entry; returns the end as stored (an earlier run's, if there was one)."""
        return self.writer.finish(self.key, self.seq, {"seq": self.seq, **payload}, retention_s)


def _header(task: Task, name: str) -> float | None:
    value = task.request.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _outcome(end: dict[str, Any]) -> dict[str, Any]:
    """What a run returns for a stream's end entry: its result, or its error raised."""
    if "result" in end:
        return dict(end["result"])
    raise error_from_dict(end.get("error"))


def run_generate(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    config = get_config(task.app)
    request_id = check_request_id(task.request.id)  # it names keys: check before any is touched
    client = redis_for(config)
    out = _Output(
        writer=writer_for(client, config.scheduler_writer_parallel, config.scheduler_writer_batch_size),
        key=output_stream(config.scheduler_topic, request_id),
        ttl_s=config.ttl_s,
    )
    started = time.time()
    with redis_errors(config):
        previous = last_entry(client, out.key)
        stolen = stolen_from(client, config, request_id) if config.scheduler_name == "global" else None
        ticket = task.request.get("fd_ticket")
        if isinstance(ticket, str):
            admission.release(client, config, ticket)
    if previous is not None and previous.end:
        logger.info("request %s already ended in an earlier run; not running it again", request_id)
        return _outcome(previous.data)
    if previous is not None:
        out.seq = previous.seq + 1  # an earlier run died mid-way: its chunks are not sent twice
    try:
        request = _check(task, args, kwargs, started)
        result = _generate(task, config, request, out, started, stolen)
    except FDCeleryError as exc:
        retention = EXPIRED_RETENTION_S if isinstance(exc, RequestExpired) else END_RETENTION_S
        return _outcome(out.end({"error": error_to_dict(exc)}, retention))
    except Exception as exc:
        logger.exception("request %s failed in the engine", request_id)
        error = WorkerError(f"the worker failed the request: {type(exc).__name__}: {exc}")
        return _outcome(out.end({"error": error_to_dict(error)}, END_RETENTION_S))
    return _outcome(out.end({"result": result.to_dict()}, END_RETENTION_S))


def _check(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], now: float) -> GenerateRequest:
    deadline = _header(task, "fd_deadline")
    if deadline is not None and now > deadline:
        submitted = _header(task, "fd_submitted") or deadline
        raise RequestExpired(
            f"request {task.request.id} waited {now - submitted:.3f}s, past its TTL of "
            f"{deadline - submitted:.3f}s (scheduler_ttl); it was not started"
        )
    if args:
        raise InvalidRequest(f"fd.generate takes keyword arguments only, got {len(args)} positional")
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


def _generate(
    task: Task,
    config: SchedulerConfig,
    request: GenerateRequest,
    out: _Output,
    started: float,
    stolen: tuple[str, float] | None,
) -> GenerationResult:
    from .engine import SamplingParams, TextStreamer

    engine = engine_for(task.app)
    prompt_ids = _prompt_ids(engine, request)
    sampling = SamplingParams(request.temperature, seed_for(request, str(task.request.id)))
    streamer = TextStreamer(engine)
    skip = out.seq  # chunks an earlier run already wrote
    produced = 0
    finish_reason = "length"
    first_at = last_at = 0.0
    for token in engine.generate(prompt_ids, sampling, request.max_tokens):
        last_at = time.time()
        first_at = first_at or last_at
        if token == engine.eos_token_id:
            finish_reason = "stop"
            break
        text = streamer.push(token)
        if produced >= skip:
            out.chunk(text, (token,))
        else:
            out.token_ids.append(token)
            out.text.append(text)
        produced += 1
    tail = streamer.flush()
    if tail:
        out.chunk(tail, ())
    submitted = _header(task, "fd_submitted") or started
    return GenerationResult(
        request_id=str(task.request.id),
        text="".join(out.text),
        token_ids=tuple(out.token_ids),
        finish_reason=finish_reason,
        served_by=(str(task.request.hostname),),
        stolen=stolen is not None,
        ttft_s=max(0.0, first_at - submitted),
        tpot_s=(last_at - first_at) / (produced - 1) if produced > 1 else 0.0,
        queue_s=max(0.0, started - submitted),
        prompt_tokens=len(prompt_ids),
        model=engine.model_name,
        extra=(
            {"stolen_from": stolen[0], "steal_reaction_s": max(0.0, started - stolen[1])}
            if stolen is not None
            else {}
        ),
    )
