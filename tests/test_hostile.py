"""Hostile input: property-based requests, KV references, and raw messages pushed into Redis.

- Requests through ``Client.submit`` and plain ``app.send_task`` with random types and values:
  each is served, or refused with ``InvalidRequest`` / ``NoNodeAvailable``; nothing else.
- ``KVRef.from_dict`` on arbitrary JSON-like dicts and on mutations of a valid reference: only
  ``KVRefError``, and an accepted reference never points outside /dev/shm or ``fd:<topic>:kv:``.
- Raw messages pushed straight into a node's queue list (garbage bytes, garbage JSON, kombu
  envelopes with garbage bodies, unknown task names, pickle): the worker serves the next good
  request, and the prompt text of a bad message never reaches the worker's log.

Raw messages go to a private worker (topic ``hostile``), not to the session's ``w1``. Before
:mod:`fd_celery.worker.deadletter`, some of them killed the worker that read them, and kombu put them back
in the queue, where they killed the next worker too; the fixture still replaces a worker that a
message took down (and removes the message), so such a regression fails one case, not the module.
Envelopes are built the way kombu's Redis transport frames them (``Channel._put``: LPUSH of a
JSON envelope whose ``body`` is base64 of the serialized ``[args, kwargs, embed]``), starting from
one that kombu itself produced.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import fd_celery
from fd_celery import keys
from fd_celery import kv as kvstore
from fd_celery.errors import FDCeleryError, InvalidRequest, KVRefError, NoNodeAvailable
from fd_celery.local_cluster import LocalCluster, RedisServer, WorkerProcess
from fd_celery.protocol import MAX_TOKENS_LIMIT
from fd_celery.worker import deadletter
from tests.conftest import CUDA_IPC, run_topic

HOSTILE_TOPIC = run_topic("hostile")
FIELDS = ("prompt", "token_ids", "max_tokens", "temperature", "seed", "node")
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _marker() -> str:
    return f"SECRETPROMPT{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- strategies

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


def prompts(marker: str) -> st.SearchStrategy[Any]:
    """Prompts: text carrying ``marker`` (so a leak into the log is visible), empty and blank
    strings, and wrong types."""
    return st.one_of(
        st.text(max_size=30).map(lambda t: f"{marker} {t}"),
        st.sampled_from(["", " ", "\n\t "]),
        st.integers(),
        st.floats(),
        st.binary(max_size=8),
        st.booleans(),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )


# max_tokens: small valid values, and values the router or worker must refuse (a large valid
# value would only make the test slow: 2049 and up exceed the model's context of 2048).
MAX_TOKENS = st.one_of(
    st.integers(-3, 6),
    st.integers(max_value=0),
    st.integers(min_value=MAX_TOKENS_LIMIT + 1),
    st.integers(min_value=2049, max_value=MAX_TOKENS_LIMIT),
    st.floats(),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
)
TEMPERATURES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 20),
    st.text(max_size=4),
    st.booleans(),
)
SEEDS = st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.booleans())
TOKEN_IDS = st.one_of(
    st.lists(st.integers(-3, 300), max_size=6),
    st.lists(JSON_SCALARS, max_size=3),
    st.text(max_size=4),
    st.integers(),
    st.binary(max_size=4),
)


def nodes(live: str) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(live), st.text(max_size=20), st.integers(), st.booleans(), st.just(""))


def _field_strategies(marker: str, live: str) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "prompt": prompts(marker),
        "token_ids": TOKEN_IDS,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURES,
        "seed": SEEDS,
        "node": nodes(live),
    }


def valid_kwargs(marker: str, live: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"prompt": st.text(max_size=20).map(lambda t: f"{marker} {t}"), "max_tokens": st.integers(1, 4)},
        optional={"temperature": st.floats(0, 10), "seed": st.integers(0, 2**63 - 1), "node": st.just(live)},
    )


def request_kwargs(marker: str, live: str) -> st.SearchStrategy[dict[str, Any]]:
    """Task kwargs: valid ones, valid ones with one field replaced or removed, and any subset of
    the fields with any values plus unknown keys."""
    fields = _field_strategies(marker, live)
    # "self" is left out: it collides with the bound task's own argument (see
    # test_raw_kwarg_named_self_is_an_invalid_request).
    unknown_keys = st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS and k != "self")
    unknown = st.dictionaries(unknown_keys, JSON_VALUES, max_size=2)
    anything = st.tuples(st.fixed_dictionaries({}, optional=fields), unknown).map(
        lambda kv: {**kv[0], **kv[1]}
    )
    change = st.one_of(
        st.sampled_from(FIELDS).flatmap(lambda f: fields[f].map(lambda v: (f, v))),
        st.tuples(unknown_keys, JSON_VALUES),
        st.sampled_from(FIELDS).map(lambda f: (f, DROP)),
    )
    one_off = st.tuples(valid_kwargs(marker, live), change).map(_apply)
    return st.one_of(valid_kwargs(marker, live), one_off, anything)


DROP = object()


def _apply(pair: tuple[dict[str, Any], tuple[str, Any]]) -> dict[str, Any]:
    kwargs, (key, value) = dict(pair[0]), pair[1]
    if value is DROP:
        kwargs.pop(key, None)
    else:
        kwargs[key] = value
    return kwargs


def _jsonable(value: Any) -> Any:
    """What a JSON producer can send: bytes become text."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- Client.submit / send_task

