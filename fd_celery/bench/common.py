"""Shared pieces of the benchmarks: where results go, and the optional plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import click


def write_json(out_dir: str, name: str, data: Mapping[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
    click.echo(f"wrote {path}")
    return path


def bar_plot(
    out_dir: str, name: str, title: str, labels: list[str], values: list[float], unit: str
) -> str | None:
    """A bar chart as PNG, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        click.echo("matplotlib is not installed (pip install fd_celery[plot]): no PNG written")
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, values, color=["#2b6cb0", "#63b3ed", "#a0aec0", "#718096"][: len(values)])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    click.echo(f"wrote {path}")
    return path
