"""The batched engine (fd_celery.engine.batch): many sequences in one forward, KV in a block pool,
and every sequence's tokens exactly those of the reference path run alone."""

from __future__ import annotations

import random

import pytest
import torch

from fd_celery.engine import SamplingParams, load_engine
from fd_celery.engine.batch import (
    BatchConfig,
    BatchEngine,
    PagedBatchEngine,
    SerialBatchEngine,
    batch_engine_for,
)
from fd_celery.engine.tiny import batch_invariant
from fd_celery.errors import InvalidRequest

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tiny():
    return load_engine("fd-tiny")


def _requests(count: int, seed: int, max_prompt: int = 60, max_tokens: int = 24):
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        prompt = [rnd.randint(32, 126) for _ in range(rnd.randint(1, max_prompt))]
        sampling = SamplingParams(temperature=rnd.choice([0.0, 0.0, 0.7, 1.3]), seed=rnd.randint(0, 10**6))
        out.append((f"r{i}", prompt, sampling, rnd.randint(1, max_tokens)))
    return out


def _run(engine: BatchEngine, max_steps: int = 10_000) -> tuple[dict[str, list[int]], dict[str, str], int]:
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    widest = 0
    for _ in range(max_steps):
        if not engine.has_work():
            return tokens, reasons, widest
        outputs = engine.step()
        widest = max(widest, len(outputs))
        for out in outputs:
            if out.token is not None:
                tokens.setdefault(out.seq_id, []).append(out.token)
            if out.finished:
                reasons[out.seq_id] = out.finish_reason or ""
    raise AssertionError("the engine did not finish its sequences")


def test_this_machine_gives_batch_invariant_rows():
    assert batch_invariant(), "linear rows differ with the batch here: batched tokens cannot be exact"


def test_32_mixed_requests_in_one_batch_equal_each_alone(tiny):
    requests = _requests(32, seed=1)
    alone = {rid: list(tiny.generate(prompt, sampling, mt)) for rid, prompt, sampling, mt in requests}
    engine = batch_engine_for(tiny, BatchConfig(max_num_seqs=32, block_size=8, kv_cache_bytes=8 << 20))
    assert isinstance(engine, PagedBatchEngine)
    for rid, prompt, sampling, mt in requests:
        engine.add(rid, prompt, sampling, mt)
    tokens, reasons, widest = _run(engine)
    assert widest >= 16, "the sequences did not run together"
    assert tokens == alone
    assert all(reasons[rid] in ("length", "stop") for rid in alone)
    capacity = engine.capacity()
    assert capacity.free_blocks == capacity.total_blocks and capacity.running == capacity.waiting == 0


def test_small_pool_and_budget_queue_the_rest_and_stay_exact(tiny):
    """Few blocks, few slots, a small token budget: sequences wait their turn (first come, first
    served) and their tokens do not change."""
    requests = _requests(12, seed=2)
    alone = {rid: list(tiny.generate(prompt, sampling, mt)) for rid, prompt, sampling, mt in requests}
    engine = batch_engine_for(
        tiny,
        BatchConfig(
            max_num_seqs=3,
            block_size=4,
            kv_cache_bytes=30 * 4 * 2048,  # 30 blocks of 4 tokens
            max_num_batched_tokens=16,
        ),
    )
    for rid, prompt, sampling, mt in requests:
        engine.add(rid, prompt, sampling, mt)
    assert engine.capacity().waiting == 12
    tokens, _, widest = _run(engine)
    assert tokens == alone
    assert widest <= 3


def test_fd_small_batch_is_exact():
    small = load_engine("fd-small")
    requests = _requests(6, seed=3, max_prompt=40, max_tokens=8)
    alone = {rid: list(small.generate(prompt, sampling, mt)) for rid, prompt, sampling, mt in requests}
    engine = batch_engine_for(small, BatchConfig(max_num_seqs=8, block_size=16, kv_cache_bytes=64 << 20))
    for rid, prompt, sampling, mt in requests:
        engine.add(rid, prompt, sampling, mt)
    assert _run(engine)[0] == alone


def test_split_prefill_export_then_decode_import_is_exact(tiny):
    """Splitwise through the batch API: prefill-only sequences export their KV; another engine
    continues from it; the tokens equal one engine's run alone."""
    requests = _requests(8, seed=4)
    alone = {rid: list(tiny.generate(prompt, sampling, mt)) for rid, prompt, sampling, mt in requests}
    prefill = batch_engine_for(tiny, BatchConfig(max_num_seqs=8, block_size=8, kv_cache_bytes=4 << 20))
    decode = batch_engine_for(tiny, BatchConfig(max_num_seqs=8, block_size=16, kv_cache_bytes=4 << 20))
    for rid, prompt, sampling, mt in requests:
        prefill.add(rid, prompt, sampling, mt, keep_kv=True)
    firsts, reasons, _ = _run(prefill)
    assert all(len(t) == 1 for t in firsts.values())
    assert prefill.capacity().free_blocks < prefill.capacity().total_blocks  # the KV waits for export
    for rid, prompt, sampling, mt in requests:
        cache = prefill.export_kv(rid)
        assert cache.num_tokens == len(prompt)
        decode.add_decode(rid, cache, firsts[rid][0], sampling, mt)
    assert prefill.capacity().free_blocks == prefill.capacity().total_blocks
    rest, _, _ = _run(decode)
    assert {rid: firsts[rid] + rest.get(rid, []) for rid in alone} == alone


