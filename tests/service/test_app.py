from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from training.data import load_features


@pytest.fixture(scope="module")
def client(tiny):
    settings = Settings(model_dir=tiny.model_dir, index_dir=tiny.index_dir, max_vectors=8)
    with TestClient(create_app(settings)) as c:
        yield c


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_audio_query_returns_ten_visual_ids(client, tiny):
    data = load_features(tiny.data_dir)
    r = client.post("/v1/search", json={"modality": "audio", "vectors": [data.audio[0].tolist(), data.audio[1].tolist()], "top_k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2
    for hits in body["results"]:
        assert len(hits) == 10
        assert all(h["id"] in set(data.ids) for h in hits)
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"modality": "audio", "vectors": [[0.0] * 5]}, 422, "128 values"),
        ({"modality": "audio", "vectors": []}, 422, "at least 1"),
        ({"modality": "smell", "vectors": [[0.0] * 128]}, 422, "modality"),
        ({"modality": "audio", "vectors": [[0.0] * 128], "top_k": 0}, 422, "top_k"),
        ({"modality": "audio", "vectors": [[0.0] * 128], "top_k": 100000}, 422, "top_k"),
        ({"modality": "audio", "vectors": [[0.0] * 128] * 9}, 413, "limit is 8"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(client, body, status, message):
    r = client.post("/v1/search", json=body)
    assert r.status_code == status
    assert message in r.text


def test_nan_in_json_is_rejected(client):
    r = client.post("/v1/search", content=b'{"modality": "audio", "vectors": [[NaN' + b", 0" * 127 + b"]]}", headers={"content-type": "application/json"})
    assert r.status_code == 422
