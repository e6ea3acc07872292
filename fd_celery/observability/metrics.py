"""Prometheus metrics: recorded into Redis by every worker, exported from one place.

A prefork worker's pool processes cannot share one ``prometheus_client`` registry, and a
cluster has many workers; so each process adds its observations to a few Redis hashes (one
pipelined round trip per event, cumulative counters that never reset), and the exporter
(:mod:`fd_celery.observability.exporter`, ``celery -A APP fd metrics``) reads them on each scrape, together with what the scheduler
already keeps (live nodes, queues, load table, steal counters, KV bytes held).

Redis layout (``T`` = ``scheduler_topic``; ``<node>|<suffix>`` fields, the suffix never holds ``|``)::

    fd:T:metrics:ttft      hash  "<node>|le=<bound>" -> observations in (previous bound, bound]
                                 (not cumulative: the exporter adds them up), "<node>|sum",
                                 "<node>|count"
    fd:T:metrics:tpot      hash  the same, for the time per output token
    fd:T:metrics:requests  hash  "<node>|<outcome>" -> requests ended ("ok", "RequestExpired", ...)
    fd:T:metrics:tokens    hash  "<node>" -> output tokens of requests that ended
    fd:T:metrics:rejected  hash  "<reason>" -> requests turned away at submit ("QueueFull", ...)
    fd:T:metrics:handoffs  hash  "<node>|<kind>:count", "<node>|<kind>:bytes" -> KV hand-offs
    fd:T:metrics:givenback hash  "<dead node>" -> requests it held that a live node requeued

The recording functions never raise into the caller: a metric is not worth a failed request.
They need only ``redis``; the exporter needs ``prometheus_client`` (``pip install
prometheus-client``), imported only when it runs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import redis

from fd_celery import keys

__all__ = [
    "TTFT_BUCKETS",
    "TPOT_BUCKETS",
    "metrics_key",
    "record_end",
    "record_rejected",
    "record_given_back",
    "record_handoff",
]

logger = logging.getLogger(__name__)

# Upper bounds (seconds) of the histogram buckets; +Inf is implied. Fixed, so that every worker
# and the exporter agree without talking to each other.
TTFT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
TPOT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_INF = "+Inf"
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:@\-]")
_MAX_LABEL = 128


def metrics_key(topic: str, name: str) -> str:
    return keys.metrics_hash(topic, name)


def _label(value: object) -> str:
    """A label value we write: bounded, no field separator, nothing odd."""
    text = _LABEL_RE.sub("_", str(value))[:_MAX_LABEL]
    return text or "unknown"


def _bucket(value: float, bounds: Sequence[float]) -> str:
    for bound in bounds:
        if value <= bound:
            return _format_bound(bound)
    return _INF


def _format_bound(bound: float) -> str:
    if math.isinf(bound):
        return _INF
    return repr(float(bound))


def _observe(pipe: Any, key: str, node: str, value: float | None, bounds: Sequence[float]) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        return
    pipe.hincrby(key, f"{node}|le={_bucket(float(value), bounds)}", 1)
    pipe.hincrbyfloat(key, f"{node}|sum", float(value))
    pipe.hincrby(key, f"{node}|count", 1)


def record_end(
    client: redis.Redis,
    topic: str,
    node: str,
    outcome: str,
    ttft_s: float | None,
    tpot_s: float | None,
    tokens: int,
    *,
    first_node: str | None = None,
) -> None:
    """A request ended on ``node``: ``outcome`` is ``"ok"`` or the error's class name.

    ``ttft_s`` and ``tpot_s`` go into the histograms when given (``tpot_s`` only when more than
    one token was produced). In splitwise the decode node ends the request but the prefill node
    produced the first token: pass it as ``first_node`` and TTFT is counted there.
    ``client`` may be a pipeline: the commands are queued on it, for its owner to execute.
    Never raises: Redis errors are logged and swallowed.
    """
    try:
        node_l = _label(node)
        count = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0
        pipe, own = _pipeline(client)
        pipe.hincrby(metrics_key(topic, "requests"), f"{node_l}|{_label(outcome)}", 1)
        if count:
            pipe.hincrby(metrics_key(topic, "tokens"), node_l, count)
        _observe(
            pipe,
            metrics_key(topic, "ttft"),
            _label(first_node) if first_node else node_l,
            ttft_s,
            TTFT_BUCKETS,
        )
        if count > 1:
            _observe(pipe, metrics_key(topic, "tpot"), node_l, tpot_s, TPOT_BUCKETS)
        if own:
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - never fail a request for a metric
        logger.warning("could not record the end of a request in the metrics: %s", exc)


def record_rejected(client: redis.Redis, topic: str, reason: str) -> None:
    """A request was turned away at submit (``reason``: ``"QueueFull"``, ``"NoNodeAvailable"``)."""
    try:
        client.hincrby(metrics_key(topic, "rejected"), _label(reason), 1)
    except Exception as exc:  # noqa: BLE001 - never fail a request for a metric
        logger.warning("could not record a rejected request in the metrics: %s", exc)


def record_given_back(client: redis.Redis, topic: str, node: str, count: int) -> None:
    """``count`` requests that the dead ``node`` held went back to their queues."""
    try:
        client.hincrby(metrics_key(topic, "givenback"), _label(node), int(count))
    except Exception as exc:  # noqa: BLE001 - never fail a request for a metric
        logger.warning("could not record requests given back in the metrics: %s", exc)


def _pipeline(target: Any) -> tuple[Any, bool]:
    """Where the commands of a record go: ``target`` itself if it is a pipeline (its owner, a
    writer thread, executes it with other work), else a pipeline of our own, executed here."""
    if isinstance(target, redis.client.Pipeline):
        return target, False
    return target.pipeline(transaction=False), True


def record_handoff(client: redis.Redis, topic: str, node: str, nbytes: int, kind: str) -> None:
    """``node`` (a prefill node) handed a KV cache of ``nbytes`` to decode through store ``kind``."""
    try:
        field = f"{_label(node)}|{_label(kind)}"
        pipe, own = _pipeline(client)
        pipe.hincrby(metrics_key(topic, "handoffs"), f"{field}:count", 1)
        if isinstance(nbytes, int) and nbytes > 0:
            pipe.hincrby(metrics_key(topic, "handoffs"), f"{field}:bytes", nbytes)
        if own:
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - never fail a request for a metric
        logger.warning("could not record a KV hand-off in the metrics: %s", exc)
