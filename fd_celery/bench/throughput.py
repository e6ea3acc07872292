"""``fd-celery bench throughput``: one node's output tokens/s against concurrency, three ways.

One node serves the built-in model (``fd-small`` on the CPU by default); a client keeps
``concurrency`` requests in flight (closed loop: when one ends the next starts) of
``prompt_tokens``-token prompts and ``max_tokens`` output tokens. Side by side, in one run:

(a) ``engine``: the engine's own batched loop in one process (an :class:`EngineRunner`, no
    Celery, no Redis), the ceiling a node can reach;
(b) ``old``: the first design, one sequence per pool process: ``celery worker -P prefork -c 2``
    with ``FD_MAX_NUM_SEQS=1``, each child holding its own model and the KV of one sequence;
(c) ``node``: the batching node, ``-P threads -c <max concurrency>`` with
    ``FD_MAX_NUM_SEQS=<max concurrency>``: one model, every request in one batch.

Per concurrency: output tokens/s (all output tokens / first submit to last end), TTFT p50/p99
(submit to the first token at the client), inter-token latency p50/p99 (each streamed chunk's
gap since the one before, split evenly over the tokens it carries) and the memory of the node's
processes (peak of the summed RSS, from /proc; PSS beside it in the JSON). The three start
once; then each level runs on every system in turn while the other two are paused (SIGSTOP), so
each is measured alone on the machine and all three see it in the same state. The nodes share
one private Redis, each on a topic of its own.

Every request of (b) and (c) must carry exactly the tokens that (a) gives the same prompt and
seed (half the requests are greedy, half sampled at temperature 0.8): a mismatch, or a request
that fails, fails the bench (exit status 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from fd_celery.bench.common import write_json
from fd_celery.bench.steal import _percentile

__all__ = ["ThroughputSpec", "run_throughput"]

DEFAULT_CONCURRENCY = (1, 8, 32, 64)
QUICK_CONCURRENCY = (1, 8)
#: ``--quick``: two levels, short answers
QUICK: dict[str, Any] = {"concurrency": QUICK_CONCURRENCY, "max_tokens": 16, "old_max_concurrency": 8}
TARGET_CONCURRENCY = 32  # where the targets are checked
TARGET_VS_ENGINE = 0.8  # (c) >= 0.8 x (a)
TARGET_VS_OLD = 4.0  # (c) >= 4 x (b)
OLD_POOL_PROCESSES = 2  # (b): prefork -c 2, one sequence each
PROMPT_TOKEN_RANGE = (32, 127)  # printable ASCII: a prompt the byte tokenizer could have made
SAMPLED_TEMPERATURE = 0.8  # odd requests sample at this temperature (seeded); even ones are greedy
WARMUP_INDEX = 1_000_000  # warm-up requests' indexes (never compared)
REQUEST_TIMEOUT_S = 3600.0  # one request's stream, start to end
MEMORY_SAMPLE_S = 0.2  # how often the memory sampler reads /proc
ENGINE_START_TIMEOUT_S = 300.0  # (a)'s process: model load and warm-up
SHOWN_MISMATCHES = 10
SYSTEMS = ("engine", "old", "node")
LABELS = {
    "engine": "(a) engine loop",
    "old": "(b) old: prefork -c 2",
    "node": "(c) batching node",
}


@dataclass(frozen=True)
class ThroughputSpec:
    """What one run measures."""

    model: str = "fd-small"
    device: str = "cpu"
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    prompt_tokens: int = 128
    max_tokens: int = 64
    #: requests per concurrency level: ``concurrency * rounds`` (at least ``min_requests``)
    rounds: int = 1
    min_requests: int = 2
    #: (b) runs the levels up to this one only: with two sequences at a time its tokens/s no
    #: longer changes, and a level of 64 requests would take it many minutes
    old_max_concurrency: int = 32
    block_size: int = 16
    #: rounds of every level, the systems taking turns; each system's best round counts (a
    #: shared machine's load swings between rounds)
    repeat: int = 1

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency={self.concurrency!r}: one or more levels, each >= 1")
        for name in (
            "prompt_tokens",
            "max_tokens",
            "rounds",
            "min_requests",
            "old_max_concurrency",
            "block_size",
            "repeat",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")

    @classmethod
    def of(cls, quick: bool = False, **given: Any) -> ThroughputSpec:
        """A spec from options (None: not given): what was given, else ``--quick``'s sizes, else
        the full run's."""
        chosen = {k: v for k, v in given.items() if v is not None}
        return cls(**{**(QUICK if quick else {}), **chosen})

    def requests_at(self, concurrency: int) -> int:
        return max(concurrency * self.rounds, self.min_requests)

    @property
    def max_concurrency(self) -> int:
        return max(self.concurrency)


