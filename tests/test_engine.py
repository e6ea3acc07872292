"""Engine tests: determinism, split (prefill here, decode there) runs, guards, streaming text.

Everything runs on the CPU with the built-in models or a tiny Hugging Face model built in a tmp
directory; nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fd_celery.engine import (
    BUILTIN_MODELS,
    Engine,
    KVCache,
    SamplingParams,
    TextStreamer,
    load_engine,
)
from fd_celery.engine.sampling import position_seed, sample_token
from fd_celery.engine.tiny import TinyLlamaEngine
from fd_celery.engine.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from fd_celery.errors import ConfigError

GREEDY = SamplingParams()
WARM = SamplingParams(temperature=0.8, seed=1234)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny_a() -> Engine:
    return load_engine("fd-tiny")


@pytest.fixture(scope="module")
def tiny_b() -> Engine:
    return load_engine("fd-tiny")


def transfer(cache: KVCache) -> KVCache:
    """Copy a cache byte for byte, as a KV transfer between two processes would."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        data = bytearray(t.cpu().numpy().tobytes())
        return torch.frombuffer(data, dtype=t.dtype).reshape(t.shape)

    return KVCache(keys=[copy(k) for k in cache.keys], values=[copy(v) for v in cache.values])


def split_run(a: Engine, b: Engine, ids: list[int], sampling: SamplingParams, n: int) -> list[int]:
    """Prefill on ``a``, transfer the cache, decode the rest on ``b``."""
    cache, token = a.prefill(ids, sampling)
    cache = transfer(cache)
    out = [token]
    while len(out) < n and token != b.eos_token_id:
        token = b.decode_step(cache, token, sampling)
        out.append(token)
    return out


# -- tokenizer and sampling -------------------------------------------------------------------


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids == [BOS_ID, *"héllo".encode()]
    assert tok.vocab_size == 258
    assert tok.decode([*ids, EOS_ID]) == "héllo"
    assert tok.decode([0xC3]) == "\ufffd"


def test_sample_token_rule() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0, float("-inf")])
    assert sample_token(logits, GREEDY, position=5) == 1
    picks = {sample_token(logits, SamplingParams(1.0, seed), 7) for seed in range(200)}
    assert picks == {0, 1, 2}  # never the -inf token
    assert sample_token(logits, WARM, 9) == sample_token(logits.clone(), WARM, 9)
    assert position_seed(1, 2) != position_seed(2, 1)
    with pytest.raises(ValueError):
        sample_token(logits, SamplingParams(temperature=-1.0), 0)


# -- built-in model ---------------------------------------------------------------------------


def test_builtin_names_and_attributes(tiny_a: Engine) -> None:
    assert BUILTIN_MODELS == ("fd-tiny", "fd-small")
    assert isinstance(tiny_a, TinyLlamaEngine)
    assert (tiny_a.model_name, tiny_a.device) == ("fd-tiny", "cpu")
    assert tiny_a.max_context == 2048
    assert tiny_a.eos_token_id == EOS_ID
    assert tiny_a.vocab_size == 258


@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.8"])
def test_deterministic_across_instances(tiny_a: Engine, tiny_b: Engine, sampling: SamplingParams) -> None:
    ids = tiny_a.encode(PROMPT)
    first = list(tiny_a.generate(ids, sampling, 48))
    assert first == list(tiny_b.generate(ids, sampling, 48))
    assert first == list(tiny_a.generate(ids, sampling, 48))
    assert len(first) == 48


def test_seed_changes_sampled_tokens(tiny_a: Engine) -> None:
    ids = tiny_a.encode(PROMPT)
    one = list(tiny_a.generate(ids, SamplingParams(0.8, seed=1), 32))
    two = list(tiny_a.generate(ids, SamplingParams(0.8, seed=2), 32))
    assert one != two


def test_weight_seed_changes_model(tiny_a: Engine) -> None:
    other = load_engine("fd-tiny", seed=1)
    ids = tiny_a.encode(PROMPT)
    assert list(tiny_a.generate(ids, WARM, 32)) != list(other.generate(ids, WARM, 32))


@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.8"])
def test_split_run_equals_reference(tiny_a: Engine, tiny_b: Engine, sampling: SamplingParams) -> None:
    ids = tiny_a.encode(PROMPT)
    reference = list(tiny_a.generate(ids, sampling, 40))
    assert split_run(tiny_a, tiny_b, ids, sampling, 40) == reference