def test_abort_frees_blocks_at_the_next_step(tiny):
    engine = batch_engine_for(tiny, BatchConfig(max_num_seqs=4, block_size=8, kv_cache_bytes=4 << 20))
    sampling = SamplingParams()
    engine.add("a", list(b"hello"), sampling, 50)
    engine.add("b", list(b"world"), sampling, 50)
    engine.step()
    assert engine.capacity().running == 2
    engine.abort("a")
    outputs = engine.step()
    assert [(o.seq_id, o.finished, o.finish_reason) for o in outputs if o.seq_id == "a"] == [
        ("a", True, "abort")
    ]
    assert engine.capacity().running == 1
    engine.abort("b")
    engine.step()
    capacity = engine.capacity()
    assert capacity.free_blocks == capacity.total_blocks and not engine.has_work()


def test_admission_says_what_fits_and_refuses_what_never_can(tiny):
    engine = batch_engine_for(tiny, BatchConfig(max_num_seqs=2, block_size=16, kv_cache_bytes=4 * 16 * 2048))
    total = engine.capacity().total_blocks
    assert total == 4  # fd-tiny: 4 layers x 2 kv heads x 32 dims x (k, v) x 4 bytes = 2 KiB a token
    assert engine.can_admit(10, 20) and engine.can_ever_fit(32, 33)
    assert not engine.can_ever_fit(32, 34)
    with pytest.raises(InvalidRequest, match="KV blocks"):
        engine.add("big", [65] * 40, SamplingParams(), 40)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.add("zero", [65], SamplingParams(), 0)
    with pytest.raises(InvalidRequest, match="token ids"):
        engine.add("bad", [9999], SamplingParams(), 1)
    engine.add("one", [65] * 30, SamplingParams(), 20)  # 49 tokens of KV: all 4 blocks
    engine.step()
    assert not engine.can_admit(1, 1)  # no block left
    assert engine.capacity().free_blocks == 0


def test_serial_engine_gives_the_same_api_and_tokens(tiny):
    """An engine without paged KV (Hugging Face, the sleep engine) steps one by one, exactly."""
    engine = SerialBatchEngine(tiny, BatchConfig(max_num_seqs=4), bytes_per_token=tiny.kv_bytes_per_token)
    requests = _requests(6, seed=5)
    alone = {rid: list(tiny.generate(prompt, sampling, mt)) for rid, prompt, sampling, mt in requests}
    for rid, prompt, sampling, mt in requests:
        engine.add(rid, prompt, sampling, mt)
    assert _run(engine)[0] == alone


def test_batch_config_is_validated():
    with pytest.raises(ValueError, match="max_num_seqs"):
        BatchConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="block_size"):
        BatchConfig(block_size=-1)


def test_pool_too_small_for_one_block_is_a_config_error(tiny):
    from fd_celery.errors import ConfigError

    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        batch_engine_for(tiny, BatchConfig(kv_cache_bytes=100))


def test_pool_is_on_the_engine_device_in_float32(tiny):
    """The pool lives on the engine's device and in float32, as the reference cache does."""
    engine = batch_engine_for(tiny, BatchConfig(kv_cache_bytes=1 << 20))
    assert isinstance(engine, PagedBatchEngine)
    assert engine.pool.keys[0].dtype == torch.float32 and engine.pool.keys[0].device.type == "cpu"


def test_block_ranges_hand_out_consecutive_blocks_and_merge_them_back():
    from fd_celery.engine.batch import BlockRanges

    rnd = random.Random(9)
    ranges = BlockRanges(64)
    held: dict[int, int] = {}
    free = set(range(64))
    for _ in range(2000):
        if held and (rnd.random() < 0.5 or not free):
            start = rnd.choice(sorted(held))
            count = held.pop(start)
            ranges.give(start, count)
            free.update(range(start, start + count))
        else:
            count = rnd.randint(1, 12)
            start = ranges.take(count)
            if start is None:  # only when no run of `count` free blocks exists
                assert not any(all(b in free for b in range(s, s + count)) for s in range(65 - count))
                continue
            assert all(b in free for b in range(start, start + count))
            free.difference_update(range(start, start + count))
            held[start] = count
        assert ranges.free == len(free)
    for start, count in held.items():
        ranges.give(start, count)
    assert ranges.take(64) == 0, "returned blocks did not merge back into one range"
