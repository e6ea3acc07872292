"""``fd-celery demo``: a private cluster, a burst of requests, live progress, who served what."""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

IMPLEMENTED = ("local",)
PROMPTS = [
    "Once upon a time",
    "The scheduler said",
    "Celery and Redis walk into a bar",
    "KV caches are",
    "Prefill, then decode",
    "A node became idle and",
]


@dataclass
class Progress:
    total: int
    tokens: int = 0
    done: int = 0
    failed: int = 0
    by_node: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self, elapsed: float) -> str:
        nodes = " ".join(f"{n.split('@')[0]}:{c}" for n, c in sorted(self.by_node.items()))
        bar_width = 24
        filled = int(bar_width * (self.done + self.failed) / self.total)
        return (f"\r[{'#' * filled}{'.' * (bar_width - filled)}] {self.done}/{self.total} done, "
                f"{self.tokens} tokens streamed, {elapsed:4.1f}s  {nodes}   ")


def run_demo(scheduler: str, num_requests: int, num_workers: int, max_tokens: int) -> int:
    if scheduler not in IMPLEMENTED:
        click.echo(f"fd-celery demo: the {scheduler} scheduler is not available in this version yet; "
                   f"available: {', '.join(IMPLEMENTED)}", err=True)
        return 2
    from ..local_cluster import LocalCluster, RedisServer

    # Ctrl-C and SIGTERM both unwind through the finally below, which stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    click.echo("fd_celery demo: starting a private Redis ...")
    try:
        redis_server = RedisServer().start()
    except RuntimeError as exc:
        click.echo(f"fd-celery demo: {exc}", err=True)
        return 1
    topic = f"demo-{uuid.uuid4().hex[:6]}"
    cluster = LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": scheduler})
    try:
        click.echo(f"Redis on 127.0.0.1:{redis_server.port}; starting {num_workers} worker(s) "
                   f"(`celery -A workers.mixed worker`, built-in model fd-tiny on cpu) ...")
        nodes = [cluster.add_worker(f"node{i + 1}").node for i in range(num_workers)]
        cluster.wait_live(nodes, topic=topic)
        click.echo(f"nodes up: {', '.join(nodes)}; sending {num_requests} requests (scheduler {scheduler})")
        results = _burst(redis_server.port, topic, scheduler, num_requests, max_tokens)
        _report(results)
        return 0 if all(r.get("error") is None for r in results) else 1
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the cluster", err=True)
        return 130
    finally:
        cluster.close()
        redis_server.stop()


def _burst(port: int, topic: str, scheduler: str, num_requests: int, max_tokens: int) -> list[dict[str, Any]]:
    from celery import Celery

    import fd_celery

    app = Celery("fd-demo-client", set_as_current=False)
    fd_celery.install(app, scheduler_port=port, scheduler_topic=topic, scheduler_name=scheduler)
    client = fd_celery.Client(app)
    progress = Progress(total=num_requests)
    started = time.monotonic()

    def one(i: int) -> dict[str, Any]:
        tokens = max(1, max_tokens // 4 + (i * 7919) % (max_tokens - max_tokens // 4 + 1))
        handle = client.submit(PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0.8, seed=i)
        try:
            for chunk in handle.stream(timeout=300):
                with progress.lock:
                    progress.tokens += len(chunk.token_ids)
            result = handle.result(timeout=60)
        except fd_celery.FDCeleryError as exc:
            with progress.lock:
                progress.failed += 1
            return {"request": handle.request_id, "error": f"{type(exc).__name__}: {exc}"}
        with progress.lock:
            progress.done += 1
            progress.by_node[result.served_by[-1]] += 1
        return {"request": handle.request_id, **result.to_dict(), "error": None}

    stop = threading.Event()

    def show() -> None:
        while not stop.wait(0.2):
            with progress.lock:
                click.echo(progress.line(time.monotonic() - started), nl=False)

    ticker = threading.Thread(target=show, daemon=True)
    ticker.start()
    with ThreadPoolExecutor(max_workers=min(32, num_requests)) as pool:
        results = list(pool.map(one, range(num_requests)))
    stop.set()
    ticker.join()
    click.echo(progress.line(time.monotonic() - started))
    return results


def _report(results: list[dict[str, Any]]) -> None:
    click.echo("")
    click.echo(f"{'request':10} {'served by':14} {'tokens':>6} {'TTFT ms':>8} {'TPOT ms':>8}  text")
    for r in results:
        if r["error"]:
            click.echo(f"{r['request'][:8]:10} {'-':14} {'-':>6} {'-':>8} {'-':>8}  {r['error']}")
            continue
        text = r["text"].replace("\n", " ")[:28]
        click.echo(f"{r['request'][:8]:10} {' > '.join(n.split('@')[0] for n in r['served_by']):14} "
                   f"{len(r['token_ids']):>6} {r['ttft_s'] * 1000:8.1f} {r['tpot_s'] * 1000:8.2f}  {text!r}")
    ok = [r for r in results if not r["error"]]
    click.echo("")
    per_node = Counter(r["served_by"][-1] for r in ok)
    for node, count in sorted(per_node.items()):
        mine = [r for r in ok if r["served_by"][-1] == node]
        ttft = sorted(r["ttft_s"] for r in mine)[len(mine) // 2] * 1000
        tpot = sorted(r["tpot_s"] for r in mine)[len(mine) // 2] * 1000
        click.echo(f"{node}: {count} requests, {sum(len(r['token_ids']) for r in mine)} tokens, "
                   f"TTFT p50 {ttft:.1f} ms, TPOT p50 {tpot:.2f} ms")
    failed = len(results) - len(ok)
    click.echo(f"{len(ok)} completed, {failed} failed")
