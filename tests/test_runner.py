"""The engine runner: one model copy per process, sequences handed out, tokens exact.

No worker processes: the runner is driven directly, and every token list is compared with the
engine's own reference path (``Engine.generate``) run alone.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import Celery

from fd_celery.engine import SamplingParams, load_engine
from fd_celery.engine.runner import EngineRunner
from fd_celery.settings import NodeSettings, set_node_settings
from fd_celery.worker.runner import runner_for

CASES = [  # prompt, max_tokens, temperature, seed
    ("the runner hands out sequences", 24, 0.0, 0),
    ("sampled, seeded", 30, 0.9, 7),
    ("one token", 1, 0.7, 3),
    ("", 12, 1.3, 11),
]


@pytest.fixture(scope="module")
def runner() -> EngineRunner:
    return EngineRunner(load_engine("fd-tiny", "cpu"))


def _reference(
    runner: EngineRunner, prompt: str, max_tokens: int, temperature: float, seed: int
) -> list[int]:
    engine = runner.engine
    return list(engine.generate(engine.encode(prompt), SamplingParams(temperature, seed), max_tokens))


@pytest.mark.parametrize(("prompt", "max_tokens", "temperature", "seed"), CASES)
def test_generate_gives_the_reference_tokens(
    runner: EngineRunner, prompt: str, max_tokens: int, temperature: float, seed: int
) -> None:
    ids = runner.engine.encode(prompt)
    got = list(runner.generate(ids, SamplingParams(temperature, seed), max_tokens))
    assert got == _reference(runner, prompt, max_tokens, temperature, seed)
    assert 1 <= len(got) <= max_tokens


@pytest.mark.parametrize(("prompt", "max_tokens", "temperature", "seed"), CASES)
def test_prefill_then_decode_gives_the_reference_tokens(
    runner: EngineRunner, prompt: str, max_tokens: int, temperature: float, seed: int
) -> None:
    """Splitwise's two halves through the runner: the first token from prefill, the rest from
    decode on the prompt's cache, together exactly what one node produces."""
    ids = runner.engine.encode(prompt)
    sampling = SamplingParams(temperature, seed)
    cache, first = runner.prefill(ids, sampling)
    assert cache.num_tokens == len(ids)
    rest = list(runner.decode(cache, first, sampling, max_tokens))
    assert [first, *rest] == _reference(runner, prompt, max_tokens, temperature, seed)


def test_abort_ends_the_sequence_at_its_next_step(runner: EngineRunner) -> None:
    sequence = runner.generate(runner.engine.encode("stop me"), SamplingParams(0.8, 5), 200)
    taken = []
    for token in sequence:
        taken.append(token)
        if len(taken) == 3:
            sequence.abort()
    assert sequence.aborted
    assert taken == _reference(runner, "stop me", 200, 0.8, 5)[:3]


def test_threads_share_one_model_and_each_gets_its_own_tokens(runner: EngineRunner) -> None:
    """A thread pool's threads step their sequences on one model copy, interleaved token by
    token: each sequence is still exactly its reference."""
    prompts = [(f"thread {i} says", 40, 0.5 * (i % 3), 100 + i) for i in range(6)]
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i: int, prompt: str, max_tokens: int, temperature: float, seed: int) -> None:
        barrier.wait()
        got[i] = list(
            runner.generate(runner.engine.encode(prompt), SamplingParams(temperature, seed), max_tokens)
        )

    threads = [threading.Thread(target=run, args=(i, *case)) for i, case in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: got.get(i) for i in range(len(prompts))} == {
        i: _reference(runner, *case) for i, case in enumerate(prompts)
    }


def test_runner_for_is_one_per_process_not_per_thread() -> None:
    app = Celery("runner-test", set_as_current=False)
    set_node_settings(app, NodeSettings(model="fd-tiny", device="cpu"))
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(runner_for(app))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen) == 4 and all(r is seen[0] for r in seen), "each thread loaded its own model copy"
    assert runner_for(app) is seen[0]
