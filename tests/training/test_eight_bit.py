"""8-bit features stay 8-bit in training's memory and are de-quantised per batch, to the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from avdata.features import YOUTUBE8M, dequantize, feature_stats, load_features, save_directory
from avdata.synthetic import SyntheticConfig, generate
from training.config import load_config
from training.train import _as_floats, _scaled_model, embed_all, evaluate_model, train


def test_torch_batches_dequantise_exactly_as_the_data_layer():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(_as_floats(torch.from_numpy(codes)).numpy(), dequantize(codes))
    floats = np.ones((2, 3), np.float32)
    assert _as_floats(torch.from_numpy(floats)).data_ptr() == torch.from_numpy(floats).data_ptr()  # floats pass through


def test_feature_stats_match_float64_reference():
    codes = np.random.default_rng(0).integers(0, 256, (53, 6), dtype=np.uint8)
    x = codes.astype(np.float64) * 4 / 255 + 4 / 512 - 2
    mean, std = feature_stats(codes, rows=7)  # blocks that do not divide the rows
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-6)  # float32 de-quantisation rounds each value by ~1e-7
    np.testing.assert_allclose(std, x.std(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_training_on_8bit_codes_matches_training_on_their_floats(tmp_path):
    cfg = load_config("tiny")
    data = generate(SyntheticConfig(n_clips=300, n_classes=4, hidden_dim=32, quantize=True))
    codes = data.take(np.arange(len(data)))
    codes.audio, codes.visual = YOUTUBE8M.quantize(data.audio), YOUTUBE8M.quantize(data.visual)
    eight = load_features(save_directory(codes, tmp_path / "q"), keep_8bit=True)
    floats = load_features(tmp_path / "q")  # the same files, de-quantised at load
    assert eight.audio.dtype == np.uint8 and eight.audio.nbytes * 4 == floats.audio.nbytes
    np.testing.assert_array_equal(dequantize(eight.visual), floats.visual)
    a, b = _scaled_model(cfg, eight, eight.subset("train")), _scaled_model(cfg, floats, floats.subset("train"))
    for modality in ("audio", "visual"):
        for name in ("feature_mean", "feature_std"):
            torch.testing.assert_close(getattr(a.towers[modality], name), getattr(b.towers[modality], name), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embed_all(a, "audio", eight.audio), embed_all(a, "audio", floats.audio))
    run_8bit, run_float = train(cfg, eight, show_progress=False), train(cfg, floats, show_progress=False)
    assert run_8bit.best_step == run_float.best_step
    m8, mf = evaluate_model(run_8bit.model, run_8bit.cca, eight.subset("test")), evaluate_model(run_float.model, run_float.cca, floats.subset("test"))
    assert abs(m8["avg"] - mf["avg"]) < 0.02
