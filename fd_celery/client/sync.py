"""The client: submit requests, stream their output, get their results.

A request's output stream is the one channel a handle follows: chunks in order, then an end
entry holding the final result or the error. The Celery result backend is consulted only for what
never reaches the stream (a failure outside fd_celery's code, a stream already expired), and the
client's own clock turns a request that no node started within its TTL into ``RequestExpired``.
Client apps need no torch.

A client's reader threads live until :meth:`Client.close` (or the end of its ``with`` block).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn

import kombu.exceptions
import redis
from celery import Celery, states
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from fd_celery.connection import BLOCK_MS, redis_errors, redis_for
from fd_celery.errors import (
    BrokerUnavailable,
    ClientClosed,
    FDCeleryError,
    InvalidRequest,
    RequestExpired,
    ResultTimeout,
    WorkerError,
    error_from_dict,
)
from fd_celery.keys import check_request_id, output_stream
from fd_celery.protocol import RESULT_DEFERRED, RESULT_HEADER, SAMPLING_FIELDS, GenerationResult, OutputChunk
from fd_celery.settings import get_config
from fd_celery.streams import StreamReaders, last_entry
from fd_celery.streams.cancel import cancel_stream

__all__ = ["Client", "RequestHandle"]

# Keywords of Client.submit after the prompt, named in the error for an unknown one.
SUBMIT_KEYWORDS = (
    "token_ids",
    "max_tokens",
    "temperature",
    "seed",
    "request_id",
    "node",
    "priority",
    *SAMPLING_FIELDS,
)

# A request still PENDING this long after its deadline was never started by any node.
EXPIRY_GRACE_S = 2.0


logger = logging.getLogger(__name__)


class Client:
    """Submits generation requests to an fd_celery cluster through a Celery app.

    Close it when done (``close()``, or ``with Client(app) as client:``): that stops the threads
    that follow its requests' output streams. The app and its connections stay the caller's.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.config = get_config(app)
        # Splitwise requests start with prefill; the output stream carries both halves.
        self._task_name = "fd.prefill" if self.config.scheduler_name == "splitwise" else "fd.generate"
        self._readers: StreamReaders | None = None
        self._readers_lock = threading.Lock()
        self._closed = False
        self._redis = redis_for(self.config)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop following output streams: reader threads end within about one blocking read
        (``BLOCK_MS``), and a handle still waiting raises ``ClientClosed``. Calling it again does
        nothing; a submit afterwards raises ``ClientClosed``."""
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, None
        if readers is not None:  # (a waiting handle sees the flag when its wait ends, and leaves)
            readers.close()

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise ClientClosed(f"this Client is closed (close() was called): it cannot {doing}")

    @property
    def readers(self) -> StreamReaders:
        """The reader threads that follow this client's output streams (started on first use)."""
        with self._readers_lock:
            self._check_open("follow output streams")
            if self._readers is None:
                config = self.config
                self._readers = StreamReaders(
                    redis_for(config),
                    config.scheduler_reader_parallel,
                    config.scheduler_reader_batch_size,
                    config.scheduler_topic,
                    BLOCK_MS,
                )
            return self._readers

    def submit(
        self,
        prompt: str | None = None,
        *,
        token_ids: list[int] | None = None,
        max_tokens: int | None = None,  # required: None is an InvalidRequest, as is a typo of it
        temperature: float = 0.0,
        seed: int | None = None,
        request_id: str | None = None,
        node: str | None = None,
        priority: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        ignore_eos: bool | None = None,
        stop_token_ids: list[int] | None = None,
        **unknown: NoReturn,
    ) -> RequestHandle:
        """Send one request; returns at once with its handle.

        Raises ``InvalidRequest`` for a malformed request, ``QueueFull`` when the local queue is at
        ``scheduler_max_size``, ``NoNodeAvailable`` for a ``node`` that is not live, and
        ``BrokerUnavailable`` when Redis cannot be reached, ``ClientClosed`` after :meth:`close`.
        ``max_tokens`` is required. A keyword it does not know is an ``InvalidRequest`` naming it
        (and a type checker's error).
        """
        self._check_open("submit requests")
        if unknown:
            raise InvalidRequest(
                f"Client.submit() got unknown keyword(s) {sorted(unknown)}; allowed: "
                f"prompt, {', '.join(SUBMIT_KEYWORDS)}"
            )
        fields = {
            "prompt": prompt,
            "token_ids": token_ids,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "node": node,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "repetition_penalty": repetition_penalty,
            "min_tokens": min_tokens,
            "ignore_eos": ignore_eos,
            "stop_token_ids": stop_token_ids,
        }
        kwargs = {k: v for k, v in fields.items() if v is not None}
        request_id = check_request_id(request_id) if request_id is not None else str(uuid.uuid4())
        if priority is not None and (
            isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
        ):
            raise InvalidRequest(f"priority={priority!r} is invalid; allowed: an integer from 0 to 9")
        submitted = time.time()
        try:
            with redis_errors(self.config):
                # One round trip that fails fast and names the host (unreachable, wrong password)
                # before Celery's result consumer would retry for 20 s and raise a bare RuntimeError.
                self._redis.ping()
                # ignore_result: no subscription to Celery's result channel (this handle reads the
                # output stream), and the worker stores the SUCCESS record off the request's path.
                self.app.send_task(
                    self._task_name,
                    kwargs=kwargs,
                    task_id=request_id,
                    priority=priority,
                    ignore_result=True,
                    headers={RESULT_HEADER: RESULT_DEFERRED},
                )
                async_result = self.app.AsyncResult(request_id)
        except kombu.exceptions.OperationalError as exc:
            raise BrokerUnavailable(
                f"could not publish to the broker at {self.config.redacted_url()}: {exc}"
            ) from None
        return RequestHandle(self, async_result, deadline=submitted + self.config.ttl_s)


