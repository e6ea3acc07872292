"""``install(app)``: make a Celery app an fd_celery app.

Everything is plugged in through Celery's own extension points: task registration, a router in
``task_routes``, JSON-only serializer settings, ``celery`` command options (``user_options``) and
a worker bootstep. The resolved :class:`SchedulerConfig` is cached on the app; read it with
:func:`get_config`.
"""

from __future__ import annotations

import logging
from typing import Any

import click
from celery import Celery, signals

from fd_celery import keys
from fd_celery.config import RedisTLS, SchedulerConfig
from fd_celery.errors import ConfigError
from fd_celery.keys import ROLES
from fd_celery.scheduler.routing import route_task
from fd_celery.settings import DEFAULT_DEVICE, DEFAULT_MODEL, get_config, has_config, set_config
from fd_celery.worker import tasks  # noqa: F401 - shared tasks: importing registers them on every app
from fd_celery.worker.bootstep import FDIntakeStep, FDWorkerStep

__all__ = ["install"]

logger = logging.getLogger(__name__)

# A request may run this long after it starts; Redis redelivers an unacked message only after
# the visibility timeout, which must exceed the TTL plus this, or a slow request runs twice.
MAX_RUN_S = 3600
UNACKED_RESTORE_INTERVAL_S = 5
DEAD_LETTER_TRANSPORT = "fd_celery.worker.deadletter:Transport"
# Celery's own ``expires`` is a backstop behind our exact TTL check at execution.
EXPIRES_BACKSTOP_GRACE_S = 5.0

_DERIVED_ATTR = "_fd_derived_urls"


def install(app: Celery, config: SchedulerConfig | None = None, **overrides: Any) -> SchedulerConfig:
    """Register fd_celery's tasks, router, settings, command options and worker step on ``app``.

    ``config`` (or the merged sources, see :mod:`fd_celery.config`) decides the scheduler; any
    ``overrides`` replace single parameters. Call it after the app's own configuration.
    """
    if config is None:
        config = SchedulerConfig.from_sources(app_conf=dict(app.conf), overrides=overrides)
    elif overrides:
        config = config.replace(**overrides)
    if config.tls is None:
        config = config.with_tls(RedisTLS.from_celery(app.conf))
    _apply_config(app, config)
    _configure_celery(app, config)
    _register_tasks(app, config)
    _register_cli(app)
    if FDWorkerStep not in app.steps["worker"]:
        app.steps["worker"].add(FDWorkerStep)
    if FDIntakeStep not in app.steps["consumer"]:
        app.steps["consumer"].add(FDIntakeStep)
    return config


def _apply_config(app: Celery, config: SchedulerConfig) -> None:
    """Cache the config; derive broker and result backend from it unless the app chose its own."""
    set_config(app, config)
    derived: set[str] = getattr(app, _DERIVED_ATTR, set())
    for setting in ("broker_url", "result_backend"):
        if not app.conf.get(setting) or setting in derived:
            app.conf[setting] = config.redis_url
            derived.add(setting)
    setattr(app, _DERIVED_ATTR, derived)
    if getattr(app, "_pool", None) is not None:  # the broker URL changed under a live pool
        app._pool.force_close_all()
        app._pool = None


