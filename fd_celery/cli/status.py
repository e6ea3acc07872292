"""``celery -A APP fd status`` and ``celery -A APP fd metrics``: a topic's nodes, for people and
for Prometheus.

``fd status`` names the scheduler and the topic it shows, then lists every live node of the
topic: role, load score, queue depth, slots, running requests, heartbeat age, steals made and
suffered, requests rescued from dead nodes (taken from a dead node's queue: not a steal), KV bytes
held (``--json`` for scripts).
``fd metrics`` serves the Prometheus exposition at ``/metrics`` (``--once`` prints it and exits);
see :mod:`fd_celery.observability.metrics`.

Celery loads this module (its ``celery.commands`` entry point) in every ``celery`` command. In a
command of an fd_celery app, an fd_celery error that nothing caught (``celery call fd.generate``
with a bad field, a worker refusing its configuration) ends the command with its one-line message
and exit status 1, not a traceback of Celery's and Click's frames: see :func:`short_errors`.
"""

from __future__ import annotations

import json
import sys
import threading
from types import TracebackType
from typing import Any

import click
from celery.bin.base import CeleryCommand, handle_preload_options
from celery.signals import user_preload_options

from fd_celery import kv
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import FDCeleryError
from fd_celery.keys import dead_letter_list, steals_hash
from fd_celery.observability.exporter import queue_depths, shared_queue_depths
from fd_celery.scheduler import loadtable
from fd_celery.scheduler.registry import live_nodes
from fd_celery.settings import get_config, has_config


@user_preload_options.connect
def short_errors(app: Any = None, **_: Any) -> None:
    """In a ``celery`` command of an fd_celery app (Celery sends this signal before the command
    runs): an uncaught fd_celery error prints ``Error: <Type>: <message>`` on stderr, exit 1. Any
    other error keeps Python's traceback."""
    if app is None or not has_config(app) or isinstance(sys.excepthook, _ShortErrors):
        return
    sys.excepthook = _ShortErrors(sys.excepthook)


class _ShortErrors:
    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, FDCeleryError):
            click.echo(f"Error: {exc_type.__name__}: {exc}", err=True)
        else:
            self.previous(exc_type, exc, tb)


# (JSON field, table heading)
COLUMNS = (
    ("node", "node"),
    ("role", "role"),
    ("load_score", "load"),
    ("queue", "queue"),
    ("slots", "slots"),
    ("running", "running"),
    ("heartbeat_age_s", "heartbeat"),
    ("steals_made", "stole"),
    ("steals_suffered", "stolen from"),
    ("rescued", "rescued"),
    ("kv_bytes", "KV held"),
    ("kv_stores", "KV stores"),
    ("model", "model"),
    ("device", "device"),
)


@click.group(name="fd")
@click.pass_context
@handle_preload_options
def fd(ctx: click.Context, **_: Any) -> None:
    """fd_celery: inspect the scheduler (--scheduler-… options go before the subcommand)."""


