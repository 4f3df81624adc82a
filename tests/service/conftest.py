"""Service fixtures: an app over a private copy of the tiny index (item changes write to it)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from avdata.features import load_features
from service.settings import Settings
from store.collection import Collection


BASE_URL, LOCAL_CLIENT = "http://localhost", ("127.0.0.1", 50000)  # a browser or curl on the server's machine


def copy_index(tiny, dest: Path) -> Path:
    shutil.copytree(tiny.index_dir, dest)
    return dest


def persisted(tiny, index_dir: Path, modality: str):
    """The index a restart would serve: the checkpoint on disk plus the write-ahead log after it."""
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    collection.close()
    return collection.shards[modality].index


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').text}")


def make_client(tiny, index_dir: Path, **overrides) -> TestClient:
    """A started TestClient (use it in a ``with``); the model loads in the background as in production."""
    return make_served_client(Settings(model_dir=tiny.model_dir, index_dir=index_dir, **overrides))


def make_served_client(settings: Settings) -> TestClient:
    """A TestClient of the app as a browser or curl on the server's machine reaches it (Host, client address)."""
    return TestClient(create_app(settings), base_url=BASE_URL, client=LOCAL_CLIENT)


@pytest.fixture(scope="module")
def features(tiny):
    return load_features(tiny.data_dir)


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("svc") / "index")
    with make_client(tiny, index_dir, max_vectors=8, max_top_k=50, max_body_bytes=200_000) as c:
        wait_ready(c)
        yield c


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
