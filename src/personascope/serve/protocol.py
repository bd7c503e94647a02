"""The wire format: OpenAI chat-completion requests with a `persona` extension, and OpenAI-style errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from personascope.io.checks import MIN_TEMPERATURE, REPETITION_PENALTY_RANGE, SEED_RANGE, check_count, check_number

#: The sampling bounds: the lower ones where the maths still holds (`personascope.io.checks`), the upper ones
#: OpenAI's; frequency and presence penalties lie in [-2, 2], as OpenAI's.
MAX_TEMPERATURE, MAX_REPETITION_PENALTY, MAX_COUNT_PENALTY = 2.0, 2.0, 2.0
MIN_REPETITION_PENALTY = REPETITION_PENALTY_RANGE[0]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger asks get a 400 (or 413 for the body). At most `max_queue` requests
    wait for the model; beyond, a 503 with `Retry-After: retry_after_s`."""

    max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_steer: int = 8
    max_stop: int = 4
    max_coef: float = 1000.0
    max_queue: int = 256
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_body_bytes", "max_messages", "max_queue", "retry_after_s"):
            check_count(name, getattr(self, name))
        for name in ("max_steer", "max_stop"):
            check_count(name, getattr(self, name), 0)
        check_number("max_coef", self.max_coef, 0)


class Message(BaseModel):
    """One chat message; `content` may be a string or OpenAI text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class SteerSpec(BaseModel):
    """Add `coef` × the named vector at `layer` (default: the vector's best layer) over the `scope` tokens."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    vector: str
    coef: float
    layer: int | None = None
    scope: Literal["prompt", "response", "all"] = "response"


class PersonaOptions(BaseModel):
    """The `persona` extension of a chat request."""

    model_config = ConfigDict(extra="forbid")
    steer: list[SteerSpec] = Field(default_factory=list)
    monitor: list[str] | bool = False
    trace: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    messages: list[Message]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float = Field(default=0.0, ge=-MAX_COUNT_PENALTY, le=MAX_COUNT_PENALTY)
    presence_penalty: float = Field(default=0.0, ge=-MAX_COUNT_PENALTY, le=MAX_COUNT_PENALTY)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    persona: PersonaOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ScoreRequest(BaseModel):
    """`POST /v1/persona/score`: a chat ending with an assistant answer; `vectors` default to all registered."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message]
    vectors: list[str] | None = None


class APIError(Exception):
    """A request the server refuses: becomes `status` with an OpenAI-style error body (and `headers`)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
