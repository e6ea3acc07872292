"""The worker bootstep: a ``celery worker`` of an fd_celery app becomes a node.

On start it decides the node's role and engine (``--fd-role/--fd-model/--fd-device`` or
``FD_ROLE/FD_MODEL/FD_DEVICE``), consumes its role's topic queue and its own node queue, joins the
node registry and heartbeats every ``scheduler_sync_period``. Its ``info()`` is what
``celery inspect stats`` and Flower show under ``fd``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import bootsteps, signals

from fd_celery import keys, kv
from fd_celery.connection import redis_for
from fd_celery.scheduler import loadtable, recovery, registry
from fd_celery.scheduler.stealing import Thief
from fd_celery.settings import NodeSettings, get_config, get_node_settings, node_knobs, set_node_settings
from fd_celery.worker.redaction import install_log_redaction
from fd_celery.worker.runner import loaded_runner

__all__ = ["FDWorkerStep", "FDIntakeStep"]

logger = logging.getLogger(__name__)


class FDWorkerStep(bootsteps.StartStopStep):
    """Node identity, queues, registry and heartbeat of one worker."""

    label = "fd_celery"

    def __init__(
        self,
        worker: Any,
        fd_role: str | None = None,
        fd_model: str | None = None,
        fd_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        app = worker.app
        env = NodeSettings.from_env()
        concurrency = int(getattr(worker, "concurrency", 0) or os.cpu_count() or 1)
        settings = NodeSettings(
            role=fd_role or env.role,
            model=fd_model or env.model,
            device=fd_device or env.device,
            # (one intra-op thread is the fastest for small-batch decoding on CPU: more spin against
            # each other and the other pool processes; FD_TORCH_THREADS gives a big CPU model more)
            torch_threads=node_knobs().torch_threads,
        )
        set_node_settings(app, settings)
        global _worker_app
        _worker_app = app  # pool processes forked from here warm up this app's engine
        install_log_redaction()
        config = get_config(app)
        self.node = worker.hostname
        self.queues = [
            keys.role_queue(config.scheduler_topic, settings.role),
            keys.node_queue(config.scheduler_topic, settings.role, self.node),
        ]
        for queue in self.queues:
            app.amqp.queues.select_add(queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_ms = int(time.time() * 1000)
        self.slots = concurrency
        self.app = app
        self.thief: Thief | None = None
        self.load_score = 0.0
        self.waiting = 0
        self.facts: dict[str, Any] = {}
        self._held: list[str] | None = None  # delivery tags last published (see recovery)
        self._held_at = 0.0

    def start(self, worker: Any) -> None:
        app = worker.app
        config = get_config(app)
        settings = get_node_settings(app)
        if _engine_in_main_process(worker):  # the model loads before the node joins the registry
            from fd_celery.worker.runner import runner_for

            # a batching node runs as many requests at once as its engine has sequence slots
            self.slots = min(self.slots, runner_for(app).capacity().max_num_seqs)
        client = redis_for(config)
        self.facts = self._facts(worker)
        registry.register(client, config, self.node, self.facts)
        self._publish(client, config)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, args=(app,), name="fd-heartbeat", daemon=True)
        self._thread.start()
        if config.scheduler_name in ("global", "splitwise"):
            if config.scheduler_name == "splitwise":  # no stealing between live nodes; orphans only
                config = config.replace(scheduler_min_load_score=ORPHANS_ONLY_SCORE)
            visibility_s = float((app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
            self.thief = Thief(
                client, config, settings.role, self.node, self.slots, _CeleryWorkerView(), visibility_s
            )
            self.thief.start()
        logger.info(
            "fd_celery node %s: role %s, model %s on %s, scheduler %s, topic %s, queues %s",
            self.node,
            settings.role,
            settings.model,
            settings.device,
            config.scheduler_name,
            config.scheduler_topic,
            ", ".join(self.queues),
        )

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self.thief is not None:
            self.thief.stop()
            self.thief = None
        if self._thread is not None:
            self._thread.join(timeout=2)
        config = get_config(worker.app)
        try:
            client = redis_for(config)
            registry.unregister(client, config, self.node)
            _, waiting = self._publish(client, config, beat=False)
            if not waiting:  # requests still queued here stay visible to thieves as orphans
                loadtable.remove(client, config, get_node_settings(worker.app).role, [self.node])
        except Exception as exc:  # noqa: BLE001 - Redis may already be gone at shutdown
            logger.warning("could not leave the node registry: %s", exc)

    shutdown = stop

    def info(self, worker: Any) -> dict[str, Any]:
        settings = get_node_settings(worker.app)
        config = get_config(worker.app)
        made = suffered = None
        try:
            counters = redis_for(config).hmget(
                keys.steals_hash(config.scheduler_topic), f"{self.node}:made", f"{self.node}:suffered"
            )
            made, suffered = (int(c or 0) for c in counters)
        except Exception as exc:  # noqa: BLE001 - the stats answer without the counters
            logger.warning("could not read steal counters: %s", exc)
        return {
            "fd": {
                "node": self.node,
                "role": settings.role,
                "model": settings.model,
                "device": settings.device,
                "scheduler": config.scheduler_name,
                "topic": config.scheduler_topic,
                "slots": self.slots,
                "running": _requests_held(),
                "queue_depth": self.waiting,
                "load_score": round(self.load_score, 4),
                "steals_made": made,
                "steals_suffered": suffered,
                "kv_stores": kv.stores_offered(settings.device),
                "queues": self.queues,
                "engine": _engine_stats(),
            }
        }

    def _facts(self, worker: Any) -> dict[str, Any]:
        settings = get_node_settings(worker.app)
        return {
            "role": settings.role,
            "model": settings.model,
            "device": settings.device,
            "slots": self.slots,
            "host": socket.gethostname(),
            "kv_stores": kv.stores_offered(settings.device),
            "pid": os.getpid(),
            "started_ms": self.started_ms,
        }

    def _publish(self, client: Any, config: Any, beat: bool = True) -> tuple[float, int]:
        """Heartbeat plus load score, both from the truth (see :mod:`fd_celery.scheduler.loadtable`)."""
        role = get_node_settings(self.app).role
        if not beat:
            queue = self.queues[1]
            return 0.0, sum(client.llen(q) for q in loadtable.queue_lists(queue))
        kv_running, kv_free_tokens = 0.0, None
        runner = loaded_runner()
        if runner is not None:  # the engine runs in this process: its KV cache counts
            capacity = runner.capacity()
            used = capacity.total_blocks - capacity.free_blocks
            kv_running = self.slots * used / max(1, capacity.total_blocks)
            kv_free_tokens = capacity.free_blocks * capacity.block_size
        self.load_score, self.waiting, known = loadtable.publish(
            client,
            config,
            role,
            self.node,
            _requests_held(),
            self.slots,
            self.queues[1],
            kv_running=kv_running,
            kv_free_tokens=kv_free_tokens,
        )
        if not known:  # Redis lost its data (restart without persistence, failover): join again
            logger.warning("node %s was missing from the registry; registering again", self.node)
            registry.register(client, config, self.node, self.facts)
            self._held = None
        held = _held_tags()
        now = time.monotonic()
        # What another node gives back if this one dies: written when it changes, and once a
        # second anyway (a node judged dead while frozen had its list claimed, and must say again).
        if held is not None and (held != self._held or now - self._held_at >= recovery.INTERVAL_S):
            recovery.publish_held(client, config, self.node, held)
            self._held, self._held_at = held, now
        return self.load_score, self.waiting

    def _heartbeat(self, app: Any) -> None:
        config = get_config(app)
        client = redis_for(config)
        transport_options = dict(app.conf.broker_transport_options or {})
        next_sweep = time.monotonic()
        # Judge others dead only after beating without a break for a whole expire period: after
        # a Redis outage every heartbeat is stale, and the live nodes must get to beat again.
        next_recovery = time.monotonic() + config.expire_period_s
        while not self._stop.wait(config.sync_period_s):
            try:
                self._publish(client, config)
                if time.monotonic() >= next_recovery:  # what dead nodes held goes back to the queues
                    recovery.restore_dead_nodes(client, config, transport_options)
                    next_recovery = time.monotonic() + recovery.INTERVAL_S
                if time.monotonic() >= next_sweep:  # KV blobs whose request expired
                    kv.sweep_shm(config.ttl_s + SWEEP_GRACE_S)
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            except Exception as exc:  # noqa: BLE001 - a heartbeat survives anything; it logs and goes on
                logger.warning("heartbeat failed: %s", exc)
                self._stop.wait(min(1.0, config.expire_period_s / 2))
                next_recovery = time.monotonic() + config.expire_period_s


def _held_tags() -> list[str] | None:
    """The delivery tags of the messages this worker holds (None: the set changed under us)."""
    from celery.worker import state

    try:
        requests = list(state.reserved_requests)
    except RuntimeError:  # changed size during iteration: next beat
        return None
    tags = (getattr(getattr(r, "message", None), "delivery_tag", None) for r in requests)
    return sorted(t for t in tags if isinstance(t, str))


def _engine_in_main_process(worker: Any) -> bool:
    """A thread pool (or solo) runs its tasks, and so its engine, in the worker process itself."""
    pool = getattr(worker, "pool_cls", None)
    name = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}".lower()
    return "thread" in name or "solo" in name


class FDIntakeStep(bootsteps.StartStopStep):
    """A node takes a request off Redis only when its engine has room for it.

    Celery already consumes only while it holds fewer requests than its pool has slots
    (``worker_disable_prefetch``); where the engine runs in the worker process (a thread pool)
    this step adds the engine's own answer: a free sequence slot and a free KV block, with
    nobody waiting inside the engine. Until then waiting requests stay in Redis, where other
    nodes may steal them."""

    label = "fd_celery intake"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from types import MethodType

        consumer = getattr(c, "task_consumer", None)
        qos = getattr(getattr(consumer, "channel", None), "qos", None)
        if qos is None or not hasattr(qos, "can_consume") or getattr(qos, "_fd_intake", False):
            return
        before = qos.can_consume

        def can_consume(self: Any) -> bool:
            runner = loaded_runner()
            if runner is None:
                return bool(before())
            held = _requests_held()  # taken off Redis, whether or not they reached the engine yet
            return held < runner.capacity().max_num_seqs and runner.has_room(held) and bool(before())

        qos.can_consume = MethodType(can_consume, qos)
        qos._fd_intake = True


def _engine_stats() -> dict[str, Any] | None:
    """The engine of this process, when it runs here (a thread or solo pool; a prefork node's
    engines live in its children): KV blocks total/free, running and waiting sequences, steps."""
    runner = loaded_runner()
    if runner is None:
        return None
    return {**runner.capacity().to_dict(), "steps": runner.steps, "widest_step": runner.widest_step}


def _requests_held() -> int:
    """Requests this worker holds: running, or received and about to run."""
    from celery.worker import state

    return len(state.reserved_requests)


class _CeleryWorkerView:
    """The thief's view of this worker, from Celery's own worker state (main process)."""

    def held(self) -> int:
        return _requests_held()

    def arrived(self, request_id: str, started_before: int) -> bool:
        from celery.worker import state

        return request_id in state.requests or state.all_total_count[0] > started_before

    def started_count(self) -> int:
        from celery.worker import state

        return int(state.all_total_count[0])


_worker_app: Any = None

ORPHANS_ONLY_SCORE = 1e9  # splitwise thieves take only the queues of dead nodes
SWEEP_INTERVAL_S = 10.0
SWEEP_GRACE_S = 60.0


@signals.worker_process_shutdown.connect
def _close_kv_pool(**_: Any) -> None:
    """Remove this process's idle shared-memory slot files (a pool child)."""
    kv.close_pool()


@signals.worker_shutdown.connect
def _close_kv_pools(**_: Any) -> None:
    """The worker's own slot files (a solo pool), and those its pool children left if they were
    killed rather than stopped (their pids are gone by now)."""
    kv.close_pool()
    if _worker_app is not None:
        kv.sweep_shm(get_config(_worker_app).ttl_s + SWEEP_GRACE_S)


@signals.worker_process_init.connect
def _close_kv_pool_on_sigterm(**_: Any) -> None:
    """Celery gives pool children the default SIGTERM (die at once), and a service manager
    signals every process of the worker: remove the slot files first, then die as before."""
    import signal

    def on_sigterm(signum: int, frame: Any) -> None:
        kv.close_pool()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, on_sigterm)


@signals.worker_process_init.connect
def _load_engine_in_child(**_: Any) -> None:
    """Load the model when a pool process starts, not on its first request."""
    if _worker_app is None:
        return
    from fd_celery.worker.runner import runner_for

    try:
        runner_for(_worker_app)
    except Exception:
        logger.exception("could not load the model in a pool process")
