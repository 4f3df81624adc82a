"""Prometheus metrics, one registry per app (so tests can build several apps in one process).

With worker processes (:mod:`service.workers`) every process writes its figures to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and ``/metrics``, on whichever
worker answers, adds them up over the processes (the primary's folds included).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
BYTES_BUCKETS = tuple(2**i for i in range(10, 37, 2))  # 1 KiB .. 64 GiB


class ProcessFilesCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, but a process's file that is still empty is read as
    holding nothing yet. A process creates its file and sizes it a moment later; read in between,
    prometheus_client 0.26 fails the whole scrape (``struct.error``: a 500 on /metrics after a worker
    starts, prometheus/client_python#1199). A worker killed in that moment leaves the empty file for good."""

    def collect(self):
        return self.merge([path for path in glob.glob(os.path.join(self._path, "*.db")) if _holds_anything(path)], accumulate=True)


def _holds_anything(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0  # once sized, a file only grows
    except FileNotFoundError:  # a dead process's gauge file, removed since the glob
        return False


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, index_sizes: Callable[[], dict[str, int]], log_bytes: Callable[[], dict[str, int]] = dict):
        self.registry = CollectorRegistry()
        self.requests = Counter("avsearch_requests_total", "HTTP requests by route template, method and status", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "avsearch_request_duration_seconds", "HTTP request latency by route template and method", ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_vectors = Histogram("avsearch_batch_vectors", "query vectors per micro-batch", buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("avsearch_batch_requests", "requests per micro-batch", buckets=BATCH_BUCKETS, registry=self.registry)
        # Gauges: every worker serves the same collection, so over workers the figure is the largest one.
        self.index_items = Gauge("avsearch_index_items", "items in the index, by modality", ["modality"], registry=self.registry, multiprocess_mode="max")
        self.swaps = Counter("avsearch_version_swaps_total", "model/index versions swapped in", registry=self.registry)
        # The store's work (store.events.StoreEvents): group commits and checkpoints ("folds", the public metric names, kept for dashboards).
        self.commit_groups = Histogram("avsearch_commit_group_changes", "item changes per group commit (one log write and fsync)", ["modality"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.folds = Counter("avsearch_folds_total", "folds of the write-ahead log into a snapshot, by outcome (done, failed)", ["modality", "outcome"], registry=self.registry)
        self.fold_seconds = Histogram("avsearch_fold_duration_seconds", "duration of a fold, done or failed", ["modality"], buckets=FOLD_BUCKETS, registry=self.registry)
        self.fold_bytes = Histogram("avsearch_fold_log_bytes", "log bytes a fold set out to fold", ["modality"], buckets=BYTES_BUCKETS, registry=self.registry)
        self.log_size = Gauge("avsearch_log_bytes", "write-ahead log bytes not yet folded into a snapshot (grows while folds fail)", ["modality"], registry=self.registry, multiprocess_mode="max")
        self._index_sizes, self._log_bytes = index_sizes, log_bytes
        self.reading = self.registry  # what /metrics and the console read: every process's figures with workers
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.reading = CollectorRegistry()
            ProcessFilesCollector(self.reading)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, vectors: int, requests: int) -> None:
        self.batch_vectors.observe(vectors)
        self.batch_requests.observe(requests)

    def committed(self, modality: str, changes: int) -> None:
        self.commit_groups.labels(modality).observe(changes)

    def checkpointed(self, modality: str, seconds: float, log_bytes: int, failed: bool) -> None:
        self.folds.labels(modality, "failed" if failed else "done").inc()
        self.fold_seconds.labels(modality).observe(seconds)
        self.fold_bytes.labels(modality).observe(log_bytes)

    def render(self) -> bytes:
        for modality, size in self._index_sizes().items():
            self.index_items.labels(modality).set(size)
        for modality, size in self._log_bytes().items():
            self.log_size.labels(modality).set(size)
        return generate_latest(self.reading)
