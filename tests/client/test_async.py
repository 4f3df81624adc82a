"""Every route through ``AsyncClient`` against a real server, checked against the sync ``Client``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from avsearch_client import AsyncClient, Client, InvalidRequest, NotFound
from tests.client.conftest import DIMS


def run(coroutine):
    return asyncio.run(coroutine)


def test_every_route(server, tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(100, DIMS["audio"])).astype(np.float32)
    sync = Client(server.url)

    async def session():
        async with AsyncClient(server.url) as client:
            assert await client.health() is True
            model = await client.wait_until_ready(5)
            assert await client.ready() == model == (await client.info()).model
            got = await client.search("audio", queries, top_k=5)
            assert (got.ids == sync.search("audio", queries, top_k=5, binary=False).ids).all() and len(got) == 100
            by_id = await client.search("visual", ids=["clip-000010"], top_k=3, target="visual", filter={})
            assert by_id[0][0].id == "clip-000010"
            np.testing.assert_allclose(await client.embed("audio", queries), sync.embed("audio", queries), atol=1e-6)
            ids = [f"async-{i}" for i in range(70)]
            done = await client.upsert("audio", ids, queries[:70], [{"i": i} for i in range(70)], progress=True, concurrency=2)
            assert (done.upserted, done.requests) == (70, 2)
            item = await client.get("audio", "async-5")
            assert item.metadata == {"i": 5}
            np.testing.assert_allclose(item.embedding, sync.get("audio", "async-5").embedding)
            assert (await client.delete("audio", "async-5")).count == done.count - 1
            with pytest.raises(NotFound):
                await client.get("audio", "async-5")
            with pytest.raises(InvalidRequest):
                await client.search("audio", queries[:, :5])
            reloaded = await client.reload()
            assert reloaded.model == model
            snap = await client.create_snapshot()
            assert snap.name in [s.name for s in await client.list_snapshots()]
            path = await client.download_snapshot(snap.name, tmp_path / "s.tar")
            assert path.stat().st_size == snap.bytes
            await client.delete_snapshot(snap.name)
            assert snap.name not in [s.name for s in sync.list_snapshots()]
            response = await client.request("GET", "/v1/indexes")  # any route, a console one included
            assert response.json()["audio"]["count"] == done.count - 1

    run(session())


def test_many_tasks_share_one_client(server):
    queries = np.random.default_rng(1).normal(size=(32, DIMS["visual"])).astype(np.float32)
    expected = Client(server.url).search("visual", queries, top_k=4)

    async def concurrent():
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(*(client.search("visual", queries[i], top_k=4) for i in range(32)))

    results = run(concurrent())
    assert [r.ids[0].tolist() for r in results] == expected.ids.tolist()
