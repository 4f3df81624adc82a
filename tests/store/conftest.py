"""Store fixtures: the service's (a private copy of the tiny index, clients over it), shared; and
a helper that queues commits into one group."""

import threading
import time

from tests.service.conftest import features  # noqa: F401 - a fixture, found by pytest through this import


def queued_as_one_group(shard, calls) -> None:
    """Run ``calls`` in threads, queued in this order behind a pause, so that one leader takes them all."""
    threads = []
    with shard.paused():
        for call in calls:
            threads.append(threading.Thread(target=call))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while shard.queued < len(threads) and time.monotonic() < deadline:
                time.sleep(0.005)
        assert shard.queued == len(calls)
    for thread in threads:
        thread.join()
