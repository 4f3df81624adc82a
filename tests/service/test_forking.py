"""service.forking.Quiescence: what the primary holds off while it forks (a real event loop, threads)."""

from __future__ import annotations

import asyncio
import threading
import time

from service.forking import Quiescence


class _Loop:
    """An event loop in a thread of its own, as a server's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _app(events: list, gates: dict[str, threading.Event], requests: Quiescence | None = None):
    async def app(scope, receive, send):
        events.append(("start", scope["path"]))
        if scope["path"] in gates:
            if scope["path"] == "/waits-on-process" and requests is not None:
                with requests.waiting_on_process():
                    await asyncio.to_thread(gates[scope["path"]].wait)
            else:
                await asyncio.to_thread(gates[scope["path"]].wait)
        events.append(("end", scope["path"]))

    return app


def _request(path: str) -> dict:
    return {"type": "http", "path": path}


def _serving(requests: Quiescence, events: list, path: str):
    """A started loop serving ``requests``, and the future of one request to ``path``, under way."""
    loop = _Loop()
    loop.run(_started(requests)).result(5)
    under_way = loop.run(requests(_request(path), None, None))
    _eventually(lambda: ("start", path) in events)
    return loop, under_way


def _eventually(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_hold_waits_for_the_requests_under_way_and_holds_off_new_ones():
    events, slow = [], threading.Event()
    requests = Quiescence(_app(events, {"/slow": slow}))
    loop, first = _serving(requests, events, "/slow")
    try:
        inside = threading.Event()

        def fork_like() -> None:
            with requests.held():
                events.append(("held", ""))
                inside.set()
                time.sleep(0.2)  # a request sent meanwhile must not start
                events.append(("released", ""))

        holder = threading.Thread(target=fork_like)
        holder.start()
        time.sleep(0.2)
        assert ("held", "") not in events  # the slow request is still under way
        slow.set()
        assert inside.wait(5)
        second = loop.run(requests(_request("/fast"), None, None))
        holder.join(5)
        second.result(5)
        first.result(5)
        assert events == [("start", "/slow"), ("end", "/slow"), ("held", ""), ("released", ""), ("start", "/fast"), ("end", "/fast")]
    finally:
        slow.set()
        loop.close()


def test_a_request_waiting_on_the_process_itself_does_not_hold_a_hold_up():
    events, waiting = [], threading.Event()
    requests = Quiescence(None)
    requests.app = _app(events, {"/waits-on-process": waiting}, requests)
    loop, pending = _serving(requests, events, "/waits-on-process")
    try:
        held = threading.Event()

        def fork_like() -> None:
            with requests.held():
                held.set()

        holder = threading.Thread(target=fork_like)
        holder.start()
        assert held.wait(5), "a swap waiting for the fork it asked for would wait forever"
        holder.join(5)
        waiting.set()
        pending.result(5)
    finally:
        waiting.set()
        loop.close()


def test_a_hold_before_the_server_started_or_after_it_stopped_runs_at_once():
    requests = Quiescence(None)
    with requests.held():  # no loop yet: the primary's first forks
        pass
    loop = _Loop()
    loop.run(_started(requests)).result(5)
    loop.close()
    ran = threading.Event()

    def fork_like() -> None:
        with requests.held():
            ran.set()

    threading.Thread(target=fork_like, daemon=True).start()
    assert ran.wait(5), "a hold on a stopped loop waited for it"


async def _started(requests: Quiescence) -> None:
    requests.started()
