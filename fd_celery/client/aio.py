"""The asyncio twin of :class:`~fd_celery.client.Client`, for apps that are asynchronous.

Submission is the one path every caller takes (``Client.submit``: the router checks, admits,
stamps the TTL and places the request), run on a small pool of threads because Celery's publish
is blocking; it takes a millisecond or two. Following output is where the time goes, and that is
asynchronous: ``scheduler_reader_parallel`` asyncio tasks each follow their share of the open
streams with one ``XREAD BLOCK`` (``redis.asyncio``), so a thousand open requests cost a few
connections and no thread each.

::

    async with AsyncClient(app) as client:
        handle = await client.submit("Once upon a time", max_tokens=32, seed=1)
        async for chunk in handle.stream():
            print(chunk.text, end="")
        result = await handle.result()
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery, states

from fd_celery import keys
from fd_celery.client.sync import EXPIRY_GRACE_S, Client, RequestHandle, _as_fd_error
from fd_celery.connection import BLOCK_MS, CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, redis_errors
from fd_celery.errors import (
    BrokerUnavailable,
    ClientClosed,
    RequestExpired,
    ResultTimeout,
    error_from_dict,
)
from fd_celery.protocol import GenerationResult, OutputChunk
from fd_celery.streams.entries import StreamEntry, decode_entry

__all__ = ["AsyncClient", "AsyncRequestHandle", "SUBMIT_THREADS"]

SUBMIT_THREADS = 8  # threads that publish requests (each publish blocks for a millisecond or two)
WAKE_KEY_TTL_S = 3600  # a client's wake-up streams vanish this long after its last use
READ_RETRY_S = 0.2  # after a failed read, the reader waits this long before the next
CLOSE_TIMEOUT_S = 5.0  # aclose() waits this long for its reader tasks to end
MAX_CONNECTIONS = 32  # Redis connections of one client's asyncio side (blocking reads included)


class AsyncClient:
    """Submits requests like :class:`~fd_celery.client.Client` and follows them with asyncio.

    Create it inside a running event loop's program (its Redis connections belong to the loop
    that first uses them) and close it with ``await client.aclose()`` or ``async with``.
    """

    def __init__(self, app: Celery, *, submit_threads: int = SUBMIT_THREADS) -> None:
        self.app = app
        self._sync = Client(app)  # its submit() is the one submission path; it follows nothing here
        self.config = self._sync.config
        self._redis = _async_redis(self.config.redis_url)
        self._backend_redis = self._backend_client(app)
        self._executor = ThreadPoolExecutor(submit_threads, thread_name_prefix="fd-submit")
        self._readers: _AsyncReaders | None = None
        self._closed = False

    def _backend_client(self, app: Celery) -> aioredis.Redis | None:
        """A client for the result backend's Redis when it is one we can read directly;
        otherwise (another backend) its state is read through Celery, on a thread."""
        url = str(app.conf.result_backend or "")
        if url == self.config.redis_url:
            return self._redis
        if url.startswith("redis://"):
            return _async_redis(url)
        return None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Stop following streams (a waiting handle raises ``ClientClosed``) and close the
        connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        readers, self._readers = self._readers, None
        if readers is not None:
            await readers.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sync.close()
        if self._backend_redis is not None and self._backend_redis is not self._redis:
            await self._backend_redis.aclose()
        await self._redis.aclose()

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise ClientClosed(f"this AsyncClient is closed (aclose() was called): it cannot {doing}")

    @property
    def readers(self) -> _AsyncReaders:
        self._check_open("follow output streams")
        if self._readers is None:
            self._readers = _AsyncReaders(
                self._redis,
                self.config.scheduler_reader_parallel,
                self.config.scheduler_reader_batch_size,
                self.config.scheduler_topic,
            )
        return self._readers

    async def submit(
        self,
        prompt: str | None = None,
        *,
        max_tokens: int | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> AsyncRequestHandle:
        """Send one request: ``Client.submit``'s arguments (``token_ids``, ``temperature``,
        ``seed``, ``top_p`` ...) and errors; returns its handle."""
        self._check_open("submit requests")
        request_id = request_id if request_id is not None else str(uuid.uuid4())
        call = functools.partial(
            self._sync.submit, prompt, max_tokens=max_tokens, request_id=request_id, **options
        )
        submitted = time.time()
        handle = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        return AsyncRequestHandle(self, handle, deadline=submitted + self.config.ttl_s)


class AsyncRequestHandle:
    """One submitted request: ``stream()`` yields its output, ``result()`` waits for the end."""

    def __init__(self, client: AsyncClient, handle: RequestHandle, deadline: float) -> None:
        self._client = client
        self._sync = handle
        self.request_id = request_id = handle.request_id
        self._deadline = deadline
        self._final: dict[str, Any] | None = None
        self._key = keys.output_stream(client.config.scheduler_topic, request_id)

    @property
    def id(self) -> str:
        return self.request_id

    async def stream(self, timeout: float | None = None) -> AsyncIterator[OutputChunk]:
        """Output chunks in order; raises the request's error where it happened, and
        ``ResultTimeout`` when ``timeout`` seconds pass without the end."""
        async for chunk in self._follow(timeout, chunks=True):
            yield chunk

    async def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end and return the final result (or raise the request's error)."""
        if self._final is None:
            async for _ in self._follow(timeout, chunks=False):
                pass
        assert self._final is not None
        return GenerationResult.from_dict(self._final)

    async def cancel(self) -> bool:
        """``RequestHandle.cancel``: stop the request wherever it is (queued, or running: its
        node stops within a step and frees its KV); its stream ends as ``cancelled``. True if
        this call cancelled it, False if it had already ended."""
        self._client._check_open(f"cancel request {self.request_id}")
        loop = asyncio.get_running_loop()
        return bool(await loop.run_in_executor(self._client._executor, self._sync.cancel))

    async def _follow(self, timeout: float | None, chunks: bool) -> AsyncIterator[OutputChunk]:
        client = self._client
        config = client.config
        doing = f"follow request {self.request_id}"
        client._check_open(doing)
        give_up_at = None if timeout is None else time.monotonic() + timeout
        readers = client.readers
        with redis_errors(config):
            entries_queue = await readers.subscribe(self._key, -1)
        try:
            while True:
                wait_s = BLOCK_MS / 1000
                if give_up_at is not None:
                    wait_s = max(0.001, min(wait_s, give_up_at - time.monotonic()))
                try:
                    entries = await asyncio.wait_for(entries_queue.get(), wait_s)
                except asyncio.TimeoutError:
                    entries = []
                client._check_open(doing)
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
                    if await self._ended_outside_stream():
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

    async def _ended_outside_stream(self) -> bool:
        """As the sync handle: the backend's state, and the TTL by the caller's clock."""
        state, result = await self._backend_state()
        if state == states.SUCCESS:
            with redis_errors(self._client.config):
                stream_gone = not await self._client._redis.exists(self._key)
            if stream_gone:  # retention ran out; the backend keeps results longer
                self._final = dict(result)
                return True
            return False
        if state in states.PROPAGATE_STATES:
            raise _as_fd_error(result, self.request_id)
        if state == states.PENDING and time.time() > self._deadline + EXPIRY_GRACE_S:
            raise RequestExpired(
                f"request {self.request_id} was not started by any node within its TTL of "
                f"{self._client.config.ttl_s:g}s (scheduler_ttl)"
            )
        return False

    async def _backend_state(self) -> tuple[str, Any]:
        app = self._client.app
        backend_redis = self._client._backend_redis
        try:
            if backend_redis is not None:
                raw = await backend_redis.get(app.backend.get_key_for_task(self.request_id))
                if raw is None:
                    return states.PENDING, None
                meta = app.backend.decode_result(raw)
                return str(meta["status"]), meta.get("result")
            async_result = app.AsyncResult(self.request_id)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._client._executor, lambda: (async_result.state, async_result.result)
            )
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"result backend unreachable: {exc}") from None


