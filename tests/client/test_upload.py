"""10^5 items uploaded in batches through the client: none lost, none repeated, each under its id."""

from __future__ import annotations

import re

import numpy as np
import pytest

from avsearch_client import Client
from tests.client.conftest import DIMS, start_server

N, PER_REQUEST = 100_000, 1000


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = start_server(tiny, tmp_path_factory.mktemp("upload"), max_vectors=str(PER_REQUEST), wal_fsync="never")  # the client is under test, not the disk
    yield s
    s.stop()


def upsert_requests(client: Client) -> int:
    """Acknowledged upsert requests, from the server's own metrics."""
    text = client.request("GET", "/metrics").text
    found = re.search(r'avsearch_requests_total\{method="POST",route="/v1/items/\{modality\}",status="200"\} ([0-9.e+]+)', text)
    return int(float(found.group(1))) if found else 0


def test_a_large_upload_arrives_whole(server):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N, DIMS["audio"])).astype(np.float32)
    ids = [f"bulk-{i:06d}" for i in range(N)]
    metadata = [{"i": i} for i in range(N)]
    seen: list[int] = []
    with Client(server.url) as client:
        before = client.info().index_sizes["audio"]
        done = client.upsert("audio", ids, vectors, metadata, progress=lambda n, total: seen.append(n), concurrency=4)
        assert (done.upserted, done.requests, done.count) == (N, N // PER_REQUEST, before + N)
        assert seen == list(range(4 * PER_REQUEST, N + 1, 4 * PER_REQUEST))  # after each wave of 4 requests
        assert upsert_requests(client) == N // PER_REQUEST  # no request sent twice
        assert client.info().index_sizes["audio"] == before + N  # no id lost (ids are unique: none counted twice)
        # Each batch's first and last item, and a random sample: its own metadata and its own vector's embedding.
        edges = [i for start in range(0, N, PER_REQUEST) for i in (start, start + PER_REQUEST - 1)]
        sample = sorted(set(edges) | set(rng.choice(N, 200, replace=False).tolist()))
        expected = client.embed("audio", vectors[sample])
        for row, i in zip(expected, sample):
            item = client.get("audio", ids[i])
            assert item.metadata == {"i": i}
            np.testing.assert_allclose(item.embedding, row, atol=1e-5)
