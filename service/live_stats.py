"""Live search figures for the console (searches/s, p50, p99) read from the Prometheus registry.

The request histogram already records every search (``MetricsMiddleware``); this only reads it, so
the figures cost the search path nothing. Quantiles are estimated from the histogram buckets the way
Prometheus's ``histogram_quantile`` does (linear within a bucket), over the difference between now
and a snapshot up to ``WINDOW_S`` seconds old, so they describe recent traffic, not all time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

HISTOGRAM = "avsearch_request_duration_seconds"
SEARCH_ROUTE, SEARCH_METHOD = "/v1/search", "POST"
WINDOW_S = 30.0
SNAPSHOT_EVERY_S = 1.0


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    bounds: tuple[float, ...]  # bucket upper bounds, +inf last
    cumulative: tuple[float, ...]  # requests at or below each bound

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0


def read_histogram(registry: CollectorRegistry, route: str = SEARCH_ROUTE, method: str = SEARCH_METHOD, at: float | None = None) -> Snapshot:
    buckets: dict[float, float] = {}
    for family in registry.collect():
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_bucket") and labels.get("route") == route and labels.get("method") == method:
                buckets[float(labels["le"])] = sample.value
    bounds = tuple(sorted(buckets))
    return Snapshot(time.monotonic() if at is None else at, bounds, tuple(buckets[b] for b in bounds))


def quantile(bounds: tuple[float, ...], cumulative: tuple[float, ...], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, linear within its bucket; None without observations.

    A quantile in the +inf bucket is reported as the highest finite bound (as Prometheus does).
    """
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _figures(bounds: tuple[float, ...], cumulative: tuple[float, ...], seconds: float | None) -> dict:
    p50, p99 = quantile(bounds, cumulative, 0.5), quantile(bounds, cumulative, 0.99)
    count = cumulative[-1] if cumulative else 0.0
    return {
        "searches": int(count),
        "searches_per_s": (count / seconds) if seconds else None,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
    }


class SearchStats:
    """Snapshots taken when the figures are asked for (at most one a second, kept for ``WINDOW_S``)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._lock = threading.Lock()
        self._snapshots: deque[Snapshot] = deque()

    def read(self, now: float | None = None) -> dict:
        current = read_histogram(self.registry, at=now)
        with self._lock:
            while self._snapshots and current.at - self._snapshots[0].at > WINDOW_S:
                self._snapshots.popleft()
            base = self._snapshots[0] if self._snapshots else None
            if not self._snapshots or current.at - self._snapshots[-1].at >= SNAPSHOT_EVERY_S:
                self._snapshots.append(current)
        window = None
        if base is not None and not base.bounds:  # no search had been made yet: the window starts from zero
            base = Snapshot(base.at, current.bounds, tuple(0.0 for _ in current.bounds))
        if base is not None and base.bounds == current.bounds and current.at > base.at:
            delta = tuple(c - b for c, b in zip(current.cumulative, base.cumulative))
            window = {"seconds": current.at - base.at, **_figures(current.bounds, delta, current.at - base.at)}
        return {"route": SEARCH_ROUTE, "window": window, "since_start": _figures(current.bounds, current.cumulative, None)}