def _async_redis(url: str) -> aioredis.Redis:
    """A client whose commands wait for a free connection (up to ``MAX_CONNECTIONS``) rather than
    fail: a thousand followers checking their backend state at once share a few connections."""
    # The socket timeout stays above BLOCK_MS, or a blocking read would time out (redis-py 8).
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=30,
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pool)  # (it closes the pool when closed)


class _ReaderSlot:
    """One asyncio task and the streams it follows (stream key -> [last seq, queue])."""

    def __init__(self, readers: _AsyncReaders, index: int) -> None:
        self.readers = readers
        self.wake_key = f"{readers.wake_prefix}:{index}"
        self.wake_id = "0-0"
        self.subs: dict[str, tuple[int, asyncio.Queue[Any]]] = {}
        self.has_subs = asyncio.Event()
        self.reading = False  # a blocking read is in flight
        self.woken = False  # a wake-up was sent since that read began
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"fd-aio-reader-{index}")

    async def _run(self) -> None:
        client, count = self.readers.client, self.readers.batch_size
        while not self.readers.stopped:
            await self.has_subs.wait()
            streams: dict[Any, Any] = {key: f"0-{after + 1}" for key, (after, _) in self.subs.items()}
            if not streams:
                self.has_subs.clear()
                continue
            streams[self.wake_key] = self.wake_id
            self.reading, self.woken = True, False
            try:
                reply: Any = await client.xread(streams, count=count, block=BLOCK_MS)
            except redis.RedisError as exc:
                if self.readers.stopped:  # (redis-py may turn our cancellation into an error)
                    return
                for _, q in self.subs.values():
                    q.put_nowait(exc)
                await asyncio.sleep(READ_RETRY_S)
                continue
            finally:
                self.reading = False
            self._dispatch(reply or [])

    def _dispatch(self, reply: list[Any]) -> None:
        for key_raw, rows in reply:
            key = key_raw.decode()
            if key == self.wake_key:
                self.wake_id = rows[-1][0].decode()
                continue
            entries: list[StreamEntry] = [decode_entry(eid, fields) for eid, fields in rows]
            sub = self.subs.get(key)
            if sub is not None:
                self.subs[key] = (entries[-1].seq, sub[1])
                sub[1].put_nowait(entries)

    async def subscribe(self, key: str, after_seq: int) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.subs[key] = (after_seq, q)
        self.has_subs.set()
        if self.reading and not self.woken:
            # One wake-up per read, however many streams join meanwhile: they are all in the next.
            self.woken = True
            await self.wake()
        return q

    async def wake(self) -> None:
        pipe = self.readers.client.pipeline(transaction=False)
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
        pipe.expire(self.wake_key, WAKE_KEY_TTL_S)
        await pipe.execute()


