"""``bench-sleep:<ms>``: a benchmark engine that computes nothing and sleeps per token.

For benchmarks that measure scheduling, not arithmetic: the service time of a request is
``ms`` per token without burning CPU, so four nodes on a two-core machine behave like four
machines. Tokens are a deterministic function of (seed, position), the KV cache is a small real
tensor per layer, and a split prefill/decode run gives the same tokens as one node. Never use it
for correctness tests of generation: those use the real model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.sampling import position_seed
from fd_celery.engine.tokenizer import ByteTokenizer
from fd_celery.errors import ConfigError

PREFIX = "bench-sleep:"
_LAYERS = 2
_PRINTABLE = list(range(32, 127))


class SleepEngine(Engine):
    def __init__(self, model_name: str, device: str = "cpu") -> None:
        try:
            self.sleep_s = float(model_name[len(PREFIX) :]) / 1000.0
        except ValueError:
            raise ConfigError(
                f"model={model_name!r}: give the sleep per token in ms, e.g. bench-sleep:20"
            ) from None
        if not 0 <= self.sleep_s <= 10:
            raise ConfigError(f"model={model_name!r}: the sleep per token must be 0 to 10000 ms")
        self.model_name = model_name
        self.device = device
        self.max_context = 1 << 20
        self._tokenizer = ByteTokenizer()
        self.eos_token_id = None  # runs to max_tokens: service time is exactly ms x tokens

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def _token(self, sampling: SamplingParams, position: int) -> int:
        time.sleep(self.sleep_s)
        return _PRINTABLE[position_seed(sampling.seed, position) % len(_PRINTABLE)]

    def prefill(self, token_ids: Sequence[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        ids = torch.tensor([list(token_ids)], dtype=torch.float32)
        cache = KVCache(
            keys=[ids.clone() for _ in range(_LAYERS)], values=[ids.clone() for _ in range(_LAYERS)]
        )
        return cache, self._token(sampling, len(token_ids))

    def decode_step(self, cache: KVCache, last_token: int, sampling: SamplingParams) -> int:
        column = torch.tensor([[float(last_token)]])
        cache.keys = [torch.cat([k, column], dim=1) for k in cache.keys]
        cache.values = [torch.cat([v, column], dim=1) for v in cache.values]
        return self._token(sampling, cache.num_tokens)
