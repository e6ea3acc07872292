"""Flower, for real, against the session's cluster: the worker's ``fd`` section in Flower's API
and on its rendered worker page, and ``fd.generate`` requests in its task list.

Flower is started as users start it (``celery -A workers.mixed flower``, basic auth on), against
the test Redis. Its URLs and formats are those of flower 2.x (``flower/urls.py``,
``flower/api/workers.py``, ``flower/api/tasks.py``, ``flower/templates/worker.html``). The
rendered page is checked in headless Chromium when a ``chromium`` binary exists, and its
screenshot is kept as ``test-artifacts/flower-worker.png``.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fd_celery
from fd_celery.keys import nodes_zset
from fd_celery.local_cluster import WorkerProcess, free_port
from tests.conftest import RUN_ID, TOPIC, make_app, run_topic, wait_until

pytest.importorskip("flower")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
EVENTS_TOPIC = run_topic("flower-events")
AUTH = ("fd-admin", "flower-test-pw")
FLOWER_START_TIMEOUT_S = 30.0
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class Flower:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log_path: str) -> None:
        self.port = port
        self.process = process
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-4000:]

    def get(self, path: str, auth: tuple[str, str] | None = AUTH, timeout: float = 10.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:300]!r}\n{self.log()}"
        return json.loads(body)


def _env(redis_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FD_", "FLOWER_", "CELERY_"))}
    env.update(
        FD_SCHEDULER_HOST="127.0.0.1",
        FD_SCHEDULER_PORT=str(redis_port),
        FD_SCHEDULER_TOPIC=TOPIC,
        PYTHONUNBUFFERED="1",
    )
    return env


POLL_INTERVAL_S = 0.3  # Flower's API and the workers' replies are not worth asking more often


@pytest.fixture(scope="module")
def flower(redis_server, cluster) -> Iterator[Flower]:
    port = free_port()
    log_path = tempfile.mkstemp(prefix="fd-flower-", suffix=".log")[1]
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.mixed",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={AUTH[0]}:{AUTH[1]}",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            env=_env(redis_server.port),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Flower(port, process, log_path)
    try:

        def answers() -> bool:
            assert process.poll() is None, f"Flower exited at start:\n{running.log()}"
            with contextlib.suppress(OSError):
                return running.get("/healthcheck", auth=None, timeout=2)[0] == 200
            return False

        wait_until(answers, FLOWER_START_TIMEOUT_S, "Flower to answer", POLL_INTERVAL_S)
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        os.unlink(log_path)


def _celery_control(redis_port: int, command: str, node: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.mixed", "control", command, "-d", node, "-t", "5"],
        env=_env(redis_port),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def _workers_with_fd_stats(flower: Flower, node: str) -> dict[str, Any] | None:
    status, body = flower.get("/api/workers?refresh=1")
    if status != 200:  # 503 while an inspect broadcast fails: try again
        return None
    workers = json.loads(body)
    return workers if "fd" in (workers.get(node, {}).get("stats") or {}) else None


def test_flower_requires_the_basic_auth_login(flower):
    assert flower.get("/api/workers", auth=None)[0] == 401
    assert flower.get("/api/workers", auth=("fd-admin", "wrong"))[0] == 401
    assert flower.get("/api/workers")[0] == 200


def test_flower_api_lists_the_node_with_its_fd_stats(flower, node):
    workers = wait_until(
        lambda: _workers_with_fd_stats(flower, node),
        30,
        f"{node} with an fd section in /api/workers",
        POLL_INTERVAL_S,
    )
    fd = workers[node]["stats"]["fd"]
    assert fd["node"] == node
    assert fd["role"] == "mixed"
    assert fd["model"] == "fd-tiny" and fd["device"] == "cpu"
    assert fd["topic"] == TOPIC
    assert fd["slots"] == 1
    assert f"fd.{TOPIC}.mixed" in fd["queues"] and any(node in q for q in fd["queues"])
    assert fd["kv_stores"] == ["shm", "redis"]  # a CPU node: no CUDA IPC
    assert "fd.generate" in workers[node]["registered"]
    consumed = {q["name"] for q in workers[node]["active_queues"]}
    assert set(fd["queues"]) <= consumed


def _tasks(flower: Flower) -> dict[str, Any]:
    return flower.get_json("/api/tasks?taskname=fd.generate")


class _UserStartedWorker(WorkerProcess):
    """A worker started the way users start one: with Celery's heartbeat, gossip and mingle.

    The session's workers run ``--without-heartbeat --without-gossip`` and no ``-E``, which
    leaves them with no event dispatcher at all: ``celery control enable_events`` answers
    "event dispatcher unavailable" and Flower can never list their tasks."""

    def command(self) -> list[str]:
        skip = {"--without-gossip", "--without-mingle", "--without-heartbeat"}
        return [arg for arg in super().command() if arg not in skip]


@pytest.fixture(scope="module")
def events_worker(cluster) -> Iterator[WorkerProcess]:
    """A mixed node on a topic of its own (so it takes no requests of the shared ``w1``)."""
    worker = _UserStartedWorker(name="flower1", env={**cluster.env, "FD_SCHEDULER_TOPIC": EVENTS_TOPIC})
    worker.start()
    try:
        nodes = cluster.redis.client()

        def joined() -> bool:
            assert worker.alive(), f"worker exited at start:\n{worker.log()[-3000:]}"
            return worker.node.encode() in nodes.zrange(nodes_zset(EVENTS_TOPIC), 0, -1)

        wait_until(joined, 60, f"{worker.node} to join the registry", POLL_INTERVAL_S)
        # The node joins the registry before its consumer (remote control included) is up.
        app = make_app(cluster.redis, scheduler_topic=EVENTS_TOPIC)
        wait_until(
            lambda: app.control.ping(destination=[worker.node], timeout=0.5),
            30,
            f"{worker.node} to answer a ping",
            interval_s=0,
        )
        yield worker
    finally:
        worker.stop()


def test_flower_lists_fd_generate_requests_once_task_events_are_on(flower, events_worker, redis_server):
    """Workers send no task events by default (fd_celery leaves ``worker_send_task_events``
    off); ``celery control enable_events`` (or ``-E``) turns them on and Flower lists requests."""
    node = events_worker.node
    _celery_control(redis_server.port, "enable_events", node)
    client = fd_celery.Client(make_app(redis_server, scheduler_topic=EVENTS_TOPIC))
    prompts = ["flower one", "flower two: a secret prompt"]
    handles = [client.submit(p, max_tokens=6, seed=i) for i, p in enumerate(prompts)]
    results = [h.result(timeout=60) for h in handles]
    ids = [h.request_id for h in handles]

    def all_succeeded() -> dict[str, Any] | None:
        tasks = _tasks(flower)
        seen = {i: tasks.get(i) for i in ids}
        return seen if all(t and t.get("state") == "SUCCESS" for t in seen.values()) else None

    seen = wait_until(all_succeeded, 15, "both requests SUCCESS in /api/tasks", POLL_INTERVAL_S)
    for request_id, result in zip(ids, results):
        task = seen[request_id]
        assert task["name"] == "fd.generate"
        assert task["worker"] == node
        assert task["received"] and task["started"] and task["succeeded"]
        assert task["runtime"] > 0
        # Flower shows the router's kwargsrepr (sizes), never the prompt itself.
        assert "secret prompt" not in (task.get("kwargs") or "")
        assert "prompt=<" in (task.get("kwargs") or "")
        assert result.served_by == (node,)
    info = flower.get_json(f"/api/task/info/{ids[0]}")
    assert info["state"] == "SUCCESS" and info["name"] == "fd.generate" and info["worker"] == node


# -- the rendered worker page in headless Chromium ----------------------------------------------


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="fd-chromium-") as profile:
        command = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


def test_flower_worker_page_shows_the_fd_section_in_chromium(flower, node):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary: apt-get install -y chromium chromium-driver")
    wait_until(
        lambda: _workers_with_fd_stats(flower, node),
        30,
        f"{node} with an fd section in /api/workers",
        POLL_INTERVAL_S,
    )

    # Basic auth in the URL: Chromium sends it for this top-level navigation and its same-origin
    # loads. `#tab-other` opens the tab where Flower lists non-standard stats such as `fd`.
    quoted = urllib.parse.quote(node, safe="")
    url = f"http://{AUTH[0]}:{AUTH[1]}@127.0.0.1:{flower.port}/worker/{quoted}#tab-other"

    ARTIFACTS.mkdir(exist_ok=True)
    # This run's own file, moved to the kept name once checked: another run may be taking its own.
    png = ARTIFACTS / f"flower-worker-{RUN_ID}.png"
    # One after the other: side by side, two browsers are slower on a small CI machine.
    dom = _run_chromium(binary, ["--dump-dom", url])
    shot = _run_chromium(binary, [f"--screenshot={png}", "--window-size=1280,1600", url])

    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert f'<h1 id="workername">{html.escape(node)}</h1>' in page, page[:2000]
    cell = re.search(r"<td>fd</td>\s*<td[^>]*>(.*?)</td>", page, re.S)
    assert cell, "no `fd` row in the worker page's Other statistics"
    fd_text = html.unescape(cell.group(1))
    assert "'model': 'fd-tiny'" in fd_text and "'role': 'mixed'" in fd_text
    assert f"fd.{TOPIC}.mixed" in fd_text and node in fd_text
    # The Other tab is the one shown (so the screenshot shows the fd section).
    assert re.search(
        r'id="tab-other"[^>]*class="[^"]*\bactive\b|class="[^"]*\bactive\b[^"]*"[^>]*id="tab-other"', page
    ), "the Other tab is not the active one"

    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    os.replace(png, ARTIFACTS / "flower-worker.png")
