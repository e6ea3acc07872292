"""``SchedulerConfig``: the seed's 17 parameters, their defaults, every source, units, bad values.

Sources, lowest precedence first: defaults < ``FD_SCHEDULER_*`` env < Celery ``app.conf``
``scheduler_*`` keys < ``install()`` keyword arguments < ``--scheduler-…`` command-line options.
The command-line cases run the real ``celery`` command as subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import pytest
import redis
from celery import Celery

import fd_celery
from fd_celery import ConfigError, SchedulerConfig
from fd_celery.keys import nodes_zset
from fd_celery.local_cluster import LocalCluster
from tests.conftest import run_topic

REPO = Path(__file__).resolve().parents[1]

# The seed table's defaults, in DESIGN's units: sync/expire in ms, ttl/release in seconds.
SEED_DEFAULTS: dict[str, Any] = {
    "scheduler_name": "local",
    "scheduler_max_size": -1,
    "scheduler_ttl": 900,
    "scheduler_host": "127.0.0.1",
    "scheduler_port": 6379,
    "scheduler_db": 0,
    "scheduler_password": "",
    "scheduler_topic": "default",
    "scheduler_min_load_score": 3,
    "scheduler_load_shards_num": 1,
    "scheduler_sync_period": 5,
    "scheduler_expire_period": 3000,
    "scheduler_release_load_expire_period": 600,
    "scheduler_reader_parallel": 4,
    "scheduler_writer_parallel": 4,
    "scheduler_reader_batch_size": 200,
    "scheduler_writer_batch_size": 200,
}
NAMES = list(SEED_DEFAULTS)

# Three distinct valid values per parameter (none of the first is the default): single-source
# overrides use the first; the precedence test puts them in env, app.conf and kwargs.
VALUES: dict[str, tuple[Any, Any, Any]] = {
    "scheduler_name": ("global", "splitwise", "local"),
    "scheduler_max_size": (8, 16, 32),
    "scheduler_ttl": (30, 45, 60),
    "scheduler_host": ("10.0.0.5", "redis.example", "cache-1.internal"),
    "scheduler_port": (7000, 7001, 7002),
    "scheduler_db": (3, 4, 5),
    "scheduler_password": ("pw-a", "pw-b", "pw-c"),
    "scheduler_topic": ("env-topic", "team-a.v1_x", "kw"),
    "scheduler_min_load_score": (1.5, 2.5, 0.0),
    "scheduler_load_shards_num": (2, 4, 8),
    "scheduler_sync_period": (10, 20, 30),
    "scheduler_expire_period": (4000, 5000, 6000),
    "scheduler_release_load_expire_period": (60, 120, 1),
    "scheduler_reader_parallel": (2, 3, 8),
    "scheduler_writer_parallel": (1, 2, 16),
    "scheduler_reader_batch_size": (50, 25, 1000),
    "scheduler_writer_batch_size": (500, 10, 1),
}


def env_name(name: str) -> str:
    return "FD_" + name.upper()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FD_SCHEDULER_* from the machine running the tests."""
    for key in list(os.environ):
        if key.upper().startswith("FD_SCHEDULER_"):
            monkeypatch.delenv(key)


def new_app(**conf: Any) -> Celery:
    app = Celery("cfg-test", set_as_current=False)
    for key, value in conf.items():
        setattr(app.conf, key, value)
    return app


def installed(**kwargs: Any) -> SchedulerConfig:
    app = new_app()
    returned = fd_celery.install(app, **kwargs)
    assert fd_celery.get_config(app) == returned
    return fd_celery.get_config(app)


# --------------------------------------------------------------------------- defaults and names


def test_names_are_exactly_the_seed_table():
    assert SchedulerConfig.names() == tuple(NAMES)
    assert len(SchedulerConfig.names()) == 17


@pytest.mark.parametrize("name", NAMES)
def test_default_is_the_seed_default(name):
    expected = SEED_DEFAULTS[name]
    assert getattr(SchedulerConfig(), name) == expected
    assert getattr(installed(), name) == expected
    assert type(getattr(SchedulerConfig(), name)) is (float if name in FLOAT_PARAMS else type(expected))


