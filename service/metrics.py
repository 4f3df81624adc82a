"""Prometheus metrics, one registry per app (so tests can build several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, index_sizes: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("avsearch_requests_total", "HTTP requests by route template, method and status", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "avsearch_request_duration_seconds", "HTTP request latency by route template and method", ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_vectors = Histogram("avsearch_batch_vectors", "query vectors per micro-batch", buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("avsearch_batch_requests", "requests per micro-batch", buckets=BATCH_BUCKETS, registry=self.registry)
        self.index_items = Gauge("avsearch_index_items", "items in the index, by modality", ["modality"], registry=self.registry)
        self.swaps = Counter("avsearch_version_swaps_total", "model/index versions swapped in", registry=self.registry)
        self._index_sizes = index_sizes

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, vectors: int, requests: int) -> None:
        self.batch_vectors.observe(vectors)
        self.batch_requests.observe(requests)

    def render(self) -> bytes:
        for modality, size in self._index_sizes().items():
            self.index_items.labels(modality).set(size)
        return generate_latest(self.registry)
