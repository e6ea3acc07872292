"""Chat messages → a prompt, by the model's template.

- A Hugging Face model (a node's ``model`` is a directory this server can read): the tokenizer's
  own chat template (``apply_chat_template`` with the generation prompt), sent as token ids so
  the worker adds no second BOS. The tokenizer is loaded once per model, from local files only.
- The built-in models (``fd-tiny``, ``fd-small``, ``bench-sleep:*``) have no template of their
  own; they get the plain one documented here::

      system: You are terse.
      user: Hello
      assistant:

  one ``<role>: <content>`` line per message (roles ``system``, ``user``, ``assistant``;
  ``developer`` counts as ``system``), then ``assistant:`` for the answer to follow.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from fd_celery.server.schema import ApiError

__all__ = ["plain_template", "render_chat"]


def plain_template(messages: list[dict[str, str]]) -> str:
    """The documented template of the built-in models."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(path: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ApiError(
            503,
            f"model {path!r} is a Hugging Face model: its chat template needs transformers in the "
            "server's environment (pip install 'fd_celery[hf]')",
            type="server_error",
            code="model_template_unavailable",
        ) from None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(model: str, messages: list[dict[str, str]]) -> tuple[str | None, list[int] | None]:
    """The prompt of a chat request for ``model``: ``(text, None)`` or ``(None, token_ids)``."""
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        return plain_template(messages), None
    tokenizer = _hf_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400,
            f"model {model!r} has no chat template; use /v1/completions with a prompt",
            param="messages",
            code="no_chat_template",
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # a BatchEncoding (transformers 5 returns one by default)
        ids = ids["input_ids"]
    return None, [int(i) for i in ids]