def _configure_celery(app: Celery, config: SchedulerConfig) -> None:
    conf = app.conf
    if "pickle" in (conf.accept_content or []) or conf.task_serializer == "pickle":
        logger.warning("fd_celery accepts JSON only: pickle is removed from this app's settings")
    conf.task_serializer = "json"
    conf.result_serializer = "json"
    conf.event_serializer = "json"
    conf.accept_content = ["json"]
    conf.result_accept_content = ["json"]
    # Waiting requests must stay in Redis, where routing and stealing can see them.
    conf.worker_prefetch_multiplier = 1
    conf.worker_disable_prefetch = True
    conf.broker_connection_retry_on_startup = True
    transport = dict(conf.broker_transport_options or {})
    transport.setdefault("visibility_timeout", int(config.ttl_s + MAX_RUN_S))
    # kombu sweeps for unacked messages of dead workers every interval x throttle seconds
    # (10 x 10 by default); sweep every few seconds, so recovery is bounded by the visibility
    # timeout rather than by the sweep.
    transport.setdefault("unacked_restore_interval", UNACKED_RESTORE_INTERVAL_S)
    transport.setdefault("unacked_restore_throttle", 1)
    _screen_broker_messages(conf, transport, config)
    conf.broker_transport_options = transport
    routes = conf.task_routes
    routes = [] if routes is None else list(routes) if isinstance(routes, (list, tuple)) else [routes]
    if route_task not in routes:
        conf.task_routes = (route_task, *routes)


def _screen_broker_messages(conf: Any, transport: dict[str, Any], config: SchedulerConfig) -> None:
    """On a Redis broker, use kombu's Redis transport with fd_celery's screening channel: an
    item in a queue that is not a readable message is dead-lettered instead of killing the
    worker (see :mod:`fd_celery.worker.deadletter`). Another broker, or a transport the app chose, is
    left alone."""
    scheme = str(conf.broker_url or "").split("://", 1)[0]
    if conf.broker_transport in (None, "redis", "rediss", DEAD_LETTER_TRANSPORT) and scheme in (
        "redis",
        "rediss",
    ):
        conf.broker_transport = DEAD_LETTER_TRANSPORT
        transport["fd_dead_letters"] = keys.dead_letter_list(config.scheduler_topic)


def _register_tasks(app: Celery, config: SchedulerConfig) -> None:
    for name in keys.TASK_NAMES:
        app.tasks[name].expires = config.ttl_s + EXPIRES_BACKSTOP_GRACE_S


def _register_cli(app: Celery) -> None:
    """``--scheduler-…`` on every ``celery`` command (preload options, so they take effect
    before the worker connects anywhere); ``--fd-role/--fd-model/--fd-device`` on the worker."""
    preload = app.user_options["preload"]
    if any(getattr(opt, "name", "") == "scheduler_name" for opt in preload):
        return
    for name in SchedulerConfig.names():
        preload.add(
            click.Option(
                ["--" + name.replace("_", "-")],
                default=None,
                callback=_check_option,
                help=f"fd_celery: {SchedulerConfig.describe(name)} (env FD_{name.upper()}).",
            )
        )
    worker = app.user_options["worker"]
    worker.add(
        click.Option(
            ["--fd-role"],
            type=click.Choice(ROLES),
            default=None,
            help="fd_celery: the node's role (env FD_ROLE; default mixed).",
        )
    )
    worker.add(
        click.Option(
            ["--fd-model"],
            default=None,
            help=f"fd_celery: model name or local directory (env FD_MODEL; default {DEFAULT_MODEL}).",
        )
    )
    worker.add(
        click.Option(
            ["--fd-device"],
            default=None,
            help=f"fd_celery: cpu, cuda or cuda:N (env FD_DEVICE; default {DEFAULT_DEVICE}).",
        )
    )


def _check_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None:
        return None
    try:
        SchedulerConfig().replace(**{str(param.name): value})
    except ConfigError as exc:
        if "must be longer than" not in str(exc):  # cross-field checks run on the whole set
            raise click.BadParameter(str(exc)) from None
    return value


@signals.user_preload_options.connect
def _apply_cli_options(app: Celery | None = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    if app is None or not has_config(app):
        return
    given = {k: v for k, v in (options or {}).items() if k.startswith("scheduler_") and v is not None}
    if not given:
        return
    try:
        config = get_config(app).replace(**given)
    except ConfigError as exc:
        # Signal receivers' exceptions are only logged by Celery; a bad option must stop the command.
        raise SystemExit(f"fd_celery: {exc}") from None
    _apply_config(app, config)
    _register_tasks(app, config)
