"""The batched engine API: many sequences in flight on one model, one step at a time.

In the spirit of vLLM's ``EngineCore.step`` and SGLang's scheduler loop: sequences are added
(waiting), a :meth:`BatchEngine.step` admits waiting ones while KV blocks, sequence slots and the
step's token budget allow, runs one forward for every running sequence (new prompts are prefilled
in the same forward) and returns one token per sequence that made progress. A sequence holds
its KV in fixed-size blocks of a pool allocated once; it reserves every block it can ever need
(prompt plus ``max_tokens``) when it is admitted, so a running sequence never runs out and
nothing is ever preempted.

Two implementations: :class:`TinyBatchEngine` batches the built-in models for real (a block KV
pool, all running sequences in one forward); :class:`SerialBatchEngine` gives any
:class:`~fd_celery.engine.base.Engine` (Hugging Face, the bench's sleep engine) the same API by
stepping its sequences one after the other. Either way a sequence's tokens are exactly those of
the engine's reference path (:meth:`Engine.generate`) run alone.
"""

from __future__ import annotations

import abc
import bisect
import collections
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.sampling import Sampler, sample_token
from fd_celery.errors import InvalidRequest

__all__ = [
    "BatchConfig",
    "BatchEngine",
    "Capacity",
    "KVPool",
    "PagedBatchEngine",
    "SerialBatchEngine",
    "StepOutput",
    "batch_engine_for",
]


