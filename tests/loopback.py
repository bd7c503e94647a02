"""Loopback HTTP servers on 127.0.0.1 that speak the OpenAI and Anthropic chat wire protocols.

A test gives a handler ``Request -> Reply``; the server records every request it received (so tests can count
hits) and can answer with any status, raw (malformed) bodies, or a delay longer than the client's timeout.

Example:
    with Loopback(lambda req: Reply(body=openai_reply("42"))) as server:
        make_llm("openai:judge", base_url=server.url + "/v1")
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    """One received request: path, parsed JSON body (None if not JSON) and headers (lower-case names)."""

    path: str
    body: Any
    headers: dict[str, str]

    @property
    def prompt(self) -> str:
        """The last user message's text."""
        return [m for m in self.body["messages"] if m["role"] == "user"][-1]["content"]


@dataclass
class Reply:
    """What to answer: a JSON-able body (dict) or raw text (str), after ``delay`` seconds."""

    body: dict[str, Any] | str = ""
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Reply]


def openai_reply(text: str, top_logprobs: dict[str, float] | None = None) -> dict[str, Any]:
    """A ``/v1/chat/completions`` reply; with ``top_logprobs`` ({token: logprob}) as the first token's list."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}, "logprobs": None}
    if top_logprobs is not None:
        first = max(top_logprobs, key=top_logprobs.__getitem__)
        choice["logprobs"] = {"content": [{
            "token": first, "logprob": top_logprobs[first], "bytes": list(first.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in top_logprobs.items()]}]}
    return {"id": "chatcmpl-loopback", "object": "chat.completion", "created": int(time.time()),
            "model": "loopback", "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def anthropic_reply(text: str) -> dict[str, Any]:
    """A ``/v1/messages`` reply with one text block."""
    return {"id": "msg_loopback", "type": "message", "role": "assistant", "model": "loopback",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}}


def logprobs_from_probs(probs: dict[str, float]) -> dict[str, float]:
    """``{token: probability}`` to ``{token: logprob}``."""
    return {t: math.log(p) for t, p in probs.items()}


def scripted(replies: Iterable[Reply], then: Handler) -> Handler:
    """Answer with ``replies`` in order, then hand every later request to ``then``."""
    queue = list(replies)
    lock = threading.Lock()

    def handle(request: Request) -> Reply:
        with lock:
            nxt = queue.pop(0) if queue else None
        return nxt if nxt is not None else then(request)

    return handle


class Loopback:
    """A threaded HTTP server on 127.0.0.1 (random port) answering POSTs with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                request = Request(self.path, body, {k.lower(): v for k, v in self.headers.items()})
                with outer._lock:
                    outer.requests.append(request)
                reply = outer.handler(request)
                time.sleep(reply.delay)
                data = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (append ``/v1`` for an OpenAI base URL)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def hits(self, prompt: str | None = None) -> int:
        """How many requests arrived (only those whose last user message is ``prompt``, if given)."""
        with self._lock:
            return sum(1 for r in self.requests if prompt is None or (r.body and r.prompt == prompt))

    def __enter__(self) -> Loopback:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
