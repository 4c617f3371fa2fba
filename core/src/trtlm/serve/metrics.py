"""Prometheus metrics of ``trtlm serve`` (``GET /metrics``), named as vLLM names them with a ``trtlm:`` prefix.

Engine state (requests running / waiting, KV-cache usage, token counters,
preemptions) is read from ``EngineClient.stats()`` (the engine sends its stats with every step) when Prometheus scrapes, so
the numbers are the engine's own and cost nothing between scrapes.  Latencies
(time to first token, inter-token, end to end, queue) and request outcomes are
recorded by the HTTP layer as responses are produced, i.e. as a client sees
them.  Each server has its own registry: several apps in one process (tests)
do not collide.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Histogram buckets (seconds), wide enough for a CPU test model and an H200 alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)


class Metrics:
    """The server's metric objects; ``stats`` returns the engine's EngineStats (or None while loading)."""

    def __init__(self, model_name: str, stats: Callable[[], Any | None]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram("trtlm:time_to_first_token_seconds", "Time from request arrival to its first token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("trtlm:inter_token_latency_seconds", "Time between two outputs of one request.",
                             labels, buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("trtlm:e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter("trtlm:request_success", "Finished sequences by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._errors = Counter("trtlm:request_errors", "Requests answered with an error, by kind.",
                               labels + ["kind"], registry=self.registry)
        self.registry.register(_EngineCollector(model_name, stats))

    def finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "unknown").inc()

    def error(self, kind: str) -> None:
        """kind: bad_request, unauthorized, queue_full, timeout, unavailable, internal, disconnect."""
        self._errors.labels(self.model_name, kind).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and counters read from the engine's stats at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], Any | None]):
        self.model_name = model_name
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats()
        if s is None:
            return
        m = self.model_name

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([m], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([m], float(value))
            return c

        yield gauge("trtlm:num_requests_running", "Requests in the running batch.", s.running)
        yield gauge("trtlm:num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield gauge("trtlm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s.kv_usage)
        yield gauge("trtlm:kv_cache_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used)
        yield gauge("trtlm:kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total)
        yield counter("trtlm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("trtlm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("trtlm:num_preemptions", "Requests preempted (blocks freed, recomputed later).",
                      s.preemptions)