def test_kv_cache_layout(tiny_a: Engine) -> None:
    ids = tiny_a.encode(PROMPT)
    cache, token = tiny_a.prefill(ids, GREEDY)
    assert cache.num_layers == 4 and cache.num_tokens == len(ids)
    for t in cache.tensors():
        assert t.shape == (2, len(ids), 32) and t.dtype == torch.float32 and t.is_contiguous()
    tiny_a.decode_step(cache, token, GREEDY)
    assert cache.num_tokens == len(ids) + 1
    assert all(t.is_contiguous() for t in cache.tensors())


def test_output_is_printable(tiny_a: Engine) -> None:
    ids = tiny_a.encode("héllo")
    for seed in range(3):
        tokens = list(tiny_a.generate(ids, SamplingParams(1.0, seed), 64))
        assert all(32 <= t <= 126 or t in (10, EOS_ID) for t in tokens)
        assert all(c.isprintable() or c == "\n" for c in tiny_a.decode(tokens))


def test_eos_rare_but_possible(tiny_a: Engine) -> None:
    ids = tiny_a.encode("hi")
    runs = [len(list(tiny_a.generate(ids, SamplingParams(1.0, s), 64))) for s in range(12)]
    assert sum(n == 64 for n in runs) >= 10
    firsts = {tiny_a.prefill(ids, SamplingParams(100.0, s))[1] for s in range(400)}
    assert EOS_ID in firsts and BOS_ID not in firsts


def test_max_context_guard(tiny_a: Engine) -> None:
    limit = tiny_a.max_context
    with pytest.raises(ValueError, match="max_context"):
        tiny_a.prefill([65] * limit, GREEDY)
    with pytest.raises(ValueError):
        tiny_a.prefill([], GREEDY)
    with pytest.raises(ValueError):
        tiny_a.prefill([65, 300], GREEDY)
    cache, token = tiny_a.prefill([65] * (limit - 1), GREEDY)  # fits: prompt + one token
    with pytest.raises(ValueError, match="max_context"):
        tiny_a.decode_step(cache, token, GREEDY)
    assert cache.num_tokens == limit - 1


def test_fd_small_cache_size() -> None:
    engine = load_engine("fd-small")
    cache, _ = engine.prefill(list(range(256)) * 2, GREEDY)
    assert cache.nbytes >= 16 * 2**20
    assert engine.max_context == 4096


# -- load_engine ------------------------------------------------------------------------------


def test_load_engine_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-model.*fd-tiny"):
        load_engine("no-such-model")
    with pytest.raises(ConfigError):
        load_engine(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="device"):
        load_engine("fd-tiny", device="tpu")
    with pytest.raises(ConfigError):
        load_engine("fd-tiny", device="cpu:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_engine("fd-tiny", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_split_run() -> None:
    gpu = load_engine("fd-tiny", device="cuda")
    ids = gpu.encode(PROMPT)
    reference = list(gpu.generate(ids, WARM, 32))
    cache, token = gpu.prefill(ids, WARM)
    moved = transfer(cache)
    cache = KVCache([k.cuda() for k in moved.keys], [v.cuda() for v in moved.values])
    out = [token]
    while len(out) < 32:
        token = gpu.decode_step(cache, token, WARM)
        out.append(token)
    assert out == reference


def test_import_does_not_load_transformers() -> None:
    code = "import sys, fd_celery.engine; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_missing_transformers_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install fd_celery\[hf\]"):
        load_engine(str(tmp_path))


# -- TextStreamer -----------------------------------------------------------------------------


def stream(streamer: TextStreamer, ids: list[int]) -> list[str]:
    return [streamer.push(i) for i in ids]


def test_streamer_multibyte(tiny_a: Engine) -> None:
    text = "héllo wörld €"
    ids = ByteTokenizer().encode(text)
    streamer = TextStreamer(tiny_a)
    pieces = stream(streamer, ids)
    assert "".join(pieces) + streamer.flush() == text == tiny_a.decode(ids)
    assert pieces[1:4] == ["h", "", "é"]  # the first byte of "é" is held back
    assert "\ufffd" not in "".join(pieces)


