"""The Prometheus exporter: one topic's metrics read from Redis on each scrape.

What the workers recorded (:mod:`fd_celery.observability.metrics`) together with what the
scheduler already keeps (live nodes, queues, load table, steal counters, KV bytes held).
Needs ``prometheus_client`` (``pip install prometheus-client``), imported only when it runs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from fd_celery import keys
from fd_celery.observability.metrics import _INF, TPOT_BUCKETS, TTFT_BUCKETS, metrics_key

__all__ = ["FDCollector", "exposition", "serve", "queue_depths", "shared_queue_depths"]

logger = logging.getLogger(__name__)


def _split(field: bytes | str) -> tuple[str, str]:
    text = field.decode() if isinstance(field, bytes) else field
    node, _, suffix = text.rpartition("|")
    return node, suffix


def _histograms(
    raw: dict[bytes, bytes], bounds: Sequence[float]
) -> dict[str, tuple[list[tuple[str, float]], float]]:
    """``{node: ([(le, cumulative count), ..., ("+Inf", count)], sum)}`` from a histogram hash."""
    per_node: dict[str, dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        node, suffix = _split(field)
        per_node[node][suffix] = float(value)
    out = {}
    for node, fields in per_node.items():
        counts: dict[float, float] = {float(b): 0.0 for b in bounds}
        for suffix, observed in fields.items():
            if suffix.startswith("le="):
                bound = math.inf if suffix[3:] == _INF else float(suffix[3:])
                counts[bound] = counts.get(bound, 0.0) + observed
        counts.setdefault(math.inf, 0.0)
        running, buckets = 0.0, []
        for bound in sorted(counts):
            running += counts[bound]
            buckets.append((_INF if math.isinf(bound) else _go_float(bound), running))
        out[node] = (buckets, fields.get("sum", 0.0))
    return out


def _go_float(value: float) -> str:
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(value))


class FDCollector:
    """A ``prometheus_client`` collector that reads one topic's metrics from Redis per scrape."""

    def __init__(self, client: redis.Redis, config: Any) -> None:
        self.client = client
        self.config = config

    def describe(self) -> list[Any]:
        return []  # families are known only after reading Redis; registering must not read it

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("fd_up", "1 when the exporter could read the scheduler's Redis.")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            logger.warning("metrics scrape could not read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from fd_celery import kv
        from fd_celery.scheduler import loadtable, registry

        topic = self.config.scheduler_topic
        client = self.client
        pipe = client.pipeline(transaction=False)
        for name in ("ttft", "tpot", "requests", "tokens", "rejected", "handoffs", "givenback"):
            pipe.hgetall(metrics_key(topic, name))
        pipe.hgetall(keys.steals_hash(topic))
        pipe.llen(keys.dead_letter_list(topic))
        ttft, tpot, requests, tokens, rejected, handoffs, given_back, steals, dead = pipe.execute()

        for name, raw, bounds, doc in (
            ("fd_ttft_seconds", ttft, TTFT_BUCKETS, "Time to first token, from submit (seconds)."),
            ("fd_tpot_seconds", tpot, TPOT_BUCKETS, "Time per output token after the first (seconds)."),
        ):
            family = HistogramMetricFamily(name, doc, labels=["node"])
            for node, (buckets, total) in sorted(_histograms(raw, bounds).items()):
                family.add_metric([node], buckets, sum_value=total)
            yield family

        done = CounterMetricFamily(
            "fd_requests",
            "Requests ended, by node and outcome (ok, or the error class: RequestExpired, WorkerError, ...).",
            labels=["node", "outcome"],
        )
        expired = CounterMetricFamily(
            "fd_requests_expired",
            "Requests that ended as RequestExpired (their TTL ran out before they started).",
            labels=["node"],
        )
        expired_by_node: dict[str, float] = defaultdict(float)
        for field, value in sorted(requests.items()):
            node, outcome = _split(field)
            done.add_metric([node, outcome], float(value))
            if outcome == "RequestExpired":
                expired_by_node[node] += float(value)
        yield done
        for node, value in sorted(expired_by_node.items()):
            expired.add_metric([node], value)
        yield expired

        out_tokens = CounterMetricFamily(
            "fd_output_tokens", "Output tokens of ended requests.", labels=["node"]
        )
        for field, value in sorted(tokens.items()):
            out_tokens.add_metric([field.decode()], float(value))
        yield out_tokens

        rejected_f = CounterMetricFamily(
            "fd_requests_rejected", "Requests turned away at submit, by reason.", labels=["reason"]
        )
        for field, value in sorted(rejected.items()):
            rejected_f.add_metric([field.decode()], float(value))
        yield rejected_f

        back = CounterMetricFamily(
            "fd_requests_given_back",
            "Requests a dead node held that a live node "
            "put back in their queues (after scheduler_expire_period).",
            labels=["node"],
        )
        for field, value in sorted(given_back.items()):
            back.add_metric([field.decode()], float(value))
        yield back
        dead_f = GaugeMetricFamily(
            "fd_dead_letters",
            "Messages nodes refused as unreadable, kept in "
            f"{keys.dead_letter_list(topic)} (the newest 1,000).",
        )
        dead_f.add_metric([], float(dead))
        yield dead_f

        made = CounterMetricFamily("fd_steals_made", "Requests this node stole from others.", labels=["node"])
        suffered = CounterMetricFamily(
            "fd_steals_suffered", "Requests stolen from this node.", labels=["node"]
        )
        for field, value in sorted(steals.items()):
            node, _, side = field.decode().rpartition(":")
            (made if side == "made" else suffered).add_metric([node], float(value))
        yield made
        yield suffered

        hand_count = CounterMetricFamily(
            "fd_kv_handoffs", "KV caches handed from prefill to decode.", labels=["node", "kind"]
        )
        hand_bytes = CounterMetricFamily(
            "fd_kv_handoff_bytes", "Bytes of KV caches handed to decode.", labels=["node", "kind"]
        )
        for field, value in sorted(handoffs.items()):
            node, suffix = _split(field)
            kind, _, what = suffix.rpartition(":")
            (hand_count if what == "count" else hand_bytes).add_metric([node, kind], float(value))
        yield hand_count
        yield hand_bytes

        # The live cluster, from the scheduler's own state.
        nodes = registry.live_nodes(client, self.config)
        live = GaugeMetricFamily("fd_nodes_live", "Live nodes, by role.", labels=["role"])
        by_role: dict[str, int] = defaultdict(int)
        for info in nodes:
            by_role[info.role] += 1
        for role in keys.ROLES:
            live.add_metric([role], by_role.get(role, 0))
        yield live

        queue = GaugeMetricFamily(
            "fd_queue_depth", "Requests waiting in a live node's own queue.", labels=["node", "role"]
        )
        load = GaugeMetricFamily(
            "fd_load_score",
            "A live node's load score ((waiting + running) / slots).",
            labels=["node", "role"],
        )
        running = GaugeMetricFamily(
            "fd_running_requests", "Requests a live node holds (running or about to run).", labels=["node"]
        )
        slots = GaugeMetricFamily("fd_node_slots", "Requests a live node runs at once.", labels=["node"])
        beat = GaugeMetricFamily(
            "fd_heartbeat_age_seconds", "Seconds since a live node's last heartbeat.", labels=["node"]
        )
        held = GaugeMetricFamily(
            "fd_kv_bytes_held", "KV-cache bytes a node's blobs hold in the stores.", labels=["node"]
        )
        depths = queue_depths(client, topic, [(info.name, info.role) for info in nodes])
        scores: dict[str, dict[str, float]] = {}
        for info in nodes:
            if info.role not in scores:
                scores[info.role] = loadtable.scores(client, self.config, info.role)
            queue.add_metric([info.name, info.role], depths.get(info.name, 0))
            load.add_metric([info.name, info.role], scores[info.role].get(info.name, 0.0))
            running.add_metric([info.name], _number(info.facts.get("running")))
            slots.add_metric([info.name], _number(info.facts.get("slots")))
            beat.add_metric([info.name], info.heartbeat_age_s)
        for node, nbytes in sorted(kv.bytes_held(client, topic).items()):
            held.add_metric([node], nbytes)
        yield from (queue, load, running, slots, beat, held)

        shared = GaugeMetricFamily(
            "fd_shared_queue_depth",
            "Requests waiting in a role's topic-wide "
            "queue (the local scheduler's queue; any node of the role takes them).",
            labels=["role"],
        )
        for role, depth in shared_queue_depths(client, topic).items():
            shared.add_metric([role], depth)
        yield shared


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def queue_depths(client: redis.Redis, topic: str, nodes: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Requests waiting in each node's own queue (every priority list), in one round trip."""
    from fd_celery.scheduler.loadtable import queue_lists

    pipe = client.pipeline(transaction=False)
    for node, role in nodes:
        for name in queue_lists(keys.node_queue(topic, role, node)):
            pipe.llen(name)
    replies = pipe.execute()
    per = len(queue_lists("x"))
    return {node: int(sum(replies[i * per : (i + 1) * per])) for i, (node, _) in enumerate(nodes)}


def shared_queue_depths(client: redis.Redis, topic: str) -> dict[str, int]:
    """Requests waiting in each role's topic-wide queue."""
    from fd_celery.scheduler.loadtable import queue_lists

    pipe = client.pipeline(transaction=False)
    for role in keys.ROLES:
        for name in queue_lists(keys.role_queue(topic, role)):
            pipe.llen(name)
    replies = pipe.execute()
    per = len(queue_lists("x"))
    return {role: int(sum(replies[i * per : (i + 1) * per])) for i, role in enumerate(keys.ROLES)}


def exposition(client: redis.Redis, config: Any) -> bytes:
    """The Prometheus text exposition of one topic, read from Redis now."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(FDCollector(client, config))
    return bytes(generate_latest(reg))


def serve(client: redis.Redis, config: Any, port: int, address: str) -> Any:
    """Serve ``/metrics`` on ``address:port`` from a background thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    reg = CollectorRegistry(auto_describe=False)
    reg.register(FDCollector(client, config))
    started = start_http_server(port, addr=address, registry=reg)
    return started[0] if isinstance(started, tuple) else started
