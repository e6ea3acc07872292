"""What the server knows of the cluster: its live nodes and the models they serve.

Read from the node registry at most every :data:`REFRESH_S` (shared by all requests), so a burst
of requests costs no extra Redis round trips. A request names a model; if every node that could
start it serves that model, the scheduler places it as it places any request (load, stealing,
prefix affinity); if only some do, the server pins it (``node=``) to one of those, at random.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from fd_celery.config import SchedulerConfig
from fd_celery.connection import redis_errors, redis_for
from fd_celery.errors import NoNodeAvailable
from fd_celery.keys import DECODE_ROLES, PREFILL_ROLES
from fd_celery.scheduler.registry import NodeInfo, live_nodes

__all__ = ["ClusterView", "Placement", "REFRESH_S"]

REFRESH_S = 0.5  # the node list is at most this old


@dataclass(frozen=True)
class Placement:
    model: str
    node: str | None  # None: the scheduler places it


class ClusterView:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._nodes: list[NodeInfo] = []
        self._read_at = -1e9
        self._lock = asyncio.Lock()

    async def nodes(self) -> list[NodeInfo]:
        async with self._lock:
            if time.monotonic() - self._read_at >= REFRESH_S:
                self._nodes = await asyncio.to_thread(self._read)
                self._read_at = time.monotonic()
            return self._nodes

    def _read(self) -> list[NodeInfo]:
        with redis_errors(self.config):
            return live_nodes(redis_for(self.config), self.config)

    def _roles(self) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        """Roles that may start a request, and (splitwise) roles that must finish it."""
        if self.config.scheduler_name == "splitwise":
            return PREFILL_ROLES, DECODE_ROLES
        return ("mixed",), None

    async def models(self) -> dict[str, list[NodeInfo]]:
        """Model name → the live nodes that can start a request for it."""
        starters, _ = self._roles()
        out: dict[str, list[NodeInfo]] = {}
        for node in await self.nodes():
            if node.role in starters:
                out.setdefault(str(node.facts.get("model", "")), []).append(node)
        return out

    async def ready(self) -> tuple[bool, str]:
        """Whether at least one request could be served now, and why not."""
        starters, finishers = self._roles()
        nodes = await self.nodes()
        if not any(n.role in starters for n in nodes):
            return False, f"no live node ({' or '.join(starters)}) in topic {self.config.scheduler_topic!r}"
        if finishers and not any(n.role in finishers for n in nodes):
            return False, f"no live decode node in topic {self.config.scheduler_topic!r}"
        return True, f"{len(nodes)} live node(s)"

    async def place(self, model: str) -> Placement:
        """Where a request for ``model`` goes; ``NoNodeAvailable`` when no live node serves it."""
        models = await self.models()
        serving = models.get(model)
        if not serving:
            known = ", ".join(sorted(models)) or "none"
            raise NoNodeAvailable(
                f"no live node serves model {model!r} in topic {self.config.scheduler_topic!r} "
                f"(served now: {known})"
            )
        if len(models) == 1:
            return Placement(model, None)
        return Placement(model, random.choice(serving).name)
