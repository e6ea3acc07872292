"""The one sampling rule every engine shares.

Splitwise runs prefill and decode in different processes (often on different machines), so the
token at position ``p`` must depend only on ``(logits, sampling.seed, p)``. A process-wide RNG
would make the token depend on how many draws that process made before; instead every draw gets
a fresh ``torch.Generator`` seeded from a 64-bit mix of ``(seed, position)``.

The draw itself always runs on the CPU in float64 (inverse CDF over the softmax), so a CUDA
worker and a CPU worker holding identical logits pick the identical token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["position_seed", "sample_token", "GREEDY_BELOW", "SamplingParams", "Sampler"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy; ``seed`` makes sampling exact.

    The rest follow vLLM's meaning: ``top_k`` (0: all tokens), ``top_p`` and ``min_p`` filter
    what is sampled; ``presence_penalty`` and ``frequency_penalty`` (OpenAI's) lower the logits of
    tokens generated so far, ``repetition_penalty`` (> 1) those of the prompt's and generated
    tokens; ``min_tokens`` holds end-of-sequence and ``stop_token_ids`` back until that many
    tokens were generated; ``ignore_eos`` never ends at end-of-sequence; ``stop_token_ids`` end
    the sequence like end-of-sequence (the stop token is not part of the output)."""

    temperature: float = 0.0
    seed: int = 0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @property
    def plain(self) -> bool:
        """Only temperature and seed: the token depends on the logits and position alone."""
        return (
            self.top_p >= 1.0
            and self.top_k <= 0
            and self.min_p <= 0.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
            and self.min_tokens <= 0
            and not self.ignore_eos
            and not self.stop_token_ids
        )


# Temperatures below this sample greedily: softmax(logits / T) is argmax to float64 precision.
GREEDY_BELOW = 1e-6

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for ``(seed, position)`` (splitmix64 finaliser).

    Neighbouring positions and neighbouring seeds get unrelated streams, and the result is
    always a valid ``torch.Generator.manual_seed`` argument.
    """
    x = (seed * _GOLDEN + position * _MIX1 + _MIX2) & _MASK64
    x ^= x >> 30
    x = (x * _MIX1) & _MASK64
    x ^= x >> 27
    x = (x * _MIX2) & _MASK64
    x ^= x >> 31
    return x >> 1


def sample_token(logits: torch.Tensor, sampling: SamplingParams | Sampler, position: int) -> int:
    """Pick the token at ``position`` from 1-D ``logits`` (``-inf`` entries are never picked).

    ``temperature == 0`` is argmax; otherwise one uniform draw from the ``(seed, position)``
    generator is mapped through the CDF of ``softmax(logits / temperature)``. A :class:`Sampler`
    (one sequence's parameters and history) applies its penalties and filters first.
    """
    if isinstance(sampling, Sampler):
        return sampling.pick(logits, position)
    _check(sampling, logits)
    temperature = float(sampling.temperature)
    if temperature < GREEDY_BELOW:  # dividing by a subnormal temperature would overflow
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / temperature, dim=0)
    return _draw(probs, sampling.seed, position)


def _check(sampling: SamplingParams, logits: torch.Tensor) -> None:
    temperature = float(sampling.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {sampling.temperature!r}")
    if logits.dim() != 1:
        raise ValueError(f"expected 1-D logits, got shape {tuple(logits.shape)}")


def _draw(probs: torch.Tensor, seed: int, position: int) -> int:
    """One uniform draw from the ``(seed, position)`` generator through the CDF of ``probs``
    (float64, on the CPU; zero entries are never picked)."""
    cdf = torch.cumsum(probs, dim=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(position_seed(int(seed), int(position)))
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u.reshape(1), right=True).item())
    # u can round up to cdf[-1]; fall back to the last token that has any probability.
    last_possible = int(torch.nonzero(probs > 0)[-1].item())
    return min(index, last_possible)


class Sampler:
    """One sequence's sampling: its parameters and its history (prompt, tokens generated).

    Penalties, masks and filters are applied in float64 on the CPU to a copy of the logits, in
    vLLM's order: repetition, frequency and presence penalties; end-of-sequence (and stop tokens)
    held back by ``ignore_eos`` / ``min_tokens``; then greedy, or temperature, top-k, top-p,
    min-p and the seeded draw. Everything is a function of (logits, parameters, history,
    position), so the token is the same alone, in any batch, and split across nodes. Plain
    parameters take :func:`sample_token`'s path unchanged."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        eos_token_id: int | None,
        output_ids: Sequence[int] = (),
    ) -> None:
        self.params = params
        self.eos_token_id = eos_token_id
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.output_ids = [int(t) for t in output_ids]
        self._stops = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self._stops.add(int(eos_token_id))

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def temperature(self) -> float:
        return self.params.temperature

    def stops(self, token: int) -> bool:
        """Whether ``token`` ends the sequence (end-of-sequence, or one of ``stop_token_ids``)."""
        return token in self._stops

    def pick(self, logits: torch.Tensor, position: int) -> int:
        params = self.params
        _check(params, logits)
        if params.plain:
            token = sample_token(logits, params, position)
        else:
            token = self._pick(logits.detach().to("cpu", torch.float64).clone(), position)
        self.output_ids.append(token)
        return token

    def _pick(self, x: torch.Tensor, position: int) -> int:
        params = self.params
        if params.repetition_penalty != 1.0 and (self.prompt_ids or self.output_ids):
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(self.output_ids)), dtype=torch.long)
            picked = x[seen]
            x[seen] = torch.where(
                picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
            )
        if (params.frequency_penalty or params.presence_penalty) and self.output_ids:
            ids, counts = torch.tensor(self.output_ids, dtype=torch.long).unique(return_counts=True)
            x[ids] -= params.frequency_penalty * counts.to(torch.float64) + params.presence_penalty
        held = set()
        if params.ignore_eos and self.eos_token_id is not None:
            held.add(self.eos_token_id)
        if len(self.output_ids) < params.min_tokens:
            held |= self._stops
        for token in held:
            if 0 <= token < x.shape[0]:
                x[token] = float("-inf")
        if params.temperature < GREEDY_BELOW:
            return int(torch.argmax(x).item())
        probs = torch.softmax(x / float(params.temperature), dim=0)
        if 0 < params.top_k < probs.shape[0]:
            kth = torch.topk(probs, params.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if params.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True, stable=True)
            before = torch.cumsum(ordered, dim=0) - ordered  # mass of the tokens ranked above
            drop = before >= params.top_p * ordered.sum()
            drop[0] = False  # the most likely token always stays
            probs = probs.clone()
            probs[order[drop]] = 0.0
        if params.min_p > 0.0:
            probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
        return _draw(probs, params.seed, position)
