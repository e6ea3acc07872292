"""docker/: the Dockerfile, compose.yaml and client.py, checked without a Docker engine.

No engine runs here, so the files are checked for what would break a build or a ``compose up``:
the services and their roles, Flower's basic auth, Redis's password and AOF (the Redis command is
run for real), every ``celery -A <module>`` names an importable app, every ``celery``/``fd-celery``
subcommand and option exists, every file the Dockerfile copies exists, torch is installed before
the package, and ``docker/client.py`` works against the real test cluster.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fd_celery.local_cluster import free_port
from tests.conftest import TOPIC

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKER_README = DOCKER / "README.md"

FD_ENV_KEYS = ("FD_SCHEDULER_HOST", "FD_SCHEDULER_PASSWORD", "FD_SCHEDULER_NAME", "FD_MODEL", "FD_DEVICE")
# What `${VAR:?...}` variables get when the tests interpolate the compose file.
TEST_SECRETS = {"FD_SCHEDULER_PASSWORD": "test-password-1234", "FLOWER_BASIC_AUTH": "admin:flower-pw"}


# -- compose interpolation and command parsing -------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ``${V}``, ``${V:-default}``, ``${V:?error}``, ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        got = env.get(name)
        if op in (":-", "-"):
            return got if got or (op == "-" and got is not None) else arg
        if op in (":?", "?"):
            if not got:
                raise KeyError(f"{name} is required: {arg}")
            return got
        return got or ""

    return _VAR.sub(sub, value)


@dataclass(frozen=True)
class Invocation:
    """One ``celery``/``fd-celery`` command line found in the docker files."""

    where: str
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return self.argv[0]

    def app_module(self) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg in ("-A", "--app") and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith("--app="):
                return arg.split("=", 1)[1]
        return None

    def subcommand(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(subcommand path, options after it), global options such as ``-A mod`` removed."""
        args = list(self.argv[1:])
        path: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-A", "--app", "-b", "--broker", "--result-backend", "--workdir", "--config"):
                i += 2
                continue
            if arg.startswith("-"):
                rest = args[i:]
                break
            path.append(arg)
            i += 1
        # Positional words after a subcommand's options (none in our files) stay in `rest`.
        return tuple(path), tuple(rest)


_SHELL_OPERATOR = set("();<>|&")


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: split at ``|``, ``;``, ``&&``... outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    try:
        for token in lexer:
            if token and set(token) <= _SHELL_OPERATOR:
                commands.append([])
            else:
                commands[-1].append(token)
    except ValueError:  # unbalanced quotes: not a command line
        return []
    return [c for c in commands if c]


def invocations_in(command: Any, where: str) -> list[Invocation]:
    """``celery``/``fd-celery`` invocations in a compose/Dockerfile command (list or string),
    looking inside ``sh -c`` scripts and pipelines, past ``exec`` and ``VAR=value`` prefixes."""
    if command is None:
        return []
    if isinstance(command, list):
        argv = [str(a) for a in command]
        if argv and argv[0] in ("CMD", "CMD-SHELL", "NONE"):
            if argv[0] == "CMD-SHELL":
                return invocations_in(" ".join(argv[1:]), where)
            argv = argv[1:]
        if len(argv) >= 3 and argv[0] in ("sh", "bash", "/bin/sh", "/bin/bash") and argv[1] == "-c":
            return invocations_in(argv[2], where)
        return _from_argv(argv, where)
    found: list[Invocation] = []
    for argv in _shell_commands(str(command)):
        found += _from_argv(argv, where)
    return found


