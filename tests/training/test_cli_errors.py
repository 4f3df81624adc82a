"""Bad input to `python -m training` ends with exit code 2 and one readable line, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from training.__main__ import main


def _features(path, n=60, labels=True, split=None):
    rng = np.random.default_rng(0)
    path.mkdir()
    np.save(path / "audio_features.npy", rng.standard_normal((n, 128)).astype(np.float32))
    np.save(path / "visual_features.npy", rng.standard_normal((n, 1024)).astype(np.float32))
    if labels:
        np.save(path / "labels.npy", rng.integers(0, 3, n))
    if split is not None:
        np.save(path / "split.npy", np.asarray(split))
    return path


def _fails_with(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err


def test_selecting_by_labels_without_labels(tmp_path, capsys):
    data = _features(tmp_path / "d", labels=False)
    _fails_with(capsys, ["train", "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet", "--select", "labels"], "use --select pairs")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_training_with_an_empty_validation_split(tmp_path, capsys):
    data = _features(tmp_path / "d", split=["train"] * 50 + ["test"] * 10)
    _fails_with(capsys, ["train", "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"], "'val' split has no rows")


@pytest.mark.parametrize("text, message", [("model: {hidden_dim: [", "not valid YAML"), ("- just\n- a list\n", "expected a mapping")])
def test_a_broken_config_file(tmp_path, capsys, text, message):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    _fails_with(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], message)


def test_a_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _fails_with(capsys, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "model")], "not a readable avsearch checkpoint")
    assert not (tmp_path / "model" / "manifest.json").exists()
