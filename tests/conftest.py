"""Shared fixtures: one tiny trained, exported and indexed model per test session."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# tests/docker builds and runs the images on a Docker engine: `make docker-test` (docker/test.sh,
# also run by .ci/run) runs it with AVSEARCH_DOCKER_TEST=1 and fails there if anything is missing;
# `make test` needs no engine and leaves it out.
collect_ignore = [] if os.environ.get("AVSEARCH_DOCKER_TEST") == "1" else ["docker"]


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@dataclass
class TinyArtifacts:
    data_dir: Path  # feature directory of the tiny synthetic set
    run_dir: Path  # training run (checkpoint.pt, metrics.json)
    model_dir: Path  # exported ONNX encoders + manifest.json
    index_dir: Path  # audio/ and visual/ FAISS indexes of every clip


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyArtifacts:
    from index.build import build_indexes
    from training.config import load_config
    from avdata.features import load_features, save_directory
    from training.export import export_run
    from avdata.synthetic import generate
    from training.train import CHECKPOINT_NAME, save_checkpoint, train

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny")
    data_dir = save_directory(generate(cfg.synthetic), root / "data")
    data = load_features(data_dir)
    result = train(cfg, data, show_progress=False)
    save_checkpoint(root / "run" / CHECKPOINT_NAME, cfg, data, result)
    export_run(root / "run", root / "model")
    build_indexes(root / "model", data_dir, root / "index", progress=False)
    return TinyArtifacts(data_dir, root / "run", root / "model", root / "index")