def _from_argv(argv: list[str], where: str) -> list[Invocation]:
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name in ("celery", "fd-celery"):
            return [Invocation(where, (name, *argv[i + 1 :]))]
        if name.startswith("python") and argv[i + 1 : i + 3] == ["-m", "celery"]:
            return [Invocation(where, ("celery", *argv[i + 3 :]))]
    return []


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _exec_form(args: str) -> list[str] | None:
    import json

    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _readme_shell_lines(text: str) -> list[str]:
    lines: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            lines.append(line.split(" #", 1)[0])
    # Join continuation lines.
    return [s for s in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines() if s.strip()]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with the required secrets set."""
    return interpolate(compose, dict(TEST_SECRETS))


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, Any]:
    return resolved["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def worker_services(services: dict[str, Any]) -> dict[str, Invocation]:
    found = {}
    for name, svc in services.items():
        for inv in invocations_in(svc.get("command"), name):
            if inv.subcommand()[0][:1] == ("worker",):
                found[name] = inv
    return found


def all_invocations(services: dict[str, Any], dockerfile: list[tuple[str, str]]) -> list[Invocation]:
    found: list[Invocation] = []
    for name, svc in services.items():
        entry = svc.get("entrypoint")
        command = svc.get("command")
        if isinstance(entry, list) and isinstance(command, list):
            found += invocations_in(entry + command, f"{name}: entrypoint + command")
        else:
            found += invocations_in(entry, f"{name}: entrypoint") + invocations_in(
                command, f"{name}: command"
            )
        found += invocations_in((svc.get("healthcheck") or {}).get("test"), f"{name}: healthcheck")
    for word, args in dockerfile:
        if word in ("CMD", "ENTRYPOINT", "RUN", "HEALTHCHECK"):
            found += invocations_in(_exec_form(args) or args, f"Dockerfile {word}")
    for line in _readme_shell_lines(DOCKER_README.read_text()):
        found += invocations_in(line, f"docker/README.md: {line.strip()}")
    return found


# -- compose: services, roles, environment, security -------------------------------------------


def test_compose_has_redis_flower_client_and_the_worker_roles(services):
    assert {"redis", "flower", "client"} <= set(services)
    workers = worker_services(services)
    roles = sorted(inv.app_module() or "" for inv in workers.values())
    assert roles == ["workers.decode", "workers.decode", "workers.mixed", "workers.prefill"], workers
    names = []
    for inv in workers.values():
        argv = list(inv.argv)
        flag = "-n" if "-n" in argv else "--hostname"
        assert flag in argv, f"{inv.where}: a worker needs a node name (-n name@%h)"
        names.append(argv[argv.index(flag) + 1])
    assert len(set(names)) == len(names), f"node names must differ: {names}"
    assert all(n.endswith("@%h") for n in names)
    prefill = [inv for inv in workers.values() if inv.app_module() == "workers.prefill"]
    assert "prefill1@%h" in prefill[0].argv

    flower = invocations_in(services["flower"]["command"], "flower")
    assert flower and flower[0].app_module() == "workers.mixed" and flower[0].subcommand()[0] == ("flower",)
    assert any("5555:5555" in str(p) for p in services["flower"].get("ports", []))


def test_every_service_gets_the_shared_fd_env(compose, services):
    anchor = compose["x-fd-env"]
    assert set(FD_ENV_KEYS) <= set(anchor)
    raw = COMPOSE_FILE.read_text()
    assert re.search(r"^x-fd-env: &fd-env\b", raw, re.M), "the shared environment is the x-fd-env anchor"
    expected = interpolate(anchor, dict(TEST_SECRETS))
    assert expected["FD_SCHEDULER_HOST"] == "redis"
    assert expected["FD_SCHEDULER_NAME"] == "splitwise"
    for name, svc in services.items():
        env = svc.get("environment")
        assert isinstance(env, dict), f"{name}: environment must be a mapping from the anchor"
        for key in FD_ENV_KEYS:
            assert env.get(key) == expected[key], f"{name}: {key}"
    # The password is required, never defaulted in the file.
    with pytest.raises(KeyError, match="FD_SCHEDULER_PASSWORD"):
        interpolate(anchor, {})


def test_the_compose_scheduler_settings_are_valid():
    from fd_celery import SchedulerConfig

    env = interpolate(yaml.safe_load(COMPOSE_FILE.read_text())["x-fd-env"], dict(TEST_SECRETS))
    config = SchedulerConfig.from_sources(
        environ={k: v for k, v in env.items() if k.startswith("FD_SCHEDULER_")}
    )
    assert config.scheduler_name == "splitwise" and config.scheduler_host == "redis"
    assert config.scheduler_password == TEST_SECRETS["FD_SCHEDULER_PASSWORD"]


def test_flower_requires_basic_auth_from_the_environment(compose, services):
    flower = services["flower"]
    script = " ".join(map(str, flower["command"]))
    match = re.search(r"--basic[-_]auth[= ](\S+)", script)
    assert match, "Flower must run with --basic-auth"
    assert "FLOWER_BASIC_AUTH" in match.group(1), "the credentials come from the environment"
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == TEST_SECRETS["FLOWER_BASIC_AUTH"]
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH"):
        interpolate(compose["services"]["flower"]["environment"], {"FD_SCHEDULER_PASSWORD": "x"})
    # Published on loopback unless the operator says otherwise.
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_flower_options_are_real_flower_options(services):
    """Flower drops unknown options silently (flower.command.is_flower_option), so a typo would
    leave it running without authentication: check each against Flower's own option table."""
    pytest.importorskip("flower")
    import flower.options  # noqa: F401  (defines the options)
    from tornado.options import options

    known = set(options._options)  # normalized with dashes
    for inv in invocations_in(services["flower"]["command"], "flower"):
        _, opts = inv.subcommand()
        for opt in opts:
            if opt.startswith("--"):
                name = opt[2:].split("=", 1)[0].replace("_", "-")
                assert name in known, f"{opt!r} is not a Flower option"


