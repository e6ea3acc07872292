"""The server's own settings (the scheduler's are :class:`~fd_celery.SchedulerConfig`'s).

API keys come from the environment (``FD_API_KEYS``: comma-separated) and/or a file
(``FD_API_KEY_FILE`` or ``--api-key-file``: one key per line, ``#`` comments), never from the
command line, where ``ps`` would show them. With no key configured the API is open.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from fd_celery.errors import ConfigError

__all__ = ["ServerSettings", "load_api_keys", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_CHAT_MAX_TOKENS"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body over this many bytes gets 413
DEFAULT_CHAT_MAX_TOKENS = 512  # a chat request that sets neither max_completion_tokens nor max_tokens
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes={self.max_body_bytes} is too small; allowed: 1024 or more")
        if self.chat_max_tokens < 1:
            raise ConfigError(f"chat_max_tokens={self.chat_max_tokens} is invalid; allowed: 1 or more")

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the keys (constant time: every key
        is compared, however early one matches)."""
        if not self.api_keys:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer ") :].strip().encode()
        found = False
        for key in self.api_keys:
            found |= hmac.compare_digest(given, key.encode())
        return found

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, api_key_file: str | None = None
    ) -> ServerSettings:
        environ = os.environ if environ is None else environ
        return cls(
            api_keys=load_api_keys(environ, api_key_file),
            max_body_bytes=_int(environ, "FD_SERVER_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            chat_max_tokens=_int(environ, "FD_SERVER_CHAT_MAX_TOKENS", DEFAULT_CHAT_MAX_TOKENS),
        )


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def load_api_keys(environ: Mapping[str, str], api_key_file: str | None = None) -> tuple[str, ...]:
    keys = [k.strip() for k in environ.get("FD_API_KEYS", "").split(",") if k.strip()]
    path = api_key_file or environ.get("FD_API_KEY_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as exc:
            raise ConfigError(f"API key file {path!r} cannot be read: {exc.strerror}") from None
        if not keys:
            raise ConfigError(f"API key file {path!r} holds no key")
    short = [k for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ConfigError(
            f"an API key must have at least {MIN_KEY_CHARS} characters ({len(short)} too short)"
        )
    return tuple(keys)
