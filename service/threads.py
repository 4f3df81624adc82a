"""The threads of ``serve``: numpy's BLAS threads (one setting per process) and FAISS's OpenMP
threads (one setting per thread: with GNU OpenMP, a thread that never set its own count uses
OMP_NUM_THREADS, or one per core, whatever another thread set)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.settings import Settings

log = logging.getLogger(__name__)


def limit_threads(settings: Settings) -> None:
    """Cap FAISS's OpenMP threads (in the calling thread) and numpy's BLAS threads (for this process).

    The search of a micro-batch is small; spare BLAS threads spin-wait after each call and take the
    core the event loop needs (measured: 5x less throughput at 64 clients on 2 cores). Process-wide,
    so ``create_app`` leaves it to the entry point rather than changing the threads of its caller.
    The threads that search set their own OpenMP count (:func:`search_thread_setup`).
    """
    if settings.search_threads <= 0:
        return
    import faiss

    faiss.omp_set_num_threads(settings.search_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning("threadpoolctl is not installed: numpy's BLAS keeps its default threads (set OPENBLAS_NUM_THREADS=%d)", settings.search_threads)
        return
    threadpool_limits(limits=settings.search_threads)


def search_thread_setup(settings: Settings) -> Callable[[], None]:
    """What each of the app's worker threads (the batcher's, ``asyncio.to_thread``'s) runs first, so
    that FAISS searches and inserts there use ``search_threads`` OpenMP threads."""

    def setup() -> None:
        if settings.search_threads > 0:
            import faiss

            faiss.omp_set_num_threads(settings.search_threads)

    return setup
