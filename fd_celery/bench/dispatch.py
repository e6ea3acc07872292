"""``fd-celery bench dispatch``: scheduling overhead, fd_celery against plain Celery.

Four single-worker setups on one private Redis, each with the same pool size:
``fd_celery`` (one-token requests through ``Client.submit``/``result``, the built-in model),
``fd_celery-null`` (the same, with the ``bench-sleep:0`` engine that computes nothing: what is
left is fd_celery's own overhead), ``plain`` (a Celery no-op task with Celery's defaults) and ``plain-matched`` (the same no-op
with fd_celery's worker settings: late acks, no prefetch). Rounds alternate between them and
the best round of each counts, so a noisy moment hurts no one setup alone.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import click

from fd_celery.bench.common import bar_plot, write_json
from fd_celery.local_cluster import LocalCluster

TOPIC = "bench-dispatch"
NULL_TOPIC = "bench-dispatch-null"


def _fd_round(client: Any, n: int) -> float:
    started = time.perf_counter()
    handles = [client.submit("hi", max_tokens=1) for _ in range(n)]
    for handle in handles:
        handle.result(timeout=300)
    return n / (time.perf_counter() - started)


def _plain_round(app: Any, queue: str, n: int) -> float:
    started = time.perf_counter()
    results = [app.send_task("plain.noop", kwargs={"prompt": "hi"}, queue=queue) for _ in range(n)]
    for result in results:
        result.get(timeout=300)
    return n / (time.perf_counter() - started)


def run_dispatch(
    num_requests: int, rounds: int, concurrency: int, out_dir: str, scheduler: str = "local"
) -> dict[str, Any]:
    from celery import Celery

    import fd_celery

    with LocalCluster(env={"FD_SCHEDULER_TOPIC": TOPIC, "FD_SCHEDULER_NAME": scheduler}) as cluster:
        fd_worker = cluster.add_worker("fd", concurrency=concurrency)
        null_worker = cluster.add_worker(
            "fdnull",
            concurrency=concurrency,
            env={"FD_SCHEDULER_TOPIC": NULL_TOPIC, "FD_MODEL": "bench-sleep:0"},
        )
        cluster.add_worker(
            "plain",
            app="fd_celery.bench.plain_app",
            concurrency=concurrency,
            env={"BENCH_PLAIN_QUEUE": "plain"},
            extra_args=["-Q", "plain"],
        )
        cluster.add_worker(
            "matched",
            app="fd_celery.bench.plain_app",
            concurrency=concurrency,
            env={"BENCH_PLAIN_QUEUE": "plain-matched", "BENCH_PLAIN_MATCHED": "1"},
            extra_args=["-Q", "plain-matched"],
        )
        cluster.wait_live([fd_worker.node], topic=TOPIC)
        cluster.wait_live([null_worker.node], topic=NULL_TOPIC)

        fd_app = Celery("bench-fd", set_as_current=False)
        fd_celery.install(
            fd_app, scheduler_port=cluster.redis.port, scheduler_topic=TOPIC, scheduler_name=scheduler
        )
        client = fd_celery.Client(fd_app)
        null_app = Celery("bench-fd-null", set_as_current=False)
        fd_celery.install(
            null_app, scheduler_port=cluster.redis.port, scheduler_topic=NULL_TOPIC, scheduler_name=scheduler
        )
        null_client = fd_celery.Client(null_app)
        plain_app = Celery(
            "bench-plain", broker=cluster.redis.url(), backend=cluster.redis.url(), set_as_current=False
        )
        plain_app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

        systems: dict[str, Callable[[int], float]] = {
            "fd_celery": lambda n: _fd_round(client, n),
            "fd_celery-null": lambda n: _fd_round(null_client, n),
            "plain": lambda n: _plain_round(plain_app, "plain", n),
            "plain-matched": lambda n: _plain_round(plain_app, "plain-matched", n),
        }
        click.echo("warming up ...")
        for run in systems.values():  # first requests pay for imports, connections, the model
            run(max(10, num_requests // 10))
        throughput: dict[str, list[float]] = {name: [] for name in systems}
        for r in range(rounds):
            for name, run in systems.items():
                throughput[name].append(run(num_requests))
                click.echo(f"round {r + 1}/{rounds}: {name:14} {throughput[name][-1]:8.0f} req/s")

    best = {name: max(values) for name, values in throughput.items()}
    report = {
        "benchmark": "dispatch",
        "scheduler": scheduler,
        "requests_per_round": num_requests,
        "rounds": rounds,
        "worker_concurrency": concurrency,
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "throughput_req_s": throughput,
        "best_req_s": best,
        "ratio_vs_plain": best["fd_celery"] / best["plain"],
        "ratio_vs_plain_matched": best["fd_celery"] / best["plain-matched"],
        "ratio_null_vs_plain": best["fd_celery-null"] / best["plain"],
        "ratio_null_vs_plain_matched": best["fd_celery-null"] / best["plain-matched"],
        "target_ratio": 0.8,
    }
    click.echo("")
    click.echo(f"fd_celery      {best['fd_celery']:8.0f} req/s (one-token requests, real model)")
    click.echo(
        f"fd_celery-null {best['fd_celery-null']:8.0f} req/s (one-token requests, engine that computes nothing)"
    )
    click.echo(f"plain Celery   {best['plain']:8.0f} req/s (no-op task, Celery defaults)")
    click.echo(f"plain matched  {best['plain-matched']:8.0f} req/s (no-op task, late acks, no prefetch)")
    click.echo(
        f"ratio fd/plain {report['ratio_vs_plain']:.2f}; fd/plain-matched "
        f"{report['ratio_vs_plain_matched']:.2f} (the model's own compute included)"
    )
    click.echo(
        f"ratio fd-null/plain {report['ratio_null_vs_plain']:.2f}; fd-null/plain-matched "
        f"{report['ratio_null_vs_plain_matched']:.2f} (scheduling overhead alone; target >= 0.8)"
    )
    write_json(out_dir, f"dispatch-{scheduler}", report)
    bar_plot(
        out_dir,
        f"dispatch-{scheduler}",
        f"{scheduler} scheduler: dispatch throughput, {concurrency} pool process(es), best of {rounds}",
        list(best),
        list(best.values()),
        "requests / s",
    )
    return report


def _cpus() -> int:
    import os

    return os.cpu_count() or 1
