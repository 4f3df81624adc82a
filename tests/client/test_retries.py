"""Retries against real servers: one restarted under the client, a real 503 that clears, a version swap
under load; and which calls the policy retries (the idempotent ones, or any when nothing was applied)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from avsearch_client import AsyncClient, Client, RetryPolicy, Unavailable
from avsearch_client.wire import Call
from tests.client.conftest import DIMS, start_server

PATIENT = {"retries": 240, "backoff": 0.05, "max_backoff": 0.5}  # ~2 min: a restart of serve fits, even on a loaded machine


def restart_soon(server, delay: float = 0.3) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), server.restart()))
    thread.start()
    return thread


def test_a_server_restarted_under_the_client(server):
    rng = np.random.default_rng(0)
    before = server.proc.pid
    calls = 0
    with Client(server.url, **PATIENT) as client:
        expected = client.search("audio", ids=["clip-000007"], top_k=5, target="audio").ids  # the upserts below go to visual
        restart = restart_soon(server)
        while restart.is_alive() or calls < 20:
            assert (client.search("audio", ids=["clip-000007"], top_k=5, target="audio").ids == expected).all()
            client.upsert("visual", [f"restart-{calls}"], rng.normal(size=DIMS["visual"]))  # idempotent: retried on a broken connection too
            calls += 1
        restart.join()
        assert server.proc.pid != before
        assert all(client.get("visual", f"restart-{i}").id == f"restart-{i}" for i in range(calls))  # every acknowledged upsert survived


def test_a_server_restarted_under_the_async_client(server):
    async def run() -> int:
        async with AsyncClient(server.url, **PATIENT) as client:
            expected = (await client.search("audio", ids=["clip-000003"], top_k=5, target="audio")).ids
            restart = restart_soon(server)
            calls = 0
            while restart.is_alive() or calls < 20:
                hits = await asyncio.gather(*(client.search("audio", ids=["clip-000003"], top_k=5, target="audio") for _ in range(4)))
                assert all((h.ids == expected).all() for h in hits)
                calls += 1
            restart.join()
            return calls

    before = server.proc.pid
    assert asyncio.run(run()) >= 20 and server.proc.pid != before


def test_a_503_is_raised_then_retried_until_it_clears(tiny, tmp_path):
    blocker = tmp_path / "not-a-directory"  # the snapshot directory cannot be made: the server answers 503
    blocker.write_text("")
    server = start_server(tiny, tmp_path, snapshot_dir=str(blocker))
    try:
        with pytest.raises(Unavailable) as caught:
            Client(server.url, retries=0).create_snapshot()
        assert caught.value.status == 503 and "nothing was kept; retry later" in caught.value.message
        clear = threading.Timer(0.5, blocker.unlink)
        clear.start()
        started = time.monotonic()
        snap = Client(server.url, **PATIENT).create_snapshot()  # not idempotent, but a 503 applied nothing
        clear.join()
        assert time.monotonic() - started >= 0.4 and snap.items == {"audio": 600, "visual": 600}
        assert (blocker / f"{snap.name}.tar").is_file()
    finally:
        server.stop()


def test_searches_and_upserts_through_a_version_swap_all_succeed(server):
    """The server swaps without failing a request (no 503 during a swap: changes wait for it)."""
    rng = np.random.default_rng(1)
    with Client(server.url, retries=0) as client, Client(server.url, retries=0) as admin:
        swaps = threading.Thread(target=lambda: [admin.reload() for _ in range(3)])
        swaps.start()
        done = 0
        while swaps.is_alive() or done < 10:
            assert len(client.search("audio", rng.normal(size=DIMS["audio"]), top_k=3)[0]) == 3
            client.upsert("audio", [f"swap-{done}"], rng.normal(size=DIMS["audio"]))
            done += 1
        swaps.join()
        assert client.info().index_sizes["audio"] >= 600 + done


@pytest.mark.parametrize(
    "error, idempotent, retried",
    [
        (httpx.ConnectError("refused"), False, True),  # nothing was sent
        (httpx.ConnectTimeout("slow"), False, True),
        (httpx.RemoteProtocolError("closed"), True, True),
        (httpx.RemoteProtocolError("closed"), False, False),  # a delete may have been applied
        (httpx.ReadTimeout("slow"), False, False),
        (httpx.ReadTimeout("slow"), True, True),
    ],
)
def test_which_failures_are_retried(error, idempotent, retried):
    policy = RetryPolicy(retries=2)
    call = Call("POST", "/v1/x", idempotent=idempotent)
    assert (policy.delay(0, call, error=error) is not None) is retried
    assert policy.delay(2, call, error=error) is None  # the attempts are counted


@pytest.mark.parametrize("status, idempotent, retried", [(503, False, True), (502, True, True), (502, False, False), (500, True, False), (404, True, False), (429, True, False)])
def test_which_statuses_are_retried(status, idempotent, retried):
    response = httpx.Response(status, headers={"Retry-After": "1"})
    delay = RetryPolicy(retries=2, backoff=0.01, max_backoff=5).delay(0, Call("POST", "/v1/x", idempotent=idempotent), response=response)
    assert (delay is not None) is retried
    if retried:
        assert delay >= 1  # Retry-After is honoured (up to max_backoff)
