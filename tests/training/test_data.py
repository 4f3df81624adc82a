from __future__ import annotations

import numpy as np
import pytest

from avdata.features import DataError, dequantize, load_features, make_paired, save_directory
from avdata.synthetic import SyntheticConfig, generate, generate_chunks


def _write(tmp_path, **arrays):
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    return tmp_path


def _ok_arrays(n=20):
    rng = np.random.default_rng(0)
    return {"audio_features": rng.standard_normal((n, 8)).astype(np.float32), "visual_features": rng.standard_normal((n, 12)).astype(np.float32)}


def test_directory_round_trip(tmp_path):
    data = generate(SyntheticConfig(n_clips=50, n_classes=3, hidden_dim=16))
    loaded = load_features(save_directory(data, tmp_path))
    np.testing.assert_array_equal(loaded.audio, data.audio)
    np.testing.assert_array_equal(loaded.visual, data.visual)
    np.testing.assert_array_equal(loaded.labels, data.labels)
    assert loaded.ids == data.ids
    assert list(loaded.split) == list(data.split)


def test_directory_without_split_gets_a_seeded_split(tmp_path):
    loaded = load_features(_write(tmp_path, **_ok_arrays(100)))
    assert set(loaded.split) == {"train", "val", "test"}
    again = load_features(tmp_path)
    assert list(again.split) == list(loaded.split)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(visual_features=a["visual_features"][:-1]), "rows must pair up"),
        (lambda a: a["audio_features"].__setitem__((3, 2), np.nan), "NaN/Inf"),
        (lambda a: a["visual_features"].__setitem__((0, 0), np.inf), "NaN/Inf"),
        (lambda a: a.update(audio_features=np.zeros((0, 8), np.float32), visual_features=np.zeros((0, 12), np.float32)), "empty"),
        (lambda a: a.update(audio_features=np.array(["x"] * 20).reshape(20, 1)), "dtype"),
        (lambda a: a.update(audio_features=np.ones(20, np.float32)), "2-D"),
        (lambda a: a.update(labels=np.zeros(19, np.int64)), "labels"),
        (lambda a: a.update(split=np.array(["train"] * 19 + ["dev"])), "unknown split"),
    ],
)
def test_bad_directory_input_names_the_file_and_problem(tmp_path, mutate, message):
    arrays = _ok_arrays()
    mutate(arrays)
    _write(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_features(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_file_and_missing_path(tmp_path):
    np.save(tmp_path / "audio_features.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="visual_features.npy: missing"):
        load_features(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_features(tmp_path / "nope")


def test_corrupt_npy_is_a_data_error(tmp_path):
    (tmp_path / "audio_features.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "visual_features.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="not a readable .npy"):
        load_features(tmp_path)


def test_uint8_features_are_dequantised_by_youtube8m_rule():
    q = np.arange(256, dtype=np.uint8)[None, :]
    data = make_paired(q, q)
    # YouTube-8M starter code's Dequantize(feat, max=2, min=-2): feat * 4/255 + 4/512 - 2, in float64.
    want = q.astype(np.float64) * (4 / 255) + 4 / 512 - 2
    np.testing.assert_allclose(data.audio, want, rtol=0, atol=1e-6)
    assert data.audio[0, 0] == np.float32(-2 + 4 / 512) and data.audio[0, 255] == np.float32(2 + 4 / 512)
    np.testing.assert_allclose(dequantize(q), data.audio)


def test_hdf5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    path = tmp_path / "feat.h5"
    with h5py.File(path, "w") as f:
        for part, n in (("train", 40), ("test", 10)):
            f[f"audio_{part}"] = rng.standard_normal((n, 128)).astype(np.float32)
            f[f"visual_{part}"] = rng.standard_normal((n, 1024)).astype(np.float32)
            f[f"lab_{part}"] = rng.integers(0, 4, size=(n, 1))
    data = load_features(path)
    assert len(data) == 50
    assert (data.split == "test").sum() == 10
    assert (data.split == "val").sum() == 4  # carved from train, never from test
    assert set(data.split[40:]) == {"test"}
    assert data.labels.shape == (50,)


def test_hdf5_missing_key(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["audio_train"] = np.zeros((2, 3))
    with pytest.raises(DataError, match="missing HDF5 datasets"):
        load_features(path)


def test_synthetic_is_seeded_and_quantisable():
    a = generate(SyntheticConfig(n_clips=100, n_classes=4, hidden_dim=16, seed=3))
    b = generate(SyntheticConfig(n_clips=100, n_classes=4, hidden_dim=16, seed=3))
    c = generate(SyntheticConfig(n_clips=100, n_classes=4, hidden_dim=16, seed=4))
    np.testing.assert_array_equal(a.visual, b.visual)
    assert not np.allclose(a.visual, c.visual)
    q = generate(SyntheticConfig(n_clips=100, n_classes=4, hidden_dim=16, quantize=True))
    steps = (q.audio.astype(np.float64) + 2 - 4 / 512) * 255 / 4  # back to the 8-bit codes
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert (q.visual >= -2).all() and (q.visual <= 2 + 4 / 512).all()
    assert a.audio.shape == (100, 128) and a.visual.shape == (100, 1024)


def test_synthetic_default_is_hard_for_linear_cca():
    """The embedded default leaves linear CCA on raw features far from perfect (and far above chance)."""
    from training.cca import fit_linear_cca
    from training.metrics import cross_modal_metrics

    data = generate(SyntheticConfig(n_clips=3000))
    train, test = data.subset("train"), data.subset("test")
    mean_a, std_a = train.audio.mean(0), train.audio.std(0) + 1e-6
    mean_v, std_v = train.visual.mean(0), train.visual.std(0) + 1e-6
    cca = fit_linear_cca((train.audio - mean_a) / std_a, (train.visual - mean_v) / std_v, 10, 1e-4)
    m = cross_modal_metrics(cca.transform((test.audio - mean_a) / std_a, "a"), cca.transform((test.visual - mean_v) / std_v, "b"), test.labels)
    chance = np.mean(np.bincount(test.labels) / len(test.labels))
    assert 1.5 * chance < m["avg"] < 0.6


def _class_means(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)])


def test_chunked_collection_is_seeded_and_of_the_same_world():
    cfg = SyntheticConfig(n_clips=4000, seed=3)
    reference = generate(cfg)
    chunks = list(generate_chunks(cfg, 2500, chunk_rows=1000))
    assert [len(ids) for *_, ids in chunks] == [1000, 1000, 500]
    ids = [i for *_, chunk_ids in chunks for i in chunk_ids]
    assert len(set(ids)) == 2500 and not set(ids) & set(reference.ids)
    again = next(generate_chunks(cfg, 2500, chunk_rows=1000))
    assert np.array_equal(again[1], chunks[0][1]) and not np.array_equal(chunks[0][1], chunks[1][1][:1000])
    visual = np.concatenate([v for _, v, _, _ in chunks])
    labels = np.concatenate([lab for _, _, lab, _ in chunks])
    assert visual.dtype == np.float32 and visual.shape == (2500, cfg.visual_dim)
    # Same world = same class prototypes seen through the same maps: the class means agree with
    # generate()'s far better than with another seed's world.
    ours = _class_means(visual, labels, cfg.n_classes)
    same = _class_means(reference.visual, reference.labels, cfg.n_classes)
    other_cfg = SyntheticConfig(n_clips=4000, seed=4)
    other = generate(other_cfg)
    different = _class_means(other.visual, other.labels, cfg.n_classes)
    assert np.abs(ours - same).mean() < 0.3 * np.abs(ours - different).mean()
