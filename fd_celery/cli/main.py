"""``fd-celery``: the demo and the benchmarks."""

from __future__ import annotations

import click

from fd_celery.config import SCHEDULER_NAMES
from fd_celery.server.cli import serve


@click.group()
@click.version_option(package_name="fd_celery")
def main() -> None:
    """fd_celery: FastDeploy's LLM request schedulers on Celery and Redis."""


@main.command()
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULER_NAMES),
    default="local",
    show_default=True,
    help="Which scheduler the demo cluster runs.",
)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1, 10_000),
    default=24,
    show_default=True,
    help="Requests in the burst.",
)
@click.option(
    "--workers",
    "num_workers",
    type=click.IntRange(1, 16),
    default=None,
    help="Worker processes (nodes) to start [default: 2 local, 4 global, 3 splitwise "
    "(1 prefill + 2 decode)].",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 4096),
    default=48,
    show_default=True,
    help="Most tokens per request (requests vary between a quarter of this and this).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="fd-demo-output",
    show_default=True,
    callback=lambda ctx, param, value: _folder(value),
    help="Output folder (made if missing): the timeline PNG and the requests' results as JSON.",
)
def demo(scheduler: str, num_requests: int, num_workers: int | None, max_tokens: int, out_dir: str) -> None:
    """Start a private Redis and real workers, send a burst of requests, show who served what."""
    from fd_celery.cli.demo import run_demo

    raise SystemExit(run_demo(scheduler, num_requests, num_workers, max_tokens, out_dir))


def _folder(value: str) -> str:
    if value.lower().endswith((".png", ".json")):
        raise click.BadParameter(f"{value!r} looks like a file: --out names the output folder")
    return value


main.add_command(serve)  # the OpenAI-compatible server (fd_celery/server/cli.py)


@main.group()
def bench() -> None:
    """Benchmarks: JSON figures and PNG plots, measured side by side in one run."""


@bench.command()
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(10, 1_000_000),
    default=1000,
    show_default=True,
    help="Requests per measured round.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="Alternating rounds of each system; the best round of each is compared.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Pool processes of the one worker each system gets.",
)
@click.option(
    "--scheduler",
    type=click.Choice(["local", "global"]),
    default="local",
    show_default=True,
    help="The fd_celery scheduler measured.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Where the JSON and PNG go.",
)
def dispatch(num_requests: int, rounds: int, concurrency: int, scheduler: str, out_dir: str) -> None:
    """One-token requests through fd_celery against a plain Celery no-op task, same Redis."""
    from fd_celery.bench.dispatch import run_dispatch

    run_dispatch(num_requests, rounds, concurrency, out_dir, scheduler)


@bench.command()
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(4, 100_000),
    default=64,
    show_default=True,
    help="Requests in the burst, all submitted to one node.",
)
@click.option(
    "--tokens", type=click.IntRange(1, 10_000), default=10, show_default=True, help="Tokens per request."
)
@click.option(
    "--ms-per-token",
    type=click.FloatRange(0, 1000),
    default=20.0,
    show_default=True,
    help="Service time per token of the bench-sleep engine.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Where the JSON and PNG go.",
)
def steal(num_requests: int, tokens: int, ms_per_token: float, out_dir: str) -> None:
    """Global scheduler: makespan with and without stealing against the ideal; steal reaction."""
    from fd_celery.bench.steal import run_steal

    run_steal(num_requests, tokens, ms_per_token, out_dir)


@bench.command()
@click.option(
    "--repeat",
    type=click.IntRange(1, 50),
    default=10,
    show_default=True,
    help="Rounds per size (each round runs the baselines and every store once, in turn); "
    "the best of each counts.",
)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(1, 10_000),
    default=50,
    show_default=True,
    help="Split requests whose hand-off latency is measured.",
)
@click.option(
    "--stream-tokens",
    type=click.IntRange(10, 10_000),
    default=400,
    show_default=True,
    help="Tokens of the streaming measurement.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Where the JSON and PNG go.",
)
def pd(repeat: int, num_requests: int, stream_tokens: int, out_dir: str) -> None:
    """Splitwise: KV store throughput against memcpy and raw Redis; hand-off latency; streaming."""
    from fd_celery.bench.pd import run_pd

    run_pd(repeat, num_requests, stream_tokens, out_dir)


def _levels(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r}: comma-separated integers >= 1, such as 1,8,32,64")
    return levels


@bench.command()
@click.option("--model", default=None, help="A built-in model.  [default: fd-small]")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.  [default: cpu]")
@click.option(
    "--concurrency",
    callback=_levels,
    default=None,
    help="Requests in flight, one level per value.  [default: 1,8,32,64; --quick: 1,8]",
)
@click.option(
    "--prompt-tokens", type=click.IntRange(1, 4000), default=None, help="Prompt length.  [default: 128]"
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 4000),
    default=None,
    help="Output tokens.  [default: 64; --quick: 16]",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 100),
    default=None,
    help="Requests per level: concurrency x rounds (at least 2).  [default: 1]",
)
@click.option(
    "--old-max-concurrency",
    type=click.IntRange(1, 4096),
    default=None,
    help="The old design (prefork -c 2) runs the levels up to this one.  [default: 32; --quick: 8]",
)
@click.option("--quick", is_flag=True, help="A short run: concurrency 1 and 8, 16 output tokens.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Where the JSON and PNG go.",
)
def throughput(quick: bool, out_dir: str, **options: object) -> None:
    """One node's tokens/s against concurrency: the engine alone, the old design, the batching node."""
    from fd_celery.bench.throughput import ThroughputSpec, run_throughput

    try:
        spec = ThroughputSpec.of(quick, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    raise SystemExit(0 if run_throughput(spec, out_dir)["ok"] else 1)
