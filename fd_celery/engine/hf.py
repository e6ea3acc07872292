"""``HFEngine``: a Hugging Face causal LM from a local directory, behind the Engine interface.

transformers is an optional dependency (``pip install fd_celery[hf]``), so it is imported only
when an HFEngine is built: ``import fd_celery.engine`` stays free of it. Nothing is downloaded:
model and tokenizer load with ``local_files_only=True``.

The model keeps its KV cache in a ``transformers`` ``DynamicCache`` (transformers 5: a list of
``DynamicLayer`` objects whose ``keys``/``values`` are ``[batch, kv_heads, tokens, head_dim]``).
Splitwise needs our explicit :class:`KVCache` instead, so each call wraps our per-layer tensors
(batch 1 squeezed) into a fresh ``DynamicCache`` and reads the grown tensors back afterwards.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.sampling import sample_token
from fd_celery.engine.tiny import resolve_device
from fd_celery.errors import ConfigError

__all__ = ["HFEngine"]

log = logging.getLogger(__name__)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("loading a model directory needs transformers: pip install fd_celery[hf]") from None
    major = int(transformers.__version__.split(".", 1)[0])
    if major < 5:
        # The cache conversion below uses transformers 5's DynamicCache layers and ``dtype=``.
        raise ConfigError(
            f"HFEngine needs transformers>=5, found {transformers.__version__}: "
            f"pip install -U 'transformers>=5'"
        )
    return transformers


def _first_id(value: Any) -> int | None:
    """``eos_token_id`` may be an int, a list of ints or None; the engine stops on the first."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


class HFEngine(Engine):
    """A local Hugging Face causal LM. float32 on CPU (exact, reproducible); the checkpoint's own
    dtype on CUDA."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        transformers = _import_transformers()
        if not os.path.isdir(path):
            raise ConfigError(f"model={path!r} is not a directory")
        torch_device = resolve_device(device)
        self.model_name = path
        self.device = device
        self._torch_device = torch_device
        self._dynamic_cache = transformers.DynamicCache
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            dtype: Any = torch.float32 if torch_device.type == "cpu" else "auto"
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a Hugging Face model from {path!r}: {exc}") from None
        self.model = model.to(torch_device).eval()
        self._cache_kwarg = self._find_cache_kwarg()
        self._accepts_logits_to_keep = "logits_to_keep" in self._forward_params()
        config = self.model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 0)
        if self.max_context <= 0:
            raise ConfigError(f"model {path!r} has no max_position_embeddings in its config")
        self.eos_token_id = self._find_eos()
        self._vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        log.info(
            "loaded HF model %s (%s) on %s: max_context=%d eos=%s",
            path,
            type(self.model).__name__,
            device,
            self.max_context,
            self.eos_token_id,
        )

    def _forward_params(self) -> set[str]:
        return set(inspect.signature(self.model.forward).parameters)

    def _find_cache_kwarg(self) -> str:
        """transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works
        with a deprecation warning); pass whichever this version's forward declares."""
        return "cache" if "cache" in self._forward_params() else "past_key_values"

    def _find_eos(self) -> int | None:
        generation = getattr(self.model, "generation_config", None)
        for value in (
            getattr(generation, "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            eos = _first_id(value)
            if eos is not None:
                return eos
        return None

    # -- tokenizer ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        # No clean-up of spaces: it rewrites earlier text and would break streaming.
        return str(
            self.tokenizer.decode(
                [int(i) for i in token_ids],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    # -- inference ---------------------------------------------------------------------------

    def prefill(self, token_ids: Sequence[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        """One forward pass over the prompt into an empty cache."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(n + 1)
        cache = KVCache(keys=[], values=[])
        with torch.inference_mode():
            logits = self._forward(token_ids, cache, start=0)
            return cache, sample_token(logits, sampling, position=n)

    def decode_step(self, cache: KVCache, last_token: int, sampling: SamplingParams) -> int:
        """Feed ``last_token`` at position ``cache.num_tokens``; the cache grows by one."""
        start = cache.num_tokens
        self._check_room(start + 2)
        with torch.inference_mode():
            logits = self._forward([last_token], cache, start=start)
            return sample_token(logits, sampling, position=start + 1)

    def _check_room(self, needed: int) -> None:
        """Guard: the cache plus the token about to be produced must fit in ``max_context``."""
        if needed > self.max_context:
            raise ValueError(f"sequence would hold {needed} tokens, more than max_context={self.max_context}")

    def _forward(self, token_ids: Sequence[int], cache: KVCache, start: int) -> torch.Tensor:
        """Run ``token_ids`` at positions ``start ..`` on top of ``cache`` (updated in place);
        return the last position's logits as float32."""
        ids = torch.tensor([[int(t) for t in token_ids]], dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self._vocab_size:
            raise ValueError(f"token ids must be in 0..{self._vocab_size - 1}")
        n = ids.shape[1]
        positions = torch.arange(start, start + n, dtype=torch.long)[None]
        hf_cache = self._to_hf_cache(cache)
        kwargs: dict[str, Any] = {self._cache_kwarg: hf_cache, "use_cache": True}
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=ids.to(self._torch_device),
            position_ids=positions.to(self._torch_device),
            **kwargs,
        )
        self._from_hf_cache(hf_cache, cache)
        return out.logits[0, -1].float()

    def _to_hf_cache(self, cache: KVCache) -> Any:
        """Our ``[kv_heads, tokens, head_dim]`` tensors → a DynamicCache (batch 1)."""
        if cache.num_layers == 0:
            return self._dynamic_cache()
        data = [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(cache.keys, cache.values, strict=True)]
        return self._dynamic_cache(data)

    @staticmethod
    def _from_hf_cache(hf_cache: Any, cache: KVCache) -> None:
        """Copy the grown per-layer tensors back into ``cache`` (batch dimension squeezed)."""
        layers = hf_cache.layers
        cache.keys[:] = [layer.keys[0].contiguous() for layer in layers]
        cache.values[:] = [layer.values[0].contiguous() for layer in layers]