@fd.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The scheduler and topic, and every live node of the topic: role, load, queue, slots, running,
    heartbeat, steals, rescues, KV bytes."""
    app = ctx.obj.app
    try:
        config = get_config(app)
        client = redis_for(config)
        with redis_errors(config):
            report = collect_status(client, config)
    except FDCeleryError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rows = report["nodes"]
    click.echo(
        f"scheduler {report['scheduler']}, topic {config.scheduler_topic!r} on {config.redacted_url()}: "
        f"{len(rows)} live node(s)"
    )
    others = sorted({row["scheduler"] for row in rows if row.get("scheduler")} - {report["scheduler"]})
    if others:
        click.echo(
            f"note: nodes of this topic run the {' and '.join(others)} scheduler, this app "
            f"{report['scheduler']} (scheduler_name, FD_SCHEDULER_NAME or --scheduler-name)"
        )
    if rows:
        click.echo(_table(rows))
    waiting = {role: n for role, n in report["shared_queues"].items() if n}
    if waiting:
        click.echo("waiting in topic-wide queues: " + ", ".join(f"{role} {n}" for role, n in waiting.items()))
    if report["dead_letters"]:
        click.echo(
            f"refused messages: {report['dead_letters']} in Redis list "
            f"{dead_letter_list(config.scheduler_topic)} (newest first; see fd_celery.worker.deadletter)"
        )


def collect_status(client: Any, config: Any) -> dict[str, Any]:
    """What ``fd status`` shows: ``{"scheduler", "topic", "nodes": [row, ...], "shared_queues":
    {role: n}, "dead_letters": n}``. ``scheduler`` is the one this app is configured with; a row
    carries its node's own where the node publishes it. ``rescued`` counts the requests a node
    took from dead nodes (``steals_made`` only those taken from live, busy ones)."""
    topic = config.scheduler_topic
    nodes = live_nodes(client, config)
    depths = queue_depths(client, topic, [(n.name, n.role) for n in nodes])
    scores: dict[str, dict[str, float]] = {}
    steals = {k.decode(): int(v) for k, v in client.hgetall(steals_hash(topic)).items()}
    held = kv.bytes_held(client, topic)
    rows = []
    for info in nodes:
        if info.role not in scores:
            scores[info.role] = loadtable.scores(client, config, info.role)
        row = info.to_dict()
        row.update(
            role=info.role,
            load_score=round(scores[info.role].get(info.name, 0.0), 4),
            queue=depths.get(info.name, 0),
            slots=_int(info.facts.get("slots")),
            running=_int(info.facts.get("running")),
            steals_made=steals.get(f"{info.name}:made", 0),
            steals_suffered=steals.get(f"{info.name}:suffered", 0),
            rescued=steals.get(f"{info.name}:rescued", 0),
            kv_bytes=held.get(info.name, 0),
        )
        rows.append(row)
    return {
        "scheduler": config.scheduler_name,
        "topic": topic,
        "nodes": rows,
        "shared_queues": shared_queue_depths(client, topic),
        "dead_letters": int(client.llen(dead_letter_list(topic))),
    }


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _cell(field: str, value: Any) -> str:
    if field == "kv_bytes":
        return _bytes(int(value or 0))
    if field == "kv_stores":  # the stores a node takes blobs from, as it published them
        return ",".join(value) if isinstance(value, list) else ""
    if field == "heartbeat_age_s":
        return f"{float(value):.1f}s"
    if field == "load_score":
        return f"{float(value):.2f}"
    return "" if value is None else str(value)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: list[dict[str, Any]]) -> str:
    heads = [head for _, head in COLUMNS]
    cells = [[_cell(field, row.get(field)) for field, _ in COLUMNS] for row in rows]
    widths = [max(len(head), *(len(r[i]) for r in cells)) for i, head in enumerate(heads)]
    numeric = {"load", "queue", "slots", "running", "heartbeat", "stole", "stolen from", "rescued", "KV held"}

    def fmt(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if h in numeric else v.ljust(w) for v, w, h in zip(values, widths, heads)
        ).rstrip()

    return "\n".join([fmt(heads), *(fmt(r) for r in cells)])


@fd.command(cls=CeleryCommand)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9808,
    show_default=True,
    help="Port to serve /metrics on.",
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 exposes it to the network).",
)
@click.option("--once", is_flag=True, help="Print the exposition to stdout and exit.")
@click.pass_context
def metrics(ctx: click.Context, port: int, address: str, once: bool) -> None:
    """Prometheus metrics of the topic at http://ADDRESS:PORT/metrics, read from Redis per scrape."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "the metrics exporter needs prometheus_client: pip install prometheus-client"
        ) from None
    from fd_celery.observability import exporter

    app = ctx.obj.app
    try:
        config = get_config(app)
        client = redis_for(config)
        with redis_errors(config):
            client.ping()
            if once:
                click.echo(exporter.exposition(client, config).decode(), nl=False)
                return
    except FDCeleryError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        server = exporter.serve(client, config, port, address)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc}") from None
    click.echo(
        f"fd_celery metrics of topic {config.scheduler_topic!r} ({config.redacted_url()}) "
        f"at http://{address}:{port}/metrics; Ctrl-C stops"
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
