"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time


def best_time(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls: the least disturbed by a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
