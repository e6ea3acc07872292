"""Output streams: tokens travel through Redis directly, never one Celery task per token.

Each request has one Redis stream (``keys.output_stream``). Entry ids are ``0-<seq+1>``, which
makes writing idempotent: the append script skips every chunk whose seq is not above the last
one written, so a request run twice (at-least-once delivery) never shows its caller a chunk twice.
Its last entry carries ``end`` and the final result (or the error), written once: a second run
gets the first run's final result back and returns that, so the result backend agrees too.

Worker side, :class:`OutputWriter` runs ``scheduler_writer_parallel`` threads; a request always
goes to the same thread (order holds) and a thread writes up to ``scheduler_writer_batch_size``
queued entries in one round trip. Caller side, :class:`StreamReaders` runs
``scheduler_reader_parallel`` threads; each follows its share of the streams a client process
watches with one blocking XREAD, up to ``scheduler_reader_batch_size`` entries per stream per
call, so a thousand open requests cost a few connections, not a thousand.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from fd_celery import keys
from fd_celery.errors import BrokerUnavailable

__all__ = ["OutputWriter", "StreamReaders", "StreamEntry", "last_entry", "END_RETENTION_S"]

logger = logging.getLogger(__name__)

END_RETENTION_S = 600  # a finished stream stays readable this long after its end
EXPIRED_RETENTION_S = 60  # the error entry of an expired request: long enough for a reader to see
WRITE_RETRY_PAUSES_S = (0.1, 0.3, 1.0, 2.0)  # a Redis blip or restart is ridden out, not lost
WAKE_KEY_TTL_S = 3600  # a client's private wake-up streams vanish this long after its last use

# KEYS[1] = stream (entries 0-<seq+1>, field d = JSON; the final entry also has end = 1)
# KEYS[2] (optional) = a result-backend key: with the final entry, SET to ARGV[4] (EX ARGV[3]) and
#   PUBLISHed, in the same step, when this call ends the stream (not when an earlier run did)
# ARGV[1] = expiry in ms; ARGV[2] = "1" if the last pair is final; ARGV[3], ARGV[4] = the record's
#   expiry in s and value (unused without KEYS[2]); then pairs of (seq, JSON)
# Returns the final entry's JSON when the stream has ended (ours or an earlier run's), else nil.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_seq = -1
if #last > 0 then
  local fields = last[1][2]
  if fields[3] == 'end' then return fields[2] end
  last_seq = tonumber(string.match(last[1][1], '%-(%d+)$')) - 1
end
local final = ARGV[2] == '1'
for i = 5, #ARGV - 1, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last_seq then
    if final and i == #ARGV - 1 then
      redis.call('XADD', KEYS[1], '0-' .. (seq + 1), 'd', ARGV[i + 1], 'end', '1')
    else
      redis.call('XADD', KEYS[1], '0-' .. (seq + 1), 'd', ARGV[i + 1])
    end
    last_seq = seq
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if final then
  if #KEYS > 1 then
    redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[3])
    redis.call('PUBLISH', KEYS[2], ARGV[4])
  end
  return ARGV[#ARGV]
end
return false
"""

#: A result-backend record to store with a stream's end: (key, encoded value, expiry in s).
Record = tuple[str, bytes, int]


def _append_call(key: str, ttl_ms: int, items: list[tuple[int, str]], final: bool,
                 record: Record | None) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of one :data:`_APPEND` call."""
    keys_ = [key, record[0]] if record is not None else [key]
    args: list[Any] = [ttl_ms, "1" if final else "0", record[2] if record else 0, record[1] if record else ""]
    for seq, payload in items:
        args.extend((seq, payload))
    return keys_, args


@dataclass
class StreamEntry:
    seq: int
    data: dict[str, Any]
    end: bool


def _decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    seq = int(entry_id.split(b"-")[1]) - 1
    return StreamEntry(seq=seq, data=json.loads(fields[b"d"]), end=fields.get(b"end") == b"1")


def last_entry(client: redis.Redis, key: str) -> StreamEntry | None:
    rows = client.xrevrange(key, count=1)
    return _decode_entry(*rows[0]) if rows else None


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
        self._script = client.register_script(_APPEND)
        self._queues: list[queue.SimpleQueue[_Pending | _Deferred]] = [queue.SimpleQueue() for _ in range(parallel)]
        self._pid = os.getpid()
        self._failed: dict[str, BaseException] = {}  # stream key -> error of a lost chunk write
        self._outstanding: dict[str, int] = {}  # stream key -> writes queued, not yet stored
        self._lock = threading.Lock()
        for index, q in enumerate(self._queues):
            thread = threading.Thread(
                target=self._run, args=(q,), name=f"fd-writer-{index}", daemon=True
            )
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
        self, key: str, items: list[tuple[int, dict[str, Any]]], ttl_s: float, timeout_s: float = 30.0,
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
                reply = self._script(keys=keys_, args=args)
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
                keys_, args = _append_call(call[0].key, call[-1].ttl_ms, [i for m in call for i in m.items],
                                           call[-1].final, call[-1].record)
                pipe.evalsha(self._script.sha, len(keys_), *keys_, *args)
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
            if isinstance(item, _Pending) and isinstance(last, list) and last[0].key == item.key and not last[-1].final:
                last.append(item)
            else:
                calls.append([item] if isinstance(item, _Pending) else item)
        replies: list[Any] = []
        for attempt, pause_s in enumerate((*WRITE_RETRY_PAUSES_S, None)):
            try:
                sent = [c for c in calls if isinstance(c, list) or attempt == 0 or c.retry]
                replies = self._send(sent)
                missing = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
                if missing:  # Redis restarted (or its scripts were flushed): load it, send those again
                    self._script.sha = self.client.script_load(_APPEND)
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


class _ReaderSlot:
    """One reader thread and the streams it follows (stream key -> [last seq, queue])."""

    def __init__(self, readers: StreamReaders, index: int) -> None:
        self.readers = readers
        self.wake_key = f"{readers.wake_prefix}:{index}"
        self.wake_id = "0-0"
        self.subs: dict[str, tuple[int, queue.SimpleQueue[Any]]] = {}
        self.lock = threading.Lock()
        self.has_subs = threading.Event()
        threading.Thread(target=self._run, name=f"fd-reader-{index}", daemon=True).start()

    def _run(self) -> None:
        client, count = self.readers.client, self.readers.batch_size
        while True:
            self.has_subs.wait()
            with self.lock:
                streams = {key: f"0-{after + 1}" for key, (after, _) in self.subs.items()}
                if not streams:
                    self.has_subs.clear()
                    continue
            streams[self.wake_key] = self.wake_id
            try:
                reply = client.xread(streams, count=count, block=self.readers.block_ms)
            except redis.RedisError as exc:
                self._fail(exc)
                time.sleep(0.2)
                continue
            for key_raw, rows in reply or []:
                key = key_raw.decode()
                if key == self.wake_key:
                    self.wake_id = rows[-1][0].decode()
                    continue
                entries = [_decode_entry(eid, fields) for eid, fields in rows]
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

    def __init__(self, client: redis.Redis, parallel: int, batch_size: int, topic: str, block_ms: int) -> None:
        self.client, self.batch_size, self.block_ms = client, batch_size, block_ms
        self.wake_prefix = keys.wake_prefix(topic, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._slots = [_ReaderSlot(self, i) for i in range(parallel)]

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