# --------------------------------------------------------------------------- the requests


def request_of(index: int, prompt_tokens: int) -> dict[str, Any]:
    """Request ``index``: the same prompt, temperature and seed wherever it runs."""
    rnd = random.Random(index)
    return {
        "token_ids": [rnd.randrange(*PROMPT_TOKEN_RANGE) for _ in range(prompt_tokens)],
        "temperature": 0.0 if index % 2 == 0 else SAMPLED_TEMPERATURE,
        "seed": index,
    }


@dataclass
class Done:
    """One request as the client saw it."""

    index: int
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = math.nan
    gaps_s: list[float] = field(default_factory=list)  # inter-token latency samples
    error: str | None = None


#: How a system starts request ``index``: its chunks of token ids as they arrive, then (when the
#: iterator ends) the final token ids.
Start = Callable[[int], tuple[Iterator[Sequence[int]], Callable[[], Sequence[int]]]]


def _timed(index: int, start: Start) -> Done:
    done = Done(index)
    submitted = last = time.perf_counter()
    try:
        chunks, final = start(index)
        for chunk in chunks:
            now = time.perf_counter()
            if not chunk:
                continue
            if math.isnan(done.ttft_s):
                done.ttft_s = now - submitted
            else:  # the gap since the chunk before, split over the tokens this one carries
                done.gaps_s += [(now - last) / len(chunk)] * len(chunk)
            last = now
        done.tokens = [int(t) for t in final()]
    except Exception as exc:  # noqa: BLE001 - a failed request is counted and reported, the run goes on
        done.error = f"{type(exc).__name__}: {exc}"
    return done


def closed_loop(start: Start, concurrency: int, num_requests: int) -> tuple[list[Done], float]:
    """Requests ``0 .. num_requests-1`` with ``concurrency`` in flight; (each one, wall seconds)."""
    results: list[Done] = []
    lock = threading.Lock()
    next_index = iter(range(num_requests))

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            done = _timed(index, start)
            with lock:
                results.append(done)

    threads = [
        threading.Thread(target=client, name=f"bench-client-{i}", daemon=True)
        for i in range(min(concurrency, num_requests))
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return sorted(results, key=lambda d: d.index), wall


# --------------------------------------------------------------------------- memory from /proc


def _proc_kib(path: str, field_name: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # (the process ended between listing and reading)
    return 0


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a worker and its pool children)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(name))
    return pids


def cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) that ``pids`` have used, all their threads."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass  # (it ended between listing and reading)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pids: Sequence[int]) -> int:
    return sum(_proc_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids)


def pss_kib(pids: Sequence[int]) -> int:
    return sum(_proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)


