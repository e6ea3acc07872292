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

import torch

from fd_celery.engine.base import SamplingParams

__all__ = ["position_seed", "sample_token", "GREEDY_BELOW"]

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


def sample_token(logits: torch.Tensor, sampling: SamplingParams, position: int) -> int:
    """Pick the token at ``position`` from 1-D ``logits`` (``-inf`` entries are never picked).

    ``temperature == 0`` is argmax; otherwise one uniform draw from the ``(seed, position)``
    generator is mapped through the CDF of ``softmax(logits / temperature)``.
    """
    temperature = float(sampling.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {sampling.temperature!r}")
    if logits.dim() != 1:
        raise ValueError(f"expected 1-D logits, got shape {tuple(logits.shape)}")
    if temperature < GREEDY_BELOW:  # dividing by a subnormal temperature would overflow
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / temperature, dim=0)
    cdf = torch.cumsum(probs, dim=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(position_seed(int(sampling.seed), int(position)))
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u.reshape(1), right=True).item())
    # u can round up to cdf[-1]; fall back to the last token that has any probability.
    last_possible = int(torch.nonzero(probs > 0)[-1].item())
    return min(index, last_possible)
