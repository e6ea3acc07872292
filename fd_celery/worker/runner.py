"""This process's engine runner: one model copy per pool process, loaded once, never per thread
or per request (a thread pool's threads share it; see :class:`~fd_celery.engine.runner.EngineRunner`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from celery import Celery

from fd_celery.settings import get_node_settings

if TYPE_CHECKING:  # torch comes with the engine: loaded in workers only, never at import
    from fd_celery.engine.runner import EngineRunner

__all__ = ["runner_for"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_runner: tuple[int, tuple[str, str], EngineRunner] | None = None  # (pid, (model, device), runner)


def runner_for(app: Celery) -> EngineRunner:
    """The runner of this process's model (loaded on first use; a forked child loads its own)."""
    global _runner
    settings = get_node_settings(app)
    wanted = (settings.model, settings.device)
    current = _runner
    if current is not None and current[0] == os.getpid() and current[1] == wanted:
        return current[2]
    with _lock:
        current = _runner
        if current is None or current[0] != os.getpid() or current[1] != wanted:
            from fd_celery.engine import load_engine
            from fd_celery.engine.runner import EngineRunner

            if settings.torch_threads > 0:
                import torch

                torch.set_num_threads(settings.torch_threads)
            logger.info("loading model %s on %s", settings.model, settings.device)
            current = _runner = (
                os.getpid(),
                wanted,
                EngineRunner(load_engine(settings.model, settings.device)),
            )
        return current[2]
