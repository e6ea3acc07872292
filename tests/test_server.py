"""The OpenAI-compatible server, as its users meet it: the real ``openai`` package (and plain
HTTP) against a real ``fd-celery serve`` process, real workers and a real Redis.

Servers on a topic no node serves check what needs no worker (validation, keys, limits, 503);
the session's worker checks that answers are the tokens ``Client.submit`` gives; a slow
``bench-sleep`` node of its own topic makes a queue for 429, 504 and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import fd_celery
from fd_celery import keys
from fd_celery.local_cluster import LocalCluster, RedisServer, free_port
from fd_celery.server.chat import plain_template
from tests.conftest import TOPIC, run_topic, wait_until

SERVER_START_S = 60
API_KEY = "sk-test-" + "k" * 24
SLOW_MS_PER_TOKEN = 20


class ServerProcess:
    """``fd-celery serve`` in a subprocess on a free port."""

    def __init__(self, redis_server: RedisServer, topic: str, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tempfile.mkstemp(prefix="fd-server-", suffix=".log")[1]
        full_env = {
            **os.environ,
            "FD_SCHEDULER_HOST": "127.0.0.1",
            "FD_SCHEDULER_PORT": str(redis_server.port),
            "FD_SCHEDULER_TOPIC": topic,
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        if redis_server.password:
            full_env["FD_SCHEDULER_PASSWORD"] = redis_server.password
        command = [sys.executable, "-c", "from fd_celery.server.cli import serve; serve()"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), "--log-level", "warning", *args],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._answers, SERVER_START_S, f"the server on port {self.port} to answer")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited at start:\n{self.log()[-3000:]}")
        try:
            httpx.get(self.url + "/health", timeout=2)
            return True
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def openai(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kwargs)

    def metric(self, name: str, **headers: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
        return sum(values)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


@contextlib.contextmanager
def serving(redis_server: RedisServer, topic: str, *args: str, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(redis_server, topic, *args, **env)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- no worker needed


@pytest.fixture(scope="module")
def offline(redis_server: RedisServer) -> Iterator[ServerProcess]:
    """A server on a topic no node serves, with a small body limit."""
    with serving(redis_server, run_topic("srv-offline"), "--max-body-bytes", "4096") as server:
        yield server


def test_no_live_node_is_503_and_health_says_so(offline):
    health = httpx.get(offline.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert offline.openai().models.list().data == []
    with pytest.raises(openai.InternalServerError) as info:
        offline.openai().completions.create(model="fd-tiny", prompt="hi", max_tokens=4)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_node_available" and "fd-tiny" in info.value.body["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"top_p": 1.5}, "top_p"),
        ("/v1/completions", {"top_k": "forty"}, "top_k"),
        ("/v1/completions", {"presence_penalty": 9}, "presence_penalty"),
        ("/v1/completions", {"seed": -1}, "seed"),
        ("/v1/completions", {"stop": ["\n"]}, "stop"),
        ("/v1/completions", {"logprobs": 2}, "logprobs"),
        ("/v1/completions", {"logit_bias": {"65": 10}}, "logit_bias"),
        ("/v1/completions", {"n": 2}, "n"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ("/v1/chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {"model": None}, "model"),
    ],
)
def test_a_bad_or_unsupported_field_is_400_naming_it(offline, path, body, param):
    base: dict[str, Any] = {"model": "fd-tiny", "max_tokens": 4}
    base.update(
        {"prompt": "hello"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    if path == "/v1/chat/completions" and "max_completion_tokens" in body:
        base.pop("max_tokens")
    response = offline.post(path, {**base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(offline):
    """SDKs send top_p=1, n=1, penalties 0 explicitly: those change nothing and pass the checks
    (here the request then finds no node: 503, not 400)."""
    body = {
        "model": "fd-tiny",
        "prompt": "hello",
        "max_tokens": 4,
        "top_p": 1,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "stop": None,
        "logprobs": None,
        "user": "someone",
    }
    assert offline.post("/v1/completions", body).status_code == 503


def test_the_openai_client_sees_a_bad_request_error(offline):
    with pytest.raises(openai.BadRequestError, match=r"stop=\['x'\] is not supported by this cluster yet"):
        offline.openai().completions.create(model="fd-tiny", prompt="hi", max_tokens=4, stop=["x"])


def test_a_body_over_the_limit_is_413_and_bad_json_400(offline):
    big = offline.post("/v1/completions", {"model": "fd-tiny", "prompt": "x" * 5000, "max_tokens": 4})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    bad = httpx.post(offline.url + "/v1/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(offline.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_api_keys_from_the_environment_and_a_file(redis_server):
    other = "sk-file-" + "f" * 24
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(f"# keys of the test\n{other}\n")
    topic = run_topic("srv-keys")
    try:
        with serving(redis_server, topic, "--api-key-file", f.name, FD_API_KEYS=API_KEY) as server:
            for key in (API_KEY, other):
                assert server.openai(api_key=key).models.list().data == []
            for wrong in ("sk-wrong-" + "w" * 24, API_KEY[:-1]):
                with pytest.raises(openai.AuthenticationError):
                    server.openai(api_key=wrong).models.list()
            no_key = httpx.get(server.url + "/v1/models", timeout=10)
            assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
            assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
            assert httpx.get(server.url + "/health", timeout=10).status_code == 503  # open, no node
    finally:
        os.unlink(f.name)


# --------------------------------------------------------------------------- the session's worker


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, cluster: LocalCluster) -> Iterator[ServerProcess]:
    with serving(redis_server, TOPIC, FD_API_KEYS=API_KEY) as server:
        wait_until(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 200, 30, "health 200")
        yield server


@pytest.fixture
def api(server: ServerProcess) -> openai.OpenAI:
    return server.openai(api_key=API_KEY)


def test_models_and_health_list_the_live_nodes(server, api):
    assert [m.id for m in api.models.list().data] == ["fd-tiny"]
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_completions_give_client_submit_tokens_streamed_or_not(server, api, app):
    prompt, seed = "Once upon a time", 7
    with fd_celery.Client(app) as client:
        direct = client.submit(prompt, max_tokens=12, temperature=0.8, seed=seed).result(timeout=60)
    plain = api.completions.create(model="fd-tiny", prompt=prompt, max_tokens=12, temperature=0.8, seed=seed)
    assert plain.choices[0].text == direct.text
    assert plain.choices[0].finish_reason == direct.finish_reason
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == len(prompt.encode()) + 1 == direct.prompt_tokens  # BOS + bytes
    assert plain.usage.completion_tokens == len(direct.token_ids)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = api.completions.create(
        model="fd-tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == direct.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == direct.finish_reason
    assert events[-1].choices == [] and events[-1].usage == plain.usage

    # A prompt of token ids is the same request: BOS and the bytes of the text
    ids = api.completions.create(
        model="fd-tiny", prompt=[256, *prompt.encode()], max_tokens=12, temperature=0.8, seed=seed
    )
    assert ids.choices[0].text == direct.text


def test_sampling_fields_reach_the_engine_as_client_submit_keywords(server, api, app):
    sampling = {"top_p": 0.9, "top_k": 20, "presence_penalty": 0.5, "repetition_penalty": 1.2}
    with fd_celery.Client(app) as client:
        handle = client.submit("Sampling", max_tokens=12, temperature=0.9, seed=5, **sampling)
        direct = handle.result(timeout=60)
    answer = api.completions.create(
        model="fd-tiny",
        prompt="Sampling",
        max_tokens=12,
        temperature=0.9,
        seed=5,
        top_p=0.9,
        presence_penalty=0.5,
        extra_body={"top_k": 20, "repetition_penalty": 1.2},
    )
    assert answer.choices[0].text == direct.text


def test_chat_uses_the_plain_template_and_gives_client_submit_tokens(server, api, app):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = plain_template(messages)
    assert prompt == "system: Be brief.\nuser: Hello there\nassistant:"
    with fd_celery.Client(app) as client:
        direct = client.submit(prompt, max_tokens=10, temperature=0.5, seed=3).result(timeout=60)
    answer = api.chat.completions.create(
        model="fd-tiny", messages=messages, max_completion_tokens=10, temperature=0.5, seed=3
    )
    assert answer.choices[0].message.content == direct.text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.prompt_tokens == direct.prompt_tokens
    assert answer.usage.completion_tokens == len(direct.token_ids)
    events = list(
        api.chat.completions.create(
            model="fd-tiny", messages=messages, max_tokens=10, temperature=0.5, seed=3, stream=True
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == direct.text
    assert events[-1].choices[0].finish_reason == direct.finish_reason


def test_a_request_the_worker_refuses_is_400_streamed_or_not(server, api):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="context"):
            result = api.completions.create(model="fd-tiny", prompt="hi", max_tokens=30000, stream=stream)
            list(result) if stream else None  # type: ignore[call-overload]


def test_one_server_process_holds_many_concurrent_streams(server):
    """A few hundred streams open at once through one server process, which keeps a handful of
    threads (asyncio readers, no thread per request). The worker serves them one at a time, so
    most wait in the queue with their stream open."""
    concurrent = 200
    pid = server.process.pid
    threads_seen: list[int] = []

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": "fd-tiny", "prompt": f"req {i}", "max_tokens": 2, "seed": i, "stream": True}
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise AssertionError(f"{response.status_code}: {(await response.aread()).decode()}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def watch_threads(stop: asyncio.Event) -> None:
        while not stop.is_set():
            with open(f"/proc/{pid}/status") as f:
                threads_seen.append(int(next(ln for ln in f if ln.startswith("Threads:")).split()[1]))
            await asyncio.sleep(0.1)

    async def run() -> tuple[list[str], float]:
        limits = httpx.Limits(max_connections=concurrent + 10)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(
            base_url=server.url, limits=limits, timeout=300, headers=headers
        ) as http:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_threads(stop))
            started = time.monotonic()
            texts = await asyncio.gather(*(one(http, i) for i in range(concurrent)))
            elapsed = time.monotonic() - started
            stop.set()
            await watcher
        return texts, elapsed

    texts, elapsed = asyncio.run(run())
    peak = server.metric("fd_server_requests_in_flight_peak", Authorization=f"Bearer {API_KEY}")
    print(
        f"\n{concurrent} concurrent streams: {elapsed:.1f}s, server peak in flight {peak:g}, "
        f"server threads max {max(threads_seen)}"
    )
    assert all(len(t) >= 1 for t in texts)
    assert peak >= concurrent * 0.9
    assert max(threads_seen) < 40


# --------------------------------------------------------------------------- a queue to wait in


@pytest.fixture(scope="module")
def slow_topic(redis_server: RedisServer, cluster: LocalCluster) -> Iterator[str]:
    """A topic of its own with one slow node (bench-sleep: SLOW_MS_PER_TOKEN per token) that
    runs one request at a time, so the next ones wait in the queue."""
    topic = run_topic("srv-slow")
    env = {
        "FD_SCHEDULER_TOPIC": topic,
        "FD_MODEL": f"bench-sleep:{SLOW_MS_PER_TOKEN}",
        "FD_MAX_NUM_SEQS": "1",
    }
    worker = cluster.add_worker("srvslow", env=env)
    cluster.wait_live([worker.node], topic=topic)
    with cluster.client(topic) as client:  # its first request loads the engine: not under a TTL of 2 s
        client.submit("warm up", max_tokens=1).result(timeout=120)
    yield topic
    worker.stop()


def _stream_in_background(server: ServerProcess, body: dict[str, Any]) -> threading.Event:
    """Start a streamed request in a thread; returns once its first chunk has arrived (it runs)."""
    first, failed = threading.Event(), []

    def run() -> None:
        try:
            for _ in server.openai().completions.create(**body, stream=True):
                first.set()
        except Exception as exc:  # noqa: BLE001 - what the caller saw, for the test to check
            failed.append(exc)
            first.set()

    threading.Thread(target=run, daemon=True).start()
    assert first.wait(60) and not failed, failed
    return first


def test_a_full_queue_is_429_with_retry_after_and_an_expired_request_504(redis_server, slow_topic):
    """scheduler_max_size=1: one request runs, one waits, the next is refused. The waiting one
    outlives its scheduler_ttl behind the running one: 504."""
    model = f"bench-sleep:{SLOW_MS_PER_TOKEN}"
    with serving(redis_server, slow_topic, "--scheduler-max-size", "1", "--scheduler-ttl", "2") as server:
        _stream_in_background(server, {"model": model, "prompt": "long", "max_tokens": 250})
        waiting: list[Any] = []
        waiter = threading.Thread(
            target=lambda: waiting.append(
                _outcome(lambda: server.openai().completions.create(model=model, prompt="w", max_tokens=2))
            ),
            daemon=True,
        )
        waiter.start()
        pending = redis_server.client()
        wait_until(lambda: pending.zcard(keys.pending_set(slow_topic)) == 1, 30, "the second request to wait")
        refused = server.post("/v1/completions", {"model": model, "prompt": "third", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            server.openai().completions.create(model=model, prompt="fourth", max_tokens=2)
        waiter.join(60)
        assert isinstance(waiting[0], openai.APIStatusError), waiting
        assert waiting[0].status_code == 504 and waiting[0].body["code"] == "request_expired"


def _outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
        return exc


def _stream_end(redis_server: RedisServer, topic: str, request_id: str) -> dict[str, Any] | None:
    from fd_celery.streams import last_entry

    entry = last_entry(redis_server.client(), keys.output_stream(topic, request_id))
    return entry.data["result"] if entry is not None and entry.end else None


def test_a_client_that_leaves_mid_stream_cancels_its_request(redis_server, slow_topic):
    """The node stops within a step: the stream ends "cancelled" with what was streamed, long
    before the 1000 tokens it asked for, and the node takes the next request at once."""
    model = f"bench-sleep:{SLOW_MS_PER_TOKEN}"
    with serving(redis_server, slow_topic) as server:
        body = {"model": model, "prompt": "leaving", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            wait_until(lambda: next(lines).startswith("data: {"), 30, "a token")
        left_at = time.monotonic()
        end = wait_until(lambda: _stream_end(redis_server, slow_topic, request_id), 10, "the stream's end")
        assert end["finish_reason"] == "cancelled" and 1 <= len(end["token_ids"]) < 1000
        after = server.openai().completions.create(model=model, prompt="after", max_tokens=2)
        assert after.choices[0].text
        # 1000 tokens would take 20 s; the node was free again within a few steps
        assert time.monotonic() - left_at < 10
        assert server.metric("fd_server_cancelled_total") == 1


def test_a_client_that_leaves_before_its_request_starts_cancels_it(redis_server, slow_topic):
    """A request still queued when its client leaves never runs: its stream ends "cancelled"
    with no token, and the node goes from the running request to the one after."""
    model = f"bench-sleep:{SLOW_MS_PER_TOKEN}"
    with serving(redis_server, slow_topic) as server:
        _stream_in_background(server, {"model": model, "prompt": "long", "max_tokens": 60})

        def streams() -> set[str]:
            return {k.decode() for k in redis_server.client().keys(f"fd:{slow_topic}:out:*")}

        before = streams()  # (the running request's, and those of earlier tests)

        async def leave() -> None:
            body = {"model": model, "prompt": "leaving", "max_tokens": 5, "stream": True}
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                request = http.build_request("POST", "/v1/completions", json=body)
                response_task = asyncio.create_task(http.send(request, stream=True))
                # The server answers a stream's headers at its first token: leave before that.
                await asyncio.sleep(0.5)
                assert not response_task.done()
                response_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await response_task

        asyncio.run(leave())
        wait_until(lambda: server.metric("fd_server_cancelled_total") == 1, 10, "the server to cancel")
        after = server.openai().completions.create(model=model, prompt="after", max_tokens=2)
        assert after.choices[0].text
        new = streams() - before - {keys.output_stream(slow_topic, after.id.removeprefix("cmpl-"))}
        assert len(new) == 1, new
        left_id = new.pop().rsplit(":", 1)[1]
        end = _stream_end(redis_server, slow_topic, left_id)
        assert end is not None and end["finish_reason"] == "cancelled" and end["token_ids"] == []


# --------------------------------------------------------------------------- failures


def test_a_bad_setting_stops_serve_with_its_name(redis_server):
    command = [sys.executable, "-c", "from fd_celery.server.cli import serve; serve()"]
    out = subprocess.run(
        [*command, "--scheduler-ttl", "soon", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FD_SCHEDULER_PORT": str(redis_server.port)},
    )
    assert out.returncode != 0 and "scheduler_ttl" in out.stderr and "soon" in out.stderr


def test_redis_lost_mid_stream_ends_the_stream_with_an_error_event():
    """Headers and tokens are out when Redis goes away: the stream ends with an error event and
    [DONE] (the openai client raises), it does not hang."""
    redis_server = RedisServer().start()
    topic = run_topic("srv-lost")
    model = f"bench-sleep:{SLOW_MS_PER_TOKEN}"
    try:
        with LocalCluster(redis_server, env={"FD_SCHEDULER_TOPIC": topic, "FD_MODEL": model}) as cluster:
            worker = cluster.add_worker("srvlost")
            cluster.wait_live([worker.node], topic=topic)
            with serving(redis_server, topic) as server:
                stream = server.openai(timeout=60).completions.create(
                    model=model, prompt="a long one", max_tokens=1000, stream=True
                )
                texts = []
                started = time.monotonic()
                with pytest.raises(openai.APIError, match="unreachable") as info:
                    for event in stream:
                        texts.append(event.choices[0].text)
                        if len(texts) == 3:
                            redis_server.stop()
                assert len(texts) >= 3 and time.monotonic() - started < 30
                assert info.value.body is not None and info.value.body["code"] == "broker_unavailable"
    finally:
        redis_server.stop()


def test_a_hugging_face_model_gets_its_own_chat_template(tmp_path):
    """A model directory's tokenizer template, as token ids (no second BOS from the worker);
    one without a template is a 400 that says to use /v1/completions."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from fd_celery.server.chat import render_chat
    from fd_celery.server.schema import ApiError

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello there", "general kenobi"] * 5, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    messages = [{"role": "user", "content": "hello there"}]
    plain = tmp_path / "plain"
    fast.save_pretrained(plain)
    with pytest.raises(ApiError, match="no chat template") as info:
        render_chat(str(plain), messages)
    assert info.value.status == 400
    fast.chat_template = "{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    templated = tmp_path / "templated"
    fast.save_pretrained(templated)
    text, ids = render_chat(str(templated), messages)
    assert text is None and ids is not None
    assert fast.decode(ids) == "<s>[user] hello there\n[assistant] "