def test_default_durations_in_documented_units():
    config = SchedulerConfig()
    assert config.ttl_s == 900.0
    assert config.release_load_expire_period_s == 600.0
    assert config.sync_period_s == pytest.approx(0.005)
    assert config.expire_period_s == pytest.approx(3.0)


def test_config_is_frozen():
    config = SchedulerConfig()
    with pytest.raises(AttributeError):
        config.scheduler_ttl = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- sources


FLOAT_PARAMS = {
    "scheduler_ttl",
    "scheduler_sync_period",
    "scheduler_expire_period",
    "scheduler_release_load_expire_period",
    "scheduler_min_load_score",
}


def expected_value(name: str, raw: Any) -> Any:
    return float(raw) if name in FLOAT_PARAMS else raw


@pytest.mark.parametrize("name", NAMES)
def test_override_from_install_kwarg(name):
    value = VALUES[name][0]
    config = installed(**{name: value})
    assert getattr(config, name) == expected_value(name, value)
    others = {n: getattr(config, n) for n in NAMES if n != name}
    assert others == {n: getattr(SchedulerConfig(), n) for n in NAMES if n != name}


@pytest.mark.parametrize("name", NAMES)
def test_override_from_celery_conf_key(name):
    value = VALUES[name][0]
    app = new_app(**{name: value})
    fd_celery.install(app)
    assert getattr(fd_celery.get_config(app), name) == expected_value(name, value)


@pytest.mark.parametrize("name", NAMES)
def test_override_from_celery_conf_update(name):
    value = VALUES[name][0]
    app = Celery("cfg-test", set_as_current=False)
    app.conf.update({name: value})
    fd_celery.install(app)
    assert getattr(fd_celery.get_config(app), name) == expected_value(name, value)


@pytest.mark.parametrize("name", NAMES)
def test_override_from_environment(name, monkeypatch):
    value = VALUES[name][0]
    monkeypatch.setenv(env_name(name), str(value))
    assert getattr(installed(), name) == expected_value(name, value)


@pytest.mark.parametrize("name", NAMES)
def test_precedence_env_conf_kwarg(name, monkeypatch):
    env_v, conf_v, kw_v = VALUES[name]
    monkeypatch.setenv(env_name(name), str(env_v))
    # env alone
    assert getattr(installed(), name) == expected_value(name, env_v)
    # app.conf beats env
    app = new_app(**{name: conf_v})
    fd_celery.install(app)
    assert getattr(fd_celery.get_config(app), name) == expected_value(name, conf_v)
    # kwargs beat app.conf and env
    app = new_app(**{name: conf_v})
    fd_celery.install(app, **{name: kw_v})
    assert getattr(fd_celery.get_config(app), name) == expected_value(name, kw_v)