@dataclass(frozen=True)
class BatchConfig:
    """How much a node runs at once (FastDeploy/vLLM names)."""

    #: Most sequences running at once (decoding or being prefilled).
    max_num_seqs: int = 32
    #: Tokens per KV block.
    block_size: int = 16
    #: Bytes of the KV pool (keys and values of every layer); the pool holds
    #: ``kv_cache_bytes // bytes_per_block`` blocks.
    kv_cache_bytes: int = 256 << 20
    #: Most tokens one step runs (decode rows plus prompt rows). A prompt longer than this still
    #: runs, alone in its step.
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name, low in (
            ("max_num_seqs", 1),
            ("block_size", 1),
            ("kv_cache_bytes", 1),
            ("max_num_batched_tokens", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: an integer >= {low}")


@dataclass(frozen=True)
class Capacity:
    """What a node has room for, in the unit that runs out (KV blocks)."""

    total_blocks: int
    free_blocks: int
    block_size: int
    running: int
    waiting: int
    max_num_seqs: int

    def to_dict(self) -> dict[str, int]:
        return {
            "total_blocks": self.total_blocks,
            "free_blocks": self.free_blocks,
            "block_size": self.block_size,
            "running": self.running,
            "waiting": self.waiting,
            "max_num_seqs": self.max_num_seqs,
        }


@dataclass(frozen=True)
class StepOutput:
    """One sequence's progress in one step: a new token (``None`` when it ended without one:
    aborted), and whether it is finished."""

    seq_id: str
    token: int | None
    finished: bool
    #: "stop" (end-of-sequence token), "length" (``max_tokens``), "abort", or None while running
    finish_reason: str | None = None


@dataclass
class _Seq:
    seq_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    keep_kv: bool = False  # prefill only: keep the KV after the first token, for export
    imported: KVCache | None = None  # decode side: the KV to copy in, then decode from
    tokens: list[int] = field(default_factory=list)  # generated (the first one included)
    num_cached: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    cache: KVCache | None = None  # SerialBatchEngine's per-sequence cache
    aborted: bool = False
    sampler: Sampler | None = None  # its parameters and history (penalties, stops)

    @property
    def next_input(self) -> int:
        return self.tokens[-1]

    def kv_tokens_needed(self) -> int:
        """Tokens whose KV this sequence can ever hold: the prompt, then every generated token
        but the last (its KV is never needed)."""
        return len(self.prompt) + self.max_tokens - 1


class BatchEngine(abc.ABC):
    """Sequences in flight on one model. Not thread-safe: one thread calls these (the runner's)."""

    def __init__(self, engine: Engine, config: BatchConfig) -> None:
        self.engine = engine
        self.config = config
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: dict[str, _Seq] = {}
        self._kept: dict[str, _Seq] = {}  # prefill-only sequences whose KV waits for export
        self._ids = itertools.count()

    # -- what callers ask --------------------------------------------------------------------

    def add(
        self,
        seq_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        *,
        keep_kv: bool = False,
    ) -> None:
        """Queue a sequence: prefill ``prompt_ids``, then decode up to ``max_tokens`` tokens in
        all (stopping after end-of-sequence). ``keep_kv``: stop after the first token and keep
        the KV for :meth:`export_kv` (the prefill half of a splitwise request)."""
        prompt = [int(t) for t in prompt_ids]
        self._check_new(seq_id, prompt, max_tokens, len(prompt))
        seq = _Seq(seq_id, prompt, sampling, 1 if keep_kv else max_tokens, keep_kv=keep_kv)
        seq.sampler = Sampler(sampling, prompt, self.engine.eos_token_id)
        self._waiting.append(seq)

    def add_decode(
        self,
        seq_id: str,
        cache: KVCache,
        first_token: int,
        sampling: SamplingParams,
        max_tokens: int,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        """Queue a sequence that continues from ``cache`` (a prompt's KV, made elsewhere) whose
        next token is ``first_token`` (already produced: never emitted again). It decodes up to
        ``max_tokens - 1`` more tokens. ``prompt_ids``: the prompt (its repetition penalty needs
        it; without one the penalty sees only the generated tokens)."""
        n = cache.num_tokens
        self._check_new(seq_id, [0] * n, max_tokens, n)
        self._check_cache(cache)
        seq = _Seq(seq_id, [0] * n, sampling, max_tokens, imported=cache)
        seq.tokens.append(int(first_token))
        seq.sampler = Sampler(sampling, prompt_ids, self.engine.eos_token_id, output_ids=[int(first_token)])
        self._waiting.append(seq)

    def abort(self, seq_id: str) -> None:
        """End a sequence wherever it is; its next :meth:`step` reports it finished ("abort")
        and its blocks are free again."""
        for seq in itertools.chain(self._waiting, self._running.values()):
            if seq.seq_id == seq_id:
                seq.aborted = True
        kept = self._kept.pop(seq_id, None)
        if kept is not None:
            self._free(kept)

    def can_admit(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        """Would a sequence of this size start at the next step (nobody waits before it, a slot
        and its blocks are free)?"""
        return (
            not self._waiting
            and len(self._running) < self.config.max_num_seqs
            and self._blocks_for(num_prompt_tokens + max_tokens - 1) <= self._free_blocks()
        )

    def can_ever_fit(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        return self._blocks_for(num_prompt_tokens + max_tokens - 1) <= self._total_blocks()

    def capacity(self) -> Capacity:
        return Capacity(
            total_blocks=self._total_blocks(),
            free_blocks=self._free_blocks(),
            block_size=self.config.block_size,
            running=len(self._running),
            waiting=len(self._waiting),
            max_num_seqs=self.config.max_num_seqs,
        )

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[StepOutput]:
        """Admit what fits, run one forward for every running sequence, sample, retire."""
        outputs: list[StepOutput] = []
        for seq in [s for s in itertools.chain(self._waiting, self._running.values()) if s.aborted]:
            self._retire(seq, outputs, None, "abort")
        admitted = self._admit()
        new = {id(s) for s in admitted}
        decoding = [s for s in self._running.values() if id(s) not in new or s.imported is not None]
        prefilling = [s for s in admitted if s.imported is None]
        for seq in admitted:
            if seq.imported is not None:
                self._import(seq)
        if not decoding and not prefilling:
            return outputs
        tokens = self._forward(decoding, prefilling)
        for seq, token in zip([*decoding, *prefilling], tokens):
            seq.tokens.append(token)
            done = len(seq.tokens) >= seq.max_tokens
            stop = seq.sampler is not None and seq.sampler.stops(token)
            if stop or done:
                reason = "stop" if stop else "length"
                self._retire(seq, outputs, token, reason)
            else:
                outputs.append(StepOutput(seq.seq_id, token, False))
        return outputs

    def holds_kv(self, seq_id: str) -> bool:
        """Whether a finished ``keep_kv`` sequence's KV waits for :meth:`export_kv`."""
        return seq_id in self._kept

    def export_kv(self, seq_id: str) -> KVCache:
        """The KV of a finished ``keep_kv`` sequence (prompt only), as contiguous per-layer
        tensors; its blocks are free afterwards."""
        seq = self._kept.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"no kept KV for sequence {seq_id!r}")
        try:
            return self._export(seq)
        finally:
            self._free(seq)

    # -- the parts -----------------------------------------------------------------------------

    def _check_new(self, seq_id: str, prompt: list[int], max_tokens: int, n: int) -> None:
        if n < 1:
            raise InvalidRequest("the prompt needs at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens={max_tokens!r} must be an integer >= 1")
        if any(t < 0 or t >= self.engine.vocab_size for t in prompt):
            raise InvalidRequest(f"token ids must be in 0..{self.engine.vocab_size - 1}")
        if n + max_tokens > self.engine.max_context:
            raise InvalidRequest(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.engine.max_context} tokens"
            )
        if not self.can_ever_fit(n, max_tokens):
            raise InvalidRequest(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs "
                f"{self._blocks_for(n + max_tokens - 1)} KV blocks of {self.config.block_size} tokens; "
                f"this node's whole KV pool has {self._total_blocks()}"
            )
        if seq_id in self._kept or any(
            s.seq_id == seq_id for s in itertools.chain(self._waiting, self._running.values())
        ):
            raise ValueError(f"sequence {seq_id!r} is already in this engine")

    def _check_cache(self, cache: KVCache) -> None:
        """A cache for this model (layers and shape); subclasses check more."""
        if cache.num_layers < 1:
            raise ValueError("the KV cache has no layers")

    def _admit(self) -> list[_Seq]:
        """Waiting sequences that start now, first come first served (none overtakes another)."""
        admitted: list[_Seq] = []
        budget = self.config.max_num_batched_tokens - len(self._running)
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0]
            rows = 0 if seq.imported is not None else len(seq.prompt)
            if rows > budget and any(s.imported is None for s in admitted):
                break  # the budget is spent; a long prompt runs alone in a later step
            if not self._allocate(seq):
                break
            self._waiting.popleft()
            self._running[seq.seq_id] = seq
            admitted.append(seq)
            budget -= rows
        return admitted

    def _retire(self, seq: _Seq, outputs: list[StepOutput], token: int | None, reason: str) -> None:
        if any(s is seq for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if s is not seq)
        self._running.pop(seq.seq_id, None)
        if seq.keep_kv and reason != "abort":
            self._kept[seq.seq_id] = seq
        else:
            self._free(seq)
        outputs.append(StepOutput(seq.seq_id, token, True, reason))

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.block_size)

    @abc.abstractmethod
    def _total_blocks(self) -> int: ...

    @abc.abstractmethod
    def _free_blocks(self) -> int: ...

    @abc.abstractmethod
    def _allocate(self, seq: _Seq) -> bool:
        """Reserve the blocks ``seq`` can ever need; False (and nothing held) when they are not free."""

    @abc.abstractmethod
    def _free(self, seq: _Seq) -> None: ...

    @abc.abstractmethod
    def _import(self, seq: _Seq) -> None:
        """Copy ``seq.imported`` into the cache."""

    @abc.abstractmethod
    def _export(self, seq: _Seq) -> KVCache: ...

    @abc.abstractmethod
    def _forward(self, decoding: list[_Seq], prefilling: list[_Seq]) -> list[int]:
        """One forward: each decoding sequence's next input, each prefilling sequence's prompt;
        returns one sampled token per sequence, in that order."""


class SerialBatchEngine(BatchEngine):
    """The batched API over any engine, one sequence after the other (no shared forward).

    The pool is virtual: ``kv_cache_bytes`` worth of blocks of the engine's per-token KV size
    bound what runs at once, as they would on a batching engine."""

    def __init__(self, engine: Engine, config: BatchConfig, bytes_per_token: int) -> None:
        super().__init__(engine, config)
        self._total = max(1, config.kv_cache_bytes // max(1, bytes_per_token * config.block_size))
        self._used = 0

    def _total_blocks(self) -> int:
        return self._total

    def _free_blocks(self) -> int:
        return self._total - self._used

    def _allocate(self, seq: _Seq) -> bool:
        need = self._blocks_for(seq.kv_tokens_needed())
        if need > self._free_blocks():
            return False
        seq.blocks = [0] * need
        self._used += need
        return True

    def _free(self, seq: _Seq) -> None:
        self._used -= len(seq.blocks)
        seq.blocks, seq.cache = [], None

    def _import(self, seq: _Seq) -> None:
        seq.cache, seq.imported = seq.imported, None

    def _export(self, seq: _Seq) -> KVCache:
        assert seq.cache is not None
        return seq.cache

    def _forward(self, decoding: list[_Seq], prefilling: list[_Seq]) -> list[int]:
        out: list[int] = []
        for seq in decoding:
            assert seq.cache is not None
            out.append(self.engine.decode_step(seq.cache, seq.next_input, seq.sampler))  # type: ignore[arg-type]
        for seq in prefilling:
            seq.cache, token = self.engine.prefill(seq.prompt, seq.sampler)  # type: ignore[arg-type]
            out.append(token)
        return out


class KVPool:
    """The KV blocks of every layer, allocated once: layer ``i``'s keys are
    ``keys[i][kv_head, block, offset, head_dim]`` (values alike). A sequence's block table maps
    its token ``p`` to ``(table[p // block_size], p % block_size)``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        # Uninitialised: a block is written before it is read, and on the CPU the pages of blocks
        # never used are never touched (a one-request prefork child does not pay for the pool).
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device

    @staticmethod
    def bytes_per_block(
        num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
    ) -> int:
        return (
            2
            * num_layers
            * num_kv_heads
            * block_size
            * head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def slots(
        self, tables: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors of every row: row ``j`` of sequence ``i`` is its token at
        ``positions[i][j]``."""
        bs = self.block_size
        blocks = [table[p // bs] for table, pos in zip(tables, positions) for p in pos]
        offsets = [p % bs for pos in positions for p in pos]
        return (
            torch.tensor(blocks, dtype=torch.long, device=self.device),
            torch.tensor(offsets, dtype=torch.long, device=self.device),
        )

    def write(
        self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store rows ``k``/``v`` (``[kv_heads, rows, head_dim]``) at ``slots``."""
        blocks, offsets = slots
        self.keys[layer][:, blocks, offsets] = k
        self.values[layer][:, blocks, offsets] = v

    def view(self, layer: int, first_block: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first ``num_tokens`` keys and values, ``[kv_heads, n, head_dim]``, as
        views of the pool (no copy): a sequence's blocks are consecutive, from ``first_block``."""
        end = first_block + math.ceil(num_tokens / self.block_size)
        out = []
        for pool in (self.keys[layer], self.values[layer]):
            blocks = pool[:, first_block:end]
            out.append(blocks.reshape(blocks.shape[0], -1, blocks.shape[3])[:, :num_tokens])
        return out[0], out[1]

    def store(self, table: Sequence[int], cache: KVCache) -> None:
        """Copy a whole cache into a sequence's blocks."""
        n = cache.num_tokens
        slots = self.slots([table], [range(n)])
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self.write(layer, slots, k.to(self.device), v.to(self.device))

    def load(self, table: Sequence[int], num_tokens: int) -> KVCache:
        """A copy of a sequence's cache, contiguous per layer (what a KV hand-off carries)."""
        pairs = [self.view(layer, table[0], num_tokens) for layer in range(len(self.keys))]
        return KVCache(keys=[k.contiguous() for k, _ in pairs], values=[v.contiguous() for _, v in pairs])


class BlockRanges:
    """Free KV blocks as ranges: a sequence gets consecutive blocks (its keys and values are then
    plain views of the pool, attention reads them without a copy), first fit, merged on return."""

    def __init__(self, num_blocks: int) -> None:
        self._free: list[tuple[int, int]] = [(0, num_blocks)]  # (start, length), by start
        self.free = num_blocks

    @property
    def largest(self) -> int:
        return max((n for _, n in self._free), default=0)

    def take(self, count: int) -> int | None:
        """The first block of ``count`` consecutive free ones (now taken), or None."""
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                self._free[i : i + 1] = [(start + count, n - count)] if n > count else []
                self.free -= count
                return start
        return None

    def give(self, start: int, count: int) -> None:
        self.free += count
        ranges = self._free
        i = bisect.bisect(ranges, (start, 0))
        if i > 0 and ranges[i - 1][0] + ranges[i - 1][1] == start:  # joins the range before
            i -= 1
            start, count = ranges[i][0], ranges[i][1] + count
            del ranges[i]
        if i < len(ranges) and start + count == ranges[i][0]:  # and the one after
            count += ranges[i][1]
            del ranges[i]
        ranges.insert(i, (start, count))


class PagedModel(Protocol):
    """What an engine offers to be batched for real (the built-in models do)."""

    def new_kv_pool(self, kv_cache_bytes: int, block_size: int) -> KVPool: ...

    def check_cache(self, cache: KVCache) -> None: ...

    def forward_paged(
        self,
        pool: KVPool,
        inputs: Sequence[Sequence[int]],
        starts: Sequence[int],
        tables: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """One forward over every sequence's new tokens (``inputs[i]`` at positions
        ``starts[i] ..``, KV stored through ``tables[i]``); returns each sequence's last logits."""
        ...


class PagedBatchEngine(BatchEngine):
    """Every running sequence in one forward, KV in a block pool (no per-token copy)."""

    def __init__(self, engine: Engine, config: BatchConfig) -> None:
        super().__init__(engine, config)
        self.model: PagedModel = engine  # type: ignore[assignment]
        self.pool = self.model.new_kv_pool(config.kv_cache_bytes, config.block_size)
        self._blocks = BlockRanges(self.pool.num_blocks)

    def _total_blocks(self) -> int:
        return self.pool.num_blocks

    def _free_blocks(self) -> int:
        return self._blocks.free

    def _allocate(self, seq: _Seq) -> bool:
        first = self._blocks.take(self._blocks_for(seq.kv_tokens_needed()))
        if first is None:
            return False
        seq.blocks = list(range(first, first + self._blocks_for(seq.kv_tokens_needed())))
        return True

    def _free(self, seq: _Seq) -> None:
        if seq.blocks:
            self._blocks.give(seq.blocks[0], len(seq.blocks))
        seq.blocks = []

    def can_admit(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        need = self._blocks_for(num_prompt_tokens + max_tokens - 1)
        return super().can_admit(num_prompt_tokens, max_tokens) and self._blocks.largest >= need

    def _check_cache(self, cache: KVCache) -> None:
        self.model.check_cache(cache)

    def _import(self, seq: _Seq) -> None:
        assert seq.imported is not None
        cache = seq.imported
        self.pool.store(seq.blocks, cache)
        seq.num_cached, seq.imported = cache.num_tokens, None
        # The cache is consumed: its tensors (often views of a KV blob's shared memory) go now,
        # whoever still holds the KVCache, so the blob's file goes back to its writer at once.
        cache.keys.clear()
        cache.values.clear()

    def _export(self, seq: _Seq) -> KVCache:
        return self.pool.load(seq.blocks, seq.num_cached)

    def _forward(self, decoding: list[_Seq], prefilling: list[_Seq]) -> list[int]:
        seqs = [*decoding, *prefilling]
        inputs = [[s.next_input] for s in decoding] + [s.prompt for s in prefilling]
        starts = [s.num_cached for s in seqs]
        logits = self.model.forward_paged(self.pool, inputs, starts, [s.blocks for s in seqs])
        tokens = []
        for seq, rows, row_logits in zip(seqs, inputs, logits):
            seq.num_cached += len(rows)
            # the token at position p is sampled with p's generator, as on the reference path
            tokens.append(sample_token(row_logits, seq.sampler or seq.sampling, position=seq.num_cached))
        return tokens


def batch_engine_for(engine: Engine, config: BatchConfig) -> BatchEngine:
    """The batched engine of ``engine``: one forward per step where the engine offers paged KV
    (the built-in models), one sequence after the other otherwise."""
    if callable(getattr(engine, "forward_paged", None)):
        return PagedBatchEngine(engine, config)
    per_token = getattr(engine, "kv_bytes_per_token", None)
    per_token = per_token if isinstance(per_token, int) and per_token > 0 else 32 << 10
    return SerialBatchEngine(engine, config, bytes_per_token=per_token)