def test_streamer_resumes_mid_character(tiny_a: Engine) -> None:
    ids = ByteTokenizer().encode("héllo wörld €")
    for cut in range(1, len(ids)):
        first = TextStreamer(tiny_a)
        head = "".join(stream(first, ids[:cut]))  # no flush: the stream goes on elsewhere
        second = TextStreamer(tiny_a, emitted_ids=ids[:cut])
        tail = "".join(stream(second, ids[cut:])) + second.flush()
        assert head + tail == tiny_a.decode(ids)


def test_streamer_flushes_incomplete_tail(tiny_a: Engine) -> None:
    streamer = TextStreamer(tiny_a)
    assert streamer.push(ord("a")) == "a"
    assert streamer.push(0xE2) == ""
    assert streamer.flush() == "\ufffd"


def test_streamer_on_generated_tokens(tiny_a: Engine) -> None:
    tokens = list(tiny_a.generate(tiny_a.encode(PROMPT), WARM, 32))
    streamer = TextStreamer(tiny_a)
    assert "".join(stream(streamer, tokens)) + streamer.flush() == tiny_a.decode(tokens)


# -- Hugging Face model from a local directory -------------------------------------------------

SENTENCES = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld € and more text",
    "splitwise runs prefill and decode on different nodes",
]


def _build_hf_model(path: Path) -> None:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here: no download."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    pre, dec, proc = tokenizers.pre_tokenizers, tokenizers.decoders, tokenizers.processors
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tok.decoder = dec.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    tok.post_processor = proc.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)  # only the test's reference model; engines never touch the global RNG
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf-llama")
    _build_hf_model(path)
    return path


@pytest.fixture(scope="module")
def hf_a(hf_dir: Path) -> Engine:
    return load_engine(str(hf_dir))


def test_hf_loads_and_generates(hf_a: Engine, hf_dir: Path) -> None:
    from fd_celery.engine.hf import HFEngine

    assert isinstance(hf_a, HFEngine)
    assert (hf_a.model_name, hf_a.max_context, hf_a.eos_token_id) == (str(hf_dir), 128, 1)
    ids = hf_a.encode("hello world")
    assert ids[0] == 0 and hf_a.decode(ids) == "hello world"
    tokens = list(hf_a.generate(ids, WARM, 20))
    assert 1 <= len(tokens) <= 20
    assert all(0 <= t < hf_a.vocab_size for t in tokens)


@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "t0.8"])
def test_hf_deterministic_and_split(hf_a: Engine, hf_dir: Path, sampling: SamplingParams) -> None:
    hf_b = load_engine(str(hf_dir))
    ids = hf_a.encode("the quick brown fox")
    reference = list(hf_a.generate(ids, sampling, 24))
    assert list(hf_b.generate(ids, sampling, 24)) == reference
    assert split_run(hf_a, hf_b, ids, sampling, 24) == reference


def test_hf_matches_transformers_greedy_generate(hf_a: Engine) -> None:
    ids = hf_a.encode("splitwise runs prefill")
    ours = list(hf_a.generate(ids, GREEDY, 24))
    model = hf_a.model  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=1,
        )
    theirs = out[0, len(ids) :].tolist()
    if hf_a.eos_token_id in theirs:
        theirs = theirs[: theirs.index(hf_a.eos_token_id) + 1]
    assert ours == theirs


def test_hf_kv_layout_and_guard(hf_a: Engine) -> None:
    ids = hf_a.encode("hello world")
    cache, _ = hf_a.prefill(ids, GREEDY)
    assert cache.num_layers == 2
    for t in cache.tensors():
        assert t.shape == (1, len(ids), 16) and t.is_contiguous()
    with pytest.raises(ValueError, match="max_context"):
        hf_a.prefill([2] * hf_a.max_context, GREEDY)


def test_hf_streamer(hf_a: Engine) -> None:
    tokens = list(hf_a.generate(hf_a.encode("héllo"), WARM, 24))
    streamer = TextStreamer(hf_a)
    assert "".join(stream(streamer, tokens)) + streamer.flush() == hf_a.decode(tokens)


def test_cached_decode_matches_full_recompute(tiny_a: Engine) -> None:
    """The KV cache (RoPE positions, GQA head mapping) gives what re-running the prompt gives."""
    ids = tiny_a.encode(PROMPT)
    tokens = list(tiny_a.generate(ids, WARM, 12))
    for i, token in enumerate(tokens):
        assert tiny_a.prefill(ids + tokens[:i], WARM)[1] == token
