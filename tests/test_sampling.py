"""The sampling parameters users expect (top-k/p, min-p, penalties, stop tokens, min_tokens,
ignore_eos): each does what its name says, and a request's tokens stay exact alone, in a batch
and split across engines."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fd_celery.engine import SamplingParams, load_engine
from fd_celery.engine.batch import BatchConfig, batch_engine_for
from fd_celery.errors import InvalidRequest
from fd_celery.protocol import parse_request

pytestmark = pytest.mark.fast

PROMPT = "Sampling parameters, one at a time"


@pytest.fixture(scope="module")
def tiny():
    return load_engine("fd-tiny")


def _gen(engine, sampling: SamplingParams, max_tokens: int = 48, prompt: str = PROMPT) -> list[int]:
    return list(engine.generate(engine.encode(prompt), sampling, max_tokens))


def test_top_k_1_top_p_tiny_and_min_p_1_are_greedy_at_any_temperature(tiny):
    greedy = _gen(tiny, SamplingParams(0.0, 1))
    assert _gen(tiny, SamplingParams(1.5, 7, top_k=1)) == greedy
    assert _gen(tiny, SamplingParams(1.5, 7, top_p=1e-9)) == greedy
    assert _gen(tiny, SamplingParams(1.5, 7, min_p=1.0)) == greedy
    assert _gen(tiny, SamplingParams(1.5, 7)) != greedy


def test_top_k_only_ever_picks_among_the_k_most_likely(tiny):
    """With top_k=3 at a high temperature, each token is one of the 3 the greedy logits rank
    highest at its position (checked against the engine's own logits, step by step)."""
    ids = tiny.encode(PROMPT)
    sampling = SamplingParams(5.0, 11, top_k=3)
    tokens = _gen(tiny, sampling, max_tokens=24)
    for i, token in enumerate(tokens):
        logits = _last_logits(tiny, ids + tokens[:i])
        assert token in logits.topk(3).indices.tolist(), f"token {i} was not among the top 3"


def _last_logits(engine, ids):
    import torch

    from fd_celery.engine.base import KVCache

    with torch.inference_mode():
        return engine._forward(engine._ids_tensor(ids), KVCache(keys=[], values=[]), start=0)


def test_penalties_make_repeats_rarer(tiny):
    plain = Counter(_gen(tiny, SamplingParams(0.0, 1), 64))
    penalised = Counter(_gen(tiny, SamplingParams(0.0, 1, frequency_penalty=2.0, presence_penalty=1.0), 64))
    assert max(penalised.values()) < max(plain.values())
    assert len(penalised) > len(plain)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    import torch

    from fd_celery.engine.sampling import Sampler

    logits = torch.tensor([2.0, 1.5, -1.0, -1.2])
    assert Sampler(SamplingParams(), [0], None).pick(logits, 1) == 0  # (no penalty: the best)
    assert Sampler(SamplingParams(repetition_penalty=2.0), [0], None).pick(logits, 1) == 1  # 2.0 -> 1.0
    negative = torch.tensor([-1.0, -1.5, -3.0])
    assert Sampler(SamplingParams(repetition_penalty=2.0), [0], None).pick(negative, 1) == 1  # -1 -> -2
    assert Sampler(SamplingParams(repetition_penalty=2.0), [], None, output_ids=[0]).pick(negative, 1) == 1


def test_stop_token_ids_end_the_sequence_at_the_first_one(tiny):
    free = _gen(tiny, SamplingParams(0.9, 4), 64)
    stop = free[10]
    stopped = _gen(tiny, SamplingParams(0.9, 4, stop_token_ids=(stop,)), 64)
    first = free.index(stop)
    assert stopped == free[: first + 1]  # (the engine yields the stop token; workers do not emit it)


def test_min_tokens_holds_stops_back_and_ignore_eos_never_stops(tiny):
    free = _gen(tiny, SamplingParams(0.9, 4), 64)
    stop = free[3]
    held = _gen(tiny, SamplingParams(0.9, 4, stop_token_ids=(stop,), min_tokens=20), 64)
    assert stop not in held[:20] and len(held) > 20
    eos_heavy = SamplingParams(50.0, 2)  # near-uniform: EOS comes up soon
    ended = [_gen(tiny, SamplingParams(50.0, s), 400) for s in range(3)]
    assert any(t[-1] == tiny.eos_token_id for t in ended), "the check needs an early EOS"
    for s in range(3):
        tokens = _gen(tiny, SamplingParams(50.0, s, ignore_eos=True), 400)
        assert len(tokens) == 400 and tiny.eos_token_id not in tokens
    assert eos_heavy.plain


def _mixed_params(rnd: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rnd.choice([0.0, 0.7, 1.3]),
        seed=rnd.randint(0, 9999),
        top_p=rnd.choice([1.0, 0.9, 0.5]),
        top_k=rnd.choice([0, 5, 40]),
        min_p=rnd.choice([0.0, 0.05]),
        presence_penalty=rnd.choice([0.0, 0.5]),
        frequency_penalty=rnd.choice([0.0, 0.3]),
        repetition_penalty=rnd.choice([1.0, 1.2]),
        min_tokens=rnd.choice([0, 3]),
        stop_token_ids=rnd.choice([(), (101,), (32, 33)]),
    )


def test_mixed_parameters_in_one_batch_equal_each_alone(tiny):
    rnd = random.Random(21)
    requests = []
    for i in range(24):
        prompt = [rnd.randint(32, 126) for _ in range(rnd.randint(1, 30))]
        requests.append((f"r{i}", prompt, _mixed_params(rnd), rnd.randint(1, 30)))
    alone = {rid: list(tiny.generate(p, s, mt)) for rid, p, s, mt in requests}
    engine = batch_engine_for(tiny, BatchConfig(max_num_seqs=24, block_size=8, kv_cache_bytes=8 << 20))
    for request in requests:
        engine.add(*request)
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            if out.token is not None:
                got.setdefault(out.seq_id, []).append(out.token)
    assert got == alone


def test_split_with_penalties_equals_one_engine(tiny):
    """The decode side gets the prompt (repetition penalty) and the first token (history)."""
    rnd = random.Random(5)
    prefill = batch_engine_for(tiny, BatchConfig(kv_cache_bytes=4 << 20))
    decode = batch_engine_for(tiny, BatchConfig(kv_cache_bytes=4 << 20))
    for i in range(6):
        prompt = [rnd.randint(32, 126) for _ in range(20)]
        sampling = SamplingParams(0.8, i, repetition_penalty=1.5, frequency_penalty=0.5, top_k=20)
        alone = list(tiny.generate(prompt, sampling, 24))
        prefill.add("p", prompt, sampling, 24, keep_kv=True)
        first = [o.token for o in prefill.step()][0]
        decode.add_decode("d", prefill.export_kv("p"), first, sampling, 24, prompt_ids=prompt)
        rest = []
        while decode.has_work():
            rest += [o.token for o in decode.step() if o.token is not None]
        assert [first, *rest] == alone


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 2),
        ("presence_penalty", 3),
        ("frequency_penalty", "a lot"),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
        ("stop_token_ids", [1, -3]),
        ("stop_token_ids", 7),
    ],
)
def test_bad_sampling_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest, match=field):
        parse_request({"prompt": "hi", "max_tokens": 8, field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(InvalidRequest, match="min_tokens"):
        parse_request({"prompt": "hi", "max_tokens": 8, "min_tokens": 9})


def test_sampling_fields_travel_and_defaults_stay_off_the_wire():
    request = parse_request({"prompt": "hi", "max_tokens": 8, "top_k": -1, "stop_token_ids": [5, 6]})
    assert request.top_k == 0  # -1 (vLLM's "all") is 0 here
    wire = request.to_kwargs()
    assert wire["stop_token_ids"] == [5, 6] and "top_p" not in wire and "top_k" not in wire
    assert parse_request(wire) == request
