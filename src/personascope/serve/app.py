"""The HTTP server: OpenAI-style chat completions with persona steering and monitoring, scoring, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personascope.inference.activations import encode, read_activations
from personascope.inference.engines import check_engine
from personascope.io.checks import check_count, check_number
from personascope.model.loading import ModelHandle
from personascope.serve.chat import (
    Plan,
    chat_messages,
    check_model,
    chunk,
    completion_body,
    monitor_summary,
    monitored,
    plan,
)
from personascope.serve.jobs import Delta, Event, Finished, GenerationJob, Started
from personascope.serve.metrics import ServeMetrics
from personascope.serve.protocol import APIError, ChatRequest, Limits, ScoreRequest, error_body
from personascope.serve.recent import RecentTraffic
from personascope.serve.registry import Registry
from personascope.serve.scheduler import Scheduler, Unavailable

log = logging.getLogger("personascope.serve")

#: Routes that never need the API key: the health check and the web page's shell (it asks for the key).
PUBLIC_PATHS = frozenset({"/healthz", "/", "/dashboard", "/web/config"})
PUBLIC_PREFIXES = ("/static/",)
_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/persona/vectors", "/v1/persona/score",
           "/v1/persona/recent", "/metrics", "/healthz", "/")

#: How often the server checks that its model worker thread still runs.
WATCHDOG_S = 1.0

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class _Gate:
    """ASGI middleware: API key, body size limit, and request metrics (count and latency by route).

    The whole body is read (up to the limit) before the app sees the request, so an oversize body, chunked or
    not, is refused with 413 before anything is parsed or scheduled."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int, metrics: ServeMetrics) -> None:
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    def _authorized(self, scope: dict[str, Any]) -> bool:
        path = scope["path"]
        if not self.api_key or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _body(self, receive: Any) -> bytes | None:
        """The request body, or None when it passes the limit or the client leaves before sending it all."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                status[0] = 401
                await _send_json(send, 401, error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                       "authentication_error", code="invalid_api_key"))
                return
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                status[0] = 413 if length.isdigit() else 400
                body = _too_large(self.max_body) if length.isdigit() else error_body("bad Content-Length header")
                await _send_json(send, status[0], body)
                return
            data = await self._body(receive)
            if data is None:
                status[0] = 413
                await _send_json(send, 413, _too_large(self.max_body))
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()  # after the body: waits for the client to leave

            await self.app(scope, replay, send_counted)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _too_large(limit: int) -> dict[str, Any]:
    return error_body(f"request body is over this server's limit of {limit} bytes", code="body_too_large")


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _revive(scheduler: Scheduler, metrics: ServeMetrics) -> None:
    """Every `WATCHDOG_S`, start a new model worker should the last one have died (counted in /metrics)."""
    while True:
        await asyncio.sleep(WATCHDOG_S)
        if scheduler.revive():
            metrics.worker_restarts.inc()


async def _client_left(request: Request) -> None:
    """Returns once the client of `request` (whose body was read) has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def create_app(handle: ModelHandle, registry: Registry, *, api_key: str | None = None, limits: Limits = Limits(),
               max_batch: int = 16, batch_wait: float = 0.02, token_budget: int = 16384,
               runs_dir: Path | None = None, recent_size: int = 200, engine: str = "hf") -> FastAPI:
    """The FastAPI app serving `handle` with the vectors of `registry` (the scheduler runs while the app does);
    `engine="vllm"` generates with vLLM (steered and read on its workers), `hf` with our own decode loop.

    Example:
        >>> app = create_app(load_model(), Registry.load(handle, {"pirate": "pirate.safetensors"}))
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    from personascope.serve.web import mount_web

    check_count("max_batch", max_batch)
    check_count("token_budget", token_budget)
    check_number("batch_wait", batch_wait, 0)
    metrics = ServeMetrics()
    if check_engine(engine) == "vllm":
        from personascope.serve.vllm_scheduler import VllmScheduler as scheduler_class
    else:
        scheduler_class = Scheduler
    scheduler = scheduler_class(registry, max_batch=max_batch, token_budget=token_budget, batch_wait=batch_wait,
                                max_queue=limits.max_queue, on_batch=metrics.on_batch, on_row=metrics.on_row)
    recent = RecentTraffic(recent_size)
    served = handle.name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        watchdog = asyncio.ensure_future(_revive(scheduler, metrics))
        try:
            yield
        finally:
            watchdog.cancel()
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="personascope", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.registry, app.state.metrics = scheduler, registry, metrics
    _add_error_handlers(app)

    def finish(p: Plan, text: str, prompt: dict[str, float], end: Finished,
               trace: dict[str, list[float]] | None) -> dict[str, Any] | None:
        """Count the finished request, record it, and return its `persona` field."""
        metrics.prompt_tokens.inc(end.prompt_tokens)
        metrics.completion_tokens.inc(end.completion_tokens)
        summary = monitor_summary(registry, prompt, end.response)
        for name, entry in summary.items():
            for kind in ("prompt", "response"):
                if entry[kind] is not None:
                    metrics.score.labels(name, kind).observe(entry[kind])
            if entry["alert"]:
                metrics.alerts.labels(name).inc()
        if end.reason != "cancelled":
            recent.add({"id": p.id, "created": p.created, "messages": p.messages, "answer": text,
                        "steer": [{"vector": s.name, "coef": s.coef, "layer": s.layer, "scope": s.scope}
                                  for s in p.steer],
                        "monitor": summary})
        if not p.monitor:
            return None
        return {"monitor": summary, **({"trace": trace} if trace is not None else {})}

    def submit(p: Plan) -> tuple[GenerationJob, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody listens any more
                job.cancelled.set()

        job = GenerationJob(p.prompt_ids, p.sampling, sink, p.steer, p.monitor, p.trace)
        try:
            scheduler.submit(job)
        except Unavailable as exc:
            raise APIError(503, f"{exc}; retry later", type="server_error", code="server_busy",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        metrics.queue_depth.set(scheduler.waiting)
        return job, events

    def usage(end: Finished) -> dict[str, int]:
        return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    async def stream(p: Plan, job: GenerationJob, events: asyncio.Queue[Event],
                     include_usage: bool) -> AsyncIterator[str]:
        text, prompt = [], {}
        try:
            while True:
                event = await events.get()
                if isinstance(event, Started):
                    prompt = event.prompt
                    yield _sse(chunk(p, served, {"role": "assistant", "content": ""},
                                     persona={"prompt": prompt} if p.monitor else None))
                elif isinstance(event, Delta):
                    text.append(event.text)
                    yield _sse(chunk(p, served, {"content": event.text},
                                     persona={"trace": event.trace} if event.trace else None))
                elif isinstance(event, Finished):
                    persona = finish(p, "".join(text), prompt, event, None)
                    yield _sse(chunk(p, served, {}, event.reason, persona=persona))
                    if include_usage:
                        yield _sse(chunk(p, served, None, usage=usage(event)))
                    break
                else:
                    yield _sse(error_body(event.message, "server_error"))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op once finished; frees the batch row of a client that left

    async def complete(p: Plan, job: GenerationJob, events: asyncio.Queue[Event], request: Request) -> Response:
        text, prompt = [], {}
        trace: dict[str, list[float]] | None = {n: [] for n in p.monitor} if p.trace else None
        left = asyncio.ensure_future(_client_left(request))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait((getter, left), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client left: its row ends at the next decoding step
                    getter.cancel()
                    return Response(status_code=499)
                event = getter.result()
                if isinstance(event, Started):
                    prompt = event.prompt
                elif isinstance(event, Delta):
                    text.append(event.text)
                    for name, values in event.trace.items():
                        trace[name].extend(values)  # type: ignore[index]
                elif isinstance(event, Finished):
                    answer = "".join(text)
                    persona = finish(p, answer, prompt, event, trace)
                    return JSONResponse(completion_body(p, served, answer, event.reason, usage(event), persona))
                else:
                    return JSONResponse(error_body(event.message, "server_error"), status_code=500)
        finally:
            left.cancel()
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        p = plan(req, registry, limits, served)
        job, events = submit(p)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(p, job, events, include), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(p, job, events, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0,
                                            "owned_by": "personascope"}]}

    @app.get("/v1/persona/vectors")
    async def vectors() -> dict[str, Any]:
        return {"object": "list", "data": registry.describe()}

    @app.get("/v1/persona/recent")
    async def recent_traffic(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        return recent.snapshot(limit)

    @app.post("/v1/persona/score")
    async def score(req: ScoreRequest) -> dict[str, Any]:
        check_model(req.model, served)
        messages = chat_messages(req.messages, limits)
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise APIError(400, "the last message must be the assistant answer to score", param="messages")
        names = monitored(req.vectors if req.vectors is not None else True, registry, "vectors")
        probe = registry.probe
        if probe is None or not names:
            raise APIError(400, "no vectors to score with: the server has none registered", param="vectors")
        chat = encode(handle, "score", messages[:-1], messages[-1]["content"])
        if handle.max_length and len(chat.ids) > handle.max_length:
            raise APIError(400, f"the chat has {len(chat.ids)} tokens, over the model's context length of "
                           f"{handle.max_length}", param="messages", code="context_length_exceeded")
        pooled = await asyncio.wrap_future(scheduler.call(lambda: read_activations(
            handle, [chat], probe.read_layers, ("prompt_last", "response_avg"), progress=False)))
        columns = [registry.names.index(n) for n in names]
        prompt = probe.project(pooled["prompt_last"])[0]
        response = probe.project(pooled["response_avg"])[0]
        summary = monitor_summary(registry, {n: float(prompt[c]) for n, c in zip(names, columns)},
                                  {n: float(response[c]) for n, c in zip(names, columns)})
        return {"object": "persona.score", "model": served, "monitor": summary,
                "usage": {"prompt_tokens": chat.prompt_len, "response_tokens": len(chat.ids) - chat.prompt_len}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(scheduler.waiting)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 `ok` while the model worker runs; 503 `unavailable` when it does not (restart the process)."""
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "unavailable", "model": served,
                             "vectors": len(registry.names)}, status_code=200 if alive else 503)

    mount_web(app, runs_dir=runs_dir)
    app.add_middleware(_Gate, api_key=api_key, max_body=limits.max_body_bytes, metrics=metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as an OpenAI-style error body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(where)}: {first['msg']}" if where else str(first["msg"])
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        return JSONResponse(error_body(message, param=".".join(where) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
