"""`python -m service`: start-up problems end with exit code 2 and one readable line, before binding a port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def serve(model: Path, index: Path, **env: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "service", "serve", "--model", str(model), "--index", str(index), "--port", "1"]  # port 1: never bound
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def one_error_line(out: subprocess.CompletedProcess) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert not out.stdout  # nothing printed as if serving
    return errors[0]


@pytest.fixture
def copies(tiny, tmp_path):
    shutil.copytree(tiny.model_dir, tmp_path / "model")
    shutil.copytree(tiny.index_dir, tmp_path / "index")
    return tmp_path / "model", tmp_path / "index"


def test_missing_model(copies, tmp_path):
    assert "manifest.json: missing" in one_error_line(serve(tmp_path / "nowhere", copies[1]))


def test_corrupt_model(copies):
    model, index = copies
    (model / "audio_encoder.onnx").write_bytes(b"not onnx")
    assert "does not match the sha256 in manifest.json" in one_error_line(serve(model, index))
    # A manifest without checksums (hand-made): ONNX Runtime itself refuses the file.
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["onnx_sha256"]
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot be loaded by ONNX Runtime" in one_error_line(serve(model, index))


def test_missing_index(copies, tmp_path):
    assert "incomplete index" in one_error_line(serve(copies[0], tmp_path / "no-index"))


def test_corrupt_index(copies):
    model, index = copies
    items = index / "visual" / "items.bin"
    items.write_bytes(items.read_bytes()[:-20])
    assert "corrupt index" in one_error_line(serve(model, index))


def test_index_from_another_model(copies):
    model, index = copies
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["created"] = "another export"
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert "rebuild the index" in one_error_line(serve(model, index))


def test_invalid_setting(copies):
    line = one_error_line(serve(*copies, AVSEARCH_MAX_TOP_K="many"))
    assert "settings.max_top_k" in line and "integer" in line
    assert "AVSEARCH_API_KEY is not" in one_error_line(serve(*copies, AVSEARCH_READ_API_KEY="ro"))


def test_example_writes_a_search_body(tiny, tmp_path):
    out = subprocess.run([sys.executable, "-m", "service", "example", "--data", str(tiny.data_dir), "--out", str(tmp_path / "q.json")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    body = json.loads((tmp_path / "q.json").read_text())
    assert body["modality"] == "audio" and len(body["vectors"][0]) == 128 and body["top_k"] == 10


def test_example_reads_integer_splits_and_refuses_a_split_without_test_rows(tiny, tmp_path):
    import numpy as np

    from service.__main__ import main

    data = shutil.copytree(tiny.data_dir, tmp_path / "data")
    names = np.load(data / "split.npy")
    np.save(data / "split.npy", np.select([names == "train", names == "val"], [0, 1], 2))  # the documented 0/1/2 form
    assert main(["example", "--data", str(data), "--out", str(tmp_path / "q.json")]) == 0
    test_rows = np.flatnonzero(names == "test")
    want = np.load(data / "audio_features.npy")[test_rows[-1]]
    np.testing.assert_allclose(json.loads((tmp_path / "q.json").read_text())["vectors"][0], want, atol=1e-6)
    np.save(data / "split.npy", np.zeros(len(names), dtype=np.int64))
    assert main(["example", "--data", str(data), "--out", str(tmp_path / "q2.json")]) == 2


def test_serve_caps_blas_and_faiss_threads():
    """Spare BLAS threads spin after each small search and starve the event loop (bench/results/http_bench.md)."""
    code = (
        "import faiss, numpy, threadpoolctl\n"
        "from service.threads import limit_threads\n"
        "from service.settings import Settings\n"
        "limit_threads(Settings(search_threads=1))\n"
        "blas = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
        "print(blas, faiss.omp_get_max_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    blas, omp = out.stdout.rsplit(" ", 1)
    assert set(json.loads(blas)) == {1} and int(omp) == 1