ALLOWED = (InvalidRequest, NoNodeAvailable)


def _served_or_refused(call: Any, max_tokens: Any) -> str:
    """Run ``call`` (which submits and waits); 'served' or 'refused'. Anything else fails."""
    try:
        result = call()
    except ALLOWED:
        return "refused"
    except FDCeleryError as exc:
        raise AssertionError(
            f"refused with {type(exc).__name__}, not InvalidRequest/NoNodeAvailable: {exc}"
        ) from None
    token_ids = result["token_ids"] if isinstance(result, dict) else result.token_ids
    assert 1 <= len(token_ids) <= max_tokens
    return "served"


def test_submit_random_payloads(client, node, cluster):
    marker = _marker()
    tally: dict[str, int] = {}

    @SETTINGS
    @given(
        kwargs=request_kwargs(marker, node).map(lambda d: {k: v for k, v in d.items() if k in FIELDS}),
        request_id=st.one_of(st.none(), st.text(max_size=12), st.integers()),
        priority=st.one_of(st.none(), st.integers(-2, 12), st.text(max_size=2), st.booleans()),
    )
    @example(kwargs={"prompt": f"{marker} ok", "max_tokens": 3}, request_id=None, priority=None)
    @example(kwargs={"prompt": f"{marker} ok", "max_tokens": 2, "node": node}, request_id=None, priority=9)
    def run(kwargs: dict[str, Any], request_id: Any, priority: Any) -> None:
        if "max_tokens" not in kwargs:
            kwargs = {**kwargs, "max_tokens": None}
        if request_id is not None and isinstance(request_id, str):
            request_id = f"{request_id}{uuid.uuid4().hex[:6]}" if request_id else request_id
        outcome = _served_or_refused(
            lambda: client.submit(**kwargs, request_id=request_id, priority=priority).result(timeout=60),
            kwargs.get("max_tokens"),
        )
        tally[outcome] = tally.get(outcome, 0) + 1

    run()
    print(f"\n[hostile] Client.submit: {sum(tally.values())} payloads tried: {tally}")
    assert tally.get("served") and tally.get("refused")
    assert marker not in cluster.workers[0].log(), "a prompt reached the worker's log"


