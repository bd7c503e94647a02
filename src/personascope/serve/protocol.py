"""The wire format: OpenAI chat-completion requests with a `persona` extension, and OpenAI-style errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; larger asks get a 400 (or 413 for the body)."""

    max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_steer: int = 8
    max_stop: int = 4
    max_coef: float = 1000.0


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

    model_config = ConfigDict(extra="forbid")
    vector: str
    coef: float
    layer: int | None = None
    scope: Literal["prompt", "response", "all"] = "response"

    @field_validator("coef")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("coef must be a finite number")
        return value


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

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    persona: PersonaOptions | None = None

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
    """A request the server refuses: becomes `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
