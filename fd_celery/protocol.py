"""What travels: the generation request (task kwargs), output chunks and the final result.

Everything here is plain JSON. A request is checked twice with the same code: by the caller's
``Client.submit`` (types and limits, so mistakes fail fast) and by the worker (again, plus the
model's context length), because plain ``send_task`` users skip the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fd_celery.errors import InvalidRequest

__all__ = [
    "RESULT_HEADER",
    "RESULT_DEFERRED",
    "GenerateRequest",
    "GenerationResult",
    "OutputChunk",
    "parse_request",
    "DecodeRequest",
    "parse_decode_kwargs",
    "MAX_TOKENS_LIMIT",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_TOKENS",
]

MAX_TOKENS_LIMIT = 32_768  # tokens one request may ask to generate
MAX_PROMPT_CHARS = 1_000_000  # characters of prompt text
MAX_PROMPT_TOKENS = 131_072  # token ids given directly
MAX_TEMPERATURE = 10.0
MAX_SEED = 2**63 - 1
MAX_NODE_NAME = 255
MAX_TOP_K = 1 << 20
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_TOKEN_IDS = 256

#: The sampling fields beyond temperature and seed (see fd_celery.engine.sampling.SamplingParams).
SAMPLING_FIELDS = (
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
)
_FIELDS = ("prompt", "token_ids", "max_tokens", "temperature", "seed", "node", *SAMPLING_FIELDS)


@dataclass(frozen=True)
class GenerateRequest:
    """A checked request. Exactly one of ``prompt`` and ``token_ids`` is set."""

    max_tokens: int
    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    seed: int | None = None
    node: str | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def to_kwargs(self) -> dict[str, Any]:
        """The task kwargs: JSON-safe, and parse_request(to_kwargs()) gives this back. Sampling
        fields at their defaults are left out (a message of the fields every node knows)."""
        out = asdict(self)
        out["token_ids"] = list(self.token_ids) if self.token_ids is not None else None
        defaults = GenerateRequest(max_tokens=1)
        for name in SAMPLING_FIELDS:
            if getattr(self, name) == getattr(defaults, name):
                del out[name]
        if "stop_token_ids" in out:
            out["stop_token_ids"] = list(self.stop_token_ids)
        return out

    def sampling_kwargs(self) -> dict[str, Any]:
        """The sampling fields beyond temperature and seed, as SamplingParams takes them."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name}={value} is out of range; allowed: {low} to {high}")
    return value