def test_send_task_random_kwargs(app, node, cluster):
    marker = _marker()
    tally: dict[str, int] = {}

    @SETTINGS
    @given(kwargs=request_kwargs(marker, node))
    @example(kwargs={"prompt": f"{marker} ok", "max_tokens": 2})
    @example(kwargs={"prompt": f"{marker} ok", "max_tokens": 2, "stream": True})
    def run(kwargs: dict[str, Any]) -> None:
        outcome = _served_or_refused(
            lambda: app.send_task("fd.generate", kwargs=kwargs).get(timeout=60), kwargs.get("max_tokens")
        )
        tally[outcome] = tally.get(outcome, 0) + 1

    run()
    print(f"\n[hostile] send_task: {sum(tally.values())} kwargs dicts tried: {tally}")
    assert tally.get("served") and tally.get("refused")
    log = cluster.workers[0].log()
    assert marker not in log, "a prompt reached the worker's log"


def test_prompt_with_lone_surrogate_is_an_invalid_request(client):
    """Regression: a lone surrogate used to pass the checks and fail in the tokenizer, giving the
    caller a WorkerError."""
    with pytest.raises(InvalidRequest):
        client.submit("ab\ud800cd", max_tokens=2).result(timeout=60)


# --------------------------------------------------------------------------- KV references


def _valid_ref_dict(kind: str = "redis", topic: str = "t1", request_id: str = "req-1") -> dict[str, Any]:
    token = "ab" * 16
    name = f"{kvstore.SHM_PREFIX}{topic}-{request_id}-{token}"
    shapes = [[1, 2, 4, 8]] * 4
    return {
        "kind": kind,
        "location": f"fd:{topic}:kv:{name}" if kind == "redis" else name,
        "topic": topic,
        "request_id": request_id,
        "token": token,
        "dtype": "float32",
        "shapes": shapes,
        "num_tokens": 4,
        "nbytes": 4 * 64 * 4,
        "checksum": "sx64:0:0",
        "owner": "p@h",
        "host": "h",
        "expires_at": time.time() + 3600,
        "first_token": 5,
        "prompt_tokens": 4,
        "version": 1,
        **({"ipc": dict(CUDA_IPC)} if kind == "cuda" else {}),
    }


_NAMESPACE = re.compile(r"fd:[A-Za-z0-9_.-]{1,64}:kv:fdkv-[A-Za-z0-9_.:\-]+")


def _assert_in_namespace(ref: kvstore.KVRef) -> None:
    assert ref.kind in kvstore.STORES
    if ref.kind in ("shm", "cuda"):  # a file name in /dev/shm, or (cuda) the blob's name
        path = os.path.realpath(os.path.join(kvstore.SHM_DIR, ref.location))
        assert os.path.dirname(path) == os.path.realpath(kvstore.SHM_DIR), path
        assert ref.location.startswith(kvstore.SHM_PREFIX) and "/" not in ref.location
    else:
        assert _NAMESPACE.fullmatch(ref.location), ref.location
        assert ref.location.startswith(f"fd:{ref.topic}:kv:")


def _from_dict(data: Any) -> kvstore.KVRef | None:
    """from_dict's contract: a reference in the store's namespace, or KVRefError."""
    try:
        ref = kvstore.KVRef.from_dict(data)
    except KVRefError:
        return None
    _assert_in_namespace(ref)
    return ref


def _namespace_only(data: Any) -> None:
    """The security half alone: whatever from_dict raises, it never accepts a way out."""
    try:
        ref = kvstore.KVRef.from_dict(data)
    except Exception:  # noqa: BLE001 - the type is test_kvref_*'s business
        return
    _assert_in_namespace(ref)


REF_KEYS = st.one_of(st.sampled_from(sorted(_valid_ref_dict())), st.text(max_size=8))
MUTATION_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(
        [
            "../x",
            "/etc/passwd",
            "/dev/shm/../../etc/passwd",
            "fd:other:kv:x",
            "fdkv-../../x",
            "..",
            "",
            "shm",
            "redis",
            "float16",
            "bfloat16",
            "int64",
            "object",
            "ab" * 16,
        ]
    ),
    st.lists(st.lists(st.integers(-2, 2**40), max_size=5), max_size=5),
)


