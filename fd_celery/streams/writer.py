"""The worker side of output streams: writer threads that batch appends.

:class:`OutputWriter` runs ``scheduler_writer_parallel`` threads; a request always goes to the
same thread (order holds) and a thread writes up to ``scheduler_writer_batch_size`` queued entries
in one round trip: one pipeline of append-script calls (``fd_celery/scripts/append.lua``) and
deferred bookkeeping. When nothing of a request is still queued, its end is written by the
caller's thread itself.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from fd_celery.errors import BrokerUnavailable
from fd_celery.scripts import APPEND
from fd_celery.streams.entries import Record

__all__ = ["OutputWriter", "writer_for"]

logger = logging.getLogger(__name__)

WRITE_RETRY_PAUSES_S = (0.1, 0.3, 1.0, 2.0)  # a Redis blip or restart is ridden out, not lost


def _append_call(
    key: str, ttl_ms: int, items: list[tuple[int, str]], final: bool, record: Record | None
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one append.lua call."""
    keys_ = [key, record[0]] if record is not None else [key]
    args: list[Any] = [ttl_ms, "1" if final else "0", record[2] if record else 0, record[1] if record else ""]
    for seq, payload in items:
        args.extend((seq, payload))
    return keys_, args


@dataclass
class _Pending:
    """Entries of one request waiting for their writer thread."""

    key: str
    ttl_ms: int
    items: list[tuple[int, str]] = field(default_factory=list)
    final: bool = False
    record: Record | None = None  # with the final entry: the result-backend record to store
    done: threading.Event = field(default_factory=threading.Event)
    reply: bytes | None = None
    error: BaseException | None = None


@dataclass
class _Deferred:
    """Bookkeeping for a writer thread (a STARTED or SUCCESS record, metrics): ``work(pipe)``
    queues its commands on the thread's pipeline, which carries them with the batch's appends,
    in queue order, in one round trip. ``retry``: safe to send again after a write that may or
    may not have been applied (a counter increment is not)."""

    work: Callable[[Any], None]
    retry: bool = True


