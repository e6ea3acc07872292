"""One request through a real worker: same tokens as the engine, streamed in order, exact."""

from __future__ import annotations

import pytest
from celery import Celery

import fd_celery
from fd_celery.errors import InvalidRequest
from tests.conftest import make_app, reference_tokens

PROMPTS = [("Hello, world", 0.0, 0), ("The quick brown fox", 0.8, 7), ("héllo wörld €", 1.2, 123)]


@pytest.mark.parametrize("prompt,temperature,seed", PROMPTS)
def test_worker_generates_what_the_engine_generates(client, engine, node, prompt, temperature, seed):
    result = client.submit(prompt, max_tokens=24, temperature=temperature, seed=seed).result(timeout=60)

    expected = reference_tokens(engine, prompt, 24, temperature, seed)
    assert list(result.token_ids) == expected
    assert result.text == engine.decode(expected)
    assert result.served_by == (node,)
    assert result.stolen is False
    assert result.finish_reason in ("length", "stop")
    assert result.prompt_tokens == len(engine.encode(prompt))
    assert result.ttft_s > 0 and result.tpot_s >= 0


def test_same_prompt_and_seed_give_the_same_tokens(client):
    runs = [client.submit("determinism", max_tokens=16, temperature=1.0, seed=42) for _ in range(3)]
    tokens = {tuple(handle.result(timeout=60).token_ids) for handle in runs}
    assert len(tokens) == 1
    other = client.submit("determinism", max_tokens=16, temperature=1.0, seed=43).result(timeout=60)
    assert tuple(other.token_ids) not in tokens


def test_stream_arrives_in_order_while_the_worker_decodes(client):
    handle = client.submit("stream me", max_tokens=400, seed=3, temperature=0.7)
    chunks = []
    state_at_first_chunk = None
    for chunk in handle.stream(timeout=120):
        if not chunks:
            state_at_first_chunk = handle.async_result.state
        chunks.append(chunk)
    result = handle.result(timeout=10)

    assert state_at_first_chunk == "STARTED", "the first chunk came only after the request ended"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == list(result.token_ids)
    assert "".join(c.text for c in chunks) == result.text


def test_token_ids_prompt(client, engine):
    ids = engine.encode("from ids")
    result = client.submit(token_ids=ids, max_tokens=8, seed=1).result(timeout=60)
    assert list(result.token_ids) == reference_tokens(engine, "from ids", 8, 0.0, 1)


def test_plain_celery_send_task_and_get(app: Celery, client):
    kwargs = {"prompt": "plain celery", "max_tokens": 12, "temperature": 0.5, "seed": 9}
    plain = app.send_task("fd.generate", kwargs=kwargs).get(timeout=60)
    via_client = client.submit(**kwargs).result(timeout=60)

    assert isinstance(plain, dict)
    assert plain["token_ids"] == list(via_client.token_ids)
    assert plain["text"] == via_client.text
    assert fd_celery.GenerationResult.from_dict(plain).to_dict() == plain


def test_module_level_task_object(app: Celery):
    from fd_celery.worker.tasks import generate

    result = app.tasks[generate.name].apply_async(kwargs={"prompt": "task object", "max_tokens": 4})
    assert len(result.get(timeout=60)["token_ids"]) <= 4


def test_request_id_is_the_handle_id_and_reruns_are_idempotent(client):
    first = client.submit("idempotent", max_tokens=10, request_id="req-fixed-1")
    assert first.request_id == "req-fixed-1"
    one = first.result(timeout=60)
    # The same id again (a client retry): the earlier result comes back, nothing runs twice.
    again = client.submit("idempotent", max_tokens=10, request_id="req-fixed-1").result(timeout=60)
    assert again == one


def test_worker_keeps_serving_after_engine_level_rejection(client, engine):
    too_long = "x" * (engine.max_context + 10)
    with pytest.raises(InvalidRequest, match="context"):
        client.submit(too_long, max_tokens=4).result(timeout=60)
    assert client.submit("still serving", max_tokens=3).result(timeout=60).token_ids


def test_uninstalled_app_gets_a_clear_error(redis_server):
    with pytest.raises(fd_celery.ConfigError, match="install"):
        fd_celery.Client(Celery("bare", set_as_current=False))
    assert make_app(redis_server) is not None


def test_backend_state_is_started_while_running_and_success_after(client):
    """fd_celery records STARTED itself, off the request's path; it must never overwrite the
    final state, even for one-token requests whose end is stored within a millisecond."""

    handles = [client.submit("state", max_tokens=1, seed=i) for i in range(20)]
    for handle in handles:
        handle.result(timeout=60)
    # The SUCCESS record is stored in the same step as the stream's end: no window in which a
    # caller has the result and the backend says otherwise (or a crash leaves it STARTED).
    assert [h.async_result.state for h in handles] == ["SUCCESS"] * 20
    long = client.submit("state " * 5, max_tokens=200, seed=1)
    first = next(iter(long.stream(timeout=60)))
    assert first.token_ids and long.async_result.state == "STARTED"
    assert long.async_result.info["hostname"] and long.async_result.info["pid"]
    long.result(timeout=60)


def test_an_app_with_a_result_backend_of_its_own_gets_the_records(redis_server):
    """The app chose its own result backend (database 1; the scheduler uses 0): the worker's
    STARTED and SUCCESS records of a Client request land there, where AsyncResult looks."""
    import time
    import uuid

    from fd_celery.local_cluster import LocalCluster

    topic, backend_url = f"own-backend-{uuid.uuid4().hex[:6]}", redis_server.url(1)
    env = {"FD_SCHEDULER_TOPIC": topic, "FD_TEST_RESULT_BACKEND": backend_url, "FD_MODEL": "bench-sleep:20"}
    with LocalCluster(redis_server, env=env) as cluster:
        worker = cluster.add_worker("ob", app="tests.backend_app")
        cluster.wait_live([worker.node], topic=topic)
        app = Celery("client-own-backend", set_as_current=False)
        app.conf.result_backend = backend_url
        fd_celery.install(app, scheduler_port=redis_server.port, scheduler_topic=topic)
        handle = fd_celery.Client(app).submit("own backend", max_tokens=25)
        seen, deadline = set(), time.monotonic() + 30
        while "SUCCESS" not in seen and time.monotonic() < deadline:
            seen.add(handle.async_result.state)
            time.sleep(0.02)
        result = handle.result(timeout=10)
        assert "STARTED" in seen and "SUCCESS" in seen, seen
        assert app.AsyncResult(handle.request_id).get(timeout=10)["token_ids"] == list(result.token_ids)
        assert not redis_server.client(0).exists(f"celery-task-meta-{handle.request_id}")
