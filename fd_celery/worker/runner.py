"""This process's engine runner: one model copy per pool process, loaded once, never per thread
or per request (a thread pool's threads share it; see :class:`~fd_celery.engine.runner.EngineRunner`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from celery import Celery

from fd_celery.settings import get_node_settings, node_knobs

if TYPE_CHECKING:  # torch comes with the engine: loaded in workers only, never at import
    from fd_celery.engine.runner import EngineRunner

__all__ = ["runner_for", "loaded_runner"]


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


logger = logging.getLogger(__name__)

_lock = threading.Lock()
_runner: tuple[int, tuple[str, str], EngineRunner] | None = None  # (pid, (model, device), runner)


def loaded_runner() -> EngineRunner | None:
    """This process's runner if it loaded one (never loads)."""
    current = _runner
    return current[2] if current is not None and current[0] == os.getpid() else None


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
            from fd_celery.engine.batch import BatchConfig
            from fd_celery.engine.runner import EngineRunner
            from fd_celery.engine.tiny import batch_invariant

            if settings.torch_threads > 0:
                import torch

                torch.set_num_threads(settings.torch_threads)
            logger.info("loading model %s on %s", settings.model, settings.device)
            knobs = node_knobs()
            batch = BatchConfig(
                max_num_seqs=knobs.max_num_seqs,
                block_size=knobs.block_size,
                kv_cache_bytes=knobs.kv_cache_bytes,
                max_num_batched_tokens=knobs.max_num_batched_tokens,
            )
            runner = EngineRunner(load_engine(settings.model, settings.device), batch)
            if not batch_invariant(runner.engine.device):
                logger.warning(
                    "on this machine (torch %s threads) a linear layer's rows depend on the batch: "
                    "batched requests may differ in the last bits from a request run alone "
                    "(FD_TORCH_THREADS=1 restores exactness on CPU)",
                    torch_threads(),
                )
            current = _runner = (os.getpid(), wanted, runner)
        return current[2]