def _prompt(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"prompt must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequest("prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt has {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"prompt is not valid Unicode text (at character {exc.start})") from None
    return value


def _token_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest(f"token_ids must be a list of integers, got {type(value).__name__}")
    if not value:
        raise InvalidRequest("token_ids is empty")
    if len(value) > MAX_PROMPT_TOKENS:
        raise InvalidRequest(f"token_ids has {len(value)} ids; the limit is {MAX_PROMPT_TOKENS}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise InvalidRequest(f"token_ids[{i}]={item!r} is not a non-negative integer")
    return tuple(value)


def _temperature(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"temperature must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature={value} is out of range; allowed: 0 to {MAX_TEMPERATURE}")
    return float(value)


def _number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not (low < value if low_open else low <= value) or value > high:
        bound = f"more than {low}" if low_open else f"{low}"
        raise InvalidRequest(f"{name}={value} is out of range; allowed: {bound} to {high}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {type(value).__name__}")
    return value


def _stop_token_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest(f"stop_token_ids must be a list of integers, got {type(value).__name__}")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"stop_token_ids has {len(value)} ids; the limit is {MAX_STOP_TOKEN_IDS}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise InvalidRequest(f"stop_token_ids[{i}]={item!r} is not a non-negative integer")
    return tuple(value)


def _sampling(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields present in ``kwargs``, checked (vLLM's ranges)."""
    checks: dict[str, Any] = {
        "top_p": lambda v: _number("top_p", v, 0.0, 1.0, low_open=True),
        "top_k": lambda v: _int("top_k", v, -1, MAX_TOP_K) if v != -1 else 0,
        "min_p": lambda v: _number("min_p", v, 0.0, 1.0),
        "presence_penalty": lambda v: _number("presence_penalty", v, -2.0, 2.0),
        "frequency_penalty": lambda v: _number("frequency_penalty", v, -2.0, 2.0),
        "repetition_penalty": lambda v: _number(
            "repetition_penalty", v, 0.0, MAX_REPETITION_PENALTY, low_open=True
        ),
        "min_tokens": lambda v: _int("min_tokens", v, 0, MAX_TOKENS_LIMIT),
        "ignore_eos": lambda v: _flag("ignore_eos", v),
        "stop_token_ids": _stop_token_ids,
    }
    return {name: check(kwargs[name]) for name, check in checks.items() if kwargs.get(name) is not None}


def _node(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NODE_NAME:
        raise InvalidRequest(f"node={value!r} must be a worker's node name such as 'a@host'")
    return value


def parse_request(kwargs: Mapping[str, Any]) -> GenerateRequest:
    """Check task kwargs and build the request; every problem is an ``InvalidRequest``."""
    if not isinstance(kwargs, Mapping):
        raise InvalidRequest(f"request must be a mapping of fields, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown request field(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    prompt, token_ids = kwargs.get("prompt"), kwargs.get("token_ids")
    if (prompt is None) == (token_ids is None):
        raise InvalidRequest("give exactly one of prompt and token_ids")
    if "max_tokens" not in kwargs:
        raise InvalidRequest("max_tokens is required")
    seed, node = kwargs.get("seed"), kwargs.get("node")
    request = GenerateRequest(
        max_tokens=_int("max_tokens", kwargs["max_tokens"], 1, MAX_TOKENS_LIMIT),
        prompt=_prompt(prompt) if prompt is not None else None,
        token_ids=_token_ids(token_ids) if token_ids is not None else None,
        temperature=_temperature(kwargs.get("temperature", 0.0)),
        seed=_int("seed", seed, 0, MAX_SEED) if seed is not None else None,
        node=_node(node) if node is not None else None,
        **_sampling(kwargs),
    )
    if request.min_tokens > request.max_tokens:
        raise InvalidRequest(f"min_tokens={request.min_tokens} is more than max_tokens={request.max_tokens}")
    return request


@dataclass(frozen=True)
class DecodeRequest:
    """The kwargs of ``fd.decode``: which request, where its KV reference is, where to run."""

    request_id: str
    prefill_id: str  # the fd.prefill task whose result (in the backend) is the KV reference
    node: str  # the decode node the prefill node chose
    request: GenerateRequest
    submitted: float
    started: float  # when prefill started
    first_token_at: float

    def to_kwargs(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prefill_id": self.prefill_id,
            "node": self.node,
            "request": self.request.to_kwargs(),
            "submitted": self.submitted,
            "started": self.started,
            "first_token_at": self.first_token_at,
        }


def parse_decode_kwargs(kwargs: Mapping[str, Any]) -> DecodeRequest:
    from fd_celery.keys import check_request_id

    if not isinstance(kwargs, Mapping):
        raise InvalidRequest(f"fd.decode takes a mapping of fields, got {type(kwargs).__name__}")
    expected = {"request_id", "prefill_id", "node", "request", "submitted", "started", "first_token_at"}
    if set(kwargs) != expected:
        raise InvalidRequest(f"fd.decode takes exactly the fields {sorted(expected)}")
    for name in ("submitted", "started", "first_token_at"):
        value = kwargs[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequest(f"fd.decode field {name} must be a number")
    return DecodeRequest(
        request_id=check_request_id(kwargs["request_id"]),
        prefill_id=check_request_id(kwargs["prefill_id"]),
        node=_node(kwargs["node"]),
        request=parse_request(kwargs["request"]),
        submitted=float(kwargs["submitted"]),
        started=float(kwargs["started"]),
        first_token_at=float(kwargs["first_token_at"]),
    )


@dataclass(frozen=True)
class OutputChunk:
    """A piece of output, in order: ``seq`` counts chunks from 0."""

    seq: int
    text: str
    token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputChunk:
        return cls(seq=int(data["seq"]), text=str(data["text"]), token_ids=tuple(data["token_ids"]))

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "text": self.text, "token_ids": list(self.token_ids)}


@dataclass(frozen=True)
class GenerationResult:
    """The final result of a request, as the caller sees it."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "length" (max_tokens reached) or "stop" (end-of-sequence token)
    served_by: tuple[str, ...]  # node names that ran it, prefill first
    stolen: bool
    ttft_s: float  # submit -> first token
    tpot_s: float  # mean time per output token after the first
    queue_s: float = 0.0  # submit -> start
    prompt_tokens: int = 0
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["token_ids"] = list(self.token_ids)
        out["served_by"] = list(self.served_by)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationResult:
        try:
            return cls(
                request_id=str(data["request_id"]),
                text=str(data["text"]),
                token_ids=tuple(int(t) for t in data["token_ids"]),
                finish_reason=str(data["finish_reason"]),
                served_by=tuple(str(n) for n in data["served_by"]),
                stolen=bool(data["stolen"]),
                ttft_s=float(data["ttft_s"]),
                tpot_s=float(data["tpot_s"]),
                queue_s=float(data.get("queue_s", 0.0)),
                prompt_tokens=int(data.get("prompt_tokens", 0)),
                model=str(data.get("model", "")),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            from fd_celery.errors import WorkerError

            raise WorkerError(f"malformed result from worker: {exc!r}") from None


#: ``Client.submit`` sends this header (with ``ignore_result``): the worker stores the SUCCESS
#: record itself, off the request's path, since the caller reads the output stream.
RESULT_HEADER, RESULT_DEFERRED = "fd_result", "deferred"
