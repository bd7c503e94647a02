"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Projection buckets: persona projections on a unit vector are residual-stream lengths, a few to tens of units.
_SCORE_BUCKETS = (-40, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 40, float("inf"))


class ServeMetrics:
    """Requests, latency, tokens, batches, queue depth, per-vector projections and alerts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("personascope_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("personascope_request_seconds", "Request latency (to the last byte) by route",
                                 ["route"], registry=r)
        self.prompt_tokens = Counter("personascope_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("personascope_completion_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("personascope_tokens_per_second",
                                       "Decoding throughput of the last batch (tokens over its wall time)",
                                       registry=r)
        self.batch_size = Histogram("personascope_batch_size", "Rows per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rows = Counter("personascope_rows", "Requests ended by the model worker, by reason (stop, length, "
                            "cancelled: the client left, failed)", ["reason"], registry=r)
        self.row_tokens = Counter("personascope_row_tokens", "Tokens generated, by how their request ended (those "
                                  "of cancelled requests were spent on clients that left)", ["reason"], registry=r)
        self.worker_restarts = Counter("personascope_worker_restarts", "Model worker threads started again after "
                                       "the last one died", registry=r)
        self.queue_depth = Gauge("personascope_queue_depth", "Requests waiting for the model", registry=r)
        self.score = Histogram("personascope_persona_projection", "Persona projections of monitored requests",
                               ["vector", "kind"], buckets=_SCORE_BUCKETS, registry=r)
        self.alerts = Counter("personascope_persona_alerts", "Responses whose projection passed the threshold",
                              ["vector"], registry=r)

    def on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        """Scheduler callback after each batch."""
        self.batch_size.observe(rows)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def on_row(self, reason: str, tokens: int) -> None:
        """Scheduler callback as each row ends, with the tokens it generated."""
        self.rows.labels(reason).inc()
        self.row_tokens.labels(reason).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
