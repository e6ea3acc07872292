"""The engine runner: the seam between the tasks of a node and its model.

A runner owns the one model copy of its process and hands out :class:`Sequence` objects (a token
iterator plus ``abort``); the tasks never call the engine's ``generate`` / ``decode_step``
themselves. This runner steps one sequence at a time: each step of any sequence holds the
runner's lock, so the threads of a thread pool share one model copy and interleave token by
token, and every sequence's tokens are exactly those of the engine's reference path run alone.
A batching runner keeps this interface and steps many sequences in one forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

from fd_celery.engine.base import Engine, KVCache, SamplingParams

__all__ = ["EngineRunner", "Sequence"]


class Sequence:
    """One request's tokens as the runner produces them.

    Iterate for token ids (the first one comes from the prefill, unless the sequence continues
    from a KV cache); the iteration ends after ``max_tokens`` tokens, after the end-of-sequence
    token, or at the next step after :meth:`abort`.
    """

    def __init__(self, steps: Iterator[int]) -> None:
        self._steps = steps
        self._aborted = threading.Event()

    def __iter__(self) -> Iterator[int]:
        for token in self._steps:
            if self._aborted.is_set():
                return
            yield token

    def abort(self) -> None:
        """Stop producing tokens (any thread): the iteration ends at its next step."""
        self._aborted.set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()


class EngineRunner:
    """The model of this process and the sequences running on it, one step at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def generate(self, prompt_ids: Seq[int], sampling: SamplingParams, max_tokens: int) -> Sequence:
        """Prefill and decode here: up to ``max_tokens`` tokens, stopping after end-of-sequence."""
        return Sequence(self._steps(lambda: self.engine.prefill(prompt_ids, sampling), sampling, max_tokens))

    def prefill(self, prompt_ids: Seq[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        """Only the prompt: its KV cache (to hand to a decode node) and the first token."""
        with self._lock:
            return self.engine.prefill(prompt_ids, sampling)

    def decode(self, cache: KVCache, first_token: int, sampling: SamplingParams, max_tokens: int) -> Sequence:
        """Continue from ``cache`` (the prompt's, whose next token is ``first_token``): up to
        ``max_tokens - 1`` more tokens (the first one is not yielded again)."""
        steps = self._steps(lambda: (cache, first_token), sampling, max_tokens)
        next(steps)  # the first token: already produced by the prefill node
        return Sequence(steps)

    def _steps(
        self, start: Callable[[], tuple[KVCache, int]], sampling: SamplingParams, max_tokens: int
    ) -> Iterator[int]:
        """The engine's reference loop (:meth:`Engine.generate`), one locked step per token."""
        with self._lock:
            cache, token = start()
        yield token
        for _ in range(max_tokens - 1):
            if token == self.engine.eos_token_id:
                return
            with self._lock:
                token = self.engine.decode_step(cache, token, sampling)
            yield token
