"""``fd-celery bench throughput`` end to end, as a user runs it, at tiny sizes: it starts its own
Redis, the engine's process and both nodes, prints the table and the ratios, writes the JSON and
the PNG, finds every request's tokens equal to the engine's own, and leaves nothing running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fd_celery.bench.throughput import ThroughputSpec, group_pids, rss_kib
from fd_celery.local_cluster import LocalCluster

pytestmark = pytest.mark.slow

BENCH_TIMEOUT_S = 240  # about 40 s on an idle 2-core machine; much more while other suites run
ARGS = ["--model", "fd-tiny", "--concurrency", "1,4", "--prompt-tokens", "16", "--max-tokens", "8"]


def _bench(out_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from fd_celery.cli.main import main; main()", "bench", "throughput", *args],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        cwd=out_dir,
    )


def test_quick_run_completes_exact_with_table_json_and_plot(tmp_path: Path) -> None:
    # The bench starts a LocalCluster of its own (Redis, `celery worker`s): named here so that
    # conftest's tiers do not count this test as one that starts no worker.
    assert LocalCluster is not None
    run = _bench(tmp_path, *ARGS, "--out", "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for label in ("(a) engine loop", "(b) old: prefork -c 2", "(c) batching node"):
        for level in (1, 4):
            assert any(line.split()[:1] == [str(level)] and label in line for line in out.splitlines()), (
                f"no table row for {label} at concurrency {level}:\n{out}"
            )
    assert "c/a tokens/s" in out and "c/b tokens/s" in out
    assert "token exactness against (a): 0 mismatches; 0 failed requests" in out

    report = json.loads((tmp_path / "results" / "throughput.json").read_text())
    assert report["ok"] is True and report["mismatches"] == [] and report["failed_requests"] == []
    for system in ("engine", "old", "node"):
        for level in ("1", "4"):
            figures = report["results"][system][level]
            assert figures["requests"] == ThroughputSpec(concurrency=(1, 4)).requests_at(int(level))
            assert figures["output_tokens"] > 0 and figures["tokens_per_s"] > 0
            assert figures["ttft_ms"]["p50"] > 0 and figures["rss_mib"] > 0
    assert report["results"]["node"]["4"]["widest_step"] >= 2, "the node never batched requests"
    assert (tmp_path / "results" / "throughput.png").stat().st_size > 0


def test_bad_levels_are_refused_naming_the_option(tmp_path: Path) -> None:
    run = _bench(tmp_path, "--concurrency", "1,zero")
    assert run.returncode == 2
    assert "--concurrency" in run.stderr and "'1,zero'" in run.stderr
    run = _bench(tmp_path, "--model", "no-such-model", "--concurrency", "1")
    assert run.returncode != 0 and "no-such-model" in run.stderr


def test_memory_is_read_for_the_whole_process_group() -> None:
    """The node's memory sums every process of its group (a prefork worker and its children)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert group_pids(child.pid) == [child.pid]
        assert rss_kib([child.pid]) > 1000  # (a Python interpreter: several MiB)
    finally:
        child.kill()
        child.wait()
