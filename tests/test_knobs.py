"""A node's knobs (``FD_*`` environment variables, :class:`fd_celery.settings.NodeKnobs`): their
defaults, a bad value of each a ``ConfigError`` naming the variable, read when first used (a bad
one does not break ``import fd_celery.kv``, it breaks its use), and the KV store table, whose
stores load only when used (a client never imports torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fd_celery.errors import ConfigError
from fd_celery.settings import NodeKnobs, node_knobs, reload_node_knobs

REPO = Path(__file__).resolve().parents[1]

KNOB_VARS = (
    "FD_MAX_KV_BYTES",
    "FD_KV_SHM_POOL_SLOTS",
    "FD_KV_SHM_POOL_BYTES",
    "FD_KV_CUDA_GRACE_S",
    "FD_KV_STORE",
    "FD_TORCH_THREADS",
    "FD_MAX_NUM_SEQS",
    "FD_BLOCK_SIZE",
    "FD_KV_CACHE_BYTES",
    "FD_MAX_NUM_BATCHED_TOKENS",
    "FD_VISIBILITY_TIMEOUT_S",
)


@pytest.fixture
def clean_knobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No knob set; this process's knobs read again from its own environment afterwards."""
    for name in KNOB_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    reload_node_knobs()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in KNOB_VARS}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_knob_has_a_variable_a_unit_and_a_doc():
    described = NodeKnobs.describe()
    assert [env for env, *_ in described] == list(KNOB_VARS)
    assert all(doc for *_, doc in described)


def test_defaults_are_todays():
    knobs = NodeKnobs.from_env({})
    assert knobs == NodeKnobs()
    assert (knobs.max_kv_bytes, knobs.kv_shm_pool_slots, knobs.kv_shm_pool_bytes) == (8 << 30, 4, 1 << 30)
    assert (knobs.kv_cuda_grace_s, knobs.kv_store, knobs.torch_threads, knobs.visibility_timeout_s) == (
        5.0,
        "auto",
        1,
        None,
    )


def test_good_values_are_parsed():
    knobs = NodeKnobs.from_env(
        {
            "FD_MAX_KV_BYTES": "1048576",
            "FD_KV_SHM_POOL_SLOTS": "0",
            "FD_KV_SHM_POOL_BYTES": " 4096 ",
            "FD_KV_CUDA_GRACE_S": "0.5",
            "FD_KV_STORE": " Redis ",
            "FD_TORCH_THREADS": "8",
            "FD_VISIBILITY_TIMEOUT_S": "2m",
        }
    )
    assert knobs == NodeKnobs(
        max_kv_bytes=1 << 20,
        kv_shm_pool_slots=0,
        kv_shm_pool_bytes=4096,
        kv_cuda_grace_s=0.5,
        kv_store="redis",
        torch_threads=8,
        visibility_timeout_s=120.0,
    )
    assert (
        NodeKnobs.from_env({"FD_VISIBILITY_TIMEOUT_S": "", "FD_KV_STORE": "  "}) == NodeKnobs()
    )  # empty: unset


BAD = [
    ("FD_MAX_KV_BYTES", "8G", "an integer"),
    ("FD_MAX_KV_BYTES", "-1", "an integer"),
    ("FD_KV_SHM_POOL_SLOTS", "four", "an integer from 0 to 999"),
    ("FD_KV_SHM_POOL_SLOTS", "1000", "an integer from 0 to 999"),
    ("FD_KV_SHM_POOL_BYTES", "1.5", "an integer"),
    ("FD_KV_CUDA_GRACE_S", "soon", "a number from 0"),
    ("FD_KV_CUDA_GRACE_S", "-1", "a number from 0"),
    ("FD_KV_STORE", "gpu", "auto, shm, redis, cuda"),
    ("FD_TORCH_THREADS", "many", "an integer from 0 to 1024"),
    ("FD_TORCH_THREADS", "-2", "an integer from 0 to 1024"),
    ("FD_VISIBILITY_TIMEOUT_S", "abc", "a string with a unit"),
    ("FD_VISIBILITY_TIMEOUT_S", "0", "positive duration"),
]


@pytest.mark.parametrize("env,value,allowed", BAD, ids=[f"{e}={v}" for e, v, _ in BAD])
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(env, value, allowed):
    with pytest.raises(ConfigError) as info:
        NodeKnobs.from_env({env: value})
    message = str(info.value)
    assert message.startswith(f"{env}={value!r}"), message
    assert allowed in message, message


def test_knobs_are_read_once_and_again_on_request(clean_knobs):
    clean_knobs.setenv("FD_KV_SHM_POOL_SLOTS", "7")
    assert reload_node_knobs().kv_shm_pool_slots == 7
    clean_knobs.setenv("FD_KV_SHM_POOL_SLOTS", "9")
    assert node_knobs().kv_shm_pool_slots == 7  # kept
    assert reload_node_knobs().kv_shm_pool_slots == 9
    clean_knobs.setenv("FD_KV_SHM_POOL_SLOTS", "nine")
    with pytest.raises(ConfigError, match="FD_KV_SHM_POOL_SLOTS"):
        reload_node_knobs()