class MemorySampler:
    """The peak summed RSS of the process group being measured (:meth:`watch`), sampled every
    :data:`MEMORY_SAMPLE_S`."""

    def __init__(self) -> None:
        self._pgid = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            pgid = self._pgid
            if pgid:
                rss = rss_kib(group_pids(pgid))
                if pgid == self._pgid:
                    self._peak = max(self._peak, rss)

    def watch(self, pgid: int) -> None:
        """Measure process group ``pgid`` from now on (the peak starts again)."""
        self._pgid, self._peak = pgid, 0

    def take_peak(self) -> tuple[float, float]:
        """(peak RSS since :meth:`watch` or the last call, PSS now), in MiB."""
        pids = group_pids(self._pgid)
        peak = max(self._peak, rss_kib(pids))
        self._peak = 0
        return peak / 1024, pss_kib(pids) / 1024

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- the systems


class System:
    """One of (a), (b), (c): started once, then measured level by level. While another system is
    measured it is paused (SIGSTOP to its process group): an idle node's own timers (load and
    heartbeat every ``scheduler_sync_period``) take a tenth of a core or more, which would count
    against the one being measured on a small machine."""

    name = ""
    pgid = 0

    def __init__(self, levels: Sequence[int]) -> None:
        self.levels = list(levels)
        self.idle_rss_mib = 0.0

    def ready(self) -> None:
        """Wait until it serves (warmed up)."""

    def run_level(self, concurrency: int, num_requests: int) -> tuple[list[Done], float, dict[str, Any]]:
        raise NotImplementedError

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if self.pgid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signum)

    def close(self) -> None:
        """Stop it (resumed first: a stopped process would not see SIGTERM)."""


# --------------------------------------------------------------------------- (a) the engine loop


def _engine_main() -> None:
    """(a)'s process: reads a spec line, then one line per level; answers one JSON line each."""
    spec = json.loads(sys.stdin.readline())
    import torch

    from fd_celery.engine import SamplingParams, load_engine
    from fd_celery.engine.batch import BatchConfig
    from fd_celery.engine.runner import EngineRunner
    from fd_celery.settings import node_knobs

    if node_knobs().torch_threads > 0:  # as a worker does (runner_for)
        torch.set_num_threads(node_knobs().torch_threads)
    runner = EngineRunner(
        load_engine(spec["model"], spec["device"]),
        BatchConfig(
            max_num_seqs=spec["max_num_seqs"],
            block_size=spec["block_size"],
            kv_cache_bytes=spec["kv_cache_bytes"],
        ),
    )
    prompt_tokens, max_tokens = spec["prompt_tokens"], spec["max_tokens"]
    eos = runner.engine.eos_token_id

    def start(index: int) -> tuple[Iterator[Sequence[int]], Callable[[], Sequence[int]]]:
        request = request_of(index, prompt_tokens)
        sequence = runner.generate(
            request["token_ids"],
            SamplingParams(temperature=request["temperature"], seed=request["seed"]),
            max_tokens,
        )
        tokens: list[int] = []

        def chunks() -> Iterator[Sequence[int]]:
            for token in sequence:
                if token == eos:  # (a node's output stops before it, as here)
                    break
                tokens.append(token)
                yield (token,)

        return chunks(), lambda: tokens

    warm, _ = closed_loop(lambda i: start(WARMUP_INDEX + i), 2, 2)
    _answer({"ready": True, "errors": [d.error for d in warm if d.error]})
    for line in sys.stdin:
        level = json.loads(line)
        steps = runner.steps
        done, wall = closed_loop(start, level["concurrency"], level["requests"])
        _answer(
            {
                "wall_s": wall,
                "steps": runner.steps - steps,
                "widest_step": runner.widest_step,
                "done": [asdict(d) for d in done],
            }
        )


