"""Messages a node cannot take: refused at the door, kept for the operator, never fatal.

A Redis list is open to anyone who can reach Redis, so a node's queue may hold anything: bytes
that are not JSON, JSON that is not a kombu envelope, an envelope whose body cannot be decoded, or
a body that is not Celery's ``[args, kwargs, embed]``. Left to kombu and Celery, each of these
raises inside the worker's consumer, which Celery treats as unrecoverable: the worker dies, and a
restored message kills the next worker of the queue too.

Two guards, one at each layer that can fail:

* :class:`Transport` (set as ``broker_transport`` for Redis brokers by :func:`fd_celery.install`)
  screens every item a worker pops from a queue before kombu builds a message from it;
* :func:`guarded_strategy` (the ``Strategy`` of fd tasks) checks the decoded body before Celery
  builds a request from it, and fails that request's result with :class:`InvalidRequest`, so a
  caller waiting on it learns why at once.

The strategy also takes one kind of message out of Celery's hands: a request whose Celery
``expires`` ran out is refused by fd_celery's own TTL check, so its caller gets ``RequestExpired``
and never Celery's ``TaskRevokedError('expired')`` (:func:`fold_expires`).

Whatever is refused is logged at ERROR without its contents and pushed, as JSON, onto the topic's
dead-letter list ``fd:T:dead`` (newest first, the last :data:`KEEP` entries, kept
:data:`KEEP_S` seconds): ``celery -A APP fd status`` shows how many there are.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import datetime
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

__all__ = [
    "Transport",
    "guarded_strategy",
    "fold_expires",
    "dead_letter",
    "dead_letters",
    "KEEP",
    "KEEP_S",
    "OPTION",
]

logger = logging.getLogger(__name__)

#: The dead-letter list keeps its newest entries, and each entry at most this many bytes of the item.
KEEP = 1000
KEEP_S = 7 * 24 * 3600
KEPT_BYTES = 64 * 1024

#: Tasks whose run checks ``fd_deadline`` before it starts (see :func:`fold_expires`); ``fd.decode``
#: continues a started request and keeps Celery's ``expires``.
DEADLINE_TASKS = frozenset({"fd.generate", "fd.prefill"})

#: The broker transport option naming the dead-letter list (set by :func:`fd_celery.install`).
OPTION = "fd_dead_letters"


def dead_letter(client: Any, key: str, queue: str, reason: str, item: bytes | str) -> None:
    """Keep a refused item on the dead-letter list ``key`` and say so in the log (without it)."""
    raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else bytes(item)
    entry = {
        "at_ms": int(time.time() * 1000),
        "queue": queue,
        "reason": reason,
        "bytes": len(raw),
        "item_b64": base64.b64encode(raw[:KEPT_BYTES]).decode(),
        "truncated": len(raw) > KEPT_BYTES,
    }
    try:
        with client.pipeline() as pipe:
            pipe.lpush(key, json.dumps(entry))
            pipe.ltrim(key, 0, KEEP - 1)
            pipe.expire(key, KEEP_S)
            pipe.execute()
        where = f"kept in Redis list {key}"
    except Exception as exc:  # noqa: BLE001 - refusing the item matters more than keeping it
        where = f"not kept ({type(exc).__name__}: {exc})"
    logger.error(
        "fd_celery: refused a message of %d bytes from queue %s: %s; %s", len(raw), queue, reason, where
    )


def dead_letters(client: Any, key: str, count: int = 20) -> list[dict[str, Any]]:
    """The newest ``count`` dead-letter entries (item bytes decoded back from base64)."""
    out = []
    for raw in client.lrange(key, 0, max(0, count - 1)):
        entry = json.loads(raw)
        entry["item"] = base64.b64decode(entry.pop("item_b64", ""))
        out.append(entry)
    return out


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", type(None): "null", bool: "boolean"}.get(
        type(value), "number"
    )


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, screening each item a BRPOP returns before it becomes a message."""

    from_transport_options = kombu_redis.Channel.from_transport_options + (OPTION,)  # type: ignore[assignment]
    fd_dead_letters = "fd:dead"

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own read, except that an item which is not a readable envelope is dead-lettered
        # here instead of raising out of the consumer.
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not reply:
                raise kombu_redis.Empty()
            dest, item = reply
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = self._screen(queue, item)
            if payload is not None:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.7
            if flush is not None:
                flush()

    def _screen(self, queue: str, item: bytes) -> dict[str, Any] | None:
        """The envelope ``item`` holds, or None when it was refused."""
        try:
            payload = json.loads(item)
        except (ValueError, UnicodeDecodeError):
            reason = "not JSON"
        else:
            if not isinstance(payload, dict):
                reason = f"a JSON {_kind(payload)}, not a message envelope (an object)"
            else:
                try:  # kombu's own reading of an envelope: properties, delivery tag, body encoding
                    self.Message(payload, channel=self)
                    return payload
                except Exception as exc:  # noqa: BLE001 - any failure here would kill the consumer
                    reason = f"an envelope kombu cannot read ({_describe(exc)})"
        with self.conn_or_acquire() as client:
            dead_letter(client, self.fd_dead_letters, queue, reason, item)
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}" if exc.args else "missing field"
    if isinstance(exc, (TypeError, AttributeError)):
        return "a field of the wrong type"
    return type(exc).__name__  # never the message: it may quote the contents


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with a :class:`Channel` that refuses unreadable items."""

    Channel = Channel


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        what = f"an array of {len(body)}" if isinstance(body, (list, tuple)) else f"a JSON {_kind(body)}"
        return f"the body is {what}, not [args, kwargs, options]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        return f"args is a JSON {_kind(args)}, not an array"
    if not isinstance(kwargs, dict):
        return f"kwargs is a JSON {_kind(kwargs)}, not an object"
    if embed is not None and not isinstance(embed, dict):
        return f"options is a JSON {_kind(embed)}, not an object"
    return None


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy for ``task``, behind a check of the message body's shape.

    A body Celery's request could not unpack is refused the way Celery refuses a bad message
    (``InvalidTaskError``: logged, rejected), dead-lettered, and its result set to
    :class:`InvalidRequest` so that a caller waiting for it is not left hanging.
    """
    from celery.exceptions import InvalidTaskError
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **kwargs)

    def handler(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        if body is None:  # protocol 2: the body is still undecoded (decode errors: Celery's own)
            problem = _body_problem(message.payload)
            if problem is not None:
                _refuse(app, message, problem)
                raise InvalidTaskError(f"fd_celery: {task.name} message refused: {problem}") from None
        if task.name in DEADLINE_TASKS:
            fold_expires(message.headers)
        return handle(message, body, *args, **kw)

    return handler


def fold_expires(headers: Any) -> None:
    """Celery's ``expires`` of a request becomes fd_celery's deadline: ``fd_deadline`` is the
    earlier of the two, and ``expires`` is dropped.

    Left to Celery, an ``expires`` that ran out (the caller's, or the backstop that
    :func:`fd_celery.install` sets behind ``scheduler_ttl``) revokes the request on receipt and
    its caller gets ``TaskRevokedError('expired')``. Folded, the run's own TTL check refuses it as
    for any request past its deadline: ``RequestExpired`` in the result backend and at the end of
    the output stream, its admission ticket released, whatever way the caller sent it.
    """
    if not isinstance(headers, dict) or headers.get("expires") is None:
        return
    expires = _epoch_s(headers["expires"])
    if expires is None:  # unreadable: Celery's own check reports it as it always did
        return
    deadline = headers.get("fd_deadline")
    if isinstance(deadline, (int, float)) and not isinstance(deadline, bool):
        expires = min(expires, float(deadline))
    headers["fd_deadline"] = expires
    headers["expires"] = None


def _epoch_s(value: Any) -> float | None:
    """An ``expires`` header (ISO 8601, as Celery's protocol 2 writes it) as epoch seconds; a
    time without a zone is local time, as Celery reads it."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _refuse(app: Any, message: Any, problem: str) -> None:
    from fd_celery.connection import redis_for
    from fd_celery.errors import InvalidRequest
    from fd_celery.keys import check_request_id, dead_letter_list
    from fd_celery.settings import get_config

    headers = message.headers or {}
    queue = (message.delivery_info or {}).get("routing_key") or "?"
    raw = getattr(message, "_raw", None)  # the envelope as kombu's Redis transport read it
    item = json.dumps(raw) if isinstance(raw, dict) else bytes(message.body or b"")
    config = get_config(app)
    dead_letter(redis_for(config), dead_letter_list(config.scheduler_topic), queue, problem, item)
    raw_id = headers.get("id")
    try:
        task_id = check_request_id(raw_id if isinstance(raw_id, str) else "")
    except Exception:  # noqa: BLE001 - no usable id: nobody can be waiting for a result
        return
    app.backend.mark_as_failure(task_id, InvalidRequest(f"malformed message: {problem}"))
