from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from index.embedder import Embedder
from training.data import load_features
from training.export import ExportError, export_run, serving_encoders
from training.train import load_checkpoint


def test_onnx_matches_pytorch_on_held_out_clips(tiny):
    """The served embedding (ONNX Runtime) equals the evaluated one (PyTorch) on test clips."""
    _, model, cca, _, _ = load_checkpoint(tiny.run_dir)
    encoders = serving_encoders(model, cca)
    test = load_features(tiny.data_dir).subset("test")
    embedder = Embedder(tiny.model_dir, device="cpu")
    for modality in ("audio", "visual"):
        x = getattr(test, modality)
        with torch.no_grad():
            want = encoders[modality](torch.from_numpy(x)).numpy()
        got = embedder.embed(modality, x)
        assert got.shape == (len(x), embedder.embedding_dim)
        assert np.max(np.abs(got - want)) <= 1e-5
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # The CCA projection is really in the graph: it is not the raw head output.
        with torch.no_grad():
            raw = model.towers[modality](torch.from_numpy(x)).numpy()
        assert raw.shape[1] != got.shape[1] or not np.allclose(raw, got, atol=1e-3)


def test_manifest_card(tiny):
    manifest = json.loads((tiny.model_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["input_dims"] == {"audio": 128, "visual": 1024}
    assert manifest["embedding_dim"] == 8
    assert len(manifest["source_checkpoint_sha256"]) == 64
    assert len(manifest["feature_scaling"]["visual"]["mean"]) == 1024
    assert all(v <= 1e-5 for v in manifest["parity_max_abs_diff"].values())
    # The tiny run trained on a feature directory: its held-out test clips were the parity inputs.
    assert manifest["parity_check"]["inputs"].startswith(f"120 held-out test clips of {tiny.data_dir}")  # 20 % of 600
    assert manifest["opset"] >= 17


def test_dynamic_batch_axis_one_clip_at_a_time(tiny):
    _, model, cca, _, _ = load_checkpoint(tiny.run_dir)
    encoders = serving_encoders(model, cca)
    embedder = Embedder(tiny.model_dir, device="cpu")
    x = load_features(tiny.data_dir).subset("val").audio[:7]
    together = embedder.embed("audio", x)
    alone = np.vstack([embedder.embed("audio", row[None]) for row in x])
    np.testing.assert_allclose(alone, together, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(alone, encoders["audio"](torch.from_numpy(x)).numpy(), atol=1e-5)


def test_parity_inputs_fall_back_when_the_data_is_gone(tiny, tmp_path):
    """A checkpoint whose data source cannot be found is checked on seeded inputs, and says so."""
    from training.data import load_features as load

    manifest = export_run(tiny.run_dir, tmp_path / "given", data=load(tiny.data_dir))
    assert "held-out test clips" in manifest["parity_check"]["inputs"]
    manifest = export_run(tiny.run_dir, tmp_path / "seeded", data=tmp_path / "no-such-dir")
    assert manifest["parity_check"]["inputs"].startswith("64 seeded Gaussian inputs")
    assert all(v <= 1e-5 for v in manifest["parity_max_abs_diff"].values())


def test_export_refuses_a_model_that_fails_parity(tiny, tmp_path):
    with pytest.raises(ExportError, match="not written"):
        export_run(tiny.run_dir, tmp_path / "model", tolerance=0.0)
    assert not (tmp_path / "model" / "manifest.json").exists()


def test_served_embedding_equals_the_evaluated_one(tiny):
    """ONNX Runtime output equals what `evaluate_model` scores: embed_all on the teacher, then the CCA."""
    from training.train import embed_all

    _, model, cca, _, _ = load_checkpoint(tiny.run_dir)
    test = load_features(tiny.data_dir).subset("test")
    embedder = Embedder(tiny.model_dir, device="cpu")
    for modality, side in (("audio", "a"), ("visual", "b")):
        x = getattr(test, modality)
        evaluated = cca.transform(embed_all(model, modality, x), side)
        np.testing.assert_allclose(embedder.embed(modality, x), evaluated, atol=1e-5)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_export_refuses_a_graph_whose_output_is_not_finite(tiny, tmp_path, poison):
    """NaN compares false with everything, so a parity check must not let a NaN graph through."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny.run_dir, run)
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    payload["state_dict"]["towers.audio.head.bias"][0] = poison
    torch.save(payload, run / "checkpoint.pt")
    with pytest.raises(ExportError, match="not finite"):
        export_run(run, tmp_path / "model", data=tiny.data_dir)
    assert not (tmp_path / "model" / "manifest.json").exists()
