"""What the server answers: OpenAI's response objects, stream chunks and error statuses.

Errors, by what a client library should do with them (the ``openai`` package retries 408, 429
and 5xx, honouring ``Retry-After``):

=====================  ======  =================================================================
fd_celery error        status  why
=====================  ======  =================================================================
``InvalidRequest``     400     the request itself is wrong; ``param`` names the field when known
``QueueFull``          429     the local queue is at ``scheduler_max_size``; ``Retry-After`` set
``NoNodeAvailable``    503     no live node serves the model (or can finish the request)
``BrokerUnavailable``  503     Redis is unreachable
``RequestExpired``     504     no node started the request within ``scheduler_ttl``
``KVRefError``,        500     the cluster failed the request
``WorkerError``
=====================  ======  =================================================================
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fd_celery.errors import (
    BrokerUnavailable,
    FDCeleryError,
    InvalidRequest,
    NoNodeAvailable,
    QueueFull,
    RequestExpired,
)
from fd_celery.protocol import SAMPLING_FIELDS, GenerationResult
from fd_celery.server.schema import ApiError

__all__ = ["api_error", "completion_body", "chat_body", "Chunks", "sse", "SSE_DONE", "RETRY_AFTER_S"]

RETRY_AFTER_S = 1  # what a 429 asks the client to wait, in seconds
SSE_DONE = b"data: [DONE]\n\n"

#: fd_celery error → (status, OpenAI error type, code)
_STATUS: list[tuple[type[FDCeleryError], int, str, str]] = [
    (InvalidRequest, 400, "invalid_request_error", "invalid_value"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (NoNodeAvailable, 503, "service_unavailable", "no_node_available"),
    (BrokerUnavailable, 503, "service_unavailable", "broker_unavailable"),
    (RequestExpired, 504, "timeout", "request_expired"),
]

REQUEST_FIELDS = frozenset({"prompt", "token_ids", "max_tokens", "temperature", "seed", *SAMPLING_FIELDS})
_FIELD_FIRST = re.compile(r"([a-z_]+)(?:=|\[| must| is| has)")


def api_error(exc: FDCeleryError) -> ApiError:
    """The HTTP answer to an fd_celery error."""
    status, type_, code = 500, "server_error", type(exc).__name__
    for cls, s, t, c in _STATUS:
        if isinstance(exc, cls):
            status, type_, code = s, t, c
            break
    param = None
    if status == 400:  # the checks name the field first: "top_p=1.5 is out of range"
        named = _FIELD_FIRST.match(exc.message)
        param = named.group(1) if named and named.group(1) in REQUEST_FIELDS else None
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return ApiError(status, exc.message, type=type_, param=param, code=code, headers=headers)


def usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        ],
        "usage": usage(result),
    }


def chat_body(request_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
    }


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Chunks:
    """The stream chunks of one request, for either endpoint."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.chat = chat
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes | None:
        """Chat streams open with the assistant's role."""
        return sse({**self.base, "choices": [self._choice("", None, first=True)]}) if self.chat else None

    def text(self, text: str) -> bytes:
        return sse({**self.base, "choices": [self._choice(text, None)]})

    def finish(self, result: GenerationResult, include_usage: bool) -> bytes:
        out = sse({**self.base, "choices": [self._choice(None if self.chat else "", result.finish_reason)]})
        if include_usage:
            out += sse({**self.base, "choices": [], "usage": usage(result)})
        return out + SSE_DONE

    @staticmethod
    def error(err: ApiError) -> bytes:
        """A failure after the stream began: an error event, then the end."""
        return sse(err.body()) + SSE_DONE
