"""The engine runner: the seam between the tasks of a node and its model.

A runner owns the one model copy of its process and hands out :class:`Sequence` objects (a token
iterator plus ``abort``); the tasks never call the engine themselves. One thread of the runner
(its loop) drives a :class:`~fd_celery.engine.batch.BatchEngine`: it takes what the tasks asked
for (add, abort), runs one step for every running sequence, and hands each sequence its token.
So the threads of a thread pool (``celery worker -P threads -c 32``) share one model and decode
together, one forward per step; a prefork child runs its one request the same way. Every
sequence's tokens are exactly those of the engine's reference path run alone.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from fd_celery.engine.base import Engine, KVCache, SamplingParams
from fd_celery.engine.batch import BatchConfig, BatchEngine, Capacity, batch_engine_for
from fd_celery.engine.sampling import Sampler
from fd_celery.errors import WorkerError

__all__ = ["EngineRunner", "Sequence"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _End:
    reason: str
    error: BaseException | None = None
    cache: KVCache | None = None


class Sequence:
    """One request's tokens as the runner produces them.

    Iterate for token ids (the first one comes from the prefill, unless the sequence continues
    from a KV cache); the iteration ends after ``max_tokens`` tokens, after the end-of-sequence
    token, or at the next step after :meth:`abort`. ``finish_reason`` says which, once it ended.
    """

    def __init__(self, runner: EngineRunner | None, seq_id: str) -> None:
        self._runner = runner
        self.seq_id = seq_id
        self._items: queue.SimpleQueue[int | _End] = queue.SimpleQueue()
        self._aborted = threading.Event()
        self.finish_reason: str | None = None
        self.kv: KVCache | None = None  # a prefill-only sequence's KV, once it ended

    def __iter__(self) -> Iterator[int]:
        while self.finish_reason is None:
            item = self._items.get()
            if isinstance(item, _End):
                self.finish_reason, self.kv = item.reason, item.cache
                if item.error is not None:
                    raise item.error
                return
            if self._aborted.is_set():
                self.finish_reason = "abort"
                return
            yield item

    def abort(self) -> None:
        """Stop producing tokens (any thread): the iteration ends at its next step, and the
        sequence's KV blocks are free again at the runner's next step."""
        if not self._aborted.is_set():
            self._aborted.set()
            if self._runner is not None:
                self._runner._post(lambda batch: batch.abort(self.seq_id))

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()


class EngineRunner:
    """The model of this process and the sequences running on it, stepped by one loop thread."""

    def __init__(self, engine: Engine, config: BatchConfig | None = None) -> None:
        self.engine = engine
        self.batch: BatchEngine = batch_engine_for(engine, config or BatchConfig())
        self._cond = threading.Condition()
        self._inbox: list[Callable[[BatchEngine], None]] = []
        self._sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._capacity = self.batch.capacity()
        #: steps run and the most sequences one step advanced (what `fd` stats show)
        self.steps = 0
        self.widest_step = 0

    # -- what tasks call (any thread) -------------------------------------------------------

    def generate(self, prompt_ids: Seq[int], sampling: SamplingParams, max_tokens: int) -> Sequence:
        """Prefill and decode here: up to ``max_tokens`` tokens, stopping after end-of-sequence."""
        prompt = list(prompt_ids)
        return self._start(lambda batch, sid: batch.add(sid, prompt, sampling, max_tokens))

    def prefill(self, prompt_ids: Seq[int], sampling: SamplingParams) -> tuple[KVCache, int]:
        """Only the prompt: its KV cache (to hand to a decode node) and the first token."""
        prompt = list(prompt_ids)
        sequence = self._start(lambda batch, sid: batch.add(sid, prompt, sampling, 1, keep_kv=True))
        tokens = list(sequence)
        if sequence.kv is None or len(tokens) != 1:
            raise WorkerError(f"prefill ended without its KV ({sequence.finish_reason})")
        return sequence.kv, tokens[0]

    def decode(
        self,
        cache: KVCache,
        first_token: int,
        sampling: SamplingParams,
        max_tokens: int,
        prompt_ids: Seq[int] = (),
    ) -> Sequence:
        """Continue from ``cache`` (the prompt's, whose next token is ``first_token``): up to
        ``max_tokens - 1`` more tokens (the first one is not yielded again). ``prompt_ids``: the
        prompt, for the repetition penalty."""
        if max_tokens <= 1 or Sampler(sampling, (), self.engine.eos_token_id).stops(first_token):
            done = Sequence(None, "done")
            done._items.put(_End("length" if max_tokens <= 1 else "stop"))
            return done
        prompt = list(prompt_ids)
        # Our own copy, made here in the task's thread: the handed-over tensors are often views of
        # a KV blob's shared memory, whose file goes back to its writer once they are gone.
        own = KVCache(keys=[k.clone() for k in cache.keys], values=[v.clone() for v in cache.values])
        cache.keys.clear()
        cache.values.clear()
        return self._start(
            lambda batch, sid: batch.add_decode(sid, own, first_token, sampling, max_tokens, prompt)
        )

    def capacity(self) -> Capacity:
        """Room as of the last step (no lock: a snapshot the loop refreshes every step)."""
        return self._capacity

    def has_room(self, in_flight: int = 0) -> bool:
        """Could one more request start at the next step? A free sequence slot (counting
        ``in_flight`` requests the caller holds that may not have reached the engine yet), a free
        KV block, and nobody waiting inside the engine: what a node asks before it takes a
        message off Redis."""
        capacity = self._capacity
        busy = max(in_flight, capacity.running + len(self._inbox))
        return capacity.waiting == 0 and capacity.free_blocks > 0 and busy < capacity.max_num_seqs

    # -- the loop -------------------------------------------------------------------------------

    def _start(self, add: Callable[[BatchEngine, str], None]) -> Sequence:
        sequence = Sequence(self, f"s{next(self._ids)}")

        def command(batch: BatchEngine) -> None:
            try:
                add(batch, sequence.seq_id)
            except Exception as exc:  # noqa: BLE001 - the caller gets it, the loop serves on
                sequence._items.put(_End("error", exc))
                return
            self._sequences[sequence.seq_id] = sequence

        self._post(command)
        return sequence

    def _post(self, command: Callable[[BatchEngine], None]) -> None:
        with self._cond:
            self._inbox.append(command)
            if self._thread is None or not self._thread.is_alive():  # (first use, or a forked child)
                self._thread = threading.Thread(target=self._loop, name="fd-engine", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        batch = self.batch
        while True:
            with self._cond:
                while not self._inbox and not batch.has_work():
                    self._capacity = batch.capacity()
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
            for command in commands:
                command(batch)
            try:
                outputs = batch.step()
            except Exception as exc:  # (logged) the step's sequences fail; the node serves on
                logger.exception("engine step failed; its sequences end with the error")
                self._fail_all(batch, WorkerError(f"engine step failed: {type(exc).__name__}: {exc}"))
                continue
            self.steps += 1
            self.widest_step = max(self.widest_step, len(outputs))
            for out in outputs:
                sequence = self._sequences.get(out.seq_id)
                if sequence is None:
                    continue
                if out.token is not None:
                    sequence._items.put(out.token)
                if out.finished:
                    del self._sequences[out.seq_id]
                    cache = None
                    if batch.holds_kv(out.seq_id):
                        cache = batch.export_kv(out.seq_id)
                    sequence._items.put(_End(out.finish_reason or "length", cache=cache))
            self._capacity = batch.capacity()

    def _fail_all(self, batch: BatchEngine, error: WorkerError) -> None:
        for seq_id, sequence in list(self._sequences.items()):
            batch.abort(seq_id)
            sequence._items.put(_End("error", error))
        self._sequences.clear()
        try:
            batch.step()  # retires the aborted sequences: their blocks are free again
        except Exception:  # (logged with its traceback) nothing left to tell anyone
            logger.exception("engine could not retire the failed step's sequences")
