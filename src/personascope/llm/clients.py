"""Chat-completion clients chosen by a spec string: ``openai:MODEL``, ``anthropic:MODEL``, ``hf:MODEL``."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from personascope.errors import PersonascopeError

Message = dict[str, str]

LLM_FORMS = "openai:MODEL, anthropic:MODEL or hf:MODEL_OR_PATH"
TOP_LOGPROBS = 20
_RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_MAX_SLEEP_S = 30.0


class LLMRequestError(PersonascopeError):
    """One request failed for good (retries exhausted, or the server refused this request)."""


class LLM(Protocol):
    """A chat model. ``identity`` names the model and endpoint (used as a cache key); ``retries`` counts the
    requests it has sent again after a transient failure (429, 5xx, timeout, lost connection)."""

    spec: str
    identity: str
    retries: int

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0,
                 json_mode: bool = False) -> str:
        """Return the assistant's reply text. ``json_mode`` asks for a JSON object where supported."""
        ...

    def top_logprobs(self, messages: list[Message]) -> dict[str, float] | None:
        """Return the first reply token's top-20 ``{token: logprob}``, or None when unavailable."""
        ...


def split_spec(spec: str, *, what: str = "LLM", forms: str = LLM_FORMS) -> tuple[str, str]:
    """Split ``"kind:name"`` into its parts; raise a PersonascopeError listing ``forms`` otherwise."""
    kind, sep, name = spec.partition(":")
    if not sep or not name.strip() or kind not in ("openai", "anthropic", "hf"):
        raise PersonascopeError(f"unknown {what} spec {spec!r}: use {forms}")
    return kind, name.strip()


def make_llm(spec: str, *, base_url: str | None = None, timeout: float = 60.0, max_retries: int = 4,
             backoff: float = 0.5) -> LLM:
    """Make a chat client from a spec string; nothing is connected or loaded yet.

    Args:
        spec: ``openai:MODEL`` (any OpenAI-compatible server), ``anthropic:MODEL`` or ``hf:MODEL_OR_PATH``.
        base_url: server URL for the HTTP backends; defaults to ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL``,
            then the vendor's public API.
        timeout: seconds per HTTP request.
        max_retries: retries after the first attempt on 429/5xx/timeouts/connection errors.
        backoff: base delay in seconds; attempt ``n`` waits about ``backoff * 2**n`` (with jitter, capped).
    """
    kind, name = split_spec(spec)
    if kind == "hf":
        if base_url is not None:
            raise PersonascopeError(f"--base-url applies to openai:/anthropic: specs, not to {spec!r}")
        return HFChat(spec=spec, model_name=name)
    policy = _Policy(timeout=timeout, max_retries=max_retries, backoff=backoff)
    if kind == "openai":
        return OpenAIChat(spec, name, _endpoint(spec, base_url, "OPENAI", "https://api.openai.com/v1",
                                                policy, _openai_headers))
    return AnthropicChat(spec, name, _endpoint(spec, base_url, "ANTHROPIC", "https://api.anthropic.com",
                                               policy, _anthropic_headers))