class OutputWriter:
    """Writer threads that batch stream appends. One per process; start lazily after a fork."""

    def __init__(self, client: redis.Redis, parallel: int, batch_size: int) -> None:
        self.client = client
        self._batch_size = batch_size
        self._queues: list[queue.SimpleQueue[_Pending | _Deferred]] = [
            queue.SimpleQueue() for _ in range(parallel)
        ]
        self._pid = os.getpid()
        self._failed: dict[str, BaseException] = {}  # stream key -> error of a lost chunk write
        self._outstanding: dict[str, int] = {}  # stream key -> writes queued, not yet stored
        self._ended: set[str] = set()  # streams an append found ended by someone else (cancelled)
        self._lock = threading.Lock()
        for index, q in enumerate(self._queues):
            thread = threading.Thread(target=self._run, args=(q,), name=f"fd-writer-{index}", daemon=True)
            thread.start()

    def _queue_for(self, key: str) -> queue.SimpleQueue[_Pending | _Deferred]:
        return self._queues[zlib.crc32(key.encode()) % len(self._queues)]

    def write(self, key: str, items: list[tuple[int, dict[str, Any]]], ttl_s: float) -> None:
        """Queue chunks of one request; returns at once. Errors surface at its ``finish``."""
        pending = _Pending(key, int(ttl_s * 1000), [(seq, json.dumps(data)) for seq, data in items])
        with self._lock:
            self._outstanding[key] = self._outstanding.get(key, 0) + 1
        self._queue_for(key).put(pending)

    def finish(
        self,
        key: str,
        items: list[tuple[int, dict[str, Any]]],
        ttl_s: float,
        timeout_s: float = 30.0,
        record: Record | None = None,
    ) -> dict[str, Any]:
        """Write ``items`` (the last one is the end entry) after everything queued before them;
        wait until stored. Returns the end entry as stored: ours, or an earlier run's. ``record``
        (a result-backend key, value and expiry) is stored in the same step when ours ends it.

        When nothing of this request is still queued, the caller's thread writes it itself: one
        round trip, no hand-over to a writer thread (what short requests always hit).
        """
        payloads = [(seq, json.dumps(data)) for seq, data in items]
        with self._lock:
            inline = not self._outstanding.get(key)
            lost = self._failed.pop(key, None)
        if lost is not None:  # a chunk of this request could not be written: never end with a gap
            raise BrokerUnavailable(f"output stream {key} lost a write: {lost}")
        if inline:
            keys_, args = _append_call(key, int(ttl_s * 1000), payloads, True, record)
            try:
                reply = APPEND(self.client, keys=keys_, args=args)
            except redis.RedisError as exc:
                raise BrokerUnavailable(f"output stream {key} could not be written: {exc}") from None
            return dict(json.loads(reply))
        pending = _Pending(key, int(ttl_s * 1000), payloads, final=True, record=record)
        with self._lock:
            self._outstanding[key] = self._outstanding.get(key, 0) + 1
        self._queue_for(key).put(pending)
        if not pending.done.wait(timeout_s):
            raise BrokerUnavailable(f"output stream {key} could not be written in {timeout_s}s")
        failed = self._failed.pop(key, None)
        error = pending.error or failed
        if error is not None:
            raise BrokerUnavailable(f"output stream {key} could not be written: {error}")
        assert pending.reply is not None
        return dict(json.loads(pending.reply))

    def ended(self, key: str) -> bool:
        """Whether an append of ours found the stream already ended by someone else (a cancel):
        the run should stop. Forgotten once read as true."""
        if key not in self._ended:
            return False
        with self._lock:
            self._ended.discard(key)
        return True

    def defer(self, work: Callable[[Any], None], key: str | None = None, retry: bool = True) -> None:
        """Queue Redis commands for a writer thread, off the request's path: ``work(pipe)`` puts
        them on the pipeline that thread sends with its next batch (it must not execute it).
        With ``key``, on that stream's writer, in order with its writes. ``retry=False`` for
        commands that must not be sent twice (they are dropped if their batch fails)."""
        (self._queue_for(key) if key is not None else self._queues[0]).put(_Deferred(work, retry))

    def _run(self, q: queue.SimpleQueue[_Pending | _Deferred]) -> None:
        while True:
            batch = [q.get()]
            while len(batch) < self._batch_size:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            self._flush(batch)

    def _send(self, calls: list[list[_Pending] | _Deferred]) -> list[Any]:
        """One pipeline, one round trip: each call's reply (for deferred work, its first error or
        None). The append script goes by its sha (a registered script in a pipeline would ask
        Redis whether it exists first: one more round trip)."""
        pipe = self.client.pipeline(transaction=False)
        spans: list[int] = []
        for call in calls:
            start = len(pipe.command_stack)
            if isinstance(call, list):
                keys_, args = _append_call(
                    call[0].key,
                    call[-1].ttl_ms,
                    [i for m in call for i in m.items],
                    call[-1].final,
                    call[-1].record,
                )
                APPEND.queue(pipe, keys_, args)
            else:
                try:
                    call.work(pipe)
                except Exception:  # a bug in the work: drop what it queued, keep the batch
                    logger.exception("deferred work failed")
                    del pipe.command_stack[start:]
            spans.append(len(pipe.command_stack) - start)
        raw = pipe.execute(raise_on_error=False) if pipe.command_stack else []
        out, index = [], 0
        for count in spans:
            mine = raw[index : index + count]
            index += count
            out.append(mine[0] if count == 1 else next((r for r in mine if isinstance(r, Exception)), None))
        return out

    def _flush(self, batch: list[_Pending | _Deferred]) -> None:
        """One pipeline for the batch, in queue order: consecutive entries of one request in one
        script call (a final entry closes a call), deferred work's commands between them."""
        calls: list[list[_Pending] | _Deferred] = []
        for item in batch:
            last = calls[-1] if calls else None
            if (
                isinstance(item, _Pending)
                and isinstance(last, list)
                and last[0].key == item.key
                and not last[-1].final
            ):
                last.append(item)
            else:
                calls.append([item] if isinstance(item, _Pending) else item)
        replies: list[Any] = []
        for attempt, pause_s in enumerate((*WRITE_RETRY_PAUSES_S, None)):
            try:
                sent = [c for c in calls if isinstance(c, list) or attempt == 0 or c.retry]
                replies = self._send(sent)
                missing = [i for i, r in enumerate(replies) if APPEND.missing(r)]
                if missing:  # Redis restarted (or its scripts were flushed): load it, send those again
                    APPEND.load(self.client)
                    for i, reply in zip(missing, self._send([sent[i] for i in missing])):
                        replies[i] = reply
                calls = sent
                break
            except redis.RedisError as exc:  # appends are idempotent: a retry cannot duplicate
                if pause_s is None:
                    logger.error("output stream write failed after %d tries: %s", attempt + 1, exc)
                    replies = [exc] * len(calls)
                    break
                logger.warning("output stream write failed (%s); retrying in %.1fs", exc, pause_s)
                time.sleep(pause_s)
        appends: list[tuple[list[_Pending], Any]] = []
        for call, reply in zip(calls, replies):
            if isinstance(call, list):
                appends.append((call, reply))
            elif isinstance(reply, Exception):
                logger.warning("deferred bookkeeping failed: %s", reply)
        for members, reply in appends:
            for member in members:
                if isinstance(reply, Exception):
                    member.error = reply
                    self._failed[member.key] = reply
                else:
                    member.reply = reply
                    if reply and not member.final:  # the stream had ended before our chunk
                        self._ended.add(member.key)
                with self._lock:
                    left = self._outstanding.get(member.key, 1) - 1
                    if left > 0:
                        self._outstanding[member.key] = left
                    else:
                        self._outstanding.pop(member.key, None)
                member.done.set()


_writer: OutputWriter | None = None
_writer_lock = threading.Lock()


def writer_for(client: redis.Redis, parallel: int, batch_size: int) -> OutputWriter:
    """This process's writer (threads do not survive a fork, so a child makes its own)."""
    global _writer
    with _writer_lock:
        if _writer is None or _writer._pid != os.getpid():
            _writer = OutputWriter(client, parallel, batch_size)
        return _writer
