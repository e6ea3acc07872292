"""The caller side of output streams: reader threads that follow many streams at once.

:class:`StreamReaders` runs ``scheduler_reader_parallel`` threads; each follows its share of the
streams a client process watches with one blocking XREAD, up to ``scheduler_reader_batch_size``
entries per stream per call, so a thousand open requests cost a few connections, not a thousand.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
import zlib
from typing import Any

import redis

from fd_celery import keys
from fd_celery.streams.entries import decode_entry

__all__ = ["StreamReaders"]

WAKE_KEY_TTL_S = 3600  # a client's private wake-up streams vanish this long after its last use


class _ReaderSlot:
    """One reader thread and the streams it follows (stream key -> [last seq, queue])."""

    def __init__(self, readers: StreamReaders, index: int) -> None:
        self.readers = readers
        self.wake_key = f"{readers.wake_prefix}:{index}"
        self.wake_id = "0-0"
        self.subs: dict[str, tuple[int, queue.SimpleQueue[Any]]] = {}
        self.lock = threading.Lock()
        self.has_subs = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fd-reader-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, count = self.readers.client, self.readers.batch_size
        while not self.readers.stopped.is_set():
            self.has_subs.wait()
            if self.readers.stopped.is_set():
                return
            with self.lock:
                streams = {key: f"0-{after + 1}" for key, (after, _) in self.subs.items()}
                if not streams:
                    self.has_subs.clear()
                    if self.readers.stopped.is_set():  # (close() set it before the clear)
                        return
                    continue
            streams[self.wake_key] = self.wake_id
            try:
                reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None
                reply = client.xread(streams, count=count, block=self.readers.block_ms)  # type: ignore[arg-type, assignment]
            except redis.RedisError as exc:
                self._fail(exc)
                time.sleep(0.2)
                continue
            for key_raw, rows in reply or []:
                key = key_raw.decode()
                if key == self.wake_key:
                    self.wake_id = rows[-1][0].decode()
                    continue
                entries = [decode_entry(eid, fields) for eid, fields in rows]
                with self.lock:
                    sub = self.subs.get(key)
                    if sub is not None:
                        self.subs[key] = (entries[-1].seq, sub[1])
                        sub[1].put(entries)

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            for _, q in self.subs.values():
                q.put(exc)


class StreamReaders:
    """``scheduler_reader_parallel`` threads that follow output streams for one client."""

    def __init__(
        self, client: redis.Redis, parallel: int, batch_size: int, topic: str, block_ms: int
    ) -> None:
        self.client, self.batch_size, self.block_ms = client, batch_size, block_ms
        self.wake_prefix = keys.wake_prefix(topic, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self.stopped = threading.Event()
        self._slots = [_ReaderSlot(self, i) for i in range(parallel)]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every reader thread: each is woken out of its blocking read and ends; what a
        thread was following gets nothing more. Idempotent."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            pipe = self.client.pipeline(transaction=False)
            for slot in self._slots:
                pipe.xadd(slot.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(slot.wake_key, WAKE_KEY_TTL_S)
            pipe.execute()
        except redis.RedisError:
            pass  # Redis is gone: a blocked read ends with its error, or after its block period
        for slot in self._slots:
            slot.has_subs.set()
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            slot.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _slot(self, key: str) -> _ReaderSlot:
        return self._slots[zlib.crc32(key.encode()) % len(self._slots)]

    def subscribe(self, key: str, after_seq: int) -> queue.SimpleQueue[Any]:
        """Entries of ``key`` after ``after_seq`` arrive on the returned queue, in order, as lists
        (or a redis error, if reading failed)."""
        slot = self._slot(key)
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with slot.lock:
            slot.subs[key] = (after_seq, q)
        slot.has_subs.set()
        # Wake the reader out of its blocking read, so the new stream is read at once.
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(slot.wake_key, {"w": "1"}, maxlen=16, approximate=True)
        pipe.expire(slot.wake_key, WAKE_KEY_TTL_S)
        pipe.execute()
        return q

    def unsubscribe(self, key: str) -> None:
        slot = self._slot(key)
        with slot.lock:
            slot.subs.pop(key, None)
