"""Send a few generation requests to an fd_celery cluster and print what came back.

The compose file's ``client`` service runs this once the workers are healthy. It uses the app of
``workers.mixed`` (configured from ``FD_SCHEDULER_*`` like the workers), waits until at least
one node is live, streams the first request token by token, and prints a line per request:
who served it, time to first token and time per output token.

    python docker/client.py --requests 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Celery and Redis walk into a bar",
    "In a galaxy far, far away",
    "def fibonacci(n):",
    "The capital of France is",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="how many requests to send (default 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens per request (default 32)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for a live node before giving up (default 120)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each result")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        parser.error("--requests and --max-tokens must be at least 1")

    from fd_celery import Client, FDCeleryError, get_config
    from fd_celery.connection import redis_for
    from fd_celery.scheduler.registry import live_nodes
    from workers.mixed import app

    config = get_config(app)
    print(f"fd_celery client: {config.redacted_url()}, scheduler {config.scheduler_name}, "
          f"topic {config.scheduler_topic!r}", flush=True)

    try:
        nodes = _wait_for_nodes(redis_for(config), config, args.wait, live_nodes)
    except FDCeleryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not nodes:
        print(f"error: no live fd_celery node in topic {config.scheduler_topic!r} after {args.wait:.0f}s",
              file=sys.stderr)
        return 2
    print("live nodes: " + ", ".join(f"{n.name} ({n.role})" for n in nodes), flush=True)

    client = Client(app)
    failures = 0
    try:
        handles = [
            client.submit(PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens,
                          temperature=args.temperature, seed=i)
            for i in range(args.requests)
        ]
    except FDCeleryError as exc:
        print(f"error: could not submit: {exc}", file=sys.stderr)
        return 1

    for i, handle in enumerate(handles):
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            if i == 0:  # show streaming once
                print(f"\n[{i}] {prompt!r} ->", end=" ", flush=True)
                for chunk in handle.stream(timeout=args.timeout):
                    print(chunk.text, end="", flush=True)
                print(flush=True)
            result = handle.result(timeout=args.timeout)
        except FDCeleryError as exc:
            failures += 1
            print(f"[{i}] {handle.request_id}: {type(exc).__name__}: {exc}", flush=True)
            continue
        if i != 0:
            print(f"\n[{i}] {prompt!r} -> {result.text!r}", flush=True)
        print(f"    served_by={','.join(result.served_by)} tokens={len(result.token_ids)} "
              f"finish={result.finish_reason} ttft={result.ttft_s * 1000:.1f}ms "
              f"tpot={result.tpot_s * 1000:.1f}ms stolen={result.stolen}", flush=True)

    print(f"\n{len(handles) - failures}/{len(handles)} requests succeeded", flush=True)
    return 1 if failures else 0


def _wait_for_nodes(client, config, wait_s, live_nodes):  # type: ignore[no-untyped-def]
    """Live nodes of the topic, waiting up to ``wait_s`` for the first; Redis may still be
    starting, so an unreachable Redis is retried until the deadline and then raised."""
    from fd_celery import BrokerUnavailable
    from fd_celery.connection import redis_errors

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with redis_errors(config):
                nodes = live_nodes(client, config)
        except BrokerUnavailable:
            if time.monotonic() >= deadline:
                raise
            nodes = []
        if nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