def test_none_kwarg_means_not_given(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_TTL", "42")
    assert installed(scheduler_ttl=None).scheduler_ttl == 42.0


def test_sources_merge_per_parameter(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_TOPIC", "from-env")
    monkeypatch.setenv("FD_SCHEDULER_DB", "2")
    app = new_app(scheduler_db=5, scheduler_ttl=30)
    config = fd_celery.install(app, scheduler_ttl="1m")
    assert (config.scheduler_topic, config.scheduler_db, config.scheduler_ttl) == ("from-env", 5, 60.0)


def test_install_with_explicit_config_and_overrides():
    base = SchedulerConfig(scheduler_topic="base", scheduler_ttl=10)
    app = new_app()
    config = fd_celery.install(app, base, scheduler_ttl="20s")
    assert fd_celery.get_config(app) is config
    assert (config.scheduler_topic, config.scheduler_ttl) == ("base", 20.0)


def test_env_values_are_parsed_like_kwargs(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_NAME", " GLOBAL ")
    monkeypatch.setenv("FD_SCHEDULER_PORT", " 7005 ")
    monkeypatch.setenv("FD_SCHEDULER_MIN_LOAD_SCORE", "0.25")
    config = installed()
    assert (config.scheduler_name, config.scheduler_port, config.scheduler_min_load_score) == (
        "global",
        7005,
        0.25,
    )


# --------------------------------------------------------------------------- units

DURATION_CASES = [
    # name, given, expected in the parameter's unit
    ("scheduler_ttl", "250ms", 0.25),
    ("scheduler_ttl", "3s", 3.0),
    ("scheduler_ttl", "2m", 120.0),
    ("scheduler_ttl", 7, 7.0),
    ("scheduler_ttl", "7", 7.0),
    ("scheduler_ttl", 0.5, 0.5),
    ("scheduler_release_load_expire_period", "250ms", 0.25),
    ("scheduler_release_load_expire_period", "3s", 3.0),
    ("scheduler_release_load_expire_period", "2m", 120.0),
    ("scheduler_release_load_expire_period", 7, 7.0),
    ("scheduler_release_load_expire_period", "7", 7.0),
    ("scheduler_sync_period", "250ms", 250.0),
    ("scheduler_sync_period", "3s", 3000.0),
    ("scheduler_sync_period", "2m", 120_000.0),
    ("scheduler_sync_period", 7, 7.0),
    ("scheduler_sync_period", "7", 7.0),
    ("scheduler_expire_period", "250ms", 250.0),
    ("scheduler_expire_period", "3s", 3000.0),
    ("scheduler_expire_period", "2m", 120_000.0),
    ("scheduler_expire_period", 7, 7.0),
    ("scheduler_expire_period", "7", 7.0),
]


@pytest.mark.parametrize("name,given,expected", DURATION_CASES)
def test_duration_units(name, given, expected, monkeypatch):
    extra = {"scheduler_expire_period": "1h"} if name == "scheduler_sync_period" else {}
    if name == "scheduler_expire_period":
        extra = {"scheduler_sync_period": 1}
    config = installed(**{name: given}, **extra)
    assert getattr(config, name) == pytest.approx(expected)
    # the same string from the environment
    monkeypatch.setenv(env_name(name), str(given))
    for key, value in extra.items():
        monkeypatch.setenv(env_name(key), str(value))
    assert getattr(installed(), name) == pytest.approx(expected)


def test_duration_properties_are_seconds():
    config = installed(
        scheduler_sync_period="250ms",
        scheduler_expire_period="3s",
        scheduler_ttl="2m",
        scheduler_release_load_expire_period="1500ms",
    )
    assert config.sync_period_s == pytest.approx(0.25)
    assert config.expire_period_s == pytest.approx(3.0)
    assert config.ttl_s == pytest.approx(120.0)
    assert config.release_load_expire_period_s == pytest.approx(1.5)


# --------------------------------------------------------------------------- invalid values

BAD_VALUES: dict[str, list[Any]] = {
    "scheduler_name": ["fifo", "", 3, True, ["local"]],
    "scheduler_max_size": [0, -2, 1.5, 8.0, "ten", "5.0", True, 10**9 + 1],
    "scheduler_ttl": [
        0,
        -1,
        -0.5,
        "0s",
        "-5",
        "abc",
        "",
        "5x",
        "3 days",
        math.nan,
        math.inf,
        -math.inf,
        True,
        [5],
    ],
    "scheduler_host": ["", "   ", "two words", 123, True],
    "scheduler_port": [0, -1, 65536, "http", "", 80.0, True, math.nan],
    "scheduler_db": [-1, 10_001, "a", 1.0, False],
    "scheduler_password": [123, b"bytes", ["x"], True],
    "scheduler_topic": ["a:b", "a b", "", "a/b", "a*", "x" * 65, "é", 5, True],
    "scheduler_min_load_score": [-0.1, math.nan, math.inf, "nan", "inf", "-inf", "abc", True, 1e10, None],
    "scheduler_load_shards_num": [0, -1, 1025, 2.0, "x", True],
    "scheduler_sync_period": [0, -5, "0ms", "-1ms", math.nan, math.inf, "abc", True],
    "scheduler_expire_period": [0, -1, math.nan, "soon", False],
    "scheduler_release_load_expire_period": [0, -1, math.inf, "never", True],
    "scheduler_reader_parallel": [0, 257, 1.5, "many", True],
    "scheduler_writer_parallel": [0, -4, 257, 2.0, False],
    "scheduler_reader_batch_size": [0, 100_001, "lots", 10.5, True],
    "scheduler_writer_batch_size": [0, -200, 100_001, "200.0", True],
}
BAD_CASES = [(name, value) for name, values in BAD_VALUES.items() for value in values]


def check_message(exc: ConfigError, name: str, value: Any) -> None:
    message = str(exc)
    assert name in message, message
    if name == "scheduler_password":
        assert repr(value) not in message  # a secret is never echoed
    else:
        assert repr(value) in message, message


@pytest.mark.parametrize("name,value", BAD_CASES, ids=[f"{n}={v!r}"[:60] for n, v in BAD_CASES])
def test_bad_value_from_kwarg(name, value):
    if value is None:  # None as a kwarg means "not given"; it is a bad value only from app.conf
        app = new_app(**{name: value})
        with pytest.raises(ConfigError) as info:
            fd_celery.install(app)
    else:
        with pytest.raises(ConfigError) as info:
            installed(**{name: value})
    assert isinstance(info.value, ValueError)
    check_message(info.value, name, value)


@pytest.mark.parametrize("name,value", BAD_CASES, ids=[f"{n}={v!r}"[:60] for n, v in BAD_CASES])
def test_bad_value_from_celery_conf(name, value):
    app = new_app(**{name: value})
    with pytest.raises(ConfigError) as info:
        fd_celery.install(app)
    check_message(info.value, name, value)
    with pytest.raises(ConfigError):
        fd_celery.get_config(app)  # nothing half-installed


def test_bad_value_via_replace_and_constructor():
    with pytest.raises(ConfigError, match="scheduler_port"):
        SchedulerConfig().replace(scheduler_port=0)
    with pytest.raises(ConfigError, match="scheduler_ttl"):
        SchedulerConfig(scheduler_ttl=-1)


BAD_ENV = [
    ("scheduler_name", "fifo"),
    ("scheduler_max_size", "0"),
    ("scheduler_ttl", "abc"),
    ("scheduler_ttl", "-5"),
    ("scheduler_ttl", "nan"),
    ("scheduler_host", ""),
    ("scheduler_host", "two words"),
    ("scheduler_port", "70000"),
    ("scheduler_port", "true"),
    ("scheduler_db", "-1"),
    ("scheduler_topic", "a:b"),
    ("scheduler_topic", "a b"),
    ("scheduler_min_load_score", "nan"),
    ("scheduler_min_load_score", "inf"),
    ("scheduler_load_shards_num", "0"),
    ("scheduler_sync_period", "0"),
    ("scheduler_expire_period", "-1"),
    ("scheduler_release_load_expire_period", "inf"),
    ("scheduler_reader_parallel", "0"),
    ("scheduler_writer_parallel", "1.5"),
    ("scheduler_reader_batch_size", "lots"),
    ("scheduler_writer_batch_size", ""),
]


@pytest.mark.parametrize("name,value", BAD_ENV)
def test_bad_value_from_env(name, value, monkeypatch):
    monkeypatch.setenv(env_name(name), value)
    with pytest.raises(ConfigError) as info:
        installed()
    check_message(info.value, name, value)


@pytest.mark.parametrize(
    "sync,expire",
    [(100, 100), (100, 50), ("1s", "500ms"), ("3s", 3000), (5, "5ms"), ("10s", None)],
)
def test_expire_must_be_longer_than_sync(sync, expire):
    kwargs = {"scheduler_sync_period": sync}
    if expire is not None:
        kwargs["scheduler_expire_period"] = expire
    with pytest.raises(ConfigError) as info:
        installed(**kwargs)
    assert "scheduler_expire_period" in str(info.value)
    assert "scheduler_sync_period" in str(info.value)


def test_expire_longer_than_sync_across_sources(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_SYNC_PERIOD", "2s")
    with pytest.raises(ConfigError, match="scheduler_expire_period"):
        installed(scheduler_expire_period="1s")
    assert installed(scheduler_expire_period="3s").scheduler_expire_period == 3000.0


@pytest.mark.parametrize("name", ["scheduler_ttl", "scheduler_sync_period", "scheduler_min_load_score"])
def test_huge_int_is_a_config_error(name):
    with pytest.raises(ConfigError, match=name):
        installed(**{name: 10**400})


def test_topic_with_trailing_newline_is_rejected():
    with pytest.raises(ConfigError, match="scheduler_topic"):
        installed(scheduler_topic="ab\n")


@pytest.mark.parametrize("host", ["h:1234", "a/b", "user@h", "redis://x", "::1"])
def test_host_is_rejected_or_round_trips_through_the_url(host):
    try:
        config = installed(scheduler_host=host)
    except ConfigError as exc:
        assert "scheduler_host" in str(exc)
        return
    parsed = redis.connection.parse_url(config.redis_url)
    assert (parsed.get("host"), parsed.get("port")) == (host, 6379)


# --------------------------------------------------------------------------- unknown keys


def test_unknown_kwarg_with_hint():
    with pytest.raises(ConfigError) as info:
        installed(scheduler_ttll=5)
    assert "scheduler_ttll" in str(info.value)
    assert "did you mean scheduler_ttl" in str(info.value)


def test_unknown_plain_kwarg():
    with pytest.raises(ConfigError, match="bogus"):
        installed(bogus=1)


def test_unknown_celery_conf_key_with_hint():
    app = new_app(scheduler_topik="x")
    with pytest.raises(ConfigError) as info:
        fd_celery.install(app)
    assert "scheduler_topik" in str(info.value)
    assert "did you mean scheduler_topic" in str(info.value)
    assert "config key" in str(info.value)


def test_unknown_env_var_with_hint(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_PROT", "7000")
    with pytest.raises(ConfigError) as info:
        installed()
    assert "FD_SCHEDULER_PROT" in str(info.value)
    assert "did you mean FD_SCHEDULER_PORT" in str(info.value)


def test_unknown_key_through_replace():
    with pytest.raises(ConfigError, match="did you mean scheduler_writer_parallel"):
        SchedulerConfig().replace(scheduler_writer_paralel=2)


def test_unknown_constructor_argument_is_a_config_error():
    """Constructed directly, not through install(): still a ConfigError naming the parameter
    (the dataclass alone would raise a bare TypeError), with a hint where one is close."""
    with pytest.raises(ConfigError, match="'scheduler_bogus'"):
        SchedulerConfig(scheduler_bogus=1)
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(scheduler_tll=5)
    assert "'scheduler_tll'" in str(info.value) and "did you mean scheduler_ttl" in str(info.value)
    assert SchedulerConfig(scheduler_ttl=5).with_tls(None).scheduler_ttl == 5  # known fields still pass


def test_unrelated_celery_settings_and_env_are_ignored(monkeypatch):
    monkeypatch.setenv("FD_ROLE", "decode")
    monkeypatch.setenv("FD_SCHEDULERX", "1")  # not the FD_SCHEDULER_ prefix
    app = new_app(task_default_queue="other", worker_concurrency=3)
    assert fd_celery.install(app) == SchedulerConfig()


# --------------------------------------------------------------------------- broker and backend


def test_broker_and_backend_derived_from_scheduler_params():
    app = new_app()
    config = fd_celery.install(app, scheduler_host="redis.internal", scheduler_port=7000, scheduler_db=3)
    assert config.redis_url == "redis://redis.internal:7000/3"
    assert app.conf.broker_url == config.redis_url
    assert app.conf.result_backend == config.redis_url


def test_broker_derived_from_env(monkeypatch):
    monkeypatch.setenv("FD_SCHEDULER_HOST", "10.1.2.3")
    monkeypatch.setenv("FD_SCHEDULER_PORT", "6400")
    app = new_app()
    fd_celery.install(app)
    assert app.conf.broker_url == "redis://10.1.2.3:6400/0"


def test_default_broker_url():
    app = new_app()
    fd_celery.install(app)
    assert app.conf.broker_url == app.conf.result_backend == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("password", ["p@ss:w/rd", "hunter2", "sp ace%#?&=", "ünï"])
def test_password_is_quoted_and_never_in_redacted_url(password):
    app = new_app()
    config = fd_celery.install(app, scheduler_password=password, scheduler_host="h", scheduler_port=7000)
    url = config.redis_url
    assert app.conf.broker_url == app.conf.result_backend == url
    assert f":{quote(password, safe='')}@" in url
    assert unquote(urlparse(url).password or "") == password
    assert urlparse(url).hostname == "h" and urlparse(url).port == 7000
    assert redis.connection.parse_url(url)["password"] == password
    redacted = config.redacted_url()
    assert password not in redacted and quote(password, safe="") not in redacted
    assert redacted == "redis://:***@h:7000/0"


def test_redacted_url_without_password():
    config = installed(scheduler_port=7000)
    assert config.redacted_url() == config.redis_url == "redis://127.0.0.1:7000/0"


def test_app_own_broker_and_backend_are_kept():
    app = Celery("own", broker="redis://other:1111/2", backend="redis://other:1111/3", set_as_current=False)
    fd_celery.install(app, scheduler_port=7000)
    assert app.conf.broker_url == "redis://other:1111/2"
    assert app.conf.result_backend == "redis://other:1111/3"


def test_app_conf_broker_kept_backend_derived():
    app = new_app(broker_url="redis://mine:1/1")
    config = fd_celery.install(app, scheduler_port=7000)
    assert app.conf.broker_url == "redis://mine:1/1"
    assert app.conf.result_backend == config.redis_url


def test_app_conf_backend_kept_broker_derived():
    app = new_app(result_backend="redis://mine:1/4")
    config = fd_celery.install(app, scheduler_port=7000)
    assert app.conf.result_backend == "redis://mine:1/4"
    assert app.conf.broker_url == config.redis_url


def test_reinstall_updates_derived_urls_only():
    app = new_app(result_backend="redis://mine:1/4")
    fd_celery.install(app, scheduler_port=7000)
    fd_celery.install(app, scheduler_port=7001)
    assert app.conf.broker_url == "redis://127.0.0.1:7001/0"
    assert app.conf.result_backend == "redis://mine:1/4"
    assert fd_celery.get_config(app).scheduler_port == 7001


def test_install_forces_json_only():
    app = new_app(task_serializer="pickle", accept_content=["pickle", "json"])
    fd_celery.install(app)
    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_serializer == "json"


# --------------------------------------------------------------------------- command line


def cli_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FD_SCHEDULER_")}
    env.update({"FD_SCHEDULER_PORT": str(port), "PYTHONUNBUFFERED": "1", **extra})
    return env


def celery_cmd(
    *args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_bad_value_exits_nonzero_naming_it(redis_server):
    proc = celery_cmd(
        "-A", "workers.mixed", "fd", "--scheduler-ttl", "abc", "status", env=cli_env(redis_server.port)
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "scheduler_ttl" in output and "'abc'" in output, output


@pytest.mark.parametrize(
    "args,names",
    [
        (["--scheduler-topic", "a:b"], ["scheduler_topic", "'a:b'"]),
        (["--scheduler-port", "0"], ["scheduler_port", "'0'"]),
        (["--scheduler-name", "fifo"], ["scheduler_name", "'fifo'"]),
        # cross-field: checked on the whole config once all options are in
        (["--scheduler-expire-period", "1"], ["scheduler_expire_period", "scheduler_sync_period"]),
    ],
)
def test_cli_other_bad_values(redis_server, args, names):
    proc = celery_cmd("-A", "workers.mixed", "fd", *args, "status", env=cli_env(redis_server.port))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    for name in names:
        assert name in output, output


def test_cli_unknown_option_is_an_error_with_hint(redis_server):
    proc = celery_cmd(
        "-A", "workers.mixed", "fd", "--scheduler-ttll", "5", "status", env=cli_env(redis_server.port)
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "--scheduler-ttll" in output and "--scheduler-ttl" in output.split("--scheduler-ttll")[-1]


def test_worker_help_lists_fd_options(redis_server):
    proc = celery_cmd("-A", "workers.mixed", "worker", "--help", env=cli_env(redis_server.port))
    assert proc.returncode == 0, proc.stderr
    for option in ("--scheduler-ttl", "--scheduler-sync-period", "--fd-role", "--fd-model", "--fd-device"):
        assert option in proc.stdout, option
    for name in NAMES:
        assert "--" + name.replace("_", "-") in proc.stdout


def status_json(
    port: int, *pre: str, app: str = "workers.mixed", cwd: Path = REPO, **env: str
) -> dict[str, Any]:
    proc = celery_cmd("-A", app, "fd", *pre, "status", "--json", env=cli_env(port, **env), cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_cli_option_beats_env(redis_server):
    assert status_json(redis_server.port, FD_SCHEDULER_TOPIC="env-t")["topic"] == "env-t"
    assert (
        status_json(redis_server.port, "--scheduler-topic", "cli-t", FD_SCHEDULER_TOPIC="env-t")["topic"]
        == "cli-t"
    )


def test_cli_option_beats_install_kwargs_and_conf(redis_server, tmp_path):
    (tmp_path / "cfgapp.py").write_text(
        textwrap.dedent(
            f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from celery import Celery
        import fd_celery
        app = Celery("cfgapp")
        app.conf.scheduler_topic = "conf-t"
        app.conf.scheduler_db = 0
        fd_celery.install(app, scheduler_topic="kw-t")
        """
        )
    )
    port = redis_server.port
    assert status_json(port, app="cfgapp", cwd=tmp_path, FD_SCHEDULER_TOPIC="env-t")["topic"] == "kw-t"
    assert (
        status_json(
            port, "--scheduler-topic", "cli-t", app="cfgapp", cwd=tmp_path, FD_SCHEDULER_TOPIC="env-t"
        )["topic"]
        == "cli-t"
    )


def test_worker_started_with_cli_topic(redis_server):
    cluster = LocalCluster(redis_server)
    try:
        topic = run_topic("cli-topic")
        worker = cluster.add_worker("cliw", extra_args=["--scheduler-topic", topic])
        cluster.wait_live([worker.node], topic=topic)
        listed = status_json(redis_server.port, "--scheduler-topic", topic)
        assert listed["topic"] == topic
        assert [row["node"] for row in listed["nodes"]] == [worker.node]
        assert listed["nodes"][0]["role"] == "mixed"
        # the override took effect in the worker, not only in the status command
        client = redis_server.client()
        assert client.zscore(nodes_zset("default"), worker.node) is None
        assert worker.node not in [row["node"] for row in status_json(redis_server.port)["nodes"]]
    finally:
        cluster.close()
    assert redis_server.client().ping()  # the session's Redis is not the cluster's to stop


# --------------------------------------------------------------------------- TLS follows the app


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({}, None),
        ({"broker_use_ssl": True}, "ssl_cert_reqs=required"),
        ({"broker_use_ssl": {"ssl_cert_reqs": "none"}}, "ssl_cert_reqs=none"),
        (
            {"redis_backend_use_ssl": {"ssl_cert_reqs": "CERT_OPTIONAL", "ssl_ca_certs": "/etc/ca.pem"}},
            "ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem",
        ),
        (
            {
                "broker_url": "rediss://h:1/0?ssl_cert_reqs=required&ssl_ca_certs=/c.pem&ssl_certfile=/me.pem&ssl_keyfile=/k"
            },
            "ssl_cert_reqs=required&ssl_ca_certs=/c.pem&ssl_certfile=/me.pem&ssl_keyfile=/k",
        ),
        ({"result_backend": "rediss://h:1/0?ssl_cert_reqs=none"}, "ssl_cert_reqs=none"),
    ],
)
def test_tls_to_redis_follows_the_apps_celery_settings(conf, expected):
    """One TLS setting, Celery's own, secures broker, backend and the scheduler's connections:
    the derived URLs become ``rediss://`` with the same ``ssl_*`` options; no new parameter."""
    app = Celery("tls-conf", set_as_current=False)
    app.conf.update(conf)
    config = fd_celery.install(app, scheduler_password="s3cret", scheduler_port=6390)
    assert len(SchedulerConfig.names()) == 17 and "tls" not in config.to_dict()
    if expected is None:
        assert config.tls is None and config.redis_url.startswith("redis://")
        return
    assert config.redis_url == f"rediss://:s3cret@127.0.0.1:6390/0?{expected}"
    assert config.redacted_url() == "rediss://:***@127.0.0.1:6390/0"
    derived = [s for s in ("broker_url", "result_backend") if s not in conf]
    for setting in derived:
        assert app.conf[setting] == config.redis_url


def test_tls_with_a_bad_cert_reqs_names_the_setting():
    app = Celery("tls-bad", set_as_current=False)
    app.conf.broker_use_ssl = {"ssl_cert_reqs": "sometimes"}
    with pytest.raises(ConfigError, match=r"broker_use_ssl: ssl_cert_reqs='sometimes' is invalid"):
        fd_celery.install(app)