class _AsyncReaders:
    """``parallel`` reader tasks; a stream is always followed by the same one."""

    def __init__(self, client: aioredis.Redis, parallel: int, batch_size: int, topic: str) -> None:
        self.client, self.batch_size = client, batch_size
        self.wake_prefix = keys.wake_prefix(topic, f"{os.getpid()}-aio-{uuid.uuid4().hex[:12]}")
        self.stopped = False
        self._slots = [_ReaderSlot(self, i) for i in range(parallel)]

    def _slot(self, key: str) -> _ReaderSlot:
        return self._slots[zlib.crc32(key.encode()) % len(self._slots)]

    async def subscribe(self, key: str, after_seq: int) -> asyncio.Queue[Any]:
        """Entries of ``key`` after ``after_seq`` arrive on the returned queue, in order, as lists
        (or a redis error, when reading failed)."""
        return await self._slot(key).subscribe(key, after_seq)

    def unsubscribe(self, key: str) -> None:
        self._slot(key).subs.pop(key, None)

    @property
    def following(self) -> int:
        """How many streams are followed now."""
        return sum(len(slot.subs) for slot in self._slots)

    async def close(self) -> None:
        """Stop every reader task; what they followed gets nothing more."""
        self.stopped = True
        for slot in self._slots:
            slot.has_subs.set()
            slot.task.cancel()
        await asyncio.wait([slot.task for slot in self._slots], timeout=CLOSE_TIMEOUT_S)
