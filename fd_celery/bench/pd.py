"""``fd-celery bench pd``: the splitwise hand-off, against the machine's own limits.

1. KV stores in this process, for caches of several sizes (real tensors, the layout of a model's
   per-layer cache): write with ``kv.put`` and read with ``kv.take`` (the decode side:
   check, load, release). Beside each, measured in the same run on the same bytes: a plain
   memcpy, and a raw Redis SET + GET (+ DEL). Throughput = bytes / (write + read).
2. A real cluster (one prefill node, one decode node, the built-in model): the hand-off latency
   (prefill's first token to the decode task starting, p50/p99), and streaming: tokens per
   second seen by a client through the output stream against the engine decoding alone.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import click

from fd_celery.bench.common import bar_plot, write_json
from fd_celery.bench.steal import _percentile
from fd_celery.local_cluster import LocalCluster, RedisServer

SIZES_MB = (1, 16, 64)
TOPIC = "bench-pd"


def _cache_of(megabytes: int) -> Any:
    import torch

    from fd_celery.engine.base import KVCache

    layers, heads, dim = 8, 8, 64
    tokens = max(1, megabytes * (1 << 20) // (layers * 2 * heads * dim * 4))
    gen = torch.Generator().manual_seed(megabytes)
    make = lambda: torch.randn(heads, tokens, dim, generator=gen)  # noqa: E731
    return KVCache(keys=[make() for _ in range(layers)], values=[make() for _ in range(layers)])


def _best(fns: dict[str, Any], repeat: int) -> dict[str, float]:
    """The best time of each function, taking turns: one round runs each once, so a baseline and
    what is compared with it see the same state of the machine."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(spent) for name, spent in times.items()}


def _measure(client: Any, mb: int, repeat: int) -> dict[str, Any]:
    """One cache size: memcpy, raw Redis SET+GET(DEL) and each KV store, on the same bytes."""
    import numpy as np
    import torch

    cache = _cache_of(mb)
    nbytes = cache.nbytes
    blob = np.concatenate([t.view(-1).numpy().view(np.uint8) for t in cache.tensors()])
    target = np.empty_like(blob)
    payload = blob.tobytes()
    # Each store beside its own baseline (Redis frees big values on its own threads, on the same
    # cores: a Redis round trip would slow whatever runs next).
    best = _best(
        {
            "memcpy": lambda: np.copyto(target, blob),
            "shm": lambda: _round_trip(client, cache, "shm", mb, "cpu"),
        },
        repeat,
    )
    best.update(
        _best(
            {
                "raw_redis": lambda: (client.set("fd:bench:raw", payload), client.getdel("fd:bench:raw")),
                "redis": lambda: _round_trip(client, cache, "redis", mb, "cpu"),
            },
            repeat,
        )
    )
    row: dict[str, Any] = {
        "size_mb": round(nbytes / (1 << 20), 1),
        "bytes": nbytes,
        "memcpy_gb_s": nbytes / best["memcpy"] / 1e9,
        "memcpy_ms": best["memcpy"] * 1000,
        "raw_redis_set_get_gb_s": nbytes / best["raw_redis"] / 1e9,
    }
    for kind in ("shm", "redis"):
        row[f"{kind}_gb_s"] = nbytes / best[kind] / 1e9
        row[f"{kind}_ms"] = best[kind] * 1000
    row["shm_vs_memcpy"] = row["shm_gb_s"] / row["memcpy_gb_s"]
    row["redis_vs_raw_redis"] = row["redis_gb_s"] / row["raw_redis_set_get_gb_s"]
    if torch.cuda.is_available():
        row.update(_measure_cuda(client, cache, mb, repeat))
    return row


def _round_trip(client: Any, cache: Any, kind: str, mb: int, device: str) -> None:
    """Write a blob and take it back, as prefill and decode do (check, load, release)."""
    from fd_celery import kv

    # (hold/release off: the bytes-held index rides on round trips the hand-off makes anyway)
    ref = kv.put(
        cache,
        kind=kind,
        topic=TOPIC,
        request_id=f"b{mb}",
        owner="bench",
        host=socket.gethostname(),
        ttl_s=60,
        first_token=0,
        prompt_tokens=cache.num_tokens,
        client=client,
        hold=False,
    )
    kv.take(ref, device, client, release=False)
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _measure_cuda(client: Any, cache: Any, mb: int, repeat: int) -> dict[str, Any]:
    """The cuda store against a device-to-device copy of the same bytes. In one process: the
    buffer is taken from the producer's registry, not mapped by IPC (the other figures are the
    same: copy in, checksum, header, share, claim, check, copy out)."""
    import torch

    from fd_celery.engine.base import KVCache

    gpu = KVCache(keys=[t.cuda() for t in cache.keys], values=[t.cuda() for t in cache.values])
    src = torch.cat([t.reshape(-1).view(torch.uint8) for t in gpu.tensors()])
    dst = torch.empty_like(src)

    def d2d() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    best = _best({"d2d": d2d, "cuda": lambda: _round_trip(client, gpu, "cuda", mb, "cuda")}, repeat)
    return {
        "d2d_copy_gb_s": cache.nbytes / best["d2d"] / 1e9,
        "cuda_gb_s": cache.nbytes / best["cuda"] / 1e9,
        "cuda_ms": best["cuda"] * 1000,
        "cuda_vs_d2d_copy": best["d2d"] / best["cuda"],
    }