@dataclass(frozen=True)
class _Policy:
    timeout: float
    max_retries: int
    backoff: float

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): exponential, half of it jittered."""
        step = min(_MAX_SLEEP_S, self.backoff * 2**attempt)
        wait = step / 2 + random.uniform(0, step / 2)
        try:
            wait = max(wait, min(_MAX_SLEEP_S, float(retry_after or 0)))
        except ValueError:  # an HTTP-date Retry-After: keep our own delay
            pass
        return wait


def _openai_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _anthropic_headers(key: str | None) -> dict[str, str]:
    return {"anthropic-version": "2023-06-01", **({"x-api-key": key} if key else {})}


def _endpoint(spec: str, base_url: str | None, env: str, default: str, policy: _Policy,
              headers: Callable[[str | None], dict[str, str]]) -> _Endpoint:
    base = (base_url or os.environ.get(f"{env}_BASE_URL") or default).rstrip("/")
    key = os.environ.get(f"{env}_API_KEY") or None
    if key is None and base == default:
        raise PersonascopeError(
            f"{spec}: {env}_API_KEY is not set; export it, or pass --base-url for a local server")
    return _Endpoint(spec=spec, base=base, key_env=f"{env}_API_KEY", policy=policy,
                     headers=headers(key), secret=key)


@dataclass
class _Endpoint:
    """POSTs JSON to one server with retries; holds the key only inside request headers."""

    spec: str
    base: str
    key_env: str
    policy: _Policy
    headers: dict[str, str] = field(repr=False)
    secret: str | None = field(repr=False)
    retries: int = 0
    _client: httpx.Client | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(headers=self.headers, timeout=self.policy.timeout)
            return self._client

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``base + path`` and return the JSON reply, retrying transient failures."""
        url = self.base + path
        problem = ""
        for attempt in range(self.policy.max_retries + 1):
            retry_after = None
            try:
                response = self.client().post(url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.policy.timeout:g} s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__}: {self._redact(str(exc))})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        problem = f"reply was not JSON: {self._excerpt(response.text)!r}"
                elif status in _RETRY_STATUS:
                    retry_after = response.headers.get("retry-after")
                    problem = f"HTTP {status}: {self._excerpt(response.text)!r}"
                else:
                    raise self._refused(url, status, response.text)
            if attempt < self.policy.max_retries:
                with self._lock:
                    self.retries += 1
                time.sleep(self.policy.delay(attempt, retry_after))
        raise LLMRequestError(f"{self.spec}: request to {url} failed after "
                              f"{self.policy.max_retries + 1} attempts; last: {problem}")

    def _refused(self, url: str, status: int, text: str) -> PersonascopeError:
        if status in (401, 403):
            return PersonascopeError(f"{self.spec}: {url} rejected the credentials (HTTP {status}); "
                                     f"check {self.key_env}")
        if status == 404:
            return PersonascopeError(f"{self.spec}: {url} answered 404 ({self._excerpt(text)!r}); "
                                     "check the model name and the base URL")
        return LLMRequestError(f"{self.spec}: {url} refused the request (HTTP {status}): "
                               f"{self._excerpt(text)!r}")

    def _redact(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def _excerpt(self, text: str) -> str:
        text = self._redact(text.strip())
        return text if len(text) <= 300 else text[:300] + "…"


def _dig(reply: dict[str, Any], spec: str, *path: str | int) -> Any:
    """Follow ``path`` into a JSON reply, or raise an LLMRequestError naming what was missing."""
    node: Any = reply
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            where = "".join(f"[{s!r}]" for s in path)
            raise LLMRequestError(f"{spec}: unexpected reply shape, no {where}: {str(reply)[:300]!r}") from None
    return node


@dataclass
class _HTTPChat:
    """A chat model behind an HTTP API: its spec, model name and endpoint."""

    spec: str
    model: str
    endpoint: _Endpoint

    @property
    def identity(self) -> str:
        return f"{self.spec}@{self.endpoint.base}"

    @property
    def retries(self) -> int:
        return self.endpoint.retries


@dataclass
class OpenAIChat(_HTTPChat):
    """Any server speaking OpenAI's ``/chat/completions`` (OpenAI, vLLM, Ollama, llama.cpp, …)."""

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0,
                 json_mode: bool = False) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        reply = self.endpoint.post("/chat/completions", body)
        return _dig(reply, self.spec, "choices", 0, "message").get("content") or ""

    def top_logprobs(self, messages: list[Message]) -> dict[str, float] | None:
        reply = self.endpoint.post("/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS})
        content = (_dig(reply, self.spec, "choices", 0).get("logprobs") or {}).get("content")
        if not content or not content[0].get("top_logprobs"):
            return None
        return merge_logprobs((entry["token"], float(entry["logprob"])) for entry in content[0]["top_logprobs"])


@dataclass
class AnthropicChat(_HTTPChat):
    """Anthropic's Messages API. It exposes no logprobs, so judges fall back to the reply text."""

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0,
                 json_mode: bool = False) -> str:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature,
                                "messages": [m for m in messages if m["role"] != "system"]}
        if system:
            body["system"] = system
        path = "/messages" if self.endpoint.base.endswith("/v1") else "/v1/messages"
        blocks = _dig(self.endpoint.post(path, body), self.spec, "content")
        return "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")

    def top_logprobs(self, messages: list[Message]) -> dict[str, float] | None:
        return None


def merge_logprobs(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Collect ``(token, logprob)`` pairs into a dict, adding the probabilities of repeated token strings."""
    merged: dict[str, float] = {}
    for token, logprob in pairs:
        if token in merged:
            high, low = max(merged[token], logprob), min(merged[token], logprob)
            logprob = high + math.log1p(math.exp(low - high))
        merged[token] = logprob
    return merged


@dataclass
class HFChat:
    """A local transformers model, loaded on first use via ``personascope.model.load_model``."""

    spec: str
    model_name: str
    retries: int = 0  # a local model is never asked twice
    _handle: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def identity(self) -> str:
        return self.spec

    def _loaded(self) -> Any:
        if self._handle is None:
            from personascope.model import load_model

            self._handle = load_model(self.model_name)
        return self._handle

    def _prompt(self, messages: list[Message]) -> Any:
        import torch

        handle = self._loaded()
        return torch.tensor([handle.chat_ids(messages)], device=handle.device)

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0,
                 json_mode: bool = False) -> str:
        import torch

        with self._lock, torch.inference_mode():
            ids = self._prompt(messages)
            handle = self._handle
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            pad = handle.tokenizer.pad_token_id
            out = handle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                        pad_token_id=handle.tokenizer.eos_token_id if pad is None else pad,
                                        **sampling)
            return handle.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def top_logprobs(self, messages: list[Message]) -> dict[str, float] | None:
        import torch

        with self._lock, torch.inference_mode():
            ids = self._prompt(messages)
            logits = self._handle.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            top = torch.log_softmax(logits, dim=-1).topk(TOP_LOGPROBS)
            decode = self._handle.tokenizer.decode
            return merge_logprobs((decode([i]), v) for i, v in zip(top.indices.tolist(), top.values.tolist()))