@st.composite
def mutated_refs(draw: st.DrawFn) -> dict[str, Any]:
    data = _valid_ref_dict(kind=draw(st.sampled_from(kvstore.STORES)))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(REF_KEYS)
        if draw(st.booleans()) and key in data:
            del data[key]
        else:
            data[key] = draw(MUTATION_VALUES)
    return data


ARBITRARY_REFS = st.one_of(
    JSON_VALUES,
    st.dictionaries(REF_KEYS, MUTATION_VALUES, max_size=18),
)


def test_valid_reference_dict_is_accepted():
    """The control: the hand-built reference the mutations start from is valid."""
    for kind in kvstore.STORES:
        ref = kvstore.KVRef.from_dict(_valid_ref_dict(kind))
        _assert_in_namespace(ref)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(ARBITRARY_REFS, mutated_refs()))
def test_kvref_never_escapes_its_namespace(data):
    _namespace_only(data)


@settings(max_examples=300, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(data=st.one_of(ARBITRARY_REFS, mutated_refs()))
@example(data={**_valid_ref_dict(), "dtype": []})
def test_kvref_arbitrary_and_mutated_dicts_raise_only_kvref_error(data):
    """Regression: from_dict used to let TypeError ({'dtype': []}), ValueError ({'expires_at':
    'soon'}) and OverflowError ({'shapes': [[1e400]]}) out."""
    _from_dict(data)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"dtype": []}, id="dtype-list"),
        pytest.param({"dtype": {"a": 1}}, id="dtype-dict"),
        pytest.param({"expires_at": "soon"}, id="expires-at-text"),
        pytest.param({"expires_at": None}, id="expires-at-null"),
        pytest.param({"shapes": [[math.inf]]}, id="shape-infinite"),
    ],
)
def test_kvref_wrong_types_are_kvref_errors(change):
    with pytest.raises(KVRefError):
        kvstore.KVRef.from_dict({**_valid_ref_dict(), **change})


# --------------------------------------------------------------------------- raw messages

Crashed = AssertionError


@pytest.fixture(scope="module")
def hostile_cluster(redis_server: RedisServer) -> Iterator[LocalCluster]:
    cluster = LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": HOSTILE_TOPIC})
    yield cluster
    cluster.close()


def _crashed(worker: WorkerProcess) -> bool:
    return not worker.alive() or "Unrecoverable error" in worker.log()


@pytest.fixture
def hostile_worker(hostile_cluster: LocalCluster, redis_server: RedisServer) -> Iterator[WorkerProcess]:
    """A live worker of topic ``hostile``; a new one if a bad message took the last one down."""
    worker = next((w for w in hostile_cluster.workers if not _crashed(w)), None)
    if worker is None:
        worker = hostile_cluster.add_worker(f"h{uuid.uuid4().hex[:6]}")
        hostile_cluster.wait_live([worker.node], topic=HOSTILE_TOPIC)
    yield worker
    if _crashed(worker):
        worker.stop(timeout_s=2)
        _purge(redis_server, worker.node)


def _node_queue(worker: WorkerProcess) -> str:
    return keys.node_queue(HOSTILE_TOPIC, "mixed", worker.node)


def _purge(redis_server: RedisServer, node: str) -> None:
    """Drop what a dead hostile worker leaves: its queue, and kombu's unacked copies of its
    messages (which kombu would put back, to kill the next worker)."""
    r = redis_server.client()
    prefix = f"fd.{HOSTILE_TOPIC}."
    for key in r.keys(f"{prefix}*"):
        r.delete(key)
    for tag, raw in r.hgetall("unacked").items():
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if isinstance(routing_key, str) and routing_key.startswith(prefix):
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)