def _answer(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


class EngineSystem(System):
    """(a) in a process of its own (``python -m fd_celery.bench.throughput``), so that its memory
    is measured as a node's is, and the bench's own threads do not share its interpreter."""

    name = "engine"

    def __init__(self, spec: ThroughputSpec, batch: dict[str, int], levels: Sequence[int]) -> None:
        super().__init__(levels)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fd_celery.bench.throughput"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._send(
            {
                "model": spec.model,
                "device": spec.device,
                **batch,
                "prompt_tokens": spec.prompt_tokens,
                "max_tokens": spec.max_tokens,
            }
        )
        self.pgid = self.process.pid

    def ready(self) -> None:
        ready = self._read()
        if ready.get("errors"):
            raise RuntimeError(f"the engine's warm-up failed: {ready['errors'][0]}")

    def _send(self, data: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(data) + "\n")
        self.process.stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine process exited (status {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run_level(self, concurrency: int, num_requests: int) -> tuple[list[Done], float, dict[str, Any]]:
        self._send({"concurrency": concurrency, "requests": num_requests})
        answer = self._read()
        done = [Done(**d) for d in answer["done"]]
        return done, answer["wall_s"], {"steps": answer["steps"], "widest_step": answer["widest_step"]}

    def close(self) -> None:
        self.resume()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


# --------------------------------------------------------------------------- (b) and (c): a node


def _client_start(client: Any, spec: ThroughputSpec) -> Start:
    def start(index: int) -> tuple[Iterator[Sequence[int]], Callable[[], Sequence[int]]]:
        request = request_of(index, spec.prompt_tokens)
        handle = client.submit(max_tokens=spec.max_tokens, **request)
        chunks = (c.token_ids for c in handle.stream(timeout=REQUEST_TIMEOUT_S))
        return chunks, lambda: handle.result(timeout=REQUEST_TIMEOUT_S).token_ids

    return start


def _engine_stats(client: Any, node: str) -> dict[str, Any]:
    replies = client.app.control.inspect(destination=[node], timeout=5).stats() or {}
    engine: dict[str, Any] = (replies.get(node, {}).get("fd", {}) or {}).get("engine") or {}
    return engine


def _kv_bytes(spec: ThroughputSpec, sequences: int) -> tuple[int, int]:
    """(KV pool bytes for ``sequences`` requests of this spec, bytes of one block)."""
    import torch

    from fd_celery.engine.batch import KVPool
    from fd_celery.engine.tiny import TINY_CONFIGS

    cfg = TINY_CONFIGS[spec.model]
    per_block = KVPool.bytes_per_block(
        cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, spec.block_size, torch.float32
    )
    blocks = math.ceil((spec.prompt_tokens + spec.max_tokens - 1) / spec.block_size)
    return sequences * blocks * per_block, per_block


# --------------------------------------------------------------------------- the run


def _summary(done: list[Done], wall: float) -> dict[str, Any]:
    ok = [d for d in done if d.error is None]
    tokens = sum(len(d.tokens) for d in ok)
    ttft_ms = [d.ttft_s * 1000 for d in ok if not math.isnan(d.ttft_s)]
    itl_ms = [g * 1000 for d in ok for g in d.gaps_s]
    return {
        "requests": len(done),
        "failed": len(done) - len(ok),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": {"p50": _percentile(ttft_ms, 0.5), "p99": _percentile(ttft_ms, 0.99)},
        "itl_ms": {"p50": _percentile(itl_ms, 0.5), "p99": _percentile(itl_ms, 0.99)},
    }


def _mismatches(
    tokens: dict[tuple[str, int], list[dict[int, list[int]]]], name: str, levels: Sequence[int]
) -> list[str]:
    """Every request of ``name`` (every round) whose tokens differ from (a)'s first round for the
    same prompt and seed; for (a) itself, its later rounds against its first."""
    found = []
    for concurrency in levels:
        ref_rounds = tokens.get(("engine", concurrency), [])
        if not ref_rounds:
            continue
        ref = ref_rounds[0]
        got_rounds = tokens.get((name, concurrency), [])
        for round_, got in enumerate(got_rounds[1:] if name == "engine" else got_rounds):
            for index in sorted(set(ref) & set(got)):
                a, b = ref[index], got[index]
                if a != b:
                    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    found.append(
                        f"{LABELS[name]}, concurrency {concurrency}, round {round_ + 1}, request {index}: "
                        f"{len(b)} tokens against {len(a)}, first difference at token {at}"
                    )
    return found


class NodeSystem(System):
    """(b) or (c): a ``celery worker`` of its own, on a topic of its own, and a client."""

    def __init__(
        self,
        cluster: Any,
        name: str,
        pool: str,
        concurrency: int,
        env: dict[str, str],
        spec: ThroughputSpec,
        levels: Sequence[int],
    ) -> None:
        super().__init__(levels)
        self.name, self.spec, self.concurrency = name, spec, concurrency
        self.topic = f"bench-throughput-{name}-{os.getpid()}"
        self.cluster = cluster
        self.worker = cluster.add_worker(
            f"tp-{name}", pool=pool, concurrency=concurrency, env={**env, "FD_SCHEDULER_TOPIC": self.topic}
        )
        self.pgid = self.worker.process.pid
        self.client: Any = None

    def ready(self) -> None:
        self.cluster.wait_live([self.worker.node], topic=self.topic)
        self.client = self.cluster.client(self.topic)
        self.start = _client_start(self.client, self.spec)
        self._warm(min(4, self.concurrency), self.spec.max_tokens)

    def _warm(self, num: int, max_tokens: int) -> None:
        start = _client_start(self.client, dataclasses.replace(self.spec, max_tokens=max_tokens))
        warm, _ = closed_loop(lambda i: start(WARMUP_INDEX + i), num, num)
        failed = [d.error for d in warm if d.error]
        if failed:
            raise RuntimeError(f"{LABELS[self.name]}: warm-up failed: {failed[0]}")

    def resume(self) -> None:
        super().resume()
        if self.client is not None:
            self._warm(1, 2)  # it serves again (connections, heartbeat) before it is measured

    def run_level(self, concurrency: int, num_requests: int) -> tuple[list[Done], float, dict[str, Any]]:
        before = _engine_stats(self.client, self.worker.node)  # (a prefork node's engines: in its children)
        done, wall = closed_loop(self.start, concurrency, num_requests)
        if not before:
            return done, wall, {}
        after = _engine_stats(self.client, self.worker.node)
        return done, wall, {"steps": after["steps"] - before["steps"], "widest_step": after["widest_step"]}

    def close(self) -> None:
        System.resume(self)
        if self.client is not None:
            self.client.close()
        self.worker.stop()
        self.cluster.workers.remove(self.worker)


class _Results:
    """What the levels measured: figures, every request's tokens, failed requests."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[int, dict[str, Any]]] = {}
        #: every round's tokens of each request, by (system, concurrency)
        self.tokens: dict[tuple[str, int], list[dict[int, list[int]]]] = {}
        self.errors: list[str] = []

    def add(
        self,
        system: System,
        concurrency: int,
        done: list[Done],
        wall: float,
        extra: dict[str, Any],
        memory: tuple[float, float],
    ) -> dict[str, Any]:
        rss, pss = memory
        summary = {
            **_summary(done, wall),
            "rss_mib": rss,
            "pss_mib": pss,
            "idle_rss_mib": system.idle_rss_mib,
            **extra,
        }
        if summary.get("steps"):
            summary["tokens_per_step"] = summary["output_tokens"] / summary["steps"]
            summary["ms_per_step"] = 1000 * wall / summary["steps"]
        by_level = self.figures.setdefault(system.name, {})
        rounds = [*by_level.get(concurrency, {}).get("tokens_per_s_rounds", []), summary["tokens_per_s"]]
        if summary["tokens_per_s"] >= max(rounds):  # the best round's figures count
            by_level[concurrency] = summary
        by_level[concurrency]["tokens_per_s_rounds"] = rounds
        self.tokens.setdefault((system.name, concurrency), []).append(
            {d.index: d.tokens for d in done if d.error is None}
        )
        self.errors += [
            f"{LABELS[system.name]}, concurrency {concurrency}, request {d.index}: {d.error}"
            for d in done
            if d.error
        ]
        return summary


def _run_levels(
    cluster: Any,
    spec: ThroughputSpec,
    levels: list[int],
    old_levels: list[int],
    batch: dict[str, int],
    node_kv: int,
    old_kv: int,
    systems: list[System],
    memory: MemorySampler,
    results: _Results,
) -> None:
    # All three start at once (start-up is not measured), then each waits, paused, for its turn.
    redis_pid = cluster.redis.process.pid
    systems.append(EngineSystem(spec, batch, levels))
    old_env = {"FD_MAX_NUM_SEQS": "1", "FD_KV_CACHE_BYTES": str(old_kv)}
    systems.append(NodeSystem(cluster, "old", "prefork", OLD_POOL_PROCESSES, old_env, spec, old_levels))
    node_env = {"FD_MAX_NUM_SEQS": str(spec.max_concurrency), "FD_KV_CACHE_BYTES": str(node_kv)}
    systems.append(NodeSystem(cluster, "node", "threads", spec.max_concurrency, node_env, spec, levels))
    for system in systems:
        system.ready()
        memory.watch(system.pgid)
        system.idle_rss_mib = memory.take_peak()[0]
        system.pause()
        click.echo(f"{LABELS[system.name]}: ready, {system.idle_rss_mib:.0f} MiB RSS")
    for concurrency in levels:  # each level: every system in turn, the others paused
        num = spec.requests_at(concurrency)
        click.echo(f"concurrency {concurrency}: {num} requests")
        for system in [s for _ in range(spec.repeat) for s in systems]:
            if concurrency not in system.levels:
                continue
            system.resume()
            memory.watch(system.pgid)
            cpu_before = (cpu_s(group_pids(system.pgid)), cpu_s([redis_pid]), time.process_time())
            done, wall, extra = system.run_level(concurrency, num)
            cpu_after = (cpu_s(group_pids(system.pgid)), cpu_s([redis_pid]), time.process_time())
            # Where the CPU went: the system's processes, Redis, and this process (the clients
            # of (b) and (c): following 64 streams costs CPU on the same cores).
            extra["cpu_s"] = {
                part: after - before
                for part, before, after in zip(("system", "redis", "bench_client"), cpu_before, cpu_after)
            }
            summary = results.add(system, concurrency, done, wall, extra, memory.take_peak())
            system.pause()
            click.echo(
                f"  {LABELS[system.name]:22} {summary['tokens_per_s']:8.1f} tokens/s, "
                f"{summary['rss_mib']:6.0f} MiB RSS"
                + (f", {summary['failed']} FAILED" if summary["failed"] else "")
            )


def _terminated(*_: Any) -> None:
    raise SystemExit(143)


def run_throughput(spec: ThroughputSpec, out_dir: str) -> dict[str, Any]:
    """Run the bench, print the table, write JSON and PNG; the report (``ok`` False on any
    mismatch or failed request). SIGTERM stops it as Ctrl-C does: nothing is left running."""
    from fd_celery.engine import BUILTIN_MODELS
    from fd_celery.local_cluster import LocalCluster

    if spec.model not in BUILTIN_MODELS:
        raise click.BadParameter(
            f"model {spec.model!r}: the bench runs a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    levels = sorted(set(spec.concurrency))
    old_levels = [c for c in levels if c <= spec.old_max_concurrency]
    top = spec.max_concurrency
    node_kv, per_block = _kv_bytes(spec, top)
    old_kv, _ = _kv_bytes(spec, 1)
    click.echo(
        f"{spec.model} on {spec.device}: {spec.prompt_tokens}-token prompts, {spec.max_tokens} output tokens, "
        f"concurrency {', '.join(map(str, levels))}; KV pool {node_kv / 2**20:.0f} MiB for {top} sequences "
        f"(a, c), {old_kv / 2**20:.1f} MiB per pool process (b)"
    )
    batch = {"max_num_seqs": top, "block_size": spec.block_size, "kv_cache_bytes": node_kv}
    results = _Results()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    base_env = {"FD_MODEL": spec.model, "FD_DEVICE": spec.device, "FD_BLOCK_SIZE": str(spec.block_size)}
    systems: list[System] = []
    memory = MemorySampler()
    try:
        with LocalCluster(env=base_env) as cluster:
            try:
                _run_levels(
                    cluster, spec, levels, old_levels, batch, node_kv, old_kv, systems, memory, results
                )
            finally:  # resumed and stopped before the cluster goes (a stopped process ignores SIGTERM)
                for system in reversed(systems):
                    system.close()
    finally:
        memory.stop()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)

    mismatches = [
        *_mismatches(results.tokens, "node", levels),
        *_mismatches(results.tokens, "old", old_levels),
        *_mismatches(results.tokens, "engine", levels),
    ]
    report = _report(spec, levels, results.figures, mismatches, results.errors, batch, old_kv, per_block)
    _print(report, levels)
    write_json(out_dir, "throughput", report)
    _plot(out_dir, report, levels)
    return report


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _report(
    spec: ThroughputSpec,
    levels: list[int],
    results: dict[str, dict[int, dict[str, Any]]],
    mismatches: list[str],
    errors: list[str],
    batch: dict[str, int],
    old_kv: int,
    per_block: int,
) -> dict[str, Any]:
    def tps(name: str, c: int) -> float | None:
        level = results.get(name, {}).get(c)
        return level["tokens_per_s"] if level else None

    def rss(name: str, c: int) -> float | None:
        level = results.get(name, {}).get(c)
        return level["rss_mib"] if level else None

    def cpu(name: str, c: int) -> float | None:
        level = results.get(name, {}).get(c)
        return _cpu_per_token_ms(level) if level else None

    ratios = {
        str(c): {
            "node_vs_engine": _ratio(tps("node", c), tps("engine", c)),
            "node_vs_old": _ratio(tps("node", c), tps("old", c)),
            "node_rss_vs_old": _ratio(rss("node", c), rss("old", c)),
            "node_cpu_per_token_vs_engine": _ratio(cpu("node", c), cpu("engine", c)),
        }
        for c in levels
    }
    at = TARGET_CONCURRENCY if TARGET_CONCURRENCY in levels else None
    targets: dict[str, Any] = {"concurrency": TARGET_CONCURRENCY}
    if at is not None:
        r = ratios[str(at)]
        targets.update(
            node_vs_engine={"target": TARGET_VS_ENGINE, "measured": r["node_vs_engine"]},
            node_vs_old={"target": TARGET_VS_OLD, "measured": r["node_vs_old"]},
            node_rss_vs_old={"target": "< 1", "measured": r["node_rss_vs_old"]},
        )
    return {
        "benchmark": "throughput",
        "spec": {**asdict(spec), "concurrency": levels},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": os.environ.get("FD_TORCH_THREADS", "1 (default)"),
        },
        "systems": {
            "engine": f"EngineRunner in one process, no Celery or Redis; max_num_seqs {batch['max_num_seqs']}",
            "old": f"celery worker -P prefork -c {OLD_POOL_PROCESSES}, FD_MAX_NUM_SEQS=1, "
            f"FD_KV_CACHE_BYTES={old_kv}",
            "node": f"celery worker -P threads -c {batch['max_num_seqs']}, FD_MAX_NUM_SEQS={batch['max_num_seqs']}, "
            f"FD_KV_CACHE_BYTES={batch['kv_cache_bytes']}",
        },
        "kv_block_bytes": per_block,
        "results": {name: {str(c): v for c, v in by_level.items()} for name, by_level in results.items()},
        "ratios": ratios,
        "targets": targets,
        "mismatches": mismatches,
        "failed_requests": errors,
        "ok": not mismatches and not errors,
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print(report: dict[str, Any], levels: list[int]) -> None:
    results = report["results"]
    click.echo("")
    click.echo(
        f"{'conc':>4}  {'system':22} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'RSS MiB':>8} {'CPU/token':>9}"
    )
    for c in levels:
        for name in SYSTEMS:
            level = results.get(name, {}).get(str(c))
            if level is None:
                click.echo(f"{c:>4}  {LABELS[name]:22} {'(not run)':>9}")
                continue
            click.echo(
                f"{c:>4}  {LABELS[name]:22} {level['tokens_per_s']:9.1f} {level['ttft_ms']['p50']:9.0f} "
                f"{level['ttft_ms']['p99']:9.0f} {level['itl_ms']['p50']:8.1f} {level['itl_ms']['p99']:8.1f} "
                f"{level['rss_mib']:8.0f} {_cpu_per_token_ms(level):9.1f}"
            )
    click.echo(
        "(TTFT, ITL and CPU/token in ms; RSS: peak of the node's processes summed; CPU/token: CPU "
        "time of the node's processes per output token, Redis and the clients not counted)"
    )
    click.echo("")
    click.echo(f"{'conc':>4}  {'c/a tokens/s':>12} {'c/b tokens/s':>12} {'c/b RSS':>8} {'c/a CPU/token':>13}")
    for c in levels:
        r = report["ratios"][str(c)]
        click.echo(
            f"{c:>4}  {_fmt(r['node_vs_engine']):>12} {_fmt(r['node_vs_old']):>12} {_fmt(r['node_rss_vs_old']):>8} "
            f"{_fmt(r['node_cpu_per_token_vs_engine']):>13}"
        )
    targets = report["targets"]
    if "node_vs_engine" in targets:
        ve, vo, mem = (
            targets["node_vs_engine"]["measured"],
            targets["node_vs_old"]["measured"],
            (targets["node_rss_vs_old"]["measured"]),
        )
        click.echo(
            f"targets at concurrency {TARGET_CONCURRENCY}: c/a {_fmt(ve)} (>= {TARGET_VS_ENGINE}: "
            f"{_met(ve is not None and ve >= TARGET_VS_ENGINE)}), c/b {_fmt(vo)} (>= {TARGET_VS_OLD:g}: "
            f"{_met(vo is not None and vo >= TARGET_VS_OLD)}), memory c/b {_fmt(mem)} (< 1: "
            f"{_met(mem is not None and mem < 1)})"
        )
    click.echo("")
    for line in report["failed_requests"][:SHOWN_MISMATCHES]:
        click.echo(f"FAILED {line}")
    for line in report["mismatches"][:SHOWN_MISMATCHES]:
        click.echo(f"MISMATCH {line}")
    more = len(report["mismatches"]) - SHOWN_MISMATCHES
    if more > 0:
        click.echo(f"... and {more} more mismatches")
    click.echo(
        f"token exactness against (a): {len(report['mismatches'])} mismatches; "
        f"{len(report['failed_requests'])} failed requests"
    )


def _cpu_per_token_ms(level: dict[str, Any]) -> float:
    tokens = level["output_tokens"]
    return 1000 * level["cpu_s"]["system"] / tokens if tokens else math.nan


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _plot(out_dir: str, report: dict[str, Any], levels: list[int]) -> str | None:
    """Tokens/s against concurrency, one line per system (PNG), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        click.echo("matplotlib is not installed (pip install fd_celery[plot]): no PNG written")
        return None
    spec = report["spec"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in zip(SYSTEMS, ("#718096", "#a0aec0", "#2b6cb0")):
        by_level = report["results"].get(name, {})
        xs = [c for c in levels if str(c) in by_level]
        ax.plot(
            xs, [by_level[str(c)]["tokens_per_s"] for c in xs], marker="o", color=color, label=LABELS[name]
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(
        f"{spec['model']} on {spec['device']}: {spec['prompt_tokens']}-token prompts, {spec['max_tokens']} output tokens"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    click.echo(f"wrote {path}")
    return path


if __name__ == "__main__":
    _engine_main()
