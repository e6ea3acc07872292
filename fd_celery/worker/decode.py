"""``fd.decode``: the second half of a splitwise request.

Resolve the KV reference (from the result backend, where the prefill task put it), take the blob
out of its store, decode the rest here. A blob that an earlier decode run already took is
computed again by a prefill here: the engine is exact, so the cache is the same.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Task, states

from fd_celery import kv
from fd_celery.connection import redis_errors
from fd_celery.errors import InvalidRequest, KVRefError
from fd_celery.protocol import DecodeRequest, parse_decode_kwargs
from fd_celery.settings import get_node_settings
from fd_celery.streams import END_RETENTION_S
from fd_celery.worker.run import (
    Run,
    build_result,
    guarded,
    outcome,
    prompt_ids_of,
    sampling_for,
    stops_of,
    stream_tokens,
)
from fd_celery.worker.runner import runner_for

if TYPE_CHECKING:
    from fd_celery.engine.runner import EngineRunner

__all__ = ["run_decode"]

logger = logging.getLogger(__name__)


def run_decode(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if args:
        raise InvalidRequest(f"fd.decode takes keyword arguments only, got {len(args)} positional")
    decode = parse_decode_kwargs(kwargs)
    run = Run.open(task, decode.request_id)
    if run.ended_before():
        _release_unused_blob(run, decode)
        return outcome(run.previous.data)  # type: ignore[union-attr]
    skip = run.previous.seq + 1 if run.previous is not None else 1

    def work() -> dict[str, Any]:
        from fd_celery.engine import TextStreamer

        runner = runner_for(task.app)
        engine = runner.engine
        request = decode.request
        ref = _resolve(run, decode)
        prompt_ids = prompt_ids_of(engine, request)
        sampling = sampling_for(request, run.request_id)
        cache = _load_cache(run, ref, runner, prompt_ids, sampling)
        run.out.chunk(TextStreamer(engine).push(ref.first_token), (ref.first_token,), write=False)
        streamer = TextStreamer(engine, emitted_ids=[ref.first_token])
        done = stream_tokens(
            engine,
            run.out,
            runner.decode(cache, ref.first_token, sampling, request.max_tokens, prompt_ids),
            streamer,
            skip,
            more_after_first=False,
            stops=stops_of(engine, request),
        )
        if done.produced == 0:
            done.last_at = decode.first_token_at
        result = build_result(
            run,
            request,
            engine,
            prompt_ids,
            (ref.owner, run.node),
            decode.submitted,
            decode.first_token_at,
            done,
            started=decode.started,
        )
        result.extra.update(
            kv_store=ref.kind, kv_bytes=ref.nbytes, handoff_s=max(0.0, run.started - decode.first_token_at)
        )
        return outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))

    return guarded(run, work)


def _release_unused_blob(run: Run, decode: DecodeRequest) -> None:
    """A decode delivered after its request ended (again after it finished, or the second decode
    of a prefill that ran twice): nobody will take the blob its reference names, so release it now
    rather than leave it to the TTL sweep (GPU memory, for the cuda store). A blob already taken
    is simply not there."""
    try:
        ref = _resolve(run, decode)
        with redis_errors(run.config):
            kv.discard(ref, run.client)
    except Exception as exc:  # noqa: BLE001 - no reference left (expired, never stored): nothing to release
        logger.info("request %s: no KV blob to release after its end (%s)", run.request_id, exc)


def _resolve(run: Run, decode: DecodeRequest) -> kv.KVRef:
    """The KV reference, read from the result backend where the prefill task put it."""
    meta = run.task.backend.get_task_meta(decode.prefill_id)
    if meta.get("status") != states.SUCCESS:
        raise KVRefError(f"no KV reference for request {decode.request_id} in the result backend")
    ref = kv.KVRef.from_dict(meta.get("result"))
    if ref.topic != run.config.scheduler_topic:  # topics share nothing, KV blobs included
        raise KVRefError(
            f"KV reference of topic {ref.topic!r} refused by a node of {run.config.scheduler_topic!r}"
        )
    if ref.request_id != decode.request_id:
        raise KVRefError(f"KV reference belongs to request {ref.request_id}, not {decode.request_id}")
    return ref


def _load_cache(run: Run, ref: kv.KVRef, runner: EngineRunner, prompt_ids: list[int], sampling: Any) -> Any:
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
        cache, _ = runner.prefill(prompt_ids, sampling)
    if cache.num_tokens != len(prompt_ids):
        raise KVRefError(
            f"KV cache of {cache.num_tokens} tokens does not match the prompt of {len(prompt_ids)}"
        )
    return cache
