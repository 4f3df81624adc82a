"""A model directory that does not hang together is refused with ModelError, never a KeyError."""

from __future__ import annotations

import json
import shutil

import pytest

from index.embedder import Embedder, ModelError


@pytest.fixture
def model_copy(tiny, tmp_path):
    return shutil.copytree(tiny.model_dir, tmp_path / "model")


def test_an_encoder_from_another_export_is_refused(model_copy, tiny, tmp_path):
    Embedder(model_copy, device="cpu")  # the intact copy loads
    (model_copy / "audio_encoder.onnx").write_bytes((model_copy / "visual_encoder.onnx").read_bytes())
    with pytest.raises(ModelError, match="does not match the sha256"):
        Embedder(model_copy, device="cpu")


@pytest.mark.parametrize("key", ["files", "input_dims", "embedding_dim"])
def test_a_manifest_without_a_required_key_is_refused(model_copy, key):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    del manifest[key]
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=key):
        Embedder(model_copy, device="cpu")


def test_a_missing_encoder_file_is_refused(model_copy):
    (model_copy / "visual_encoder.onnx").unlink()
    with pytest.raises(ModelError, match="cannot be read"):
        Embedder(model_copy, device="cpu")