def test_a_bad_max_kv_bytes_breaks_the_kv_use_not_its_import():
    proc = _python(
        """
        import socket, time, uuid
        import fd_celery.kv as kv
        from fd_celery.errors import ConfigError
        from fd_celery.kv.ref import blob_name
        token = uuid.uuid4().hex
        ref = {"kind": "shm", "location": blob_name("knobs", "r-1", token), "topic": "knobs", "request_id": "r-1",
               "token": token, "dtype": "float32", "shapes": [[2, 3]], "num_tokens": 3, "nbytes": 24,
               "checksum": "s64:" + "0" * 16, "owner": "p", "host": socket.gethostname(),
               "expires_at": time.time() + 60, "first_token": 1, "prompt_tokens": 3}
        for what, use in [("check", lambda: kv.KVRef.from_dict(ref)), ("limit", lambda: kv.MAX_KV_BYTES)]:
            try:
                use()
            except ConfigError as exc:
                print(what, "ConfigError", exc)
            else:
                print(what, "accepted")
        """,
        FD_MAX_KV_BYTES="8G",
    )
    assert proc.returncode == 0, proc.stderr  # the import did not raise
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["check", "ConfigError"],
        ["limit", "ConfigError"],
    ], lines
    assert all("FD_MAX_KV_BYTES='8G'" in line for line in lines), lines


def test_a_bad_max_kv_bytes_breaks_a_put():
    proc = _python(
        """
        import torch
        import fd_celery.kv as kv
        from fd_celery.engine.base import KVCache
        from fd_celery.errors import ConfigError
        cache = KVCache(keys=[torch.zeros(2, 3)], values=[torch.zeros(2, 3)])
        try:
            kv.put(cache, kind="shm", topic="knobs", request_id="r-2", owner="p", host="h", ttl_s=60, first_token=1,
                   prompt_tokens=3)
        except ConfigError as exc:
            print("ConfigError", exc)
        """,
        FD_MAX_KV_BYTES="-5",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ConfigError FD_MAX_KV_BYTES='-5'"), proc.stdout


def test_max_kv_bytes_is_the_limit_a_reference_is_checked_against():
    proc = _python(
        """
        import fd_celery.kv as kv
        import time, uuid
        from fd_celery.errors import KVRefError
        from fd_celery.kv.ref import blob_name
        print(kv.MAX_KV_BYTES)
        for nbytes in (1000, 1004):
            token = uuid.uuid4().hex
            try:
                kv.KVRef.from_dict({"kind": "redis", "location": f"fd:knobs:kv:{blob_name('knobs', 'r-3', token)}",
                    "topic": "knobs", "request_id": "r-3", "token": token, "dtype": "float32",
                    "shapes": [[nbytes // 4]], "num_tokens": 1, "nbytes": nbytes, "checksum": "s64:" + "0" * 16,
                    "owner": "p", "host": "h", "expires_at": time.time() + 60, "first_token": 1, "prompt_tokens": 1})
                print(nbytes, "accepted")
            except KVRefError as exc:
                print(nbytes, "refused:", exc)
        """,
        FD_MAX_KV_BYTES="1000",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "1000",
        "1000 accepted",
        "1004 refused: KV reference of 1004 bytes is over the limit of 1000",
    ]


def test_a_worker_app_with_a_bad_visibility_timeout_does_not_start():
    proc = _python("import workers.mixed", FD_VISIBILITY_TIMEOUT_S="soon")
    assert proc.returncode != 0
    assert "ConfigError: FD_VISIBILITY_TIMEOUT_S='soon'" in proc.stderr, proc.stderr[-2000:]
    proc = _python(
        "import workers.mixed as m; print(m.app.conf.broker_transport_options['visibility_timeout'])",
        FD_VISIBILITY_TIMEOUT_S="90s",
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["90.0"], proc.stderr[-2000:]


# --------------------------------------------------------------------------- the store table


def test_the_store_table_has_one_row_per_store_and_each_loads_only_when_used():
    proc = _python("""
        import socket, sys, time, uuid
        import fd_celery.kv as kv
        from fd_celery.kv.base import KVStore
        from fd_celery.kv.ref import blob_name
        from fd_celery.kv.table import STORE_TABLE, STORES, load_store
        from tests.conftest import CUDA_IPC
        store_modules = sorted(row.partition(":")[0] for row in STORE_TABLE.values())
        print("rows", list(STORE_TABLE) == list(STORES) == list(kv.STORES), len(store_modules) == len(set(store_modules)))
        kv.close_pool()  # (at exit: a process that never used the shm store has no pool to close)
        print("loaded at import", [m for m in store_modules if m in sys.modules], "torch" in sys.modules)
        token = uuid.uuid4().hex
        kv.KVRef.from_dict({"kind": "cuda", "location": blob_name("knobs", "r-4", token), "topic": "knobs",
            "request_id": "r-4", "token": token, "dtype": "float16", "shapes": [[4]], "num_tokens": 1, "nbytes": 8,
            "checksum": "s64:" + "0" * 16, "owner": "p", "host": socket.gethostname(),
            "expires_at": time.time() + 60, "first_token": 1, "prompt_tokens": 1, "ipc": CUDA_IPC})
        print("after a cuda check", [m for m in store_modules if m in sys.modules], "torch" in sys.modules)
        stores = {kind: load_store(kind) for kind in STORES}
        print("stores", all(isinstance(s, KVStore) and s.kind == kind for kind, s in stores.items()),
              len({s.rank for s in stores.values()}) == len(stores))
        print("loaded after use", [m for m in store_modules if m in sys.modules], "torch" in sys.modules)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "rows True True",
        "loaded at import [] False",
        "after a cuda check ['fd_celery.kv.cuda'] False",
        "stores True True",
        "loaded after use ['fd_celery.kv.cuda', 'fd_celery.kv.redis_store', 'fd_celery.kv.shm'] False",
    ]
