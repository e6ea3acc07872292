"""``fd.generate``: one node runs prefill and decode."""

from __future__ import annotations

from typing import Any

from celery import Task

from fd_celery.connection import redis_errors
from fd_celery.scheduler.stealing import stolen_from
from fd_celery.streams import END_RETENTION_S
from fd_celery.worker.run import (
    Run,
    admitted,
    build_result,
    guarded,
    header_float,
    outcome,
    prompt_ids_of,
    sampling_for,
    stops_of,
    stream_tokens,
)
from fd_celery.worker.runner import runner_for

__all__ = ["run_generate"]


def run_generate(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # The hot path reads nothing first: reruns are rare, and the stream's append script already
    # skips what an earlier run wrote and hands back an earlier end (see fd_celery.streams).
    run = Run.open(task, task.request.id, look_back=False)

    def work() -> dict[str, Any]:
        request = admitted(run, args, kwargs)
        with redis_errors(run.config):
            stolen = (
                stolen_from(run.client, run.config, run.request_id)
                if run.config.scheduler_name == "global"
                else None
            )
        from fd_celery.engine import TextStreamer

        runner = runner_for(task.app)
        engine = runner.engine
        prompt_ids = prompt_ids_of(engine, request)
        sampling = sampling_for(request, run.request_id)
        done = stream_tokens(
            engine,
            run.out,
            runner.generate(prompt_ids, sampling, request.max_tokens),
            TextStreamer(engine),
            0,
            request.max_tokens > 1,
            stops_of(engine, request),
        )
        submitted = header_float(task, "fd_submitted") or run.started
        result = build_result(
            run,
            request,
            engine,
            prompt_ids,
            (run.node,),
            submitted,
            done.first_at,
            done,
            stolen=stolen is not None,
        )
        if stolen is not None:
            result.extra.update(stolen_from=stolen[0], steal_reaction_s=max(0.0, run.started - stolen[1]))
        return outcome(run.out.end({"result": result.to_dict()}, END_RETENTION_S))

    return guarded(run, work)
