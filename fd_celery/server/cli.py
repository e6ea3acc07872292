"""``fd-celery serve``, and the app factory any ASGI server can run.

::

    fd-celery serve --host 0.0.0.0 --port 8000 --workers 2 --scheduler-topic default
    uvicorn --factory fd_celery.server.cli:app_from_env --port 8000     # the same app

Configuration is the environment's, as for the workers: ``FD_SCHEDULER_*`` for the scheduler and
its Redis, ``FD_API_KEYS`` / ``FD_API_KEY_FILE`` for API keys, ``FD_SERVER_MAX_BODY_BYTES`` and
``FD_SERVER_CHAT_MAX_TOKENS``, and ``FD_SERVER_APP`` (``module:attribute``) to serve through a
Celery app of your own (one that ``fd_celery.install`` set up: its broker, backend and TLS
settings are used). The command's options set these variables for its server processes.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click
from celery import Celery

from fd_celery.app import install
from fd_celery.config import SchedulerConfig
from fd_celery.errors import ConfigError
from fd_celery.server.settings import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_MAX_BODY_BYTES, ServerSettings
from fd_celery.settings import has_config

__all__ = ["serve", "app_from_env", "celery_app_from_env"]


def celery_app_from_env() -> Celery:
    """``FD_SERVER_APP``'s Celery app, or a client app configured from ``FD_SCHEDULER_*``."""
    spec = os.environ.get("FD_SERVER_APP", "")
    if not spec:
        app = Celery("fd_celery.server")
        install(app)
        return app
    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr or "app")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"FD_SERVER_APP={spec!r} names no Celery app: {exc}") from None
    if not isinstance(found, Celery):
        raise ConfigError(f"FD_SERVER_APP={spec!r} is a {type(found).__name__}, not a Celery app")
    if not has_config(found):
        install(found)
    return found


def app_from_env() -> Any:
    """The ASGI app, configured from the environment (``uvicorn --factory`` calls this)."""
    _require_server_extra()
    from fd_celery.server.app import create_app

    return create_app(celery_app_from_env(), ServerSettings.from_env())


def _require_server_extra() -> None:
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the server needs {' and '.join(missing)}: pip install 'fd_celery[server]'")


def _scheduler_options(func: Any) -> Any:
    for name in reversed(SchedulerConfig.names()):
        func = click.option(
            "--" + name.replace("_", "-"),
            name,
            default=None,
            help=f"{SchedulerConfig.describe(name)} (env FD_{name.upper()}).",
        )(func)
    return func


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option(
    "--app",
    "celery_app",
    default=None,
    help="module:attribute of your own Celery app (env FD_SERVER_APP); default: one from FD_SCHEDULER_*.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File of API keys, one per line (env FD_API_KEY_FILE; FD_API_KEYS adds comma-separated keys).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1024),
    default=None,
    help=f"Largest request body (env FD_SERVER_MAX_BODY_BYTES) [default: {DEFAULT_MAX_BODY_BYTES}].",
)
@click.option(
    "--chat-max-tokens",
    type=click.IntRange(1),
    default=None,
    help="max_tokens of a chat request that sets none (env FD_SERVER_CHAT_MAX_TOKENS) "
    f"[default: {DEFAULT_CHAT_MAX_TOKENS}].",
)
@click.option("--log-level", default="info", show_default=True)
@_scheduler_options
def serve(
    host: str,
    port: int,
    workers: int,
    celery_app: str | None,
    api_key_file: str | None,
    max_body_bytes: int | None,
    chat_max_tokens: int | None,
    log_level: str,
    **scheduler: Any,
) -> None:
    """Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    try:
        _require_server_extra()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    import uvicorn

    env = {f"FD_{k.upper()}": str(v) for k, v in scheduler.items() if v is not None}
    env.update(
        {
            name: str(value)
            for name, value in (
                ("FD_SERVER_APP", celery_app),
                ("FD_API_KEY_FILE", api_key_file),
                ("FD_SERVER_MAX_BODY_BYTES", max_body_bytes),
                ("FD_SERVER_CHAT_MAX_TOKENS", chat_max_tokens),
            )
            if value is not None
        }
    )
    os.environ.update(env)  # every server process (--workers) builds its app from these
    try:
        app_from_env()  # a bad setting stops here, once, with its message
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(
        "fd_celery.server.cli:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=True,  # method, path and status only: never a body
    )
