"""``SchedulerConfig``: every parameter of FastDeploy's scheduler table, validated once.

Sources, lowest precedence first: the seed's defaults, ``FD_SCHEDULER_*`` environment variables,
``scheduler_*`` keys in the Celery app's config, keyword arguments to :func:`fd_celery.install`,
and ``celery worker --scheduler-…`` options. Every value is parsed and checked here; a bad one
raises :class:`~fd_celery.errors.ConfigError` naming the parameter, the value and what is allowed.

Units: ``scheduler_ttl`` and ``scheduler_release_load_expire_period`` are seconds;
``scheduler_sync_period`` and ``scheduler_expire_period`` are **milliseconds** (FastDeploy's
implementation uses milliseconds; its table says seconds, which would keep a dead node routable
for 50 minutes). These four also accept strings with a unit: ``"250ms"``, ``"3s"``, ``"15m"``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fd_celery.errors import ConfigError

__all__ = ["SchedulerConfig", "RedisTLS", "SCHEDULER_NAMES", "ENV_PREFIX", "parse_duration"]

SCHEDULER_NAMES = ("local", "global", "splitwise")
ENV_PREFIX = "FD_"
PREFIX = "scheduler_"

_TOPIC_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}")
_DURATION_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*")
_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf  # then rejected as out of range, naming the parameter


def parse_duration(name: str, value: object, unit: str) -> float:
    """A duration in ``unit`` ("s" or "ms"): a number in that unit, or a string with a unit."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a duration; give a number of {unit} or '250ms'")
    if isinstance(value, (int, float)):
        number = _to_float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if not match:
            raise ConfigError(
                f"{name}={value!r} is not a duration; give a number of {unit} "
                f"or a string with a unit such as '250ms', '3s', '15m'"
            )
        amount, given_unit = float(match.group(1)), match.group(2) or unit
        number = amount * _UNIT_TO_MS[given_unit] / _UNIT_TO_MS[unit]
    else:
        raise ConfigError(f"{name}={value!r} is not a duration (got {type(value).__name__})")
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive duration in {unit}")
    return number


def _integer(low: int, high: int, *, extra: tuple[int, ...] = ()) -> Callable[[str, object], int]:
    def parse(name: str, value: object) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            number = int(value)
        allowed = f"an integer from {low} to {high}" + (
            f" (or {', '.join(map(str, extra))})" if extra else ""
        )
        if number is None or not (low <= number <= high or number in extra):
            raise ConfigError(f"{name}={value!r} is invalid; allowed: {allowed}")
        return number

    return parse


def _float(low: float, high: float) -> Callable[[str, object], float]:
    def parse(name: str, value: object) -> float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = _to_float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or not low <= number <= high:
            raise ConfigError(f"{name}={value!r} is invalid; allowed: a number from {low} to {high}")
        return number

    return parse


def _duration(unit: str) -> Callable[[str, object], float]:
    return lambda name, value: parse_duration(name, value, unit)


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(name: str, value: object) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(f"{name}={value!r} is invalid; allowed: {', '.join(choices)}")
        return str(text)

    return parse


def _host(name: str, value: object) -> str:
    """A host name, an IPv4 address or an IPv6 address: nothing that could bend the Redis URL."""
    import ipaddress

    text = value.strip() if isinstance(value, str) else ""
    if _HOSTNAME_RE.fullmatch(text):
        return text
    try:
        return str(ipaddress.IPv6Address(text.strip("[]")))
    except ValueError:
        raise ConfigError(
            f"{name}={value!r} is invalid; allowed: a host name, an IPv4 or an IPv6 address "
            f"(no scheme, port, user or path)"
        ) from None


