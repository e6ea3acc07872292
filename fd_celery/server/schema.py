"""OpenAI request bodies → one fd_celery request, checked field by field.

Every field of ``/v1/completions`` and ``/v1/chat/completions`` is either mapped, accepted as
metadata, or refused with an :class:`ApiError` (400) that names it: nothing is silently ignored.
How each sampling field reaches the engine is one row of :data:`SAMPLING`; when the engine learns
a parameter (``top_p`` ...), its row names the ``Client.submit`` keyword and the field works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fd_celery.protocol import MAX_TOKENS_LIMIT

__all__ = [
    "ApiError",
    "Param",
    "SAMPLING",
    "ParsedRequest",
    "parse_completion",
    "parse_chat",
    "COMPLETION_DEFAULT_MAX_TOKENS",
]

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(name: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=name, code=code)


@dataclass(frozen=True)
class Param:
    """How one sampling field of the API reaches the engine.

    ``submit_as``: the ``Client.submit`` keyword it becomes; ``None`` while the cluster's engine
    does not support it. ``neutral``: values that change nothing (``top_p=1``), accepted even
    while unsupported, since many SDKs send them explicitly.
    """

    submit_as: str | None
    neutral: tuple[Any, ...] = ()


#: OpenAI field (and the common vLLM/FastDeploy extensions) → the engine. One row per field.
SAMPLING: dict[str, Param] = {
    "temperature": Param("temperature"),
    "seed": Param("seed"),
    "top_p": Param("top_p"),
    "top_k": Param("top_k"),
    "min_p": Param("min_p"),
    "presence_penalty": Param("presence_penalty"),
    "frequency_penalty": Param("frequency_penalty"),
    "repetition_penalty": Param("repetition_penalty"),
    "min_tokens": Param("min_tokens"),
    "ignore_eos": Param("ignore_eos"),
    "stop_token_ids": Param("stop_token_ids"),
    "stop": Param(None, neutral=(None, [])),
    "logprobs": Param(None, neutral=(None, False)),
    "top_logprobs": Param(None, neutral=(None, 0)),
    "logit_bias": Param(None, neutral=(None, {})),
}

#: Fields that ask for more than one answer per request, or for server-side features we lack.
_ONE_CHOICE = {"n": (1,), "best_of": (None, 1)}
_COMPLETION_ONLY_NEUTRAL = {"echo": (False,), "suffix": (None, "")}
#: Accepted and not acted upon: they never change the output.
_METADATA = frozenset({"user"})
_CHAT_UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "response_format",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "store",
        "metadata",
        "service_tier",
    }
)
_COMMON = frozenset({"model", "stream", "stream_options", "max_tokens"}) | _METADATA
_COMPLETION_FIELDS = _COMMON | {"prompt"} | set(SAMPLING) | set(_ONE_CHOICE) | set(_COMPLETION_ONLY_NEUTRAL)
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"} | set(SAMPLING) | {"n"} | _CHAT_UNSUPPORTED


@dataclass
class ParsedRequest:
    """What the server needs from a body: the model, the prompt (text, token ids or chat
    messages), the ``Client.submit`` keywords, and how to answer."""

    model: str
    stream: bool
    include_usage: bool
    submit: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # type as well as value: True == 1, but top_p=True is a mistake, not the neutral 1
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


def _check_known(body: Mapping[str, Any], allowed: frozenset[str] | set[str], endpoint: str) -> None:
    for name in body:
        if name not in allowed:
            raise bad_field(
                name, f"unrecognized request field {name!r} for {endpoint}", code="unknown_parameter"
            )


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Client.submit`` keywords of the sampling fields given; unsupported non-neutral
    values are a 400 naming the field."""
    out: dict[str, Any] = {"temperature": DEFAULT_TEMPERATURE}
    for name, param in SAMPLING.items():
        if name not in body:
            continue
        value = body[name]
        if param.submit_as is not None:
            if value is not None:
                out[param.submit_as] = _number(name, value) if name == "temperature" else value
            continue
        if not _is_neutral(value, param.neutral):
            raise bad_field(
                name,
                f"{name}={value!r} is not supported by this cluster yet",
                code="unsupported_parameter",
            )
    return out


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_field(name, f"{name} must be a number, got {value!r}")
    return float(value)


def _max_tokens(name: str, value: Any, default: int | None) -> int:
    if value is None:
        if default is None:
            raise bad_field(name, f"{name} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise bad_field(
            name, f"{name}={value!r} is invalid; allowed: an integer from 1 to {MAX_TOKENS_LIMIT}"
        )
    return value


def _common(body: Any, endpoint: str, allowed: frozenset[str] | set[str]) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_known(body, allowed, endpoint)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "model is required: one of the names GET /v1/models lists")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_field("stream", f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_field("stream_options", "stream_options is only allowed with stream=true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad_field("stream_options", "stream_options may hold include_usage only")
        if options.get("continuous_usage_stats"):
            raise bad_field(
                "stream_options", "continuous_usage_stats is not supported", code="unsupported_parameter"
            )
        include_usage = bool(options.get("include_usage", False))
    for name, neutral in _ONE_CHOICE.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise bad_field(
                name,
                f"{name}={body[name]!r} is not supported: one choice per request",
                "unsupported_parameter",
            )
    parsed = ParsedRequest(model=model, stream=stream, include_usage=include_usage)
    parsed.submit = _sampling(body)
    return parsed


def parse_completion(body: Any) -> ParsedRequest:
    """A ``POST /v1/completions`` body."""
    parsed = _common(body, "/v1/completions", _COMPLETION_FIELDS)
    for name, neutral in _COMPLETION_ONLY_NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise bad_field(
                name, f"{name}={body[name]!r} is not supported by this cluster yet", "unsupported_parameter"
            )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed.prompt = prompt
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        parsed.token_ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_field("prompt", "one prompt per request (a batch of prompts is not supported)")
    else:
        raise bad_field("prompt", "prompt must be a string or a list of token ids")
    parsed.submit["max_tokens"] = _max_tokens(
        "max_tokens", body.get("max_tokens"), COMPLETION_DEFAULT_MAX_TOKENS
    )
    return parsed


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: Any, default_max_tokens: int) -> ParsedRequest:
    """A ``POST /v1/chat/completions`` body; the prompt is built later, by the model's template."""
    parsed = _common(body, "/v1/chat/completions", _CHAT_FIELDS)
    for name in _CHAT_UNSUPPORTED:
        if name in body and body[name] is not None:
            raise bad_field(name, f"{name} is not supported by this cluster", "unsupported_parameter")
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise bad_field("logprobs", "logprobs must be true or false")
    parsed.messages = _messages(body.get("messages"))
    given = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    name = given[0] if given else "max_completion_tokens"
    parsed.submit["max_tokens"] = _max_tokens(name, body.get(name), default_max_tokens)
    return parsed


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(where, f"{where} must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_field(
                f"{where}.role", f"{where}.role={role!r} is not supported; allowed: {', '.join(_ROLES)}"
            )
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad_field(
                f"{where}.{sorted(extra)[0]}", f"{where} has unsupported field(s) {sorted(extra)}"
            )
        out.append({"role": _ROLES[role], "content": _content(where, message.get("content"))})
    return out


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_field(
                    f"{where}.content[{j}]", f"{where}.content[{j}]: only text parts are supported"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad_field(f"{where}.content", f"{where}.content must be a string or a list of text parts")