def _stores(redis_server: RedisServer, repeat: int) -> list[dict[str, Any]]:
    client = redis_server.client()
    rows = []
    for mb in SIZES_MB:
        row = _measure(client, mb, repeat)
        rows.append(row)
        click.echo(
            f"{row['size_mb']:7.1f} MB  memcpy {row['memcpy_gb_s']:6.2f} GB/s  "
            f"shm {row['shm_gb_s']:6.2f} GB/s ({row['shm_vs_memcpy']:.0%} of memcpy)  "
            f"redis {row['redis_gb_s']:6.2f} GB/s ({row['redis_vs_raw_redis']:.0%} of raw SET+GET "
            f"{row['raw_redis_set_get_gb_s']:.2f} GB/s)"
        )
        if "cuda_gb_s" in row:
            click.echo(
                f"{'':7} GPU   copy {row['d2d_copy_gb_s']:6.2f} GB/s  cuda {row['cuda_gb_s']:6.2f} GB/s "
                f"({row['cuda_vs_d2d_copy']:.0%} of a device copy, one process)"
            )
    return rows


def _cluster_figures(redis_server: RedisServer, requests: int, stream_tokens: int) -> dict[str, Any]:
    from fd_celery.engine import SamplingParams, load_engine

    env = {"FD_SCHEDULER_TOPIC": TOPIC, "FD_SCHEDULER_NAME": "splitwise"}
    with LocalCluster(redis_server, env=env) as cluster:
        cluster.add_split_pair(TOPIC)
        client = cluster.client(TOPIC, scheduler_name="splitwise")
        for _ in range(3):  # warm-up
            client.submit("warm", max_tokens=2).result(timeout=120)
        results = [
            client.submit(f"handoff {i}", max_tokens=2, seed=i).result(timeout=120) for i in range(requests)
        ]
        handoff_ms = [r.extra["handoff_s"] * 1000 for r in results]
        handle = client.submit("stream", max_tokens=stream_tokens, seed=1)
        arrivals = [time.perf_counter() for chunk in handle.stream(timeout=300) for _ in chunk.token_ids]
        handle.result(timeout=60)
    streamed = (len(arrivals) - 2) / (arrivals[-1] - arrivals[1]) if len(arrivals) > 2 else float("nan")
    engine = load_engine("fd-tiny")
    ids = engine.encode("stream")
    started = time.perf_counter()
    count = sum(1 for _ in engine.generate(ids, SamplingParams(0.0, 1), stream_tokens))
    alone = count / (time.perf_counter() - started)
    return {
        "handoff_ms": {
            "p50": _percentile(handoff_ms, 0.5),
            "p99": _percentile(handoff_ms, 0.99),
            "mean": statistics.fmean(handoff_ms),
            "count": len(handoff_ms),
        },
        "kv_store_used": results[0].extra.get("kv_store"),
        "stream_tokens_per_s": streamed,
        "engine_alone_tokens_per_s": alone,
        "stream_vs_engine": streamed / alone,
    }


def run_pd(repeat: int, requests: int, stream_tokens: int, out_dir: str) -> dict[str, Any]:
    redis_server = RedisServer().start()
    try:
        click.echo(f"KV stores against memcpy and raw Redis (best of {repeat}):")
        stores = _stores(redis_server, repeat)
        click.echo("cluster: 1 prefill + 1 decode node ...")
        cluster = _cluster_figures(redis_server, requests, stream_tokens)
    finally:
        redis_server.stop()
    big = [row for row in stores if row["bytes"] >= 16 << 20]
    report = {
        "benchmark": "pd",
        "stores": stores,
        **cluster,
        "targets": {
            "shm_vs_memcpy_at_16mb_plus": 0.5,
            "redis_vs_raw_redis": 0.5,
            "handoff_overhead_ms_p50": 5,
        },
        "shm_vs_memcpy_min_16mb_plus": min(row["shm_vs_memcpy"] for row in big),
        "redis_vs_raw_redis_min": min(row["redis_vs_raw_redis"] for row in stores),
    }
    click.echo(
        f"hand-off (prefill first token -> decode start): p50 {cluster['handoff_ms']['p50']:.2f} ms, "
        f"p99 {cluster['handoff_ms']['p99']:.2f} ms over {cluster['handoff_ms']['count']} requests "
        f"({cluster['kv_store_used']} store)"
    )
    click.echo(
        f"streaming: {cluster['stream_tokens_per_s']:.0f} tokens/s through the stream vs "
        f"{cluster['engine_alone_tokens_per_s']:.0f} tokens/s engine alone "
        f"({cluster['stream_vs_engine']:.0%})"
    )
    write_json(out_dir, "pd", report)
    bar_plot(
        out_dir,
        "pd",
        "KV hand-off throughput at the largest size (GB/s)",
        ["memcpy", "shm store", "raw Redis SET+GET", "redis store"],
        [
            stores[-1]["memcpy_gb_s"],
            stores[-1]["shm_gb_s"],
            stores[-1]["raw_redis_set_get_gb_s"],
            stores[-1]["redis_gb_s"],
        ],
        "GB/s",
    )
    return report
