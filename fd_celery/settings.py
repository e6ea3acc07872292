"""What every part of a node or client reads of its app: the scheduler config and the node's
own settings, cached on the Celery app by :func:`fd_celery.install` (the composition root, which
nothing inside the package imports), and the process's knobs (:class:`NodeKnobs`, ``FD_*``
environment variables read once by :func:`node_knobs`). Leaf modules read them here.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from fd_celery.config import SchedulerConfig, _choice, _duration, _float, _integer, _param
from fd_celery.errors import ConfigError
from fd_celery.keys import ROLES

__all__ = [
    "get_config",
    "set_config",
    "has_config",
    "get_node_settings",
    "set_node_settings",
    "NodeSettings",
    "NodeKnobs",
    "node_knobs",
    "reload_node_knobs",
    "DEFAULT_MODEL",
    "DEFAULT_DEVICE",
]

DEFAULT_MODEL = "fd-tiny"
DEFAULT_DEVICE = "cpu"

_CONFIG_ATTR = "_fd_config"
_NODE_ATTR = "_fd_node"


@dataclass(frozen=True)
class NodeSettings:
    """What a worker node serves: its role and its engine."""

    role: str = "mixed"
    model: str = DEFAULT_MODEL
    device: str = DEFAULT_DEVICE
    torch_threads: int = 0  # intra-op threads per pool process; 0: torch's default

    @classmethod
    def from_env(cls) -> NodeSettings:
        return cls(
            role=os.environ.get("FD_ROLE", "mixed"),
            model=os.environ.get("FD_MODEL", DEFAULT_MODEL),
            device=os.environ.get("FD_DEVICE", DEFAULT_DEVICE),
        )

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"fd_role={self.role!r} is invalid; allowed: {', '.join(ROLES)}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"fd_device={self.device!r} is invalid; allowed: cpu, cuda, cuda:N")


def get_config(app: Celery) -> SchedulerConfig:
    config = getattr(app, _CONFIG_ATTR, None)
    if config is None:
        raise ConfigError(f"Celery app {app.main!r} is not an fd_celery app: call fd_celery.install(app)")
    return config


def has_config(app: Any) -> bool:
    return getattr(app, _CONFIG_ATTR, None) is not None


def set_config(app: Celery, config: SchedulerConfig) -> None:
    setattr(app, _CONFIG_ATTR, config)


def get_node_settings(app: Celery) -> NodeSettings:
    return getattr(app, _NODE_ATTR, None) or NodeSettings.from_env()


def set_node_settings(app: Celery, settings: NodeSettings) -> None:
    setattr(app, _NODE_ATTR, settings)


# --------------------------------------------------------------------------- the process's knobs


def _kv_store(name: str, value: object) -> str:
    # The store table is imported when a value is parsed, not with this module: the kv package
    # reads its knobs from here.
    from fd_celery.kv.table import STORES

    return _choice("auto", *STORES)(name, value)


def _seconds_or_unset(name: str, value: object) -> float | None:
    return None if value is None else _duration("s")(name, value)


@dataclass(frozen=True)
class NodeKnobs:
    """Knobs of one node process, from ``FD_*`` environment variables (each field's ``env``), each
    parsed and checked once: a bad value is a :class:`~fd_celery.errors.ConfigError` naming the
    variable, its value and what is allowed. Read them through :func:`node_knobs`."""

    max_kv_bytes: int = _param(
        8 << 30,
        _integer(0, 1 << 50),
        "a KV reference of more bytes than this is refused",
        env="FD_MAX_KV_BYTES",
        unit="bytes",
    )
    kv_shm_pool_slots: int = _param(
        # (at most 999: a slot's index is three digits of its file name)
        4,
        _integer(0, 999),
        "recycled shared-memory files per prefill process; 0: a new file per blob",
        env="FD_KV_SHM_POOL_SLOTS",
        unit="files",
    )
    kv_shm_pool_bytes: int = _param(
        1 << 30,
        _integer(0, 1 << 50),
        "the most bytes a process's recycled shared-memory files hold together",
        env="FD_KV_SHM_POOL_BYTES",
        unit="bytes",
    )
    kv_cuda_grace_s: float = _param(
        5.0,
        _float(0.0, 86_400.0),
        "how long past its expiry an unclaimed cuda blob waits for its decode node",
        env="FD_KV_CUDA_GRACE_S",
        unit="s",
    )
    kv_store: str = _param(
        "auto",
        _kv_store,
        "the KV store of every hand-off (auto: as the nodes' hosts and devices allow)",
        env="FD_KV_STORE",
        unit="",
    )
    torch_threads: int = _param(
        1,
        _integer(0, 1024),
        "torch intra-op threads per pool process; 0: torch's own default",
        env="FD_TORCH_THREADS",
        unit="threads",
    )
    max_num_seqs: int = _param(
        32,
        _integer(1, 4096),
        "most requests one engine runs at once (decoding or being prefilled); a node takes a "
        "request off Redis only when its engine has room",
        env="FD_MAX_NUM_SEQS",
        unit="sequences",
    )
    block_size: int = _param(
        16, _integer(1, 4096), "tokens per KV-cache block", env="FD_BLOCK_SIZE", unit="tokens"
    )
    kv_cache_bytes: int = _param(
        256 << 20,
        _integer(1, 1 << 50),
        "the engine's KV-cache pool (on its device), allocated once; a request reserves the "
        "blocks of its prompt plus max_tokens when it starts",
        env="FD_KV_CACHE_BYTES",
        unit="bytes",
    )
    max_num_batched_tokens: int = _param(
        2048,
        _integer(1, 1 << 24),
        "most tokens one engine step runs (one per decoding request plus new prompts); a longer "
        "prompt runs alone in its step",
        env="FD_MAX_NUM_BATCHED_TOKENS",
        unit="tokens",
    )
    visibility_timeout_s: float | None = _param(
        None,
        _seconds_or_unset,
        "how long Redis waits before it gives the request of a dead worker to another; "
        "unset: scheduler_ttl + 3600 s (it must exceed the longest request)",
        env="FD_VISIBILITY_TIMEOUT_S",
        unit="s",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["parse"](f.metadata["env"], getattr(self, f.name)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NodeKnobs:
        """The knobs set in ``environ`` (``os.environ`` by default); the others keep their default.
        An empty variable counts as unset."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {
            f.name: environ[f.metadata["env"]]
            for f in dataclasses.fields(cls)
            if environ.get(f.metadata["env"], "").strip()
        }
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """``(variable, default, unit, doc)`` of every knob, for help texts."""
        return [
            (f.metadata["env"], repr(f.default), f.metadata["unit"], f.metadata["doc"])
            for f in dataclasses.fields(cls)
        ]


_knobs: NodeKnobs | None = None
_knobs_lock = threading.Lock()


def node_knobs() -> NodeKnobs:
    """This process's knobs, read from the environment on first use and kept."""
    global _knobs
    if _knobs is None:
        with _knobs_lock:
            if _knobs is None:
                _knobs = NodeKnobs.from_env()
    return _knobs


def reload_node_knobs() -> NodeKnobs:
    """Read the knobs from the environment again (tests that change it)."""
    global _knobs
    with _knobs_lock:
        _knobs = NodeKnobs.from_env()
    return _knobs