def _password(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string (got {type(value).__name__})")
    return value


def _topic(name: str, value: object) -> str:
    if not isinstance(value, str) or not _TOPIC_RE.fullmatch(value):
        raise ConfigError(
            f"{name}={value!r} is invalid; allowed: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return value


_CERT_REQS = {
    "required": "required",
    "optional": "optional",
    "none": "none",
    "cert_required": "required",
    "cert_optional": "optional",
    "cert_none": "none",
}


@dataclass(frozen=True)
class RedisTLS:
    """TLS to the scheduler's Redis, taken from the app's own Celery TLS settings (see
    :meth:`from_celery`): no ``scheduler_*`` parameter of its own, so one setting secures broker,
    result backend and the scheduler alike."""

    cert_reqs: str = "required"
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        reqs = _CERT_REQS.get(str(self.cert_reqs).lower())
        if reqs is None:
            import ssl

            reqs = {ssl.CERT_REQUIRED: "required", ssl.CERT_OPTIONAL: "optional", ssl.CERT_NONE: "none"}.get(
                self.cert_reqs
            )  # type: ignore[call-overload]
        if reqs is None:
            raise ConfigError(
                f"ssl_cert_reqs={self.cert_reqs!r} is invalid; allowed: required, optional, none"
            )
        object.__setattr__(self, "cert_reqs", reqs)
        for name in ("ca_certs", "certfile", "keyfile"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"ssl_{name} must be a file path (got {type(value).__name__})")

    def query(self) -> str:
        """The ``ssl_*`` query of a ``rediss://`` URL (what redis-py, kombu and Celery read)."""
        from urllib.parse import urlencode

        pairs = [("ssl_cert_reqs", self.cert_reqs)]
        pairs += [(f"ssl_{n}", v) for n in ("ca_certs", "certfile", "keyfile") if (v := getattr(self, n))]
        return urlencode(pairs, safe="/")

    @classmethod
    def from_celery(cls, conf: Mapping[str, Any]) -> RedisTLS | None:
        """``broker_use_ssl`` (or ``redis_backend_use_ssl``): ``True`` or Celery's dict of
        ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``; else the ``ssl_*``
        query of a ``rediss://`` broker URL or result backend; else None (plain TCP)."""
        from urllib.parse import parse_qsl, urlsplit

        for setting in ("broker_use_ssl", "redis_backend_use_ssl"):
            use = conf.get(setting)
            if use is True:
                return cls()
            if isinstance(use, Mapping) and use:
                return cls._from_options(dict(use), setting)
        for setting in ("broker_url", "result_backend"):
            # Celery's Settings read CELERY_BROKER_URL / CELERY_RESULT_BACKEND in the attribute only.
            url = getattr(conf, setting, None) or conf.get(setting)
            if isinstance(url, str) and url.startswith("rediss://"):
                return cls._from_options(dict(parse_qsl(urlsplit(url).query)), setting)
        return None

    @classmethod
    def _from_options(cls, options: dict[str, Any], source: str) -> RedisTLS:
        known = {
            "ssl_cert_reqs": "cert_reqs",
            "ssl_ca_certs": "ca_certs",
            "ssl_certfile": "certfile",
            "ssl_keyfile": "keyfile",
        }
        values = {known[k]: v for k, v in options.items() if k in known and v is not None}
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _tls(name: str, value: object) -> RedisTLS | None:
    if value is not None and not isinstance(value, RedisTLS):
        raise ConfigError(f"{name} must be a RedisTLS or None (got {type(value).__name__})")
    return value


def _param(default: Any, parse: Callable[[str, Any], Any], doc: str, **metadata: Any) -> Any:
    """A validated field: its default, its parser (``parse(name, value)``), its doc, and any
    further metadata (``env``, ``unit``: see :class:`fd_celery.settings.NodeKnobs`)."""
    return field(default=default, metadata={"parse": parse, "doc": doc, **metadata})


@dataclass(frozen=True)
class SchedulerConfig:
    """FastDeploy's scheduler parameters, under the seed's names and defaults."""

    scheduler_name: str = _param("local", _choice(*SCHEDULER_NAMES), "local, global or splitwise")
    scheduler_max_size: int = _param(
        -1, _integer(1, 10**9, extra=(-1,)), "most requests waiting in the local queue; -1: no limit"
    )
    scheduler_ttl: float = _param(
        900.0, _duration("s"), "seconds a request may wait before it starts (all schedulers)"
    )
    scheduler_host: str = _param("127.0.0.1", _host, "Redis host")
    scheduler_port: int = _param(6379, _integer(1, 65535), "Redis port")
    scheduler_db: int = _param(0, _integer(0, 10_000), "Redis database index")
    scheduler_password: str = field(
        default="", repr=False, metadata={"parse": _password, "doc": "Redis password ('' for none)"}
    )
    scheduler_topic: str = _param("default", _topic, "nodes of one topic schedule together")
    scheduler_min_load_score: float = _param(
        3.0, _float(0.0, 1e9), "a node is stolen from only at this load score or above"
    )
    scheduler_load_shards_num: int = _param(1, _integer(1, 1024), "sorted sets the load table is spread over")
    scheduler_sync_period: float = _param(
        5.0, _duration("ms"), "milliseconds between load/heartbeat publications"
    )
    scheduler_expire_period: float = _param(
        3000.0, _duration("ms"), "milliseconds of silence after which a node is dead"
    )
    scheduler_release_load_expire_period: float = _param(
        600.0, _duration("s"), "seconds after which load of a request that never ended is released"
    )
    scheduler_reader_parallel: int = _param(4, _integer(1, 256), "output reader threads")
    scheduler_writer_parallel: int = _param(4, _integer(1, 256), "output writer threads")
    scheduler_reader_batch_size: int = _param(
        200, _integer(1, 100_000), "most output entries fetched per read"
    )
    scheduler_writer_batch_size: int = _param(
        200, _integer(1, 100_000), "most output entries written per batch"
    )
    #: Not a scheduler parameter: TLS follows the app's Celery settings (``RedisTLS.from_celery``).
    tls: RedisTLS | None = field(
        default=None,
        compare=True,
        metadata={"parse": _tls, "doc": "TLS to Redis, from the app's Celery settings", "param": False},
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> SchedulerConfig:
        # An unknown keyword is a ConfigError with a hint here, before the generated __init__
        # would make it a bare TypeError.
        check_names({k: v for k, v in kwargs.items() if k not in _NOT_PARAMS}, "SchedulerConfig argument")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            parsed = f.metadata["parse"](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, parsed)
        if self.scheduler_expire_period <= self.scheduler_sync_period:
            raise ConfigError(
                f"scheduler_expire_period={self.scheduler_expire_period:g}ms must be longer than "
                f"scheduler_sync_period={self.scheduler_sync_period:g}ms, or every node looks dead"
            )

    # Durations in one unit, named by it, for code that schedules work.
    @property
    def ttl_s(self) -> float:
        return self.scheduler_ttl

    @property
    def sync_period_s(self) -> float:
        return self.scheduler_sync_period / 1000.0

    @property
    def expire_period_s(self) -> float:
        return self.scheduler_expire_period / 1000.0

    @property
    def release_load_expire_period_s(self) -> float:
        return self.scheduler_release_load_expire_period

    @property
    def redis_url(self) -> str:
        """The Redis URL that broker and result backend default to."""
        auth = f":{_quote(self.scheduler_password)}@" if self.scheduler_password else ""
        query = f"?{self.tls.query()}" if self.tls else ""
        return f"{self._scheme}://{auth}{self._url_host}:{self.scheduler_port}/{self.scheduler_db}{query}"

    @property
    def _scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    @property
    def _url_host(self) -> str:
        return f"[{self.scheduler_host}]" if ":" in self.scheduler_host else self.scheduler_host

    def redacted_url(self) -> str:
        """``redis_url`` with the password masked, for logs and errors."""
        auth = ":***@" if self.scheduler_password else ""
        return f"{self._scheme}://{auth}{self._url_host}:{self.scheduler_port}/{self.scheduler_db}"

    def to_dict(self) -> dict[str, Any]:
        """The scheduler parameters by name (TLS, which follows the app, is not one)."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes: Any) -> SchedulerConfig:
        check_names(changes, "keyword argument")
        return dataclasses.replace(self, **changes)

    def with_tls(self, tls: RedisTLS | None) -> SchedulerConfig:
        return dataclasses.replace(self, tls=tls)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("param", True))

    @classmethod
    def describe(cls, name: str) -> str:
        return str(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["doc"])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``FD_SCHEDULER_*`` variables of ``environ`` as parameter names → raw strings."""
        environ = os.environ if environ is None else environ
        found = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in environ.items()
            if key.upper().startswith(ENV_PREFIX + PREFIX.upper())
        }
        check_names(found, "environment variable", env=True)
        return found

    @classmethod
    def from_sources(
        cls,
        *,
        environ: Mapping[str, str] | None = None,
        app_conf: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> SchedulerConfig:
        """Merge the sources, lowest precedence first: defaults, env, app config, overrides."""
        values: dict[str, Any] = dict(cls.from_env(environ))
        conf_values = {k: v for k, v in (app_conf or {}).items() if k.startswith(PREFIX)}
        check_names(conf_values, "Celery config key")
        values.update(conf_values)
        overrides = dict(overrides or {})
        check_names(overrides, "keyword argument")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


#: Fields that are not scheduler parameters (``tls`` follows the app's Celery settings).
_NOT_PARAMS = frozenset(
    f.name for f in dataclasses.fields(SchedulerConfig) if not f.metadata.get("param", True)
)


def check_names(values: Mapping[str, Any], source: str, *, env: bool = False) -> None:
    """Unknown ``scheduler_*`` names are an error, with the closest known name as a hint."""
    import difflib

    known = SchedulerConfig.names()
    for name in values:
        if name not in known:
            shown = (ENV_PREFIX + name.upper()) if env else name
            short = {k[len(PREFIX) :]: k for k in known}
            close = [short[m] for m in difflib.get_close_matches(name[len(PREFIX) :], list(short), n=1)]
            hint = f"; did you mean {(ENV_PREFIX + close[0].upper()) if env else close[0]}?" if close else ""
            raise ConfigError(f"unknown {source} {shown!r}{hint}")


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
