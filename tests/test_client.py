"""The client's own life: ``close()`` and ``with``, its reader threads, and no torch in its process.

Every client here submits to a topic no node serves (its requests wait in the queue), so these
tests need the test Redis but no worker.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fd_celery
from fd_celery import ClientClosed
from fd_celery.connection import BLOCK_MS
from fd_celery.errors import FDCeleryError, ResultTimeout
from fd_celery.local_cluster import RedisServer
from tests.conftest import make_app, run_topic, wait_until

REPO = Path(__file__).resolve().parents[1]
OFFLINE_TOPIC = run_topic("offline")
# A closed client's threads and waiting handles stop within one blocking read; this allows for a
# loaded machine.
STOP_WITHIN_S = 3 * BLOCK_MS / 1000 + 2


def _offline_client(redis_server: RedisServer) -> fd_celery.Client:
    return fd_celery.Client(make_app(redis_server, scheduler_topic=OFFLINE_TOPIC))


def _reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fd-reader-")}


def test_close_is_idempotent_and_a_submit_after_it_is_refused(redis_server):
    client = _offline_client(redis_server)
    client.submit("before the close", max_tokens=2)
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(ClientClosed, match=r"closed \(close\(\) was called\): it cannot submit") as info:
        client.submit("after the close", max_tokens=2)
    assert isinstance(info.value, FDCeleryError)


def test_with_block_closes_the_client(redis_server):
    with _offline_client(redis_server) as client:
        assert isinstance(client, fd_celery.Client) and not client.closed
        handle = client.submit("inside the block", max_tokens=2)
    assert client.closed
    with pytest.raises(ClientClosed, match=f"follow request {handle.request_id}"):
        handle.result(timeout=1)


def test_a_handle_waiting_when_the_client_closes_raises_client_closed(redis_server):
    client = _offline_client(redis_server)
    handle = client.submit("nobody serves this topic", max_tokens=2)
    outcome: dict[str, BaseException] = {}

    def wait() -> None:
        try:
            handle.result(timeout=120)
        except BaseException as exc:  # noqa: BLE001 - what the waiting caller saw
            outcome["error"] = exc

    waiter = threading.Thread(target=wait, name="test-waiter", daemon=True)
    waiter.start()
    wait_until(lambda: client._readers is not None, 10, "the handle to follow its stream")
    closed_at = time.monotonic()
    client.close()
    waiter.join(STOP_WITHIN_S)
    assert not waiter.is_alive(), f"the waiting handle did not notice the close within {STOP_WITHIN_S:g}s"
    assert isinstance(outcome.get("error"), ClientClosed), outcome
    assert time.monotonic() - closed_at < STOP_WITHIN_S


def test_close_ends_the_reader_threads(redis_server):
    before = _reader_threads()
    client = _offline_client(redis_server)
    with pytest.raises(ResultTimeout):
        client.submit("start the readers", max_tokens=2).result(timeout=0.3)
    mine = _reader_threads() - before
    assert len(mine) == client.config.scheduler_reader_parallel, sorted(t.name for t in mine)
    client.close()
    wait_until(
        lambda: not any(t.is_alive() for t in mine),
        STOP_WITHIN_S,
        "the closed client's fd-reader-* threads to end",
    )


NO_TORCH = """
import sys
from celery import Celery
import fd_celery
from fd_celery.errors import ResultTimeout

app = Celery("no-torch", set_as_current=False)
fd_celery.install(app, scheduler_port=int(sys.argv[1]), scheduler_topic=sys.argv[2])
with fd_celery.Client(app) as client:
    handle = client.submit("nobody serves this topic", max_tokens=2)
    try:
        handle.result(timeout=0.3)
    except ResultTimeout:
        pass
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, f"the client process imported {loaded[:5]}"
print("no torch")
"""


def test_a_client_process_imports_no_torch(redis_server):
    """install(), a Client, a submit and a wait for its stream: none of it loads torch."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(redis_server.port), OFFLINE_TOPIC],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "no torch" in proc.stdout, proc.stdout + proc.stderr
