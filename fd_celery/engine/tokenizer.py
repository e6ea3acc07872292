"""``ByteTokenizer``: the built-in models' tokenizer: UTF-8 bytes plus BOS and EOS.

Byte-level means no vocabulary file and no download, any text encodes, and a multi-byte
character spans several tokens (which is exactly what :class:`~.text.TextStreamer` must cope
with).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ByteTokenizer", "BOS_ID", "EOS_ID", "BYTE_VOCAB_SIZE"]

BOS_ID = 256
EOS_ID = 257
BYTE_VOCAB_SIZE = 258


class ByteTokenizer:
    """ids ``0..255`` are bytes, ``256`` is BOS, ``257`` is EOS."""

    bos_token_id: int = BOS_ID
    eos_token_id: int = EOS_ID

    @property
    def vocab_size(self) -> int:
        """Usable ids (the model's embedding may be padded beyond this)."""
        return BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """``[BOS] + utf-8 bytes``: the BOS gives an empty prompt a position to predict from."""
        return [BOS_ID, *text.encode("utf-8")]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Bytes → text; specials (and anything that is not a byte) are skipped, and invalid
        or incomplete UTF-8 becomes U+FFFD rather than an error."""
        data = bytes(int(i) for i in token_ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
