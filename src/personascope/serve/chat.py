"""Chat completions: a checked request becomes a scheduler job; its events become OpenAI bodies and chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from personascope.inference.generate import default_decoding
from personascope.model import ModelHandle
from personascope.serve.decode import RowSampling
from personascope.serve.jobs import SteerOp
from personascope.serve.protocol import APIError, ChatRequest, Limits, Message
from personascope.serve.registry import Registry


@dataclass
class Plan:
    """What a request asks for, checked: prompt ids, sampling, steering and the vectors to monitor."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    sampling: RowSampling
    steer: tuple[SteerOp, ...]
    monitor: tuple[str, ...]
    trace: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def chat_messages(messages: list[Message], limits: Limits) -> list[dict[str, str]]:
    """Plain `{role, content}` dicts (`developer` is a system message), within the message limit."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} (this server allows {limits.max_messages})",
                       param="messages")
    out = []
    for i, message in enumerate(messages):
        try:
            text = message.text()
        except ValueError as exc:
            raise APIError(400, f"messages[{i}]: {exc}", param=f"messages[{i}].content") from None
        out.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    return out


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} is not served here; this server serves {served!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


def monitored(names: list[str] | bool, registry: Registry, param: str) -> tuple[str, ...]:
    """The registered names a `monitor` field asks for (`true` = all)."""
    if names is True:
        return registry.names
    if names is False:
        return ()
    for name in names:
        if name not in registry.vectors:
            raise APIError(400, _unknown(name, registry), param=param, code="unknown_vector")
    return tuple(dict.fromkeys(names))


def _unknown(name: str, registry: Registry) -> str:
    return f"unknown vector {name!r}: registered vectors are {', '.join(registry.names) or 'none'}"


def row_sampling(handle: ModelHandle, req: ChatRequest, max_tokens: int, stops: tuple[str, ...]) -> RowSampling:
    """The request's decoding; what it leaves out comes from `default_decoding` (the model's sampling settings with
    a repetition penalty against loops). `temperature: 0` asks for pure greedy: no penalty unless one is given."""
    default = default_decoding(handle)
    greedy = req.temperature == 0
    penalty = req.repetition_penalty or (1.0 if greedy else default.repetition_penalty)
    return RowSampling(
        max_tokens=max_tokens,
        temperature=default.temperature if req.temperature is None else req.temperature,
        top_p=default.top_p if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=stops,
        repetition_penalty=penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
    )


def plan(req: ChatRequest, registry: Registry, limits: Limits, served: str) -> Plan:
    """Check `req` against the registry, the limits and the model's context; 4xx `APIError` when it fails."""
    check_model(req.model, served)
    handle = registry.handle
    messages = chat_messages(req.messages, limits)
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    stops = req.stops()
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
    persona = req.persona
    steer: list[SteerOp] = []
    names: tuple[str, ...] = ()
    trace = False
    if persona is not None:
        if len(persona.steer) > limits.max_steer:
            raise APIError(400, f"at most {limits.max_steer} steering entries per request", param="persona.steer")
        for i, spec in enumerate(persona.steer):
            if spec.vector not in registry.vectors:
                raise APIError(400, _unknown(spec.vector, registry), param=f"persona.steer[{i}].vector",
                               code="unknown_vector")
            layer = registry.get(spec.vector).layer if spec.layer is None else spec.layer
            if not 0 <= layer <= handle.num_layers:
                raise APIError(400, f"layer {layer} is out of range: this model has layers 0..{handle.num_layers}",
                               param=f"persona.steer[{i}].layer")
            if abs(spec.coef) > limits.max_coef:
                raise APIError(400, f"coef {spec.coef:g} is beyond ±{limits.max_coef:g}",
                               param=f"persona.steer[{i}].coef")
            steer.append(SteerOp(spec.vector, layer, spec.scope, spec.coef))
        names = monitored(persona.monitor, registry, "persona.monitor")
        trace = persona.trace
        if trace and not names:
            names = registry.names
    prompt_ids = handle.chat_ids(messages)
    context = handle.max_length
    if context and len(prompt_ids) + max_tokens > context:
        raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                       f"model's context length of {context}", param="messages", code="context_length_exceeded")
    sampling = row_sampling(handle, req, max_tokens, tuple(stops))
    return Plan(messages, prompt_ids, sampling, tuple(steer), names, trace)


def monitor_summary(registry: Registry, prompt: dict[str, float],
                    response: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """`{NAME: {"prompt", "response", "alert"}}`: an alert when the response projection passes the threshold."""
    out = {}
    for name, value in response.items():
        threshold = registry.get(name).threshold
        alert = threshold is not None and value is not None and value > threshold
        out[name] = {"prompt": prompt.get(name), "response": value, "alert": alert}
    return out


def completion_body(p: Plan, served: str, text: str, reason: str, usage: dict[str, int],
                    persona: dict[str, Any] | None) -> dict[str, Any]:
    """A non-streamed `chat.completion`."""
    body: dict[str, Any] = {
        "id": p.id, "object": "chat.completion", "created": p.created, "model": served,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                     "logprobs": None}],
        "usage": usage,
    }
    if persona is not None:
        body["persona"] = persona
    return body


def chunk(p: Plan, served: str, delta: dict[str, Any] | None, reason: str | None = None,
          persona: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta` None gives a chunk without choices (the usage chunk)."""
    body: dict[str, Any] = {"id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": served,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
    if persona:
        body["persona"] = persona
    if usage is not None:
        body["usage"] = usage
    return body
