"""``fd-celery bench steal``: the global scheduler's work stealing, against no stealing.

Four nodes (one slot each) run the ``bench-sleep`` engine, whose requests take a fixed time per
token without using the CPU, so four processes on a small machine behave like four machines.
Every request is submitted to the same node. The same burst runs twice on fresh clusters: with
stealing (``scheduler_min_load_score`` 1) and without (a score no node reaches). Reported:
makespan of each, the ideal balanced makespan (total service time / nodes), and the steal
reaction: from a node finding nothing left to do (or its last look that found nothing to steal)
to the stolen request starting on it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import click

from fd_celery.bench.common import bar_plot, write_json
from fd_celery.local_cluster import LocalCluster

NODES = 4
NO_STEALING_SCORE = "1000000000"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _run_burst(min_load_score: str, num_requests: int, tokens: int, ms_per_token: float) -> dict[str, Any]:
    from celery import Celery

    import fd_celery

    topic = f"bench-steal-{'on' if min_load_score != NO_STEALING_SCORE else 'off'}"
    env = {
        "FD_SCHEDULER_TOPIC": topic,
        "FD_SCHEDULER_NAME": "global",
        "FD_MODEL": f"bench-sleep:{ms_per_token:g}",
        "FD_SCHEDULER_MIN_LOAD_SCORE": min_load_score,
    }
    with LocalCluster(env=env) as cluster:
        workers = [cluster.add_worker(f"s{i}") for i in range(NODES)]
        cluster.wait_live([w.node for w in workers], topic=topic)
        app = Celery("bench-steal", set_as_current=False)
        fd_celery.install(
            app, scheduler_port=cluster.redis.port, scheduler_topic=topic, scheduler_name="global"
        )
        client = fd_celery.Client(app)
        # Warm-up: every node serves one request (model load, connections), none of them stolen.
        for w in workers:
            client.submit("warm", max_tokens=1, node=w.node).result(timeout=120)
        time.sleep(0.5)
        started = time.perf_counter()
        handles = [
            client.submit("burst", max_tokens=tokens, seed=i, node=workers[0].node)
            for i in range(num_requests)
        ]
        results = [h.result(timeout=600) for h in handles]
        makespan = time.perf_counter() - started
    reactions = [r.extra["steal_reaction_s"] for r in results if r.stolen]
    per_node: dict[str, int] = {}
    for r in results:
        per_node[r.served_by[0]] = per_node.get(r.served_by[0], 0) + 1
    return {
        "makespan_s": makespan,
        "stolen": len(reactions),
        "per_node": per_node,
        "steal_reaction_s": reactions,
    }


def run_steal(num_requests: int, tokens: int, ms_per_token: float, out_dir: str) -> dict[str, Any]:
    service_s = tokens * ms_per_token / 1000.0
    ideal = num_requests * service_s / NODES
    click.echo(
        f"{num_requests} requests x {tokens} tokens x {ms_per_token:g} ms = {service_s:.2f} s each, "
        f"all submitted to one of {NODES} nodes"
    )
    click.echo("with stealing ...")
    on = _run_burst("1", num_requests, tokens, ms_per_token)
    click.echo("without stealing ...")
    off = _run_burst(NO_STEALING_SCORE, num_requests, tokens, ms_per_token)
    reactions_ms = [r * 1000 for r in on["steal_reaction_s"]]
    report = {
        "benchmark": "steal",
        "nodes": NODES,
        "requests": num_requests,
        "tokens_per_request": tokens,
        "ms_per_token": ms_per_token,
        "ideal_makespan_s": ideal,
        "with_stealing": {k: v for k, v in on.items() if k != "steal_reaction_s"},
        "without_stealing": {k: v for k, v in off.items() if k != "steal_reaction_s"},
        "makespan_vs_ideal": on["makespan_s"] / ideal,
        "steal_reaction_ms": {
            "p50": _percentile(reactions_ms, 0.5),
            "p99": _percentile(reactions_ms, 0.99),
            "mean": statistics.fmean(reactions_ms) if reactions_ms else float("nan"),
            "count": len(reactions_ms),
        },
        "targets": {"makespan_vs_ideal": 1.2, "steal_reaction_p50_ms": 50},
    }
    click.echo("")
    click.echo(f"ideal makespan      {ideal:7.2f} s")
    click.echo(
        f"with stealing       {on['makespan_s']:7.2f} s  ({report['makespan_vs_ideal']:.2f} x ideal; "
        f"{on['stolen']} stolen; per node {on['per_node']})"
    )
    click.echo(f"without stealing    {off['makespan_s']:7.2f} s  ({off['makespan_s'] / ideal:.2f} x ideal)")
    click.echo(
        f"steal reaction      p50 {report['steal_reaction_ms']['p50']:.1f} ms, "
        f"p99 {report['steal_reaction_ms']['p99']:.1f} ms over {len(reactions_ms)} steals"
    )
    write_json(out_dir, "steal", report)
    bar_plot(
        out_dir,
        "steal",
        f"Makespan, {num_requests} requests sent to one of {NODES} nodes",
        ["ideal", "with stealing", "without stealing"],
        [ideal, on["makespan_s"], off["makespan_s"]],
        "seconds",
    )
    return report
