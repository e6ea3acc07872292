"""``celery -A APP fd status``: the live nodes of a topic, as a table or as JSON."""

from __future__ import annotations

import json
from typing import Any

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from ..app import get_config
from ..connection import redis_errors, redis_for
from ..errors import FDCeleryError
from ..keys import node_queue
from ..registry import NodeInfo, live_nodes

COLUMNS = ("node", "role", "slots", "queue", "heartbeat_age_s", "model", "device", "host", "pid")


@click.group(name="fd")
@click.pass_context
@handle_preload_options
def fd(ctx: click.Context, **_: Any) -> None:
    """fd_celery: inspect the scheduler (--scheduler-… options go before the subcommand)."""


@fd.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every live node of the topic: role, slots, waiting requests, heartbeat age."""
    app = ctx.obj.app
    try:
        config = get_config(app)
        client = redis_for(config)
        with redis_errors(config):
            nodes = live_nodes(client, config)
            rows = [_row(client, config, node) for node in nodes]
    except FDCeleryError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"topic": config.scheduler_topic, "nodes": rows}, indent=2))
        return
    click.echo(f"topic {config.scheduler_topic!r} on {config.redacted_url()}: {len(rows)} live node(s)")
    if rows:
        click.echo(_table(rows))


def _row(client: Any, config: Any, node: NodeInfo) -> dict[str, Any]:
    row = node.to_dict()
    row["queue"] = client.llen(node_queue(config.scheduler_topic, node.role, node.name))
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[str(row.get(col, "")) for col in COLUMNS] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(COLUMNS)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(COLUMNS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
