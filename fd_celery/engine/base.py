"""The engine interface: what a worker needs from a model.

A request runs as ``prefill`` (the prompt → a KV cache and the first token) followed by
``decode_step`` calls (one token each, extending the cache in place). Splitwise runs the two
halves on different nodes, so everything that decides a token must be a function of
(weights, KV cache, last token, position, sampling params) and nothing else: sampling uses a
generator seeded from ``(seed, position)``, never a process-wide RNG.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fd_celery.engine.sampling import Sampler, SamplingParams

__all__ = ["Engine", "KVCache", "SamplingParams", "Sampler"]


@dataclass
class KVCache:
    """Explicit per-layer key/value tensors of one sequence.

    ``keys[i]`` and ``values[i]`` are layer ``i``'s tensors, shaped
    ``[num_kv_heads, num_tokens, head_dim]``, contiguous, on the engine's device.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def tensors(self) -> list[torch.Tensor]:
        """All tensors in a fixed order: k0, v0, k1, v1, ... (the order of a serialized blob)."""
        out: list[torch.Tensor] = []
        for k, v in zip(self.keys, self.values):
            out.extend((k, v))
        return out


class Engine(abc.ABC):
    """A loaded model on one device. One instance serves one request at a time."""

    #: The model's name as users configure it (``FD_MODEL``): a built-in name or a directory.
    model_name: str
    #: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
    device: str
    #: Most tokens one sequence may hold: prompt plus generated tokens.
    max_context: int
    #: The token that ends generation, if the model has one.
    eos_token_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Prompt text → token ids (no download, no network)."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids → text. ``decode(a + b) == decode(a) + decode(b)`` need not hold;
        callers that stream use :class:`TextStreamer`."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model accepts (valid ids are ``0 .. vocab_size - 1``)."""

    @abc.abstractmethod
    def prefill(self, token_ids: Sequence[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        """Run the prompt; return its KV cache and the first generated token (position
        ``len(token_ids)``)."""

    @abc.abstractmethod
    def decode_step(self, cache: KVCache, last_token: int, sampling: SamplingParams) -> int:
        """Append ``last_token`` to ``cache`` (in place) and return the next token."""

    def generate(self, token_ids: Sequence[int], sampling: SamplingParams, max_tokens: int) -> Iterator[int]:
        """Prefill then decode: yields up to ``max_tokens`` tokens, stopping after EOS.

        The reference path: a split run (prefill here, decode elsewhere from a transferred
        cache) must yield exactly these tokens.
        """
        sampler = Sampler(sampling, token_ids, self.eos_token_id)
        cache, token = self.prefill(token_ids, sampler)  # type: ignore[arg-type]
        yield token
        for _ in range(max_tokens - 1):
            if sampler.stops(token):
                return
            token = self.decode_step(cache, token, sampler)  # type: ignore[arg-type]
            yield token
