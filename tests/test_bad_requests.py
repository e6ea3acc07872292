"""Bad requests: every one is an ``InvalidRequest`` naming what was wrong, and the worker serves on.

Three ways in: ``Client.submit`` and plain ``app.send_task`` (checked by the router in the
caller's process, before anything is published), and messages pushed straight into a node's queue
by a Celery app without fd_celery (checked by the worker; the error comes back through the JSON
result backend as the same class).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import fd_celery
from fd_celery.errors import InvalidRequest, WorkerError
from fd_celery.keys import output_stream, role_queue
from fd_celery.protocol import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT
from tests.conftest import TOPIC, make_app, run_topic

DROP = object()  # remove this field from the base request
BASE: dict[str, Any] = {"prompt": "hello", "max_tokens": 4}


def request(**fields: Any) -> dict[str, Any]:
    merged = {**BASE, **fields}
    return {k: v for k, v in merged.items() if v is not DROP}


@pytest.fixture(scope="module")
def offline_app(redis_server) -> Celery:
    """An app of a topic no worker serves: enough for what is refused before anything is
    published (and had a bad request gone out, no worker would have run it)."""
    return make_app(redis_server, scheduler_topic=run_topic("bad-offline"))


@pytest.fixture(scope="module")
def offline_client(offline_app: Celery) -> Iterator[fd_celery.Client]:
    with fd_celery.Client(offline_app) as client:
        yield client


def assert_still_serving(client: fd_celery.Client) -> None:
    result = client.submit("still serving", max_tokens=3, seed=1).result(timeout=60)
    assert len(result.token_ids) >= 1


# --------------------------------------------------------------------------- Client.submit

SUBMIT_CASES = [
    # id, submit kwargs, what the message must name
    ("empty-prompt", request(prompt=""), "prompt is empty"),
    ("whitespace-prompt", request(prompt=" \n\t  "), "prompt is empty"),
    ("neither-prompt-nor-ids", request(prompt=DROP), "exactly one of prompt and token_ids"),
    ("both-prompt-and-ids", request(token_ids=[1, 2]), "exactly one of prompt and token_ids"),
    ("int-prompt", request(prompt=123), "prompt must be a string"),
    ("bytes-prompt", request(prompt=b"hello"), "prompt must be a string"),
    ("list-prompt", request(prompt=["hello"]), "prompt must be a string"),
    ("prompt-over-char-limit", request(prompt="x" * (MAX_PROMPT_CHARS + 1)), "limit"),
    ("max-tokens-none", request(max_tokens=None), "max_tokens is required"),
    ("max-tokens-0", request(max_tokens=0), "max_tokens"),
    ("max-tokens-negative", request(max_tokens=-3), "max_tokens"),
    ("max-tokens-absurd", request(max_tokens=10**9), "max_tokens"),
    ("max-tokens-over-limit", request(max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),
    ("max-tokens-float", request(max_tokens=2.5), "max_tokens"),
    ("max-tokens-whole-float", request(max_tokens=4.0), "max_tokens"),
    ("max-tokens-str", request(max_tokens="5"), "max_tokens"),
    ("max-tokens-bool", request(max_tokens=True), "max_tokens"),
    ("temperature-negative", request(temperature=-0.1), "temperature"),
    ("temperature-nan", request(temperature=math.nan), "temperature"),
    ("temperature-inf", request(temperature=math.inf), "temperature"),
    ("temperature-huge", request(temperature=1e6), "temperature"),
    ("temperature-str", request(temperature="hot"), "temperature"),
    ("temperature-bool", request(temperature=True), "temperature"),
    ("seed-negative", request(seed=-1), "seed"),
    ("seed-str", request(seed="7"), "seed"),
    ("seed-float", request(seed=1.5), "seed"),
    ("seed-too-big", request(seed=2**64), "seed"),
    ("token-ids-empty", request(prompt=DROP, token_ids=[]), "token_ids is empty"),
    ("token-ids-str", request(prompt=DROP, token_ids="abc"), "token_ids"),
    ("token-ids-int", request(prompt=DROP, token_ids=5), "token_ids"),
    ("token-ids-set", request(prompt=DROP, token_ids={1, 2}), "token_ids"),
    ("token-ids-negative", request(prompt=DROP, token_ids=[1, -1]), "token_ids[1]"),
    ("token-ids-str-items", request(prompt=DROP, token_ids=["a", "b"]), "token_ids[0]"),
    ("token-ids-float-items", request(prompt=DROP, token_ids=[1.0]), "token_ids[0]"),
    ("token-ids-bool-items", request(prompt=DROP, token_ids=[True]), "token_ids[0]"),
    ("token-ids-too-many", request(prompt=DROP, token_ids=[1] * (MAX_PROMPT_TOKENS + 1)), "token_ids"),
    ("request-id-space", request(request_id="a b"), "request_id"),
    ("request-id-too-long", request(request_id="x" * 200), "request_id"),
    ("request-id-path", request(request_id="../../etc"), "request_id"),
    ("request-id-empty", request(request_id=""), "request_id"),
    ("request-id-glob", request(request_id="fd*"), "request_id"),
    ("request-id-int", request(request_id=123), "request_id"),
    ("priority-negative", request(priority=-1), "priority"),
    ("priority-10", request(priority=10), "priority"),
    ("priority-bool", request(priority=True), "priority"),
    ("priority-str", request(priority="5"), "priority"),
    ("priority-float", request(priority=1.5), "priority"),
    ("node-empty", request(node=""), "node"),
    ("node-int", request(node=7), "node"),
    ("node-too-long", request(node="n" * 300), "node"),
]


@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in SUBMIT_CASES], ids=[c[0] for c in SUBMIT_CASES])
def test_submit_rejects_bad_request(offline_client, kwargs, fragment):
    with pytest.raises(InvalidRequest) as info:
        offline_client.submit(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fd_celery.FDCeleryError)


def test_rejected_submit_publishes_nothing(client, redis_server):
    request_id = f"rejected-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidRequest):
        client.submit("", max_tokens=4, request_id=request_id)
    assert not redis_server.client().exists(output_stream(TOPIC, request_id))
    # had the rejected one run, the same id would give back its (error) end
    result = client.submit("now valid", max_tokens=3, request_id=request_id).result(timeout=60)
    assert result.request_id == request_id and result.token_ids


def test_worker_serves_after_submit_rejections(client):
    assert_still_serving(client)


# --------------------------------------------------------------------------- plain send_task

SEND_TASK_CASES = [
    ("no-max-tokens", {"prompt": "hello"}, "max_tokens is required"),
    ("unknown-field", {"prompt": "hello", "max_tokens": 4, "bogus": 1}, "bogus"),
    (
        "unknown-fields",
        {"prompt": "hello", "max_tokens": 4, "stream": True, "best_of": 2},
        "['best_of', 'stream']",
    ),
    ("request-id-field", {"prompt": "hello", "max_tokens": 4, "request_id": "x"}, "request_id"),
    ("no-kwargs", {}, "exactly one of prompt and token_ids"),
    ("prompt-none-ids-none", {"prompt": None, "token_ids": None, "max_tokens": 4}, "exactly one"),
    ("max-tokens-str", {"prompt": "hello", "max_tokens": "lots"}, "max_tokens"),
]


@pytest.mark.parametrize(
    "kwargs,fragment", [c[1:] for c in SEND_TASK_CASES], ids=[c[0] for c in SEND_TASK_CASES]
)
def test_plain_send_task_rejected_by_router(offline_app: Celery, kwargs, fragment):
    with pytest.raises(InvalidRequest) as info:
        offline_app.send_task("fd.generate", kwargs=kwargs)
    assert fragment in str(info.value)


def test_apply_async_on_the_task_object_is_checked_too(offline_app: Celery):
    from fd_celery.worker.tasks import generate

    with pytest.raises(InvalidRequest, match="max_tokens"):
        offline_app.tasks[generate.name].apply_async(kwargs={"prompt": "hello", "max_tokens": 0})


@pytest.mark.parametrize("args", [[1], ["hello", 4], [{"prompt": "hello"}]])
@pytest.mark.parametrize("task", ["fd.generate", "fd.prefill"])
def test_positional_args_refused_at_send(offline_app: Celery, redis_server, args, task):
    """The router refuses them before anything is published, and says fd.generate takes
    keyword arguments (not "give exactly one of prompt and token_ids")."""
    queues_before = set(redis_server.client().keys("fd.*"))
    with pytest.raises(InvalidRequest, match=f"{task} takes keyword arguments only") as info:
        offline_app.send_task(task, args=args, kwargs={"prompt": "hello", "max_tokens": 4})
    assert f"got {len(args)} positional argument(s)" in str(info.value)
    assert set(redis_server.client().keys("fd.*")) == queues_before


@pytest.mark.parametrize(
    "keywords,named",
    [
        ({"max_token": 4}, "'max_token'"),
        ({"max_tokens": 4, "stream": True, "best_of": 2}, "'best_of', 'stream'"),
    ],
)
def test_submit_with_an_unknown_keyword_is_an_invalid_request(offline_client, keywords, named):
    with pytest.raises(InvalidRequest) as info:
        offline_client.submit("hello", **keywords)
    assert f"unknown keyword(s) [{named}]" in str(info.value)
    assert "allowed: prompt, token_ids, max_tokens" in str(info.value)


def test_submit_without_max_tokens_is_an_invalid_request(offline_client):
    with pytest.raises(InvalidRequest, match="max_tokens is required"):
        offline_client.submit("hello")


CALL_CASES = [
    # id, celery call arguments, what the one line must say
    ("bad-kwarg", ["--kwargs", '{"prompt": "hi", "max_tokens": 4, "bogus": 1}'], "['bogus']"),
    ("positional", ["--args", '["hi", 4]'], "fd.generate takes keyword arguments only"),
    ("bad-value", ["--kwargs", '{"prompt": "", "max_tokens": 4}'], "prompt is empty"),
]


@pytest.mark.parametrize("call_args,fragment", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_celery_call_prints_the_error_not_a_traceback(redis_server, call_args, fragment):
    env = {
        **os.environ,
        "FD_SCHEDULER_PORT": str(redis_server.port),
        "FD_SCHEDULER_TOPIC": run_topic("bad-offline"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.mixed", "call", "fd.generate", *call_args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: InvalidRequest: "), done.stderr
    assert fragment in lines[0]


def test_celery_call_of_a_good_request_still_prints_its_id(redis_server):
    """The control: the hook changes nothing for a request that goes out."""
    env = {
        **os.environ,
        "FD_SCHEDULER_PORT": str(redis_server.port),
        "FD_SCHEDULER_TOPIC": run_topic("bad-offline"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.mixed", "call", "fd.generate"]
        + ["--kwargs", '{"prompt": "hi", "max_tokens": 4}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done
    uuid.UUID(done.stdout.strip())


@pytest.mark.parametrize("task_id", ["../../etc", "a b", "x" * 300], ids=["path", "space", "300-chars"])
def test_plain_send_task_with_bad_task_id(app: Celery, task_id):
    with pytest.raises(InvalidRequest, match="request_id"):
        app.send_task("fd.generate", kwargs={"prompt": "hello", "max_tokens": 2}, task_id=task_id).get(
            timeout=60
        )


def test_request_id_with_trailing_newline(client):
    with pytest.raises(InvalidRequest, match="request_id"):
        client.submit("hello", max_tokens=2, request_id=f"nl-{uuid.uuid4().hex[:6]}\n").result(timeout=60)


# --------------------------------------------------------------------------- straight into the queue


@pytest.fixture(scope="module")
def raw(redis_server) -> Iterator[Celery]:
    """A Celery app with no fd_celery at all: no router, no checks, JSON only."""
    app = Celery("raw", broker=redis_server.url(), backend=redis_server.url(), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
    )
    yield app
    app.close()


QUEUE = role_queue(TOPIC, "mixed")

RAW_CASES = [
    ("empty-prompt", {"prompt": "", "max_tokens": 4}, "prompt is empty"),
    ("whitespace-prompt", {"prompt": "   ", "max_tokens": 4}, "prompt is empty"),
    ("max-tokens-lots", {"prompt": "hello", "max_tokens": "lots"}, "max_tokens"),
    ("max-tokens-missing", {"prompt": "hello"}, "max_tokens is required"),
    ("max-tokens-absurd", {"prompt": "hello", "max_tokens": 10**9}, "max_tokens"),
    ("ids-out-of-vocab", {"token_ids": [10**6], "max_tokens": 4}, "vocabulary"),
    ("ids-huge", {"token_ids": [1, 10**30], "max_tokens": 4}, "vocabulary"),
    ("ids-negative", {"token_ids": [-1], "max_tokens": 4}, "token_ids[0]"),
    ("ids-not-a-list", {"token_ids": "abc", "max_tokens": 4}, "token_ids"),
    ("ids-empty", {"token_ids": [], "max_tokens": 4}, "token_ids is empty"),
    ("unknown-field", {"prompt": "hello", "max_tokens": 4, "bogus": 1}, "bogus"),
    ("neither", {"max_tokens": 4}, "exactly one"),
    ("both", {"prompt": "hello", "token_ids": [1], "max_tokens": 4}, "exactly one"),
    ("temperature-nan", {"prompt": "hello", "max_tokens": 4, "temperature": math.nan}, "temperature"),
    ("temperature-str", {"prompt": "hello", "max_tokens": 4, "temperature": "hot"}, "temperature"),
    ("seed-negative", {"prompt": "hello", "max_tokens": 4, "seed": -5}, "seed"),
    ("prompt-dict", {"prompt": {"text": "hello"}, "max_tokens": 4}, "prompt must be a string"),
]


@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_raw_message_rejected_by_worker(raw: Celery, client, kwargs, fragment):
    async_result = raw.send_task("fd.generate", kwargs=kwargs, queue=QUEUE)
    with pytest.raises(InvalidRequest) as info:
        async_result.get(timeout=60)
    assert type(info.value) is InvalidRequest  # the same class, rebuilt from JSON
    assert fragment in str(info.value)
    assert_still_serving(client)


def test_raw_positional_args_rejected(raw: Celery, client):
    with pytest.raises(InvalidRequest, match="keyword arguments only"):
        raw.send_task("fd.generate", args=["hello", 4], queue=QUEUE).get(timeout=60)
    assert_still_serving(client)


def test_raw_valid_message_is_served(raw: Celery, node):
    """The control: the same raw path with a good payload works, so rejections are real."""
    result = raw.send_task("fd.generate", kwargs={"prompt": "hello", "max_tokens": 3}, queue=QUEUE).get(
        timeout=60
    )
    assert len(result["token_ids"]) >= 1


def test_raw_rejection_also_ends_the_output_stream(raw: Celery, redis_server, node):
    async_result = raw.send_task("fd.generate", kwargs={"prompt": "", "max_tokens": 4}, queue=QUEUE)
    with pytest.raises(InvalidRequest):
        async_result.get(timeout=60)
    assert redis_server.client().exists(output_stream(TOPIC, async_result.id))


# --------------------------------------------------------------------------- the model's context


def filler_ids(engine: Any, n: int) -> list[int]:
    return [engine.encode("a")[-1]] * n


def test_prompt_longer_than_context(client, engine):
    with pytest.raises(InvalidRequest, match="context") as info:
        client.submit("x" * (engine.max_context + 10), max_tokens=4).result(timeout=60)
    assert str(engine.max_context) in str(info.value)
    assert_still_serving(client)


@pytest.mark.parametrize("extra", [1, 100])
def test_token_ids_plus_max_tokens_over_context(client, engine, extra):
    ids = filler_ids(engine, engine.max_context - 4 + extra)
    with pytest.raises(InvalidRequest, match="context"):
        client.submit(token_ids=ids, max_tokens=4).result(timeout=60)


def test_max_tokens_alone_over_context(client, engine):
    with pytest.raises(InvalidRequest, match="context"):
        client.submit("hi", max_tokens=engine.max_context + 1).result(timeout=60)


def test_raw_prompt_longer_than_context(raw: Celery, client, engine):
    kwargs = {"prompt": "y" * (engine.max_context + 1), "max_tokens": 2}
    with pytest.raises(InvalidRequest, match="context"):
        raw.send_task("fd.generate", kwargs=kwargs, queue=QUEUE).get(timeout=60)
    assert_still_serving(client)


def test_exactly_the_context_is_served(client, engine):
    ids = filler_ids(engine, engine.max_context - 4)
    result = client.submit(token_ids=ids, max_tokens=4).result(timeout=60)
    assert 1 <= len(result.token_ids) <= 4 and result.prompt_tokens == len(ids)


# --------------------------------------------------------------------------- valid edges


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 1},
        {"temperature": 10.0, "seed": 3},
        {"temperature": 1e-300},
        {"seed": 0, "temperature": 1.0},
        {"seed": 2**63 - 1, "temperature": 1.0},
        {"priority": 0},
        {"priority": 9},
        {"request_id": "edge:" + "a" * 100},
    ],
    ids=lambda f: ",".join(f"{k}={v}"[:20] for k, v in f.items()),
)
def test_valid_edge_values_are_served(client, fields):
    if "request_id" in fields:
        fields = {**fields, "request_id": fields["request_id"][:120] + uuid.uuid4().hex[:8]}
    result = client.submit(**{**BASE, **fields}).result(timeout=60)
    assert 1 <= len(result.token_ids) <= BASE["max_tokens"]


def test_subnormal_temperature_is_served_or_rejected(client):
    try:
        result = client.submit("hello", max_tokens=2, temperature=5e-324).result(timeout=60)
    except InvalidRequest:
        return
    except WorkerError as exc:
        pytest.fail(f"valid request failed on the worker: {exc}")
    assert result.token_ids


def test_worker_is_still_alive(cluster, client):
    assert all(worker.alive() for worker in cluster.workers)
    assert_still_serving(client)
