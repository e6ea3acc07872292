"""The built-in models: a small Llama-style decoder in plain torch.

Workers need a real model (real matmuls, a real KV cache whose size grows with the prompt) that
loads without a download, identically on every node. So the weights come from a seed through a
local ``torch.Generator`` (never the global RNG) on the CPU, in float32, and are then moved to
the device: two processes with the same ``(name, seed)`` hold bit-identical weights.

Architecture: RMSNorm, rotary position embeddings, grouped-query attention with explicit
per-layer K/V tensors shaped ``[n_kv_heads, n_tokens, head_dim]``, SwiGLU MLP, tied or untied
LM head. The weights are random, so the logits are masked to printable ASCII, ``"\\n"`` and EOS
(EOS carries a fixed negative bias) to keep the output readable and usually full-length.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.batch import KVPool
from fd_celery.engine.sampling import sample_token
from fd_celery.engine.tokenizer import EOS_ID, ByteTokenizer
from fd_celery.errors import ConfigError

__all__ = ["TinyConfig", "TINY_CONFIGS", "TinyLlamaEngine", "resolve_device", "EOS_LOGIT_BIAS"]

log = logging.getLogger(__name__)

#: Added to the EOS logit: with ~96 allowed tokens and temperature 1, a 64-token run ends early
#: about 1% of the time; greedy decoding practically never picks EOS.
EOS_LOGIT_BIAS = -4.0
_EMBED_MULTIPLE = 8
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a built-in model."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_context: int
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


TINY_CONFIGS: dict[str, TinyConfig] = {
    # ~0.8M parameters: fast enough for tests and CPU workers.
    "fd-tiny": TinyConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_context=2048),
    # ~25M parameters; 32 KiB of KV per token, so a 512-token prompt is a 16 MiB cache.
    "fd-small": TinyConfig(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408, max_context=4096, tie_embeddings=False
    ),
}


def resolve_device(device: str) -> torch.device:
    """Validate ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` against this machine, before any weight
    is allocated, so a misconfigured worker fails at start-up with a readable message."""
    match = _DEVICE_RE.match(device) if isinstance(device, str) else None
    if match is None:
        raise ConfigError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if match.group(1) == "cpu":
        if match.group(2) is not None:
            raise ConfigError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use 'cpu'"
        )
    index = int(match.group(2) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return torch.device("cuda", index)


class _Layer(NamedTuple):
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # [(n_heads + 2 * n_kv_heads) * head_dim, dim]
    wo: torch.Tensor  # [dim, n_heads * head_dim]
    ffn_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * ffn_dim, dim]
    w_down: torch.Tensor  # [dim, ffn_dim]


class _Weights(NamedTuple):
    embed: torch.Tensor  # [padded_vocab, dim]
    layers: list[_Layer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [padded_vocab, dim]


def _init_weights(cfg: TinyConfig, vocab: int, seed: int) -> _Weights:
    """GPT-2 style init (std 0.02, residual projections scaled by depth) from a local generator."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def normal(rows: int, cols: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std

    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    embed = normal(vocab, cfg.dim)
    layers = [
        _Layer(
            attn_norm=torch.ones(cfg.dim),
            wqkv=normal(qkv_rows, cfg.dim),
            wo=normal(cfg.dim, cfg.n_heads * cfg.head_dim, out_std),
            ffn_norm=torch.ones(cfg.dim),
            w_gate_up=normal(2 * cfg.ffn_dim, cfg.dim),
            w_down=normal(cfg.dim, cfg.ffn_dim, out_std),
        )
        for _ in range(cfg.n_layers)
    ]
    lm_head = embed if cfg.tie_embeddings else normal(vocab, cfg.dim)
    return _Weights(embed, layers, torch.ones(cfg.dim), lm_head)


def _weights_to(weights: _Weights, device: torch.device) -> _Weights:
    embed = weights.embed.to(device)
    tied = weights.lm_head is weights.embed
    return _Weights(
        embed=embed,
        layers=[_Layer(*(t.to(device) for t in layer)) for layer in weights.layers],
        final_norm=weights.final_norm.to(device),
        lm_head=embed if tied else weights.lm_head.to(device),
    )


def _rope_tables(cfg: TinyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, ``[max_context, head_dim // 2]``."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(cfg.max_context, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[heads, T, head_dim]`` (half-split layout, as in HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


#: Every linear layer runs on at least this many rows (zero rows pad the rest). On the CPU a
#: matrix product with one row takes a different kernel (GEMV) than one with several (GEMM), and
#: products of 2-3 rows another still; from 4 rows on, with one intra-op thread, a row's result
#: does not depend on the rows beside it. So a sequence decoded alone (one row) and the same
#: sequence decoded in a batch of 32 get bit-identical logits: see :func:`batch_invariant`.
MIN_ROWS = 4


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` over the rows of 2-D ``x``, never on fewer than :data:`MIN_ROWS` rows."""
    n = x.shape[0]
    if n >= MIN_ROWS:
        return F.linear(x, weight)
    padded = torch.cat((x, x.new_zeros(MIN_ROWS - n, x.shape[1])))
    return F.linear(padded, weight)[:n]


def batch_invariant(device: torch.device | str = "cpu") -> bool:
    """Whether, here (this CPU, this torch, its thread count), a row's linear product is the same
    alone and in any batch: the premise of exact batching (checked once at engine load)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(1234)
    weight = torch.randn(96, 80, generator=gen).to(device)
    rows = torch.randn(40, 80, generator=gen).to(device)
    whole = _linear(rows, weight)
    return all(
        torch.equal(_linear(rows[start : start + n], weight), whole[start : start + n])
        for start, n in ((0, 1), (3, 1), (5, 2), (7, 3), (0, 4), (9, 5), (1, 17), (20, 20))
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Written out rather than ``F.rms_norm`` (torch >= 2.4): workers may run torch 2.1."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention: ``q`` ``[heads, n, hd]``, ``k``/``v`` ``[kv_heads, S, hd]``
    with query head ``h`` reading kv head ``h // group`` (HF Llama's layout).

    One new token (decode) folds each group's query heads into rows over its shared kv head, so
    the cache is never copied; a prompt (prefill, empty cache) repeats the kv heads once.
    """
    heads, n, hd = q.shape
    group = heads // k.shape[0]
    if n == 1:
        out = F.scaled_dot_product_attention(q.reshape(k.shape[0], group, hd), k, v)
        return out.reshape(heads, 1, hd)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _logit_bias(vocab: int, device: torch.device) -> torch.Tensor:
    """0 for printable ASCII and ``"\\n"``, :data:`EOS_LOGIT_BIAS` for EOS, ``-inf`` elsewhere."""
    bias = torch.full((vocab,), float("-inf"))
    bias[32:127] = 0.0
    bias[ord("\n")] = 0.0
    bias[EOS_ID] = EOS_LOGIT_BIAS
    return bias.to(device)


class TinyLlamaEngine(Engine):
    """A built-in model (``"fd-tiny"``, ``"fd-small"``) with the byte tokenizer."""

    def __init__(self, model_name: str = "fd-tiny", device: str = "cpu", *, seed: int = 0) -> None:
        if model_name not in TINY_CONFIGS:
            raise ConfigError(
                f"model={model_name!r} is not a built-in model; choose one of {sorted(TINY_CONFIGS)}"
            )
        torch_device = resolve_device(device)
        self.model_name = model_name
        self.device = device
        self.seed = seed
        self.config = TINY_CONFIGS[model_name]
        self.tokenizer = ByteTokenizer()
        self.max_context = self.config.max_context
        self.eos_token_id = EOS_ID
        self._torch_device = torch_device
        padded = -(-self.tokenizer.vocab_size // _EMBED_MULTIPLE) * _EMBED_MULTIPLE
        self._weights = _weights_to(_init_weights(self.config, padded, seed), torch_device)
        cos, sin = _rope_tables(self.config)
        self._cos, self._sin = cos.to(torch_device), sin.to(torch_device)
        self._bias = _logit_bias(padded, torch_device)
        log.info("loaded built-in model %s (seed %d) on %s", model_name, seed, device)

    # -- tokenizer ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- inference ---------------------------------------------------------------------------

    def prefill(self, token_ids: Sequence[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        """One causal forward pass over the whole prompt."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(n + 1)
        ids = self._ids_tensor(token_ids)
        cache = KVCache(keys=[], values=[])
        with torch.inference_mode():
            logits = self._forward(ids, cache, start=0)
            return cache, sample_token(logits, sampling, position=n)

    def decode_step(self, cache: KVCache, last_token: int, sampling: SamplingParams) -> int:
        """Feed ``last_token`` at position ``cache.num_tokens``; the cache grows by one."""
        start = cache.num_tokens
        if cache.num_layers != self.config.n_layers:
            raise ValueError(
                f"cache has {cache.num_layers} layers, model {self.model_name} has {self.config.n_layers}"
            )
        self._check_room(start + 2)
        ids = self._ids_tensor([last_token])
        with torch.inference_mode():
            logits = self._forward(ids, cache, start=start)
            return sample_token(logits, sampling, position=start + 1)

    # -- batched (see fd_celery.engine.batch) -----------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        cfg = self.config
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4

    def new_kv_pool(self, kv_cache_bytes: int, block_size: int) -> KVPool:
        cfg = self.config
        per_block = KVPool.bytes_per_block(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, torch.float32
        )
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_bytes={kv_cache_bytes} holds no KV block of {self.model_name} "
                f"({per_block} bytes for {block_size} tokens); give it at least {per_block}"
            )
        log.info(
            "KV pool of %s: %d blocks of %d tokens (%.1f MiB)",
            self.model_name,
            num_blocks,
            block_size,
            num_blocks * per_block / (1 << 20),
        )
        return KVPool(
            cfg.n_layers,
            cfg.n_kv_heads,
            cfg.head_dim,
            num_blocks,
            block_size,
            torch.float32,
            self._torch_device,
        )

    def check_cache(self, cache: KVCache) -> None:
        cfg = self.config
        if cache.num_layers != cfg.n_layers:
            raise ValueError(
                f"cache has {cache.num_layers} layers, model {self.model_name} has {cfg.n_layers}"
            )
        want = (cfg.n_kv_heads, cache.num_tokens, cfg.head_dim)
        for t in cache.tensors():
            if tuple(t.shape) != want or t.dtype != torch.float32:
                raise ValueError(
                    f"cache tensor {tuple(t.shape)} {t.dtype} does not fit {self.model_name} "
                    f"(expected {want} float32)"
                )

    def forward_paged(
        self,
        pool: KVPool,
        inputs: Sequence[Sequence[int]],
        starts: Sequence[int],
        tables: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """Every sequence's new tokens in one forward: the linear layers see all rows at once
        (each row's result independent of the others, see :data:`MIN_ROWS`), attention runs
        per sequence over its blocks, exactly as the reference path's shapes."""
        w, cfg = self._weights, self.config
        positions = [range(start, start + len(ids)) for ids, start in zip(inputs, starts)]
        for pos in positions:
            self._check_room(pos.stop + 1)
        with torch.inference_mode():
            ids = self._ids_tensor([t for ids in inputs for t in ids])
            flat = torch.tensor(
                [p for pos in positions for p in pos], dtype=torch.long, device=self._torch_device
            )
            cos, sin = self._cos[flat], self._sin[flat]
            slots = pool.slots(tables, positions)
            spans, row = [], 0
            for pos, table in zip(positions, tables):
                spans.append((row, len(pos), pos.stop, table[0]))
                row += len(pos)
            x = F.embedding(ids, w.embed)
            for index, layer in enumerate(w.layers):
                h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
                x = x + self._attention_paged(h, layer, index, pool, slots, spans, cos, sin)
                h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
                gate, up = _linear(h, layer.w_gate_up).chunk(2, dim=-1)
                x = x + _linear(F.silu(gate) * up, layer.w_down)
            last = torch.tensor(
                [r + n - 1 for r, n, _, _ in spans], dtype=torch.long, device=self._torch_device
            )
            h = _rms_norm(x.index_select(0, last), w.final_norm, cfg.norm_eps)
            logits = _linear(h, w.lm_head) + self._bias
            return list(logits.unbind(0))

    def _attention_paged(
        self,
        h: torch.Tensor,
        layer: _Layer,
        index: int,
        pool: KVPool,
        slots: tuple[torch.Tensor, torch.Tensor],
        spans: list[tuple[int, int, int, int]],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        rows, hd = h.shape[0], cfg.head_dim
        q, k, v = self._qkv(h, layer, cos, sin)
        pool.write(index, slots, k, v)
        outs = []
        for row, n, total, first_block in spans:  # (its rows, the tokens it holds, its blocks)
            keys, values = pool.view(index, first_block, total)
            outs.append(_attend(q[:, row : row + n].contiguous(), keys, values))
        out = torch.cat(outs, dim=1)
        return _linear(out.transpose(0, 1).reshape(rows, cfg.n_heads * hd), layer.wo)

    def _check_room(self, needed: int) -> None:
        """Guard: the cache plus the token about to be produced must fit in ``max_context``."""
        if needed > self.max_context:
            raise ValueError(
                f"sequence would hold {needed} tokens, more than max_context={self.max_context} "
                f"of {self.model_name}"
            )

    def _ids_tensor(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([int(t) for t in token_ids], dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        return ids.to(self._torch_device)

    def _forward(self, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Run ``ids`` (positions ``start ..``), extend ``cache``; return the last position's
        masked logits."""
        w, cfg = self._weights, self.config
        n = ids.shape[0]
        cos, sin = self._cos[start : start + n], self._sin[start : start + n]
        x = F.embedding(ids, w.embed)
        for index, layer in enumerate(w.layers):
            h = _rms_norm(x, layer.attn_norm, cfg.norm_eps)
            x = x + self._attention(h, layer, index, cache, cos, sin)
            h = _rms_norm(x, layer.ffn_norm, cfg.norm_eps)
            gate, up = _linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, layer.w_down)
        h = _rms_norm(x[-1:], w.final_norm, cfg.norm_eps)
        return (_linear(h, w.lm_head) + self._bias)[0]

    def _qkv(
        self, h: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values of rows ``h``: ``[heads, rows, head_dim]``."""
        cfg = self.config
        n, hd = h.shape[0], cfg.head_dim
        q, k, v = _linear(h, layer.wqkv).split(
            [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd], dim=-1
        )
        q = _apply_rope(q.view(n, cfg.n_heads, hd).transpose(0, 1), cos, sin)
        k = _apply_rope(k.view(n, cfg.n_kv_heads, hd).transpose(0, 1), cos, sin)
        return q, k, v.view(n, cfg.n_kv_heads, hd).transpose(0, 1)

    def _attention(
        self,
        h: torch.Tensor,
        layer: _Layer,
        index: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        n, hd = h.shape[0], cfg.head_dim
        q, k, v = self._qkv(h, layer, cos, sin)
        if index < cache.num_layers:  # decode: append one token
            k = torch.cat((cache.keys[index], k), dim=1)
            v = torch.cat((cache.values[index], v), dim=1)
            cache.keys[index], cache.values[index] = k, v
        else:  # prefill: the cache starts here
            k, v = k.contiguous(), v.contiguous()
            cache.keys.append(k)
            cache.values.append(v)
        out = _attend(q, k, v)
        return _linear(out.transpose(0, 1).reshape(n, cfg.n_heads * hd), layer.wo)