class RequestHandle:
    """One submitted request. ``stream()`` yields its output; ``result()`` waits for the end."""

    def __init__(self, client: Client, async_result: AsyncResult, deadline: float) -> None:
        self._client = client
        self._async = async_result
        self._deadline = deadline
        self._final: dict[str, Any] | None = None
        self._redis = client._redis
        self._key = output_stream(client.config.scheduler_topic, async_result.id)

    @property
    def request_id(self) -> str:
        return str(self._async.id)

    id = request_id

    @property
    def async_result(self) -> AsyncResult:
        """The Celery result, for code that wants Celery's own API."""
        return self._async

    def stream(self, timeout: float | None = None) -> Iterator[OutputChunk]:
        """Output chunks in order, as the worker produces them; ends when the request ends.

        Raises the request's error (``RequestExpired``, ``InvalidRequest``, ...) at the point it
        happened, and ``ResultTimeout`` when ``timeout`` seconds pass without the end.
        """
        yield from self._follow(timeout, chunks=True)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end and return the final result (or raise the request's error)."""
        if self._final is None:
            for _ in self._follow(timeout, chunks=False):
                pass
        assert self._final is not None
        return GenerationResult.from_dict(self._final)

    def cancel(self) -> bool:
        """Stop the request wherever it is: queued, prefilling, handed off or decoding. Its
        stream ends with ``finish_reason "cancelled"`` (and the tokens streamed so far), every
        node working on it stops at its next step and frees the request's KV, and a request
        still queued never starts. True if this call cancelled it, False if it had ended."""
        config = self._client.config
        self._client._check_open(f"cancel request {self.request_id}")
        with redis_errors(config):
            ours, _ = cancel_stream(self._redis, config.scheduler_topic, self.request_id)
        if ours:  # a worker that has not taken it yet drops it on receipt
            try:
                self._client.app.control.revoke(self.request_id)
            except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
                logger.warning("request %s: cancelled, but the revoke was not sent: %s", self.request_id, exc)
        return ours

    def _follow(self, timeout: float | None, chunks: bool) -> Iterator[OutputChunk]:
        config = self._client.config
        self._client._check_open(f"follow request {self.request_id}")
        give_up_at = None if timeout is None else time.monotonic() + timeout
        after = -1
        if not chunks:  # only the end matters: start from the stream's last entry
            with redis_errors(config):
                last = last_entry(self._redis, self._key)
            if last is not None:
                if last.end:
                    self._finish(last.data)
                    return
                after = last.seq
        readers = self._client.readers
        with redis_errors(config):
            entries_queue = readers.subscribe(self._key, after)
        try:
            while True:
                wait_s = BLOCK_MS / 1000
                if give_up_at is not None:
                    wait_s = max(0.001, min(wait_s, give_up_at - time.monotonic()))
                try:
                    entries = entries_queue.get(timeout=wait_s)
                except queue.Empty:
                    entries = []
                # Before what the queue holds: closed readers may wake their followers with anything.
                self._client._check_open(f"follow request {self.request_id}")
                if isinstance(entries, BaseException):
                    raise BrokerUnavailable(
                        f"Redis at {config.redacted_url()} is unreachable: {entries}"
                    ) from None
                for entry in entries:
                    if entry.end:
                        self._finish(entry.data)
                        return
                    if chunks:
                        yield OutputChunk.from_dict(entry.data)
                if not entries:
                    if self._ended_outside_stream():
                        return
                    if give_up_at is not None and time.monotonic() >= give_up_at:
                        raise ResultTimeout(
                            f"request {self.request_id} did not end within {timeout}s; it may still finish"
                        )
        finally:
            readers.unsubscribe(self._key)

    def _finish(self, end: dict[str, Any]) -> None:
        if "result" in end:
            self._final = dict(end["result"])
            return
        raise error_from_dict(end.get("error"))

    def _ended_outside_stream(self) -> bool:
        """Look past the stream: the backend's state, and the TTL by the caller's clock."""
        try:
            state = self._async.state
        except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
            raise BrokerUnavailable(f"result backend unreachable: {exc}") from None
        if state == states.SUCCESS:
            with redis_errors(self._client.config):
                stream_gone = not self._redis.exists(self._key)
            if stream_gone:  # retention ran out; the backend keeps results longer
                self._final = dict(self._async.result)
                return True
            return False
        if state in states.PROPAGATE_STATES:
            raise _as_fd_error(self._async.result, self.request_id)
        if state == states.PENDING and time.time() > self._deadline + EXPIRY_GRACE_S:
            raise RequestExpired(
                f"request {self.request_id} was not started by any node within its TTL of "
                f"{self._client.config.ttl_s:g}s (scheduler_ttl)"
            )
        return False


def _as_fd_error(exc: object, request_id: str) -> FDCeleryError:
    """A failure stored by Celery, as one of ours."""
    if isinstance(exc, FDCeleryError):
        return exc
    if isinstance(exc, TaskRevokedError):
        if "expired" in str(exc):
            return RequestExpired(f"request {request_id} expired before it started (scheduler_ttl)")
        return WorkerError(f"request {request_id} was revoked: {exc}")
    return WorkerError(f"request {request_id} failed on the worker: {type(exc).__name__}: {exc}")
