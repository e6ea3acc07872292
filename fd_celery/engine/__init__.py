"""The model engine: what workers run.

:func:`load_engine` maps the configured model (``FD_MODEL``) to an :class:`Engine`: a built-in
name gives a seeded plain-torch model (:class:`TinyLlamaEngine`), a local directory gives a
Hugging Face model (:class:`HFEngine`, needs ``fd_celery[hf]``). Importing this package imports
torch but not transformers.
"""

from __future__ import annotations

import os

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.bench import PREFIX as SLEEP_PREFIX
from fd_celery.engine.bench import SleepEngine
from fd_celery.engine.hf import HFEngine
from fd_celery.engine.sampling import sample_token
from fd_celery.engine.text import TextStreamer
from fd_celery.engine.tiny import TINY_CONFIGS, TinyLlamaEngine
from fd_celery.engine.tokenizer import ByteTokenizer
from fd_celery.errors import ConfigError

__all__ = [
    "BUILTIN_MODELS",
    "ByteTokenizer",
    "Engine",
    "HFEngine",
    "KVCache",
    "SamplingParams",
    "TextStreamer",
    "TinyLlamaEngine",
    "load_engine",
    "sample_token",
]

#: Names :func:`load_engine` accepts besides a model directory; the first is the default.
BUILTIN_MODELS: tuple[str, ...] = tuple(TINY_CONFIGS)


def load_engine(model: str = "fd-tiny", device: str = "cpu", *, seed: int = 0) -> Engine:
    """Load ``model`` on ``device``.

    ``seed`` picks the built-in models' weights (every node of a cluster must use the same one);
    a Hugging Face directory brings its own weights and ignores it. Raises
    :class:`~fd_celery.errors.ConfigError` for an unknown model or an unusable device.
    """
    if not isinstance(model, str) or not model:
        raise ConfigError(
            f"model={model!r} is not valid; use one of {', '.join(BUILTIN_MODELS)} "
            f"or a local Hugging Face model directory"
        )
    if model in TINY_CONFIGS:
        return TinyLlamaEngine(model, device, seed=seed)
    if model.startswith(SLEEP_PREFIX):
        return SleepEngine(model, device)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return HFEngine(path, device)
    raise ConfigError(
        f"model={model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing directory"
    )