@pytest.fixture(scope="module")
def hostile_client(redis_server: RedisServer, hostile_cluster: LocalCluster) -> fd_celery.Client:
    app = Celery("client-hostile", set_as_current=False)
    fd_celery.install(app, scheduler_port=redis_server.port, scheduler_topic=HOSTILE_TOPIC)
    return fd_celery.Client(app)


def envelope(
    template: dict[str, Any],
    queue: str,
    *,
    body: bytes | None = None,
    payload: Any = None,
    task: str = "fd.generate",
    content_type: str | None = None,
    kwargsrepr: str = "{}",
    drop: tuple[str, ...] = (),
    properties: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    """(task id, the bytes kombu's Redis transport LPUSHes for a message to ``queue``)."""
    env = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    env["headers"].update(id=task_id, root_id=task_id, task=task, kwargsrepr=kwargsrepr, argsrepr="()")
    env["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()), **(properties or {}))
    env["properties"]["delivery_info"]["routing_key"] = queue
    if payload is not None:
        body = json.dumps(payload).encode()
    if body is not None:
        env["body"] = base64.b64encode(body).decode()
    if content_type is not None:
        env["content-type"] = content_type
    for key in drop:
        env.pop(key, None)
    return task_id, json.dumps(env).encode()


def _pickle_body(marker: str) -> bytes:
    import pickle

    return pickle.dumps(((), {"prompt": marker, "max_tokens": 2}, {}), protocol=2)


def _not_base64(template: dict[str, Any], queue: str, marker: str) -> tuple[str, bytes]:
    task_id, item = envelope(template, queue)
    env = json.loads(item)
    env["body"] = "AAAAA"  # 5 base64 characters: no valid length
    return task_id, json.dumps(env).encode()


def _body(marker: str, **kwargs: Any) -> list[Any]:
    return [
        [],
        {"prompt": marker, "max_tokens": 2, **kwargs},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]


def _assert_serves(client: fd_celery.Client, worker: WorkerProcess, timeout_s: float = 30) -> None:
    """The worker serves a normal request after the bad ones (failing fast if it died)."""
    handle = client.submit("a good request after the bad ones", max_tokens=3, seed=1, node=worker.node)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _crashed(worker):
            raise Crashed(f"the worker died on a bad message: {_last_critical(worker)}")
        try:
            assert handle.result(timeout=0.5).token_ids
            return
        except fd_celery.ResultTimeout:
            continue
    raise AssertionError(f"the worker did not serve a good request within {timeout_s}s")


def _last_critical(worker: WorkerProcess) -> str:
    lines = [line for line in worker.log().splitlines() if "CRITICAL" in line]
    return lines[-1][:300] if lines else "(process exited)"


# What a raw message in a node's queue comes to, besides the worker serving the next request:
DEAD = "dead"  # refused unread: kept on the topic's dead-letter list, no result anywhere
INVALID = "invalid"  # refused and dead-lettered, and its result fails with InvalidRequest
CELERY = "celery"  # refused by Celery itself (unknown task, content type): a failed or no result
SERVED = "served"  # a well-formed message: the request is served or refused as a request


def _raw_cases() -> list[Any]:
    def case(name: str, build: Any, outcome: str) -> Any:
        return pytest.param(build, outcome, id=name)

    return [
        case("garbage-bytes", lambda t, q, m: (None, b"\x00\xff\xfe garbage " + m.encode()), DEAD),
        case("json-list", lambda t, q, m: (None, json.dumps([m, 1]).encode()), DEAD),
        case("json-string", lambda t, q, m: (None, json.dumps(m).encode()), DEAD),
        case("json-null", lambda t, q, m: (None, b"null"), DEAD),
        case("json-empty-object", lambda t, q, m: (None, b"{}"), DEAD),
        case(
            "envelope-body-not-json",
            lambda t, q, m: envelope(
                t, q, body=b"\x00 not json " + m.encode(), kwargsrepr=repr({"prompt": m})
            ),
            CELERY,
        ),
        case("envelope-body-not-base64", _not_base64, DEAD),
        case(
            "envelope-unknown-body-encoding",
            lambda t, q, m: envelope(t, q, payload=_body(m), properties={"body_encoding": "rot13"}),
            DEAD,
        ),
        case("envelope-body-not-a-3-list", lambda t, q, m: envelope(t, q, payload={"prompt": m}), INVALID),
        case("envelope-body-4-list", lambda t, q, m: envelope(t, q, payload=[*_body(m), 1]), INVALID),
        case("kwargs-not-a-mapping", lambda t, q, m: envelope(t, q, payload=[[], [m], {}]), INVALID),
        case("args-not-a-list", lambda t, q, m: envelope(t, q, payload=[m, {}, {}]), INVALID),
        case(
            "valid-envelope-bad-request",
            lambda t, q, m: envelope(
                t, q, payload=_body(m, max_tokens="lots"), kwargsrepr=repr({"prompt": m})
            ),
            SERVED,
        ),
        case(
            "unknown-task-fd.nope",
            lambda t, q, m: envelope(t, q, payload=_body(m), task="fd.nope", kwargsrepr=repr({"prompt": m})),
            CELERY,
        ),
        case(
            "unknown-task-os.system",
            lambda t, q, m: envelope(
                t, q, payload=[[f"echo {m}"], {}, {}], task="os.system", kwargsrepr="{}"
            ),
            CELERY,
        ),
        case(
            "pickle-content-type",
            lambda t, q, m: envelope(
                t, q, body=_pickle_body(m), content_type="application/x-python-serialize"
            ),
            CELERY,
        ),
        case(
            "envelope-without-headers",
            lambda t, q, m: envelope(t, q, payload=_body(m), drop=("headers",)),
            CELERY,
        ),
        case(
            "envelope-without-properties",
            lambda t, q, m: envelope(t, q, payload=_body(m), drop=("properties",)),
            DEAD,
        ),
    ]


@pytest.mark.parametrize(("build", "outcome"), _raw_cases())
def test_raw_message_in_node_queue(
    redis_server, hostile_worker, hostile_client, envelope_template, build, outcome
):
    """Each raw message leaves the worker serving, its prompt out of the log, and the outcome a
    user (or operator) can see: a dead letter naming the queue and why, a failed result, or both."""
    marker = _marker()
    queue = _node_queue(hostile_worker)
    r = redis_server.client()
    dead_key = keys.dead_letter_list(HOSTILE_TOPIC)
    dead_before = r.llen(dead_key)
    start = len(hostile_worker.log())
    task_id, item = build(envelope_template, queue, marker)
    r.lpush(queue, item)
    _assert_serves(hostile_client, hostile_worker)
    assert marker not in hostile_worker.log()[start:], "the bad message's prompt is in the worker's log"
    assert r.llen(queue) == 0, "the bad message is back in the queue"
    assert not any(marker.encode() in raw for raw in r.hvals("unacked")), (
        "kombu would restore the bad message"
    )
    added = r.llen(dead_key) - dead_before
    if outcome in (DEAD, INVALID):
        assert added == 1, f"expected one dead letter, got {added}"
        [entry] = deadletter.dead_letters(r, dead_key, 1)
        assert entry["queue"] == queue and entry["reason"]
        assert entry["reason"] in hostile_worker.log()[start:], "the refusal is not logged"
        original = item if outcome == DEAD else json.dumps(json.loads(item)).encode()
        assert entry["item"] == original, "the dead letter does not keep the message as it was"
    else:
        assert added == 0, f"{outcome} message was dead-lettered"
    if outcome == INVALID:
        with pytest.raises(InvalidRequest, match="malformed message"):
            hostile_client.app.AsyncResult(task_id).get(timeout=10)


def test_random_raw_items_are_dead_lettered(redis_server, hostile_worker, hostile_client):
    """Random bytes and random JSON (not envelopes), pushed in batches into a node's queue:
    every item lands on the dead-letter list exactly once, as it was, and the worker serves a
    normal request after each batch."""
    r = redis_server.client()
    queue = _node_queue(hostile_worker)
    dead_key = keys.dead_letter_list(HOSTILE_TOPIC)
    items = st.one_of(
        st.binary(min_size=0, max_size=64),
        JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.dictionaries(
            st.sampled_from(["body", "properties", "headers", "content-type"]), JSON_VALUES, max_size=4
        ).map(lambda v: json.dumps(v, allow_nan=True).encode()),
    )

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(items, min_size=1, max_size=8))
    def run(batch: list[bytes]) -> None:
        before = r.llen(dead_key)
        for item in batch:
            r.lpush(queue, item)
        _assert_serves(hostile_client, hostile_worker)
        assert r.llen(dead_key) - before == len(batch)
        kept = [entry["item"] for entry in deadletter.dead_letters(r, dead_key, len(batch))]
        assert sorted(kept) == sorted(batch)

    run()


def test_raw_kwarg_named_self_is_an_invalid_request(
    redis_server, hostile_worker, hostile_client, envelope_template
):
    """Regression: a field named 'self' used to collide with the bound task's own argument in
    Celery's call (a bare TypeError, and no end in the stream)."""
    task_id, item = envelope(envelope_template, _node_queue(hostile_worker), payload=_body("x", self=1))
    redis_server.client().lpush(_node_queue(hostile_worker), item)
    with pytest.raises(InvalidRequest):
        hostile_client.app.AsyncResult(task_id).get(timeout=30)


@pytest.fixture(scope="module")
def raw_marker() -> str:
    return _marker()


def test_raw_envelopes_with_random_kwargs(
    redis_server, hostile_worker, hostile_client, envelope_template, raw_marker
):
    """Well-framed messages with random request fields, pushed in batches straight into the
    node's queue: each is served or fails with InvalidRequest (nothing else), the worker serves a
    normal request after each batch, and no prompt reaches its log."""
    r = redis_server.client()
    queue = _node_queue(hostile_worker)
    app = hostile_client.app
    start = len(hostile_worker.log())
    tally: dict[str, int] = {}

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        batch=st.lists(
            st.tuples(
                request_kwargs(raw_marker, hostile_worker.node).map(_jsonable),
                st.sampled_from([[], [], [], [1], ["x", 2]]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    def run(batch: list[tuple[dict[str, Any], list[Any]]]) -> None:
        ids = []
        for kwargs, args in batch:
            task_id, item = envelope(envelope_template, queue, payload=[args, kwargs, {}], kwargsrepr="{...}")
            r.lpush(queue, item)
            ids.append((task_id, args))
        for task_id, args in ids:
            outcome = _raw_outcome(app, task_id, hostile_worker)
            if outcome == "served":
                assert not args, "positional arguments must be refused"
            tally[outcome] = tally.get(outcome, 0) + 1
        _assert_serves(hostile_client, hostile_worker)

    run()
    print(f"\n[hostile] raw envelopes: {sum(tally.values())} messages tried: {tally}")
    assert raw_marker not in hostile_worker.log()[start:]


def _raw_outcome(app: Celery, task_id: str, worker: WorkerProcess, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = app.backend.get_task_meta(task_id)
        status = meta.get("status")
        if status == states.SUCCESS:
            result = meta["result"]
            # served: tokens, or none when the very first one sampled was the end of text
            assert result["token_ids"] or result["finish_reason"] == "stop", result
            return "served"
        if status == states.FAILURE:
            result = meta.get("result")
            kind = type(result).__name__ if isinstance(result, BaseException) else str(result)
            assert isinstance(result, InvalidRequest), f"message {task_id} failed with {kind}: {result}"
            return "refused"
        if _crashed(worker):
            raise Crashed(f"the worker died on message {task_id}: {_last_critical(worker)}")
        time.sleep(0.02)
    raise AssertionError(f"message {task_id} got no result within {timeout_s}s")
