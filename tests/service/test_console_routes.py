"""The console's read routes against numpy: the PCA map, map coordinates of hits, id suggestions,
live figures, access level, training report plots, and the static files (no external asset)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service.live_stats import quantile
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.auth import ApiKeyMiddleware
from service.origin import OriginMiddleware
from service.projection import fit_pca2
from tests.service.browser import annotated_index
from tests.service.conftest import make_client, wait_ready


@pytest.fixture(scope="module")
def meta_index(tiny, tmp_path_factory):
    return annotated_index(tiny.index_dir, tiny.data_dir, tmp_path_factory.mktemp("console") / "index")


@pytest.fixture()
def console(tiny, meta_index, tmp_path):
    import shutil

    index_dir = shutil.copytree(meta_index, tmp_path / "index")
    with make_client(tiny, index_dir, max_vectors=16) as c:
        wait_ready(c)
        yield c


def _same_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> bool:
    """Columns of a equal columns of b, each up to a sign (PCA axes have no intrinsic sign)."""
    return all(np.allclose(a[:, j], b[:, j], atol=atol) or np.allclose(a[:, j], -b[:, j], atol=atol) for j in range(a.shape[1]))


def test_pca_equals_numpy_svd_up_to_sign():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 5.0
    pca = fit_pca2(x)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    assert _same_up_to_sign(pca.project(x), centred @ vt[:2].T)
    np.testing.assert_allclose(pca.explained, s[:2] ** 2 / (s**2).sum(), rtol=1e-9)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(2), atol=1e-9)


def test_pca_of_too_few_points_is_defined():
    assert np.all(fit_pca2(np.zeros((0, 4))).components == 0)
    assert np.all(np.isfinite(fit_pca2(np.ones((1, 4))).project(np.ones((3, 4)))))


def test_map_is_the_pca_of_the_served_embeddings(console):
    answer = console.get("/v1/map").json()
    assert answer["totals"] == {"audio": 600, "visual": 600}
    vectors, coords = [], []
    for modality in ("audio", "visual"):
        points = answer["points"][modality]
        assert len(points["ids"]) == 600 == len(points["xy"])  # the whole index: below the 2000 bound
        assert {"label", "kind"} <= set(points["metadata"][0])
        for item_id in points["ids"][:300]:
            vectors.append(console.get(f"/v1/items/{modality}/{item_id}").json()["embedding"])
        coords.extend(points["xy"][:300])
    # the fit used every sampled point; recompute it from the embeddings the API serves
    all_ids = {m: answer["points"][m]["ids"] for m in ("audio", "visual")}
    full = np.array([console.get(f"/v1/items/{m}/{i}").json()["embedding"] for m in ("audio", "visual") for i in all_ids[m]])
    centred = full - full.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = (np.array(vectors) - full.mean(axis=0)) @ vt[:2].T
    assert _same_up_to_sign(np.array(coords), expected, atol=1e-4)
    np.testing.assert_allclose(answer["mean"], full.mean(axis=0), atol=1e-6)


def test_map_sample_is_bounded_and_cached_until_an_item_changes(console):
    small = console.get("/v1/map", params={"per_modality": 50}).json()
    assert [len(small["points"][m]["ids"]) for m in ("audio", "visual")] == [50, 50]
    assert console.get("/v1/map", params={"per_modality": 50}).json() == small  # same sample, same fit
    for bad in (0, 2001, "x"):
        response = console.get("/v1/map", params={"per_modality": bad})
        assert response.status_code == 422 and "per_modality" in response.json()["detail"]
    vector = np.ones(128).tolist()
    assert console.post("/v1/items/audio", json={"items": [{"id": "new-one", "vector": vector}]}).status_code == 200
    after = console.get("/v1/map").json()
    assert after["totals"]["audio"] == 601 and "new-one" in after["points"]["audio"]["ids"]


def test_locate_projects_stored_items_with_the_maps_axes(console):
    answer = console.get("/v1/map").json()
    mean, axes = np.array(answer["mean"]), np.array(answer["components"])
    ids = ["clip-000001", "clip-000002"]
    located = console.post("/v1/map/locate", json={"modality": "visual", "ids": ids}).json()["points"]
    for point in located:
        embedding = np.array(console.get(f"/v1/items/visual/{point['id']}").json()["embedding"])
        np.testing.assert_allclose([point["x"], point["y"]], (embedding - mean) @ axes.T, atol=1e-6)
    assert [p["id"] for p in located] == ids
    missing = console.post("/v1/map/locate", json={"modality": "visual", "ids": ["nope"]})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert console.post("/v1/map/locate", json={"modality": "visual", "ids": []}).status_code == 422
    assert console.post("/v1/map/locate", json={"modality": "visual", "ids": ids * 9}).status_code == 413


def test_id_suggestions_are_bounded_sorted_and_follow_changes(console):
    found = console.get("/v1/items/audio", params={"prefix": "clip-0001", "limit": 5}).json()
    assert found["ids"] == [f"clip-0001{n:02d}" for n in range(5)] and found["complete"]
    assert console.get("/v1/items/audio", params={"prefix": "zz"}).json()["ids"] == []
    assert len(console.get("/v1/items/visual", params={"limit": 100}).json()["ids"]) == 100
    assert console.get("/v1/items/visual", params={"limit": 101}).status_code == 422
    assert console.get("/v1/items/sound").status_code == 422
    assert console.post("/v1/items/visual", json={"items": [{"id": "zz-new", "vector": np.ones(1024).tolist()}]}).status_code == 200
    assert console.get("/v1/items/visual", params={"prefix": "zz"}).json()["ids"] == ["zz-new"]
    assert console.delete("/v1/items/visual/zz-new").status_code == 200
    assert console.get("/v1/items/visual", params={"prefix": "zz"}).json()["ids"] == []


def test_quantile_of_buckets_interpolates_like_prometheus():
    bounds = (0.001, 0.002, 0.005, float("inf"))
    assert quantile(bounds, (10, 20, 20, 20), 0.5) == pytest.approx(0.001)  # 10 of 20 at or below 1 ms
    assert quantile(bounds, (0, 10, 10, 10), 0.5) == pytest.approx(0.0015)  # half-way through (1, 2] ms
    assert quantile(bounds, (0, 0, 0, 4), 0.99) == 0.005  # the +inf bucket reports the last finite bound
    assert quantile(bounds, (0, 0, 0, 0), 0.5) is None


def test_live_figures_count_searches(console):
    before = console.get("/v1/stats").json()["since_start"]["searches"]
    for _ in range(5):
        assert console.post("/v1/search", json={"modality": "audio", "ids": ["clip-000001"], "top_k": 3}).status_code == 200
    figures = console.get("/v1/stats").json()
    assert figures["since_start"]["searches"] == before + 5
    assert figures["since_start"]["p50_ms"] > 0 and figures["since_start"]["p99_ms"] >= figures["since_start"]["p50_ms"]


def test_index_cards_describe_each_index(console):
    cards = console.get("/v1/indexes").json()
    info = console.get("/v1/info").json()
    for modality in ("audio", "visual"):
        assert cards[modality]["factory"] == info["index_factories"][modality] == "Flat"
        assert cards[modality]["count"] == info["index_sizes"][modality]
        assert cards[modality]["dim"] == info["manifest"]["embedding_dim"]


def test_access_level_of_each_key(tiny, meta_index):
    with make_client(tiny, meta_index) as open_client:
        assert open_client.get("/v1/access").json() == {"access": "open"}
    with make_client(tiny, meta_index, api_key="rw-key", read_api_key="ro-key") as c:
        assert c.get("/v1/access").status_code == 401
        assert c.get("/v1/access", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.get("/v1/access", headers={"Authorization": "Bearer ro-key"}).json() == {"access": "read-only"}
        assert c.get("/v1/access", headers={"Authorization": "Bearer rw-key"}).json() == {"access": "read-write"}
        assert c.get("/ui/").status_code == 200  # the page itself is open: it asks for the key


def test_training_report_plots(tiny, meta_index, tmp_path):
    with make_client(tiny, meta_index) as c:
        assert c.get("/v1/report").json() == {"configured": False, "plots": [], "results_md": None}
        assert c.get("/v1/report/curves.png").status_code == 404
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    (tmp_path / "curves.png").write_bytes(png)
    (tmp_path / "results.md").write_text("# results\n")
    (tmp_path / "notes.txt").write_text("not a plot")
    with make_client(tiny, meta_index, report_dir=tmp_path) as c:
        report = c.get("/v1/report").json()
        assert report["plots"] == ["curves.png"] and report["results_md"] == "# results\n"
        served = c.get("/v1/report/curves.png")
        assert served.status_code == 200 and served.content == png and served.headers["content-type"] == "image/png"
        for name in ("notes.txt", "..%2Fsecret.png", "missing.png"):
            answer = c.get(f"/v1/report/{name}")
            assert answer.status_code == 404 and answer.json()["detail"]


def test_console_files_are_served_and_reference_nothing_outside(console):
    page = console.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert {"console.js", "console.css"} <= set(assets)
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert not re.match(r"^(https?:)?//", asset), f"external asset {asset}"
        assert console.get(f"/ui/{asset}").status_code == 200
    script = console.get("/ui/console.js").text + console.get("/ui/console.css").text
    assert not re.search(r"(src|href|url|import|fetch)\s*[=(]\s*[\"']?(https?:)?//", script)  # no CDN; YouTube links are built, not loaded
    assert console.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_the_console_adds_no_middleware(console):
    """The search path crosses the API's middlewares only (none of the console's own)."""
    assert [m.cls for m in console.app.user_middleware] == [MetricsMiddleware, ApiKeyMiddleware, OriginMiddleware, BodyLimitMiddleware]
