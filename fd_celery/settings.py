"""What every part of a node or client reads of its app: the scheduler config and the node's
own settings, cached on the Celery app by :func:`fd_celery.install` (the composition root, which
nothing inside the package imports). Leaf modules read them here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from celery import Celery

from fd_celery.config import SchedulerConfig
from fd_celery.errors import ConfigError
from fd_celery.keys import ROLES

__all__ = ["get_config", "set_config", "has_config", "get_node_settings", "set_node_settings", "NodeSettings",
           "DEFAULT_MODEL", "DEFAULT_DEVICE"]

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