def test_redis_requires_a_password_keeps_an_aof_and_is_not_published(services):
    redis_svc = services["redis"]
    assert "ports" not in redis_svc, "Redis must not be published on the host"
    script = " ".join(map(str, redis_svc["command"]))
    assert "requirepass" in script and "$FD_SCHEDULER_PASSWORD" in script
    assert "appendonly yes" in script
    assert any("/data" in str(v) for v in redis_svc.get("volumes", [])), "AOF needs a volume"


def test_the_redis_command_and_healthcheck_work_for_real(services, tmp_path):
    """Run the service's own command (on a free port, in a temp dir) and its healthcheck."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.skip("redis-server and redis-cli are needed to run the Redis service's command")
    port = free_port()
    command = list(map(str, services["redis"]["command"]))
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace(
        "redis-server -", f"redis-server - --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    )
    env = {**os.environ, **services["redis"]["environment"]}
    proc = subprocess.Popen(
        ["sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        health = services["redis"]["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        check = health[1].replace("redis-cli", f"redis-cli -p {port}")
        deadline = time.monotonic() + 10
        while subprocess.run(["sh", "-c", check], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.1)
        no_auth = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True)
        assert "NOAUTH" in no_auth.stdout + no_auth.stderr
        auth_env = {**os.environ, "REDISCLI_AUTH": env["FD_SCHEDULER_PASSWORD"]}
        aof = subprocess.run(
            [cli, "-p", str(port), "config", "get", "appendonly"],
            env=auth_env,
            capture_output=True,
            text=True,
        )
        assert aof.stdout.split() == ["appendonly", "yes"]
        # The password is not on the command line (it travels on stdin).
        cmdlines = []
        for proc_dir in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                cmdlines.append(
                    (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
        assert cmdlines and not any(env["FD_SCHEDULER_PASSWORD"] in c for c in cmdlines)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(5)


def test_workers_are_healthchecked_and_wait_for_redis(services):
    for name in [*worker_services(services), "client"]:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
    for name in worker_services(services):
        test = services[name]["healthcheck"]["test"]
        found = invocations_in(test, f"{name}: healthcheck")
        assert found and found[0].subcommand() == (("fd", "status"), ("--json",)), test
    client_deps = services["client"]["depends_on"]
    assert set(worker_services(services)) <= set(client_deps)


def test_the_worker_healthcheck_script_recognises_its_own_node(services):
    """The healthcheck pipes `fd status --json` into a Python one-liner: feed it a status."""
    import json
    import socket

    test = services["mixed1"]["healthcheck"]["test"][1]
    consumer = test.split("|", 1)[1]
    me = json.dumps({"topic": "default", "nodes": [{"node": f"mixed1@{socket.gethostname()}"}]})
    other = json.dumps({"topic": "default", "nodes": [{"node": "mixed1@elsewhere"}]})
    assert subprocess.run(["sh", "-c", consumer], input=me, text=True).returncode == 0
    assert subprocess.run(["sh", "-c", consumer], input=other, text=True).returncode == 1


# -- every app module and command named exists -------------------------------------------------


def _child_env(services: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FD_", "CELERY_"))}
    env.update({k: str(v) for k, v in services["mixed1"]["environment"].items()})
    return env


IMPORT_CHECK = """
import importlib, sys
from celery import Celery
module = importlib.import_module(sys.argv[1])
app = getattr(module, "app", None)
assert isinstance(app, Celery), f"{sys.argv[1]} has no Celery `app`"
assert "fd.generate" in app.tasks, "not an fd_celery app"
from fd_celery import get_config
config = get_config(app)
assert config.scheduler_name == "splitwise" and config.scheduler_host == "redis", config
print("ok", app.main)
"""


def test_every_celery_app_module_named_is_importable_with_app(services, dockerfile):
    modules = sorted({m for inv in all_invocations(services, dockerfile) if (m := inv.app_module())})
    assert {"workers.mixed", "workers.prefill", "workers.decode"} <= set(modules)
    env = _child_env(services)

    def check(module: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", IMPORT_CHECK, module],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    with ThreadPoolExecutor(4) as pool:
        for module, done in zip(modules, pool.map(check, modules)):
            assert done.returncode == 0, f"{module}: {done.stderr[-2000:]}"


def _option_in_help(option: str, help_text: str) -> bool:
    name = option.split("=", 1)[0]
    return re.search(r"(^|[\s,\[])" + re.escape(name) + r"($|[\s,=\]])", help_text, re.M) is not None


def test_every_celery_and_fd_celery_subcommand_named_exists(services, dockerfile):
    """`<command> --help` exits 0 for each, and each option given appears in that help."""
    invocations = all_invocations(services, dockerfile)
    assert any(inv.subcommand()[0] == ("fd", "status") for inv in invocations)
    env = _child_env(services)
    checks: dict[tuple[str, ...], list[Invocation]] = {}
    for inv in invocations:
        path, _ = inv.subcommand()
        assert path, f"{inv.where}: {inv.argv} names no subcommand"
        module = inv.app_module()
        prefix = (
            ("-m", "celery", "-A", module)
            if inv.program == "celery" and module
            else (("-m", "celery") if inv.program == "celery" else ("-m", "fd_celery.cli.main"))
        )
        checks.setdefault((*prefix, *path), []).append(inv)

    def run_help(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        if args[1] == "fd_celery.cli.main":  # the `fd-celery` console script
            cmd = [sys.executable, "-c", "from fd_celery.cli.main import main; main()", *args[2:], "--help"]
        else:
            cmd = [sys.executable, *args, "--help"]
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)

    keys = list(checks)
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(keys, pool.map(run_help, keys)))
    for key, done in results.items():
        where = checks[key][0].where
        assert done.returncode == 0, f"{where}: {' '.join(key)} --help failed:\n{done.stderr[-2000:]}"
        if key[-1] == "flower":
            continue  # Flower's options are tornado options: test_flower_options_are_real_flower_options
        for inv in checks[key]:
            for opt in inv.subcommand()[1]:
                if opt.startswith("-"):
                    assert _option_in_help(opt, done.stdout), f"{inv.where}: {opt} is not an option of {key}"


def test_console_script_fd_celery_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "fd-celery = fd_celery.cli.main:main" in scripts
    assert "fd = fd_celery.cli.status:fd" in cfg["options.entry_points"]["celery.commands"]


# -- Dockerfile --------------------------------------------------------------------------------


def _build_context(compose: dict[str, Any]) -> tuple[Path, Path]:
    build = compose["x-fd-build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    return context, context / build["dockerfile"]


def test_compose_builds_this_dockerfile_from_the_repository_root(compose, services):
    context, dockerfile = _build_context(compose)
    assert context == REPO and dockerfile == DOCKERFILE
    for name, svc in services.items():
        if name == "redis":
            continue
        assert svc.get("build", {}).get("dockerfile") == "docker/Dockerfile", name


def test_every_file_the_dockerfile_copies_exists(compose, dockerfile):
    context, _ = _build_context(compose)
    copies = [(w, a) for w, a in dockerfile if w in ("COPY", "ADD")]
    assert copies
    copied: set[str] = set()
    for word, args in copies:
        parts = _exec_form(args) or shlex.split(args)
        parts = [p for p in parts if not p.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(args)), "single-stage build"
        *sources, _dest = parts
        for src in sources:
            assert not src.startswith(("http://", "https://")), f"{word} of a URL: {src}"
            path = context / src
            assert path.exists(), f"{word} {src}: not in the build context {context}"
            copied.add(os.path.normpath(src))
    # What the package build reads: setup.cfg's `file:` references, the package and `workers`.
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    needed = {"setup.cfg", "pyproject.toml", "fd_celery", "workers"}
    for value in cfg["metadata"].values():
        if value.strip().startswith("file:"):
            needed.update(p.strip() for p in value.split(":", 1)[1].split(","))
    assert needed <= copied, f"not copied: {needed - copied}"


def test_the_client_script_the_compose_file_runs_is_in_the_image(services, dockerfile):
    entry = services["client"]["entrypoint"]
    assert entry[0] == "python"
    script = entry[1]
    assert (REPO / script).is_file()
    workdir = [a for w, a in dockerfile if w == "WORKDIR"][-1]
    destinations = []
    for word, args in dockerfile:
        if word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            destinations.append(os.path.normpath(os.path.join(workdir, parts[-1])))
    assert os.path.normpath(os.path.join(workdir, script)) in destinations


def test_dockerfile_installs_torch_first_then_the_package_with_its_extras(dockerfile):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for w, a in dockerfile if w == "ARG"}
    assert args.get("TORCH_SPEC") == "torch==2.13.0"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    runs = [(i, a) for i, (w, a) in enumerate(dockerfile) if w == "RUN"]
    torch_at = [
        i for i, a in runs if "pip install" in a and "${TORCH_SPEC}" in a and "${TORCH_INDEX_URL}" in a
    ]
    package_at = [i for i, a in runs if re.search(r"pip install [\"']?\.\[", a)]
    assert torch_at and package_at, "a RUN for torch and a RUN for the package"
    assert torch_at[0] < package_at[0], "torch must be installed before the package"
    extras = args.get("FD_EXTRAS") or ""
    assert {"worker", "hf", "flower"} <= set(extras.split(","))
    assert "${FD_EXTRAS}" in dockerfile[package_at[0]][1]


def test_dockerfile_runs_a_worker_as_a_non_root_user(dockerfile):
    users = [a for w, a in dockerfile if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    user_at = max(i for i, (w, _) in enumerate(dockerfile) if w == "USER")
    cmd_at = max(i for i, (w, _) in enumerate(dockerfile) if w == "CMD")
    assert user_at < cmd_at
    cmd = _exec_form(dockerfile[cmd_at][1])
    assert cmd, "CMD in exec form, so the worker gets SIGTERM for a warm shutdown"
    inv = invocations_in(cmd, "Dockerfile CMD")[0]
    assert inv.subcommand()[0] == ("worker",) and inv.app_module() == "workers.mixed"


def test_dockerfile_documents_a_cuda_variant():
    text = DOCKERFILE.read_text()
    assert "nvidia/cuda" in text and "download.pytorch.org/whl/cu" in text
    assert "ARG BASE_IMAGE=" in text


def test_docker_readme_covers_build_run_cpu_cuda_flower_and_security():
    text = DOCKER_README.read_text().lower()
    for word in (
        "docker build",
        "docker compose",
        "cuda",
        "cpu",
        "flower",
        "5555",
        "basic auth",
        "fd_scheduler_password",
        "do not publish redis",
    ):
        assert word in text, word


# -- docker/client.py for real ----------------------------------------------------------------


@pytest.fixture
def client_env(redis_server, cluster) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD_")}
    env.update(
        FD_SCHEDULER_HOST="127.0.0.1",
        FD_SCHEDULER_PORT=str(redis_server.port),
        FD_SCHEDULER_TOPIC=TOPIC,
        PYTHONUNBUFFERED="1",
    )
    yield env


def test_the_client_script_runs_against_a_real_cluster(client_env, node):
    done = subprocess.run(
        [
            sys.executable,
            str(DOCKER / "client.py"),
            "--requests",
            "2",
            "--max-tokens",
            "8",
            "--wait",
            "30",
            "--timeout",
            "60",
        ],
        env=client_env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2/2 requests succeeded" in done.stdout
    assert f"served_by={node}" in done.stdout
    assert "test-password" not in done.stdout
