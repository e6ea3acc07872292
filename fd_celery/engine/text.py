"""``TextStreamer``: turn a stream of token ids into a stream of text pieces.

A token need not end on a character boundary (a byte tokenizer splits "€" into three tokens,
byte-level BPE can too), and ``decode(a) + decode(b)`` need not equal ``decode(a + b)``. So the
streamer decodes the pending ids with a few tokens of context and emits only the new suffix,
holding text back while it ends in U+FFFD (an incomplete UTF-8 sequence) until the next token
completes it. The pieces from
:meth:`TextStreamer.push` plus :meth:`TextStreamer.flush` concatenate to
``engine.decode(all ids)``.

``emitted_ids`` lets a second process continue a stream the first one started (Splitwise: the
prefill node streams the first token, the decode node the rest): the new streamer counts as
already sent exactly what a streamer that had pushed those ids would have sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fd_celery.engine.base import Engine

__all__ = ["TextStreamer"]

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


def _stable(text: str) -> str:
    """``text`` without a trailing run of U+FFFD: those may still become a real character."""
    return text.rstrip(_REPLACEMENT)


# Tokens of context decoded before the pending ones: enough for tokenizers whose pieces depend
# on their neighbours (leading spaces, byte fallbacks), so the window decodes like the whole.
CONTEXT_TOKENS = 6


class TextStreamer:
    """Incremental detokeniser for one sequence (not thread-safe; one per request).

    Each push decodes a short window (a few tokens of context plus the tokens not yet released)
    rather than the whole sequence, so a long generation costs O(n), not O(n^2).
    """

    def __init__(self, engine: Engine, emitted_ids: Iterable[int] = ()) -> None:
        self._engine = engine
        self._ids: list[int] = [int(i) for i in emitted_ids]
        self._emitted = _stable(engine.decode(self._ids)) if self._ids else ""
        self._pending = len(self._ids)  # ids from here on have text not released yet
        while self._pending > 0 and engine.decode(self._ids[: self._pending]) != self._emitted:
            self._pending -= 1  # the held-back tail of emitted_ids is still pending

    @property
    def token_ids(self) -> list[int]:
        """Every id seen so far, ``emitted_ids`` included."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """The text handed out so far (``emitted_ids``' part included)."""
        return self._emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final with it (often ``""`` mid-character)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: return whatever was held back, replacement characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        start = max(0, self._pending - CONTEXT_TOKENS)
        before = self._engine.decode(self._ids[start : self._pending])
        after = self._engine.decode(self._ids[start:])
        if not after.startswith(before):
            # The tokenizer rewrote text it already produced; what was sent cannot be taken back.
            log.warning("decoded text is not an extension of the streamed text; streaming on")
            before = after[: len(before)]
        piece = after[len(before) :]
        if not final and _stable(piece) != piece:
            return ""  # ends inside a character: wait for the token that completes it
        self._pending = len(self._ids)
        self._emitted += piece
        return piece
